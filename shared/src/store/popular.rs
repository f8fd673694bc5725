//! Popular products in PostgreSQL: the daily sales rollup, the ranking snapshot computed
//! from it, and how both are read. The batch refreshes them on its schedule and the API on
//! an operator's demand, through the same [`refresh`]; the API answers from them with
//! [`read`], so no request ever scans orders. The rules are in [`crate::domain::popular`].
//!
//! A refresh for day D rebuilds the rollup of the [`MAX_DAYS`] days before D (so any filter
//! the API accepts reads complete days, and a day missed while the batch was down is filled
//! in) and the default ranking's snapshot for D, in one transaction: readers see the old
//! state or the new one, never half of it. Refreshes are serialized by an advisory lock, so
//! the batch and the admin endpoint can run one at the same moment.

use chrono::{DateTime, NaiveDate, Utc};
use sqlx::{PgConnection, PgPool};

use crate::domain::popular::{
    rank, Filter, PopularProduct, Ranked, Ranking, Refreshed, SnapshotVersion, Window, DEFAULT_DAYS,
    DEFAULT_LIMIT, MAX_DAYS,
};

/// Advisory lock (namespace, key) held by a refresh transaction. Two refreshes at once
/// would each delete and re-insert the same rollup rows and one would fail on the primary
/// key; queued, the second simply recomputes the same result.
const REFRESH_LOCK: (i32, i32) = (0x706f_7075, 0); // "popu"

/// Rebuilds the rollup of the [`MAX_DAYS`] days before `as_of` from paid orders and the
/// default ranking's snapshot for `as_of`, in one transaction. Running it again for the
/// same day writes the same rows (only `computed_at` moves).
pub async fn refresh(db: &PgPool, as_of: NaiveDate) -> Result<Refreshed, sqlx::Error> {
    let mut tx = db.begin().await?;
    sqlx::query!(
        "SELECT pg_advisory_xact_lock($1, $2)",
        REFRESH_LOCK.0,
        REFRESH_LOCK.1
    )
    .execute(&mut *tx)
    .await?;

    let rebuilt = Window::before(as_of, MAX_DAYS);
    sqlx::query!(
        "DELETE FROM daily_product_sales WHERE day BETWEEN $1 AND $2",
        rebuilt.from,
        rebuilt.to,
    )
    .execute(&mut *tx)
    .await?;
    // Bounds are instants, so the day of a payment is its UTC date whatever the session's
    // time zone; the partial index on paid orders' paid_at serves the range.
    let rollup_rows = sqlx::query!(
        "INSERT INTO daily_product_sales (day, product_id, sold_quantity)
         SELECT (o.paid_at AT TIME ZONE 'UTC')::date, i.product_id, sum(i.quantity)
         FROM orders o JOIN order_items i ON i.order_id = o.id
         WHERE o.status = 'PAID' AND o.paid_at >= $1 AND o.paid_at < $2
         GROUP BY 1, 2",
        rebuilt.starts_at(),
        rebuilt.ends_before(),
    )
    .execute(&mut *tx)
    .await?
    .rows_affected();

    let window = Window::before(as_of, DEFAULT_DAYS);
    let ranked = rank(sales_in(&mut tx, window).await?, Filter::DEFAULT.limit());
    let computed_at: DateTime<Utc> = sqlx::query_scalar!(
        "INSERT INTO popular_snapshots (as_of, days, item_limit, from_day, to_day, computed_at)
         VALUES ($1, $2, $3, $4, $5, now())
         ON CONFLICT (as_of) DO UPDATE
         SET days = EXCLUDED.days, item_limit = EXCLUDED.item_limit, from_day = EXCLUDED.from_day,
             to_day = EXCLUDED.to_day, computed_at = EXCLUDED.computed_at
         RETURNING computed_at",
        as_of,
        i32::from(DEFAULT_DAYS),
        i32::from(DEFAULT_LIMIT),
        window.from,
        window.to,
    )
    .fetch_one(&mut *tx)
    .await?;
    sqlx::query!("DELETE FROM popular_snapshot_items WHERE as_of = $1", as_of)
        .execute(&mut *tx)
        .await?;
    sqlx::query!(
        "INSERT INTO popular_snapshot_items (as_of, rank, product_id, sold_quantity)
         SELECT $1, * FROM UNNEST($2::int[], $3::bigint[], $4::bigint[])",
        as_of,
        &ranked.iter().map(|r| r.rank).collect::<Vec<_>>(),
        &ranked.iter().map(|r| r.product_id).collect::<Vec<_>>(),
        &ranked.iter().map(|r| r.sold_quantity).collect::<Vec<_>>(),
    )
    .execute(&mut *tx)
    .await?;
    let items = describe(&mut tx, &ranked).await?;
    tx.commit().await?;

    Ok(Refreshed {
        rollup_rows,
        ranking: Ranking {
            window,
            version: Some(SnapshotVersion { as_of, computed_at }),
            items,
        },
    })
}

