//! What a scenario needs before it is measured: users with balances, products and coupons.
//!
//! Users are created with SQL (twenty thousand `POST /users` would measure nothing of
//! interest, and the API's per-address limit on registrations would rightly refuse them),
//! with their balance row, a bearer token made and stored as the API makes it, and, when
//! they have money, the `CHARGE` ledger entry that explains it, so that every invariant the
//! checks verify holds from the start.
//! Products and coupons go through the admin API: there are few of them.

use anyhow::Context;
use sqlx::PgPool;
use uuid::Uuid;

use crate::client::Api;

/// Creates `count` users named `{prefix}{n}`, each with `balance` won (charged once) and a
/// token that `api` keeps; their ids in ascending order.
pub async fn create_users(
    db: &PgPool,
    api: &Api,
    prefix: &str,
    count: usize,
    balance: i64,
) -> anyhow::Result<Vec<i64>> {
    let count = i64::try_from(count).context("too many users")?;
    // Data-modifying CTEs all run to completion, referenced or not.
    let ids: Vec<i64> = sqlx::query_scalar(
        "WITH u AS (
            INSERT INTO users (name) SELECT $1 || g FROM generate_series(1, $2) AS g RETURNING id),
         b AS (
            INSERT INTO balances (user_id, amount) SELECT id, $3 FROM u RETURNING user_id),
         t AS (
            INSERT INTO balance_transactions (user_id, kind, amount, balance_after)
            SELECT user_id, 'CHARGE', $3, $3 FROM b WHERE $3 > 0)
         SELECT user_id FROM b ORDER BY user_id",
    )
    .bind(prefix)
    .bind(count)
    .bind(balance)
    .fetch_all(db)
    .await
    .context("cannot create users")?;
    issue_tokens(db, api, &ids).await?;
    Ok(ids)
}

/// Gives `api` a token of each of `users` it holds none of, made and stored as the API
/// makes them (users created by another process, whose tokens only that process saw).
pub async fn issue_tokens(db: &PgPool, api: &Api, users: &[i64]) -> anyhow::Result<()> {
    let mut missing: Vec<i64> = users.iter().copied().filter(|u| !api.knows(*u)).collect();
    missing.sort_unstable();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    let tokens = missing
        .iter()
        .map(|_| shared::domain::identity::new_token())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("the OS random source failed: {e}"))?;
    let hashes: Vec<Vec<u8>> = tokens.iter().map(|t| t.hash.to_vec()).collect();
    sqlx::query(
        "INSERT INTO user_tokens (user_id, token_hash) SELECT * FROM UNNEST($1::bigint[], $2::bytea[])",
    )
    .bind(&missing)
    .bind(&hashes)
    .execute(db)
    .await
    .context("cannot store tokens")?;
    api.remember_tokens(missing.into_iter().zip(tokens.into_iter().map(|t| t.token)));
    Ok(())
}

/// Creates `count` products through the admin API; their ids and prices.
pub async fn create_products(
    api: &Api,
    prefix: &str,
    count: usize,
    stock: i64,
) -> anyhow::Result<Vec<(i64, i64)>> {
    let mut products = Vec::with_capacity(count);
    for n in 0..count {
        // Prices from 10,000 to 14,900 won, so sums tell products apart.
        let price = 10_000 + 100 * i64::try_from(n % 50).unwrap_or(0);
        let id = api
            .create_product(&format!("{prefix}{n}"), price, stock)
            .await
            .with_context(|| format!("cannot create product {n}"))?;
        products.push((id, price));
    }
    Ok(products)
}

/// Gives each of `holders` one unused coupon of `coupon` (as if issued earlier), keeping the
/// coupon's issued count equal to its rows.
pub async fn hand_out_coupon(db: &PgPool, coupon: i64, holders: &[i64]) -> anyhow::Result<()> {
    if holders.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = holders.iter().map(|_| Uuid::now_v7()).collect();
    let requests: Vec<Uuid> = holders.iter().map(|_| Uuid::now_v7()).collect();
    let mut tx = db.begin().await?;
    sqlx::query(
        "INSERT INTO user_coupons (id, coupon_id, user_id, request_id)
         SELECT id, $2, user_id, request_id FROM UNNEST($1::uuid[], $3::bigint[], $4::uuid[])
           AS t(id, user_id, request_id)",
    )
    .bind(&ids)
    .bind(coupon)
    .bind(holders)
    .bind(&requests)
    .execute(&mut *tx)
    .await
    .context("cannot hand out coupons")?;
    sqlx::query("UPDATE coupons SET issued_quantity = issued_quantity + $2 WHERE id = $1")
        .bind(coupon)
        .bind(i64::try_from(holders.len()).context("too many holders")?)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

/// A prefix for names that tells this run's rows from any other's.
pub fn run_prefix(scenario: &str) -> String {
    format!("lg-{scenario}-{}-", chrono::Utc::now().format("%H%M%S"))
}
