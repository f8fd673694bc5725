-- Orders with reserved stock, payments, and the outbox of events to the data platform.

-- Units sold (paid). On hand (`stock`) + sold is what was ever put on sale, and
-- reserved = the units of RESERVED orders.
ALTER TABLE products ADD COLUMN sold BIGINT NOT NULL DEFAULT 0;
ALTER TABLE products ADD CONSTRAINT product_sold_not_negative CHECK (sold >= 0);

CREATE TABLE orders (
    id                UUID        PRIMARY KEY,
    user_id           BIGINT      NOT NULL REFERENCES users (id),
    status            TEXT        NOT NULL DEFAULT 'PENDING'
                      CHECK (status IN ('PENDING', 'RESERVED', 'PAID', 'REJECTED', 'CANCELLED', 'EXPIRED')),
    -- Not a foreign key: settled requests are pruned after their retention.
    create_request_id UUID        NOT NULL,
    total_amount      BIGINT      NOT NULL CHECK (total_amount >= 0),
    discount_amount   BIGINT      NOT NULL DEFAULT 0 CHECK (discount_amount >= 0),
    paid_amount       BIGINT      NOT NULL DEFAULT 0 CHECK (paid_amount >= 0),
    coupon_id         BIGINT      REFERENCES coupons (id),
    created_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    reserved_until    TIMESTAMPTZ,
    paid_at           TIMESTAMPTZ,
    closed_at         TIMESTAMPTZ,
    CONSTRAINT order_discount_within_total CHECK (discount_amount <= total_amount),
    CONSTRAINT order_paid_amount_is_total_minus_discount
        CHECK (status <> 'PAID' OR (paid_amount = total_amount - discount_amount AND paid_at IS NOT NULL)),
    CONSTRAINT order_reserved_has_deadline CHECK (status <> 'RESERVED' OR reserved_until IS NOT NULL)
);
CREATE INDEX orders_by_user ON orders (user_id, id DESC);
CREATE INDEX orders_reserved_by_deadline ON orders (reserved_until) WHERE status = 'RESERVED';

-- Lines of an order. Name and unit price are a quote while the order is PENDING and the
-- snapshot taken at reservation afterwards.
CREATE TABLE order_items (
    order_id   UUID   NOT NULL REFERENCES orders (id),
    product_id BIGINT NOT NULL REFERENCES products (id),
    name       TEXT   NOT NULL,
    unit_price BIGINT NOT NULL CHECK (unit_price > 0),
    quantity   BIGINT NOT NULL CHECK (quantity > 0),
    PRIMARY KEY (order_id, product_id)
);
CREATE INDEX order_items_by_product ON order_items (product_id);

-- At most one payment per order, whatever races.
CREATE TABLE payments (
    id              UUID        PRIMARY KEY,
    order_id        UUID        NOT NULL UNIQUE REFERENCES orders (id),
    user_id         BIGINT      NOT NULL REFERENCES users (id),
    request_id      UUID        NOT NULL,
    amount          BIGINT      NOT NULL CHECK (amount >= 0),
    discount_amount BIGINT      NOT NULL CHECK (discount_amount >= 0),
    user_coupon_id  UUID        UNIQUE REFERENCES user_coupons (id),
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- A coupon is used by one order, once.
ALTER TABLE user_coupons ADD COLUMN order_id UUID UNIQUE REFERENCES orders (id);
ALTER TABLE user_coupons ADD CONSTRAINT user_coupon_used_by_an_order CHECK ((used_at IS NULL) = (order_id IS NULL));

-- Events written in the transaction that caused them, published after commit.
CREATE TABLE outbox (
    id            UUID        PRIMARY KEY,
    routing_key   TEXT        NOT NULL,
    payload       JSONB       NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- A relay that claimed the event; another may take it over after this time.
    claimed_until TIMESTAMPTZ,
    published_at  TIMESTAMPTZ
);
CREATE INDEX outbox_unpublished ON outbox (created_at) WHERE published_at IS NULL;

-- What the data-platform stand-in received, deduplicated on the event id.
CREATE TABLE received_events (
    event_id    UUID        PRIMARY KEY,
    routing_key TEXT        NOT NULL,
    payload     JSONB       NOT NULL,
    deliveries  INT         NOT NULL DEFAULT 1,
    received_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
