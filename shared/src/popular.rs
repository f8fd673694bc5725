//! Popular products: the daily sales rollup, the ranking snapshot computed from it, and how
//! both are read. The batch refreshes them on its schedule and the API on an operator's
//! demand, through the same [`refresh`]; the API answers from them with [`read`], so no
//! request ever scans orders.
//!
//! Rules, as the contract states them and as the pure functions here apply them:
//! - A sale is a line of an order whose status is `PAID`, counted on the UTC day of its
//!   `paid_at`. No other status counts (a cancelled or expired order was never paid).
//! - A window of `days` days *as of* a day D is the whole days before D: from
//!   `D - days` to `D - 1`, both included ([`Window::before`]).
//! - Products rank by units sold in the window, more first; equal quantities rank the lower
//!   product id first, so ranks are 1, 2, 3… without ties ([`rank`]).
//!
//! A refresh for day D rebuilds the rollup of the [`MAX_DAYS`] days before D (so any filter
//! the API accepts reads complete days, and a day missed while the batch was down is filled
//! in) and the default ranking's snapshot for D, in one transaction: readers see the old
//! state or the new one, never half of it. Refreshes are serialized by an advisory lock, so
//! the batch and the admin endpoint can run one at the same moment.

use chrono::{DateTime, NaiveDate, Utc};
use sqlx::{PgConnection, PgPool};

/// The job's name in `job_runs`, logs and metrics.
pub const JOB: &str = "popular-products";
/// The default window, in days, and the one the snapshot is computed for.
pub const DEFAULT_DAYS: u8 = 3;
/// The default number of products, and the snapshot's.
pub const DEFAULT_LIMIT: u8 = 5;
/// The longest window a client may ask for; the rollup keeps that many days up to date.
pub const MAX_DAYS: u8 = 30;
/// The most products a client may ask for.
pub const MAX_LIMIT: u8 = 50;

/// Advisory lock (namespace, key) held by a refresh transaction. Two refreshes at once
/// would each delete and re-insert the same rollup rows and one would fail on the primary
/// key; queued, the second simply recomputes the same result.
const REFRESH_LOCK: (i32, i32) = (0x706f_7075, 0); // "popu"

/// What a client asks for: `days` (1–30) whole days before today, the top `limit` (1–50).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Filter {
    days: u8,
    limit: u8,
}

/// A filter outside the contract's ranges, or not a number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InvalidFilter {
    #[error("days must be an integer from 1 to 30")]
    Days,
    #[error("limit must be an integer from 1 to 50")]
    Limit,
}

impl Filter {
    /// The contract's defaults: the top 5 over 3 days, served from the snapshot.
    pub const DEFAULT: Filter = Filter {
        days: DEFAULT_DAYS,
        limit: DEFAULT_LIMIT,
    };

    /// A filter within the contract's ranges.
    pub fn new(days: u8, limit: u8) -> Option<Self> {
        ((1..=MAX_DAYS).contains(&days) && (1..=MAX_LIMIT).contains(&limit)).then_some(Self { days, limit })
    }

    /// Reads the raw query values; an absent value takes its default, anything present must
    /// be an integer in range (an empty value is not).
    pub fn parse(days: Option<&str>, limit: Option<&str>) -> Result<Self, InvalidFilter> {
        fn within(raw: Option<&str>, default: u8, max: u8) -> Option<u8> {
            match raw {
                None => Some(default),
                Some(raw) => raw.parse::<u8>().ok().filter(|v| (1..=max).contains(v)),
            }
        }
        let days = within(days, DEFAULT_DAYS, MAX_DAYS).ok_or(InvalidFilter::Days)?;
        let limit = within(limit, DEFAULT_LIMIT, MAX_LIMIT).ok_or(InvalidFilter::Limit)?;
        Ok(Self { days, limit })
    }

    pub fn days(self) -> u8 {
        self.days
    }

    pub fn limit(self) -> u8 {
        self.limit
    }

    /// True for the filter the snapshot answers directly.
    pub fn is_default(self) -> bool {
        self == Self::DEFAULT
    }
}

/// Whole UTC days, `from` through `to`, both included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub from: NaiveDate,
    pub to: NaiveDate,
}

impl Window {
    /// The `days` whole days before `as_of`: `as_of - days` through `as_of - 1`.
    pub fn before(as_of: NaiveDate, days: u8) -> Self {
        let back = |n: u8| {
            as_of
                .checked_sub_days(chrono::Days::new(u64::from(n)))
                .unwrap_or(NaiveDate::MIN)
        };
        Self {
            from: back(days.max(1)),
            to: back(1),
        }
    }

    /// The first instant of the window.
    pub fn starts_at(&self) -> DateTime<Utc> {
        self.from.and_time(chrono::NaiveTime::MIN).and_utc()
    }

    /// The first instant after the window (midnight UTC of the day after `to`).
    pub fn ends_before(&self) -> DateTime<Utc> {
        self.to
            .succ_opt()
            .unwrap_or(NaiveDate::MAX)
            .and_time(chrono::NaiveTime::MIN)
            .and_utc()
    }
}

