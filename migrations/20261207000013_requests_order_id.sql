-- The order an order command is about, typed: the order an ORDER_CREATE creates, the order
-- an ORDER_PAY pays. The api writes it with the request, from the same value as the
-- payload's `orderId`, so that settlement locks and joins on a uuid column rather than
-- casting the payload's text behind a regular expression. Requests still pending get it
-- from their payload here; settled ones keep NULL.
ALTER TABLE requests ADD COLUMN order_id UUID;
UPDATE requests SET order_id = (payload->>'orderId')::uuid
 WHERE status = 'PENDING' AND kind IN ('ORDER_CREATE', 'ORDER_PAY')
   AND payload->>'orderId' ~* '^[0-9a-f]{8}-([0-9a-f]{4}-){3}[0-9a-f]{12}$';

-- During a rolling upgrade an api of the previous version still inserts requests without
-- `order_id`; the workers of this version would find no order for them and refuse the
-- commands. Until no such api runs, the column is filled from the payload on insert (the
-- trigger fires only when it is missing: this version's api never calls the function).
-- A later migration drops it.
CREATE FUNCTION requests_order_id_from_payload() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.payload->>'orderId' ~* '^[0-9a-f]{8}-([0-9a-f]{4}-){3}[0-9a-f]{12}$' THEN
        NEW.order_id := (NEW.payload->>'orderId')::uuid;
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER requests_order_id_from_payload
    BEFORE INSERT ON requests
    FOR EACH ROW
    WHEN (NEW.order_id IS NULL AND NEW.kind IN ('ORDER_CREATE', 'ORDER_PAY'))
    EXECUTE FUNCTION requests_order_id_from_payload();
