//! Invariants of the stored data that more than one checker asserts (the tests, the load
//! generator's checks, the fault suite), each written once.
//!
//! Each counts what breaks its invariant (0 when it holds), over the users, coupons or
//! products given, or over the whole database when given `None`: a test asserts the rows it
//! made while other tests write beside it; the fault suite asserts everything.

use sqlx::PgPool;

/// Balances that differ from their ledger: a balance is the sum of its user's `CHARGE` and
/// `REFUND` entries less their `PAYMENT` entries. Over `users` only, or over every balance.
pub async fn balances_off_ledger(db: &PgPool, users: Option<&[i64]>) -> sqlx::Result<i64> {
    sqlx::query_scalar!(
        r#"SELECT count(*) AS "off_ledger!" FROM balances b
         LEFT JOIN (SELECT user_id, sum(CASE kind WHEN 'PAYMENT' THEN -amount ELSE amount END) AS total
                    FROM balance_transactions
                    WHERE $1::bigint[] IS NULL OR user_id = ANY($1) GROUP BY user_id) l USING (user_id)
         WHERE ($1::bigint[] IS NULL OR b.user_id = ANY($1)) AND b.amount <> COALESCE(l.total, 0)"#,
        users,
    )
    .fetch_one(db)
    .await
}

/// Coupons issued beyond their total quantity.
pub async fn coupons_over_issued(db: &PgPool, coupons: Option<&[i64]>) -> sqlx::Result<i64> {
    sqlx::query_scalar!(
        r#"SELECT count(*) AS "over_issued!" FROM coupons
         WHERE ($1::bigint[] IS NULL OR id = ANY($1)) AND issued_quantity > total_quantity"#,
        coupons,
    )
    .fetch_one(db)
    .await
}

/// Coupons whose issued count is not the number of user coupons held of them.
pub async fn coupons_issued_off_held(db: &PgPool, coupons: Option<&[i64]>) -> sqlx::Result<i64> {
    sqlx::query_scalar!(
        r#"SELECT count(*) AS "off_held!" FROM coupons c
         WHERE ($1::bigint[] IS NULL OR c.id = ANY($1))
           AND c.issued_quantity <> (SELECT count(*) FROM user_coupons uc WHERE uc.coupon_id = c.id)"#,
        coupons,
    )
    .fetch_one(db)
    .await
}

/// Coupons a user holds more than once (pairs of user and coupon).
pub async fn coupons_held_twice(db: &PgPool, coupons: Option<&[i64]>) -> sqlx::Result<i64> {
    sqlx::query_scalar!(
        r#"SELECT count(*) AS "held_twice!" FROM (
             SELECT 1 FROM user_coupons WHERE $1::bigint[] IS NULL OR coupon_id = ANY($1)
             GROUP BY user_id, coupon_id HAVING count(*) > 1) d"#,
        coupons,
    )
    .fetch_one(db)
    .await
}

/// Coupon requests whose outcome and the coupons held disagree: a success without the
/// coupon it issued, or a coupon held for a request that did not succeed.
pub async fn coupon_requests_off_held(db: &PgPool, coupons: Option<&[i64]>) -> sqlx::Result<i64> {
    sqlx::query_scalar!(
        r#"SELECT count(*) AS "off_held!" FROM requests r LEFT JOIN user_coupons uc ON uc.request_id = r.id
         WHERE r.kind = 'COUPON_ISSUE'
           AND ($1::bigint[] IS NULL OR (r.payload->>'couponId')::bigint = ANY($1))
           AND (r.status = 'SUCCEEDED') <> (uc.id IS NOT NULL)"#,
        coupons,
    )
    .fetch_one(db)
    .await
}

/// Products whose stock is out of bounds: on hand or reserved below zero, or more reserved
/// than on hand (an oversale).
pub async fn products_out_of_bounds(db: &PgPool, products: Option<&[i64]>) -> sqlx::Result<i64> {
    sqlx::query_scalar!(
        r#"SELECT count(*) AS "out_of_bounds!" FROM products
         WHERE ($1::bigint[] IS NULL OR id = ANY($1)) AND (stock < 0 OR reserved < 0 OR reserved > stock)"#,
        products,
    )
    .fetch_one(db)
    .await
}

/// Products whose reserved units are not the units of their `RESERVED` orders.
pub async fn products_reserved_off_orders(db: &PgPool, products: Option<&[i64]>) -> sqlx::Result<i64> {
    sqlx::query_scalar!(
        r#"SELECT count(*) AS "off_orders!" FROM products p
         WHERE ($1::bigint[] IS NULL OR p.id = ANY($1)) AND p.reserved <> COALESCE(
           (SELECT sum(oi.quantity) FROM order_items oi JOIN orders o ON o.id = oi.order_id
            WHERE oi.product_id = p.id AND o.status = 'RESERVED'), 0)"#,
        products,
    )
    .fetch_one(db)
    .await
}

/// Products whose sold units are not the units of their `PAID` orders.
pub async fn products_sold_off_orders(db: &PgPool, products: Option<&[i64]>) -> sqlx::Result<i64> {
    sqlx::query_scalar!(
        r#"SELECT count(*) AS "off_orders!" FROM products p
         WHERE ($1::bigint[] IS NULL OR p.id = ANY($1)) AND p.sold <> COALESCE(
           (SELECT sum(oi.quantity) FROM order_items oi JOIN orders o ON o.id = oi.order_id
            WHERE oi.product_id = p.id AND o.status = 'PAID'), 0)"#,
        products,
    )
    .fetch_one(db)
    .await
}
