-- A dead-lettered order creation rejects its order, found by the request that created it.
-- Partial: only PENDING orders are ever looked up this way, and few are PENDING at a time.
--
-- Not CREATE INDEX CONCURRENTLY: every process migrates at start under one advisory lock,
-- and a concurrent build waits for the snapshots of the processes queued on that lock,
-- which wait for it: PostgreSQL breaks the deadlock, and the retried migration found an
-- invalid index already there. The build blocks order writes while it scans `orders`
-- once; with a very large table, create the same index CONCURRENTLY by hand before
-- upgrading, and this statement does nothing.
CREATE INDEX IF NOT EXISTS orders_pending_by_request
    ON orders (create_request_id) WHERE status = 'PENDING';
