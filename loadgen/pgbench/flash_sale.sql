-- One coupon request as a synchronous API would handle it, in its own transaction with
-- one round trip per statement: take the hot coupon row if any is left, then write the
-- user's coupon, then commit. The row lock is held from the UPDATE to the COMMIT.
-- pgbench -D clients=C -D n=0: every transaction is a different user (1, 2, 3, ...).
\set uid 1 + :client_id + :n * :clients
\set n :n + 1
BEGIN;
WITH taken AS (
    UPDATE bench_coupons SET issued = issued + 1 WHERE id = 1 AND issued < total RETURNING id)
SELECT count(*) AS issued FROM taken \gset
\if :issued
INSERT INTO bench_user_coupons (coupon_id, user_id) VALUES (1, :uid);
\endif
COMMIT;
