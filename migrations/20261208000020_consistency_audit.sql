-- The consistency audit: the batch job that checks, after the fact, that the stored data
-- still adds up (shared::store::audit).

-- The `order.paid` event a paid order's settlement wrote, set in the same statement that
-- marks the order PAID (no row write of its own). The relay deletes an outbox row once the
-- broker confirmed it, so once published an event leaves no other trace here: this column
-- is what lets the audit tell a paid order whose event went out from one that never had
-- one, and a second event of an order from its first.
ALTER TABLE orders ADD COLUMN paid_event_id UUID;

-- Orders paid before this column: their event, when it is still in the outbox...
UPDATE orders o SET paid_event_id = e.id
FROM outbox e
WHERE o.status = 'PAID' AND o.paid_event_id IS NULL
  AND e.routing_key = 'order.paid' AND e.payload->>'orderId' = o.id::text;
-- ...otherwise the nil UUID: an event published before this column existed, whose id was
-- not kept. The audit counts it as the order's one event.
UPDATE orders SET paid_event_id = '00000000-0000-0000-0000-000000000000'
WHERE status = 'PAID' AND paid_event_id IS NULL;

COMMENT ON COLUMN orders.paid_event_id IS
    'The order.paid event written with the payment (the nil UUID: published before migration 020).';

-- The audit is a job of its own in job_runs.
ALTER TABLE job_runs DROP CONSTRAINT job_runs_job_check;
ALTER TABLE job_runs ADD CONSTRAINT job_runs_job_check
    CHECK (job IN ('popular-products', 'reservation-expiry', 'housekeeping', 'consistency-audit'));
