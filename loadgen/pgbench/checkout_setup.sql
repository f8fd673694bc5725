-- Scratch tables of the synchronous checkout baseline: users with balances, products with
-- stock, payments. Run with psql: -v users=N -v products=P -v stock=S -v balance=B.
-- Only bench_* tables are touched; the app's schema is left alone.
\set ON_ERROR_STOP on
DROP TABLE IF EXISTS bench_payments, bench_balances, bench_products, bench_users;

CREATE TABLE bench_users (
    id   BIGINT PRIMARY KEY,
    name TEXT   NOT NULL
);

CREATE TABLE bench_balances (
    user_id    BIGINT      PRIMARY KEY REFERENCES bench_users (id),
    amount     BIGINT      NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT bench_balance_not_negative CHECK (amount >= 0)
);

CREATE TABLE bench_products (
    id    BIGINT PRIMARY KEY,
    price BIGINT NOT NULL,
    stock BIGINT NOT NULL,
    sold  BIGINT NOT NULL DEFAULT 0,
    CONSTRAINT bench_product_price_positive CHECK (price > 0),
    CONSTRAINT bench_product_stock_not_negative CHECK (stock >= 0)
);

CREATE TABLE bench_payments (
    id         UUID        PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id    BIGINT      NOT NULL REFERENCES bench_users (id),
    product_id BIGINT      NOT NULL REFERENCES bench_products (id),
    amount     BIGINT      NOT NULL CHECK (amount >= 0),
    created_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
);

INSERT INTO bench_users SELECT g, 'u' || g FROM generate_series(1, :users) AS g;
INSERT INTO bench_balances (user_id, amount) SELECT g, :balance FROM generate_series(1, :users) AS g;
-- Prices from 10,000 to 14,900 won, as the scenario's products.
INSERT INTO bench_products (id, price, stock)
SELECT g, 10000 + 100 * ((g - 1) % 50), :stock FROM generate_series(1, :products) AS g;
VACUUM ANALYZE bench_users, bench_balances, bench_products, bench_payments;
