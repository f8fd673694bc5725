-- A product's per-customer limit (a flash sale's "two per person"): the units of it one
-- user holds in RESERVED and PAID orders together never pass it. NULL: no limit. Checked by
-- the api at once where it can and by the worker under the locks that settle the order.
-- A nullable column without a default: adding it rewrites nothing.
ALTER TABLE products ADD COLUMN max_per_customer BIGINT
    CONSTRAINT product_max_per_customer_positive CHECK (max_per_customer > 0);