/// The newest snapshot's version, or `None` before the first refresh. One index lookup:
/// cheap enough to ask every few seconds.
pub async fn latest_version(db: &PgPool) -> Result<Option<SnapshotVersion>, sqlx::Error> {
    let mut conn = db.acquire().await?;
    latest_version_in(&mut conn).await
}

async fn latest_version_in(conn: &mut PgConnection) -> Result<Option<SnapshotVersion>, sqlx::Error> {
    sqlx::query_as!(
        SnapshotVersion,
        "SELECT as_of, computed_at FROM popular_snapshots ORDER BY as_of DESC LIMIT 1"
    )
    .fetch_optional(conn)
    .await
}

/// The ranking for `filter`, as of the newest snapshot's day: the default filter straight
/// from the snapshot, any other summed from the daily rollup over its window. Before any
/// refresh: no items, over the window before `today`.
///
/// Reads in one read-only repeatable-read transaction, so a refresh committing meanwhile is
/// seen entirely or not at all.
pub async fn read(db: &PgPool, filter: Filter, today: NaiveDate) -> Result<Ranking, sqlx::Error> {
    let mut tx = db.begin().await?;
    sqlx::query!("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    let Some(version) = latest_version_in(&mut tx).await? else {
        return Ok(Ranking {
            window: Window::before(today, filter.days()),
            version: None,
            items: Vec::new(),
        });
    };
    let window = Window::before(version.as_of, filter.days());
    let ranked = if filter.is_default() {
        sqlx::query_as!(
            Ranked,
            "SELECT rank, product_id, sold_quantity FROM popular_snapshot_items
             WHERE as_of = $1 ORDER BY rank",
            version.as_of,
        )
        .fetch_all(&mut *tx)
        .await?
    } else {
        rank(sales_in(&mut tx, window).await?, filter.limit())
    };
    let items = describe(&mut tx, &ranked).await?;
    tx.commit().await?;
    Ok(Ranking {
        window,
        version: Some(version),
        items,
    })
}

/// Units sold per product over `window`, from the rollup.
async fn sales_in(conn: &mut PgConnection, window: Window) -> Result<Vec<(i64, i64)>, sqlx::Error> {
    let sales = sqlx::query!(
        r#"SELECT product_id, sum(sold_quantity)::bigint AS "sold!" FROM daily_product_sales
         WHERE day BETWEEN $1 AND $2 GROUP BY product_id"#,
        window.from,
        window.to,
    )
    .fetch_all(conn)
    .await?;
    Ok(sales.into_iter().map(|s| (s.product_id, s.sold)).collect())
}

/// Adds each ranked product's name and current price, keeping the ranking's order.
async fn describe(conn: &mut PgConnection, ranked: &[Ranked]) -> Result<Vec<PopularProduct>, sqlx::Error> {
    sqlx::query_as!(
        PopularProduct,
        r#"SELECT r.rank AS "rank!", p.id AS product_id, p.name, p.price, r.sold_quantity AS "sold_quantity!"
         FROM UNNEST($1::int[], $2::bigint[], $3::bigint[]) AS r(rank, product_id, sold_quantity)
         JOIN products p ON p.id = r.product_id
         ORDER BY r.rank"#,
        &ranked.iter().map(|r| r.rank).collect::<Vec<_>>(),
        &ranked.iter().map(|r| r.product_id).collect::<Vec<_>>(),
        &ranked.iter().map(|r| r.sold_quantity).collect::<Vec<_>>(),
    )
    .fetch_all(conn)
    .await
}
