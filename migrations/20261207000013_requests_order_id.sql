-- The order an order command is about, typed: the order an ORDER_CREATE creates, the order
-- an ORDER_PAY pays. The api writes it with the request, from the same value as the
-- payload's `orderId`, so that settlement locks and joins on a uuid column rather than
-- casting the payload's text behind a regular expression. Requests still pending get it
-- from their payload here (the last time that cast is needed); settled ones keep NULL.
ALTER TABLE requests ADD COLUMN order_id UUID;
UPDATE requests SET order_id = (payload->>'orderId')::uuid
 WHERE status = 'PENDING' AND kind IN ('ORDER_CREATE', 'ORDER_PAY')
   AND payload->>'orderId' ~* '^[0-9a-f]{8}-([0-9a-f]{4}-){3}[0-9a-f]{12}$';
