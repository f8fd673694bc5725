-- One checkout as a synchronous API would handle it, in one transaction with one round
-- trip per statement: take a unit of stock, debit the balance if it covers the price,
-- write the payment, commit. A refusal (no stock, no money) would fail the \gset and abort
-- the client; the setup gives enough of both, so every transaction pays.
-- pgbench -D clients=C -D n=0 -D products=P: every transaction is a different user, and
-- users are spread over the products in turn, as in the scenario.
\set uid 1 + :client_id + :n * :clients
\set n :n + 1
\set pid 1 + (:uid % :products)
BEGIN;
UPDATE bench_products SET stock = stock - 1, sold = sold + 1 WHERE id = :pid AND stock >= 1 RETURNING price \gset
UPDATE bench_balances SET amount = amount - :price, updated_at = now()
  WHERE user_id = :uid AND amount >= :price RETURNING amount \gset
INSERT INTO bench_payments (user_id, product_id, amount) VALUES (:uid, :pid, :price);
COMMIT;
