-- Why a worker gave up on a command (its last settlement error), beside the broker's
-- reason: `rejected` alone does not tell an operator what to fix.
ALTER TABLE dead_letters ADD COLUMN detail TEXT;

-- A worker notes that error here just before it rejects the message, apart from
-- dead_letters: the letter itself is opened only once the message has reached the
-- dead-letter queue, which then takes the note over. A note whose reject never happened
-- (the message came back and settled) opens nothing and is only read if its request dies.
CREATE TABLE settle_failures (
    request_id UUID        PRIMARY KEY,
    detail     TEXT        NOT NULL,
    noted_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- A replay that would change nothing now leaves its letter open rather than recording
-- 'no-op', so that it can still be discarded; the value stays allowed for old rows.
