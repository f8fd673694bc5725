//! Popular products: the rules of the ranking, without I/O. The rollup and the snapshot
//! they are computed into, and how both are read, are in [`crate::store::popular`].
//!
//! Rules, as the contract states them and as the pure functions here apply them:
//! - A sale is a line of an order whose status is `PAID`, counted on the UTC day of its
//!   `paid_at`. No other status counts (a cancelled or expired order was never paid).
//! - A window of `days` days *as of* a day D is the whole days before D: from
//!   `D - days` to `D - 1`, both included ([`Window::before`]).
//! - Products rank by units sold in the window, more first; equal quantities rank the lower
//!   product id first, so ranks are 1, 2, 3… without ties ([`rank`]).

use chrono::{DateTime, NaiveDate, Utc};

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
#[derive(Debug, Clone, PartialEq, Eq)]
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
