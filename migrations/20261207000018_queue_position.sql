-- A request's place in its partition's queue, and how fast each partition settles.
--
-- Pending requests in acceptance order: request ids are UUIDv7 made at acceptance, so by id
-- is by acceptance. The key the partition hashes is carried in the index, so that the api
-- reads a family's whole queue (which it splits into partitions itself, with the
-- partition count it routes by) from the index alone, never from the table. Only PENDING
-- rows are in it: a settled request leaves it, and it stays as small as the backlog.
CREATE INDEX requests_pending_in_order ON requests (kind, id) INCLUDE (partition_key)
    WHERE status = 'PENDING';

-- How fast each partition settles, kept by the worker that owns it: one row per partition,
-- changed by the statement that commits each settled batch (so one row write per batch,
-- never one per command). `recent` is the number of commands settled, each weighted by
-- exp(-age / 10 s); `span` is the time those weights cover, in seconds, since the partition
-- last started settling after a pause; `recent / span` is its settle rate per second.
-- Written only by the lease holder of the partition, inside its fenced batch, so two
-- writers never race on a row.
CREATE TABLE partition_settlements (
    family          TEXT             NOT NULL,
    partition       INT              NOT NULL CHECK (partition >= 0),
    settled         BIGINT           NOT NULL CHECK (settled >= 0),
    last_settled_at TIMESTAMPTZ      NOT NULL,
    recent          DOUBLE PRECISION NOT NULL CHECK (recent >= 0),
    span            DOUBLE PRECISION NOT NULL CHECK (span >= 0),
    PRIMARY KEY (family, partition)
) WITH (fillfactor = 50);
