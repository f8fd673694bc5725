-- Users, balances with their ledger, products, and idempotency keys.
-- Constraints back the invariants so that a bug becomes an error, not bad data.

CREATE TABLE users (
    id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name       TEXT        NOT NULL CHECK (char_length(name) BETWEEN 1 AND 100),
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- One row per user, created with the user, so a charge is a single UPDATE that takes the
-- row lock: concurrent charges of one user queue on it instead of conflicting.
CREATE TABLE balances (
    user_id    BIGINT      PRIMARY KEY REFERENCES users (id),
    amount     BIGINT      NOT NULL DEFAULT 0,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT balance_not_negative CHECK (amount >= 0),
    CONSTRAINT balance_within_cap CHECK (amount <= 1000000000)
);

-- The ledger: every change of a balance, written in the same transaction as the change.
-- The balance equals CHARGE + REFUND - PAYMENT over a user's rows.
CREATE TABLE balance_transactions (
    id            BIGINT      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id       BIGINT      NOT NULL REFERENCES users (id),
    kind          TEXT        NOT NULL CHECK (kind IN ('CHARGE', 'PAYMENT', 'REFUND')),
    amount        BIGINT      NOT NULL CHECK (amount > 0),
    balance_after BIGINT      NOT NULL CHECK (balance_after >= 0),
    order_id      UUID,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX balance_transactions_by_user ON balance_transactions (user_id, id DESC);

-- `stock` is on hand; `reserved` is held by unpaid orders. What can still be ordered is
-- stock - reserved, and the constraint makes overselling impossible.
CREATE TABLE products (
    id         BIGINT      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name       TEXT        NOT NULL CHECK (char_length(name) BETWEEN 1 AND 200),
    price      BIGINT      NOT NULL,
    stock      BIGINT      NOT NULL,
    reserved   BIGINT      NOT NULL DEFAULT 0,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT product_price_positive CHECK (price > 0),
    CONSTRAINT product_stock_not_negative CHECK (stock >= 0),
    CONSTRAINT product_reserved_not_negative CHECK (reserved >= 0),
    CONSTRAINT product_reserved_within_stock CHECK (reserved <= stock)
);

-- Idempotency keys, Stripe's semantics. A row whose response is NULL is in flight; it is
-- completed in the same transaction as the effect, so a key never claims an effect that
-- did not commit.
CREATE TABLE idempotency_keys (
    scope           TEXT        NOT NULL,
    key             TEXT        NOT NULL,
    request         JSONB       NOT NULL,
    response_status SMALLINT,
    response_body   JSONB,
    locked_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, key),
    CONSTRAINT idempotency_response_complete CHECK ((response_status IS NULL) = (response_body IS NULL))
);
CREATE INDEX idempotency_keys_by_age ON idempotency_keys (created_at);
