-- The batch: a record of every job run, the daily sales rollup and the popular-products
-- snapshot that `GET /products/popular` is served from.

-- One row per run of a scheduled job. `period` is the scheduled slot a run is for (the cron
-- occurrence it belongs to); on-demand runs record when they were asked for. A scheduled slot
-- can have at most one run that is under way or succeeded, whatever the number of batch
-- replicas: claiming a slot is an INSERT that this index turns into a no-op for the losers.
-- A failed or abandoned run leaves the slot free for a retry, and its row stays as history.
CREATE TABLE job_runs (
    id          BIGINT      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job         TEXT        NOT NULL CHECK (job IN ('popular-products', 'reservation-expiry', 'housekeeping')),
    period      TIMESTAMPTZ NOT NULL,
    -- SCHEDULE: the cron or the catch-up at start; MANUAL: `batch run <job>`; ADMIN: the API.
    trigger     TEXT        NOT NULL CHECK (trigger IN ('SCHEDULE', 'MANUAL', 'ADMIN')),
    -- ABANDONED: the process running it died; found and marked by the next run of the job.
    outcome     TEXT        NOT NULL DEFAULT 'RUNNING'
                CHECK (outcome IN ('RUNNING', 'SUCCEEDED', 'FAILED', 'ABANDONED')),
    -- Which process ran it (host and pid), for operators.
    runner      TEXT        NOT NULL,
    started_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    finished_at TIMESTAMPTZ,
    -- Rows the run wrote or deleted.
    rows        BIGINT      CHECK (rows >= 0),
    error       TEXT,
    CONSTRAINT job_run_finished_unless_running CHECK ((outcome = 'RUNNING') = (finished_at IS NULL)),
    CONSTRAINT job_run_success_counts_rows CHECK (outcome <> 'SUCCEEDED' OR rows IS NOT NULL),
    CONSTRAINT job_run_failure_has_error CHECK (outcome <> 'FAILED' OR error IS NOT NULL)
);
CREATE UNIQUE INDEX job_runs_once_per_period ON job_runs (job, period)
    WHERE trigger = 'SCHEDULE' AND outcome IN ('RUNNING', 'SUCCEEDED');
CREATE INDEX job_runs_by_job ON job_runs (job, started_at DESC);

-- Units of each product sold (in PAID orders) per UTC day of payment. Rebuilt for the last
-- days by every rollup, so a rerun for the same period writes the same rows.
CREATE TABLE daily_product_sales (
    day           DATE        NOT NULL,
    product_id    BIGINT      NOT NULL REFERENCES products (id),
    sold_quantity BIGINT      NOT NULL CHECK (sold_quantity > 0),
    computed_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (day, product_id)
);

-- The ranking the API serves by default, one per day it was computed for (`as_of`, the UTC
-- day of the run): the `days` whole days before it, ranked by units sold, ties to the lower
-- product id.
CREATE TABLE popular_snapshots (
    as_of       DATE        PRIMARY KEY,
    days        INT         NOT NULL CHECK (days BETWEEN 1 AND 30),
    item_limit  INT         NOT NULL CHECK (item_limit BETWEEN 1 AND 50),
    from_day    DATE        NOT NULL,
    to_day      DATE        NOT NULL,
    computed_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT popular_snapshot_window CHECK (to_day = as_of - 1 AND from_day = as_of - days)
);

CREATE TABLE popular_snapshot_items (
    as_of         DATE   NOT NULL REFERENCES popular_snapshots (as_of) ON DELETE CASCADE,
    rank          INT    NOT NULL CHECK (rank >= 1),
    product_id    BIGINT NOT NULL REFERENCES products (id),
    sold_quantity BIGINT NOT NULL CHECK (sold_quantity > 0),
    PRIMARY KEY (as_of, rank),
    CONSTRAINT popular_snapshot_product_once UNIQUE (as_of, product_id)
);

-- The rollup reads paid orders by time of payment, never the whole table.
CREATE INDEX orders_paid_by_time ON orders (paid_at) WHERE status = 'PAID';
