-- Scratch tables of the synchronous flash-sale baseline, shaped like the app's own
-- (coupons, users, user_coupons with a UUID key, two foreign keys and UNIQUE (user, coupon)),
-- so that both sides write the same rows. Run with psql: -v users=N -v quantity=Q.
-- Only bench_* tables are touched; the app's schema is left alone.
\set ON_ERROR_STOP on
DROP TABLE IF EXISTS bench_user_coupons, bench_coupons, bench_users;

CREATE TABLE bench_users (
    id   BIGINT PRIMARY KEY,
    name TEXT   NOT NULL
);

CREATE TABLE bench_coupons (
    id     BIGINT PRIMARY KEY,
    total  BIGINT NOT NULL,
    issued BIGINT NOT NULL DEFAULT 0,
    CONSTRAINT bench_coupon_issued_within_total CHECK (issued BETWEEN 0 AND total)
);

CREATE TABLE bench_user_coupons (
    id        UUID        PRIMARY KEY DEFAULT gen_random_uuid(),
    coupon_id BIGINT      NOT NULL REFERENCES bench_coupons (id),
    user_id   BIGINT      NOT NULL REFERENCES bench_users (id),
    -- The moment of the insert, not of the transaction's start, so the issue rate is exact.
    issued_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT bench_user_coupon_once UNIQUE (user_id, coupon_id)
);
CREATE INDEX bench_user_coupons_by_coupon ON bench_user_coupons (coupon_id);

INSERT INTO bench_users SELECT g, 'u' || g FROM generate_series(1, :users) AS g;
INSERT INTO bench_coupons (id, total) VALUES (1, :quantity);
VACUUM ANALYZE bench_users, bench_coupons, bench_user_coupons;
