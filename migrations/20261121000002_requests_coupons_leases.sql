-- The command pipeline: requests, coupons, and the leases that spread partitions over
-- worker replicas.

-- One row per asynchronous command. The API inserts it (PENDING) before publishing; a
-- worker locks it, applies the effect and writes the terminal status in one transaction,
-- so a redelivered message finds it terminal and changes nothing.
CREATE TABLE requests (
    id            UUID        PRIMARY KEY,
    kind          TEXT        NOT NULL CHECK (kind IN ('COUPON_ISSUE', 'ORDER_CREATE', 'ORDER_PAY')),
    -- couponId for coupon commands, userId for order commands: what the partition hashes.
    partition_key BIGINT      NOT NULL,
    payload       JSONB       NOT NULL,
    status        TEXT        NOT NULL DEFAULT 'PENDING' CHECK (status IN ('PENDING', 'SUCCEEDED', 'FAILED')),
    result        JSONB,
    error         JSONB,
    -- Set once the broker confirmed the message (or a worker saw it). Until then the
    -- sweeper re-publishes the request once publish_after has passed.
    published     BOOLEAN     NOT NULL DEFAULT false,
    publish_after TIMESTAMPTZ NOT NULL DEFAULT now() + interval '10 seconds',
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    completed_at  TIMESTAMPTZ,
    CONSTRAINT request_completed_when_terminal CHECK ((status = 'PENDING') = (completed_at IS NULL)),
    CONSTRAINT request_success_has_result CHECK (status <> 'SUCCEEDED' OR result IS NOT NULL),
    CONSTRAINT request_failure_has_error CHECK (status <> 'FAILED' OR error IS NOT NULL)
);
CREATE INDEX requests_to_publish ON requests (publish_after) WHERE NOT published AND status = 'PENDING';
CREATE INDEX requests_settled_by_age ON requests (completed_at) WHERE status <> 'PENDING';

CREATE TABLE coupons (
    id              BIGINT      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name            TEXT        NOT NULL CHECK (char_length(name) BETWEEN 1 AND 100),
    discount_type   TEXT        NOT NULL CHECK (discount_type IN ('FIXED', 'PERCENT')),
    discount_value  BIGINT      NOT NULL,
    total_quantity  BIGINT      NOT NULL CHECK (total_quantity > 0),
    issued_quantity BIGINT      NOT NULL DEFAULT 0,
    expires_at      TIMESTAMPTZ NOT NULL,
    -- true: applies to every product; false: to the products in coupon_products.
    all_products    BOOLEAN     NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT coupon_discount_valid CHECK (
        (discount_type = 'FIXED' AND discount_value > 0)
        OR (discount_type = 'PERCENT' AND discount_value BETWEEN 1 AND 100)),
    CONSTRAINT coupon_issued_within_total CHECK (issued_quantity BETWEEN 0 AND total_quantity)
);

CREATE TABLE coupon_products (
    coupon_id  BIGINT NOT NULL REFERENCES coupons (id),
    product_id BIGINT NOT NULL REFERENCES products (id),
    PRIMARY KEY (coupon_id, product_id)
);

-- A coupon held by a user. The unique constraint is what makes "one coupon of a kind per
-- user" true whatever the code does.
CREATE TABLE user_coupons (
    id         UUID        PRIMARY KEY,
    coupon_id  BIGINT      NOT NULL REFERENCES coupons (id),
    user_id    BIGINT      NOT NULL REFERENCES users (id),
    -- Not a foreign key: settled requests are pruned after their retention.
    request_id UUID        NOT NULL,
    issued_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    used_at    TIMESTAMPTZ,
    CONSTRAINT user_coupon_once UNIQUE (user_id, coupon_id)
);
CREATE INDEX user_coupons_by_coupon ON user_coupons (coupon_id);

-- Worker replicas announce themselves here; one not heard from for a few seconds is dead.
CREATE TABLE worker_replicas (
    id           UUID        PRIMARY KEY,
    name         TEXT        NOT NULL,
    started_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    heartbeat_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Who consumes which partition. The epoch grows with every change of hands and fences
-- settlement: a worker commits a batch only while it still holds the lease it started with.
CREATE TABLE partition_leases (
    family     TEXT        NOT NULL,
    partition  INT         NOT NULL CHECK (partition >= 0),
    owner      UUID,
    epoch      BIGINT      NOT NULL DEFAULT 0,
    expires_at TIMESTAMPTZ NOT NULL DEFAULT '-infinity',
    PRIMARY KEY (family, partition)
);
