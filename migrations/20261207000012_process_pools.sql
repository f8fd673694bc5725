-- Every process announces the size of its connection pool here and heartbeats the row, so
-- that each one, at start, can add up the pools of the live processes and warn when they
-- ask for more connections than PostgreSQL allows. A row not heard from for a while is a
-- process that is gone.
CREATE TABLE process_pools (
    id           UUID        PRIMARY KEY,
    process      TEXT        NOT NULL,
    host         TEXT        NOT NULL,
    pid          INT         NOT NULL,
    pool_size    INT         NOT NULL CHECK (pool_size > 0),
    started_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    heartbeat_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
