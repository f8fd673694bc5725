-- The same effect as flash_sale.sql in a single autocommit statement: the strongest
-- synchronous design, with no client round trip while the hot row is locked.
\set uid 1 + :client_id + :n * :clients
\set n :n + 1
WITH taken AS (
    UPDATE bench_coupons SET issued = issued + 1 WHERE id = 1 AND issued < total RETURNING id)
INSERT INTO bench_user_coupons (coupon_id, user_id) SELECT id, :uid FROM taken;
