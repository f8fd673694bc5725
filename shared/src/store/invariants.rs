//! Invariants of the stored data that more than one checker asserts (the tests, the load
//! generator's checks, the fault suite), each written once.

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
