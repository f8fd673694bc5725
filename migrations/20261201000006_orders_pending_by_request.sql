-- A dead-lettered order creation rejects its order, found by the request that created it.
-- Partial: only PENDING orders are ever looked up this way, and few are PENDING at a time.
CREATE INDEX orders_pending_by_request ON orders (create_request_id) WHERE status = 'PENDING';
