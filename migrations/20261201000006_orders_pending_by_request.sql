-- no-transaction
-- A dead-lettered order creation rejects its order, found by the request that created it.
-- Partial: only PENDING orders are ever looked up this way, and few are PENDING at a time.
-- Built concurrently, so that starting a new version does not block order writes while
-- the index is built over a large table (hence outside a transaction).
CREATE INDEX CONCURRENTLY IF NOT EXISTS orders_pending_by_request
    ON orders (create_request_id) WHERE status = 'PENDING';
