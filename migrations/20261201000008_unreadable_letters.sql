-- Dead-lettered messages that are not a command of their queue's family (a body no worker
-- can decode, or a command published to the other family's queues). There is no request
-- to fail and no request id to name them by, so each is named by the MD5 of its body, as a
-- UUID: the copies of one message (dead letters arrive at least once) share one row, and
-- the parked copy carries the same id as its AMQP message id, for `discard` to find.
CREATE TABLE unreadable_letters (
    id          UUID        PRIMARY KEY,
    family      TEXT        NOT NULL,
    reason      TEXT        NOT NULL,
    -- The body's size and its first bytes, escaped, for an operator to tell what it is.
    bytes       INTEGER     NOT NULL,
    preview     TEXT        NOT NULL,
    dead_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    resolution  TEXT        CHECK (resolution = 'discarded'),
    resolved_at TIMESTAMPTZ
);
CREATE INDEX unreadable_letters_open ON unreadable_letters (dead_at) WHERE resolution IS NULL;
