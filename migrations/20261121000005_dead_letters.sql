-- Commands that could not be settled, as operators see them: which request, why it was
-- dead-lettered, and what an operator did about it. The message itself rests in the
-- family's parked queue; this row is its index and its history.
CREATE TABLE dead_letters (
    request_id  UUID        PRIMARY KEY,
    family      TEXT        NOT NULL,
    kind        TEXT        NOT NULL,
    -- From the broker's x-death header: delivery_limit (redelivered too often), rejected
    -- (a worker gave up after its attempts), expired, or maxlen.
    reason      TEXT        NOT NULL,
    dead_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    resolution  TEXT        CHECK (resolution IN ('replayed', 'discarded', 'no-op')),
    resolved_at TIMESTAMPTZ
);
CREATE INDEX dead_letters_open ON dead_letters (dead_at) WHERE resolution IS NULL;