/// A product's place in a ranking, before names and prices are looked up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ranked {
    /// 1 for the best seller; consecutive, ties already broken.
    pub rank: i32,
    pub product_id: i64,
    pub sold_quantity: i64,
}

/// Ranks `(product_id, sold_quantity)` totals: more units first, then the lower product id;
/// products that sold nothing are left out; at most `limit` products.
pub fn rank(totals: impl IntoIterator<Item = (i64, i64)>, limit: u8) -> Vec<Ranked> {
    let mut totals: Vec<(i64, i64)> = totals.into_iter().filter(|(_, q)| *q > 0).collect();
    totals.sort_by(|(pa, qa), (pb, qb)| qb.cmp(qa).then(pa.cmp(pb)));
    totals.truncate(usize::from(limit));
    totals
        .into_iter()
        .zip(1..)
        .map(|((product_id, sold_quantity), rank)| Ranked {
            rank,
            product_id,
            sold_quantity,
        })
        .collect()
}

/// One line of a ranking as clients see it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct PopularProduct {
    pub rank: i32,
    pub product_id: i64,
    pub name: String,
    /// The product's current price.
    pub price: i64,
    pub sold_quantity: i64,
}

/// Which snapshot an answer was computed from; changes with every refresh, so a cache keyed
/// on it knows when to let go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotVersion {
    /// The day the snapshot was computed for.
    pub as_of: NaiveDate,
    pub computed_at: DateTime<Utc>,
}

/// A ranking over a window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ranking {
    pub window: Window,
    /// The snapshot it comes from; `None` before the first refresh.
    pub version: Option<SnapshotVersion>,
    pub items: Vec<PopularProduct>,
}

impl Ranking {
    pub fn computed_at(&self) -> Option<DateTime<Utc>> {
        self.version.map(|v| v.computed_at)
    }
}

/// What a refresh did.
#[derive(Debug, Clone)]
pub struct Refreshed {
    /// Rollup rows written (one per product and day with sales in the rebuilt days).
    pub rollup_rows: u64,
    /// The new snapshot: the default ranking as of the refreshed day.
    pub ranking: Ranking,
}

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

#[cfg(test)]
mod tests {
    use super::*;

    fn day(s: &str) -> NaiveDate {
        s.parse().unwrap_or(NaiveDate::MIN)
    }

    #[test]
    fn a_window_is_the_whole_days_before_its_day() {
        let w = Window::before(day("2026-03-02"), 3);
        assert_eq!((w.from, w.to), (day("2026-02-27"), day("2026-03-01")));
        let one = Window::before(day("2026-01-01"), 1);
        assert_eq!((one.from, one.to), (day("2025-12-31"), day("2025-12-31")));
        assert_eq!(
            w.starts_at().to_rfc3339(),
            "2026-02-27T00:00:00+00:00",
            "starts at midnight UTC of its first day"
        );
        assert_eq!(
            w.ends_before().to_rfc3339(),
            "2026-03-02T00:00:00+00:00",
            "ends at midnight UTC of its day, which is not in it"
        );
    }

    #[test]
    fn more_units_rank_first_and_ties_go_to_the_lower_product_id() {
        let ranked = rank([(7, 10), (3, 4), (5, 10), (9, 4), (2, 1), (8, 0)], 4);
        let order: Vec<(i32, i64, i64)> = ranked
            .iter()
            .map(|r| (r.rank, r.product_id, r.sold_quantity))
            .collect();
        assert_eq!(order, vec![(1, 5, 10), (2, 7, 10), (3, 3, 4), (4, 9, 4)]);
    }

    #[test]
    fn a_ranking_has_at_most_limit_products_and_none_that_sold_nothing() {
        assert!(rank([(1, 0), (2, -1)], 5).is_empty());
        assert_eq!(rank([(1, 3), (2, 2), (3, 1)], 2).len(), 2);
        assert_eq!(rank([(1, 3)], 50).len(), 1);
    }

    #[test]
    fn filters_default_to_three_days_and_five_products() {
        assert_eq!(Filter::parse(None, None), Ok(Filter::DEFAULT));
        assert!(Filter::DEFAULT.is_default());
        assert_eq!(Filter::parse(Some("3"), Some("5")), Ok(Filter::DEFAULT));
        let f = Filter::parse(Some("30"), Some("50"));
        assert_eq!(f.map(|f| (f.days(), f.limit())), Ok((30, 50)));
        assert_eq!(
            Filter::parse(Some("1"), Some("1")).map(Filter::is_default),
            Ok(false)
        );
    }

    #[test]
    fn filters_out_of_range_or_not_numbers_are_refused() {
        for bad in ["0", "31", "-1", "", "abc", "2.5", "999999999999"] {
            assert_eq!(
                Filter::parse(Some(bad), None),
                Err(InvalidFilter::Days),
                "{bad:?}"
            );
        }
        for bad in ["0", "51", "-3", "", "five", "1e1"] {
            assert_eq!(
                Filter::parse(None, Some(bad)),
                Err(InvalidFilter::Limit),
                "{bad:?}"
            );
        }
        assert_eq!(Filter::new(0, 5), None);
        assert_eq!(Filter::new(3, 51), None);
    }
}
