//! Figures as result files hold them and the printouts list them: one map of key to number,
//! sorted by key. The typed figures ([`crate::figures`]) go to and come from the keys that
//! result files have always used, so that files written before the types still read.

use std::collections::BTreeMap;
use std::fmt;

use crate::db_activity::{DbActivity, DbCost};
use crate::figures::{
    BaselineFigures, BaselineOutcome, BrowseFigures, CheckoutFigures, DispatchLag, Figures, FlashSaleFigures,
    Scenario, WorkUnit,
};

/// Figures by key.
pub type FigureMap = BTreeMap<String, f64>;

/// Why a map is not the figures of its scenario.
#[derive(Debug, Clone, PartialEq)]
pub enum FigureMapError {
    /// A figure the scenario always writes is not there.
    Missing(String),
    /// A count that is not a whole number of things.
    NotACount { key: String, value: f64 },
    /// The baseline has no variant for this scenario.
    NoBaseline(Scenario),
}

impl fmt::Display for FigureMapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FigureMapError::Missing(key) => write!(f, "figure `{key}` is missing"),
            FigureMapError::NotACount { key, value } => {
                write!(f, "figure `{key}` is {value}, not a count")
            }
            FigureMapError::NoBaseline(scenario) => {
                write!(f, "there is no baseline of {}", scenario.name())
            }
        }
    }
}

impl std::error::Error for FigureMapError {}

/// A scenario's figures as a map.
pub fn write_scenario(figures: &Figures) -> FigureMap {
    let mut w = Writer::default();
    match figures {
        Figures::FlashSale(f) => {
            w.count("requests", f.requests);
            w.number("load_seconds", f.load_seconds);
            w.number("answered_per_sec", f.answered_per_sec);
            w.count("accepted", f.accepted);
            w.number("accepted_per_sec", f.accepted_per_sec);
            w.count("issued", f.issued);
            w.maybe("last_issue_after_start_seconds", f.last_issue_after_start_seconds);
            w.maybe("coupons_issued_per_sec", f.coupons_issued_per_sec);
            w.maybe("accept_to_settled_seconds", f.accept_to_settled_seconds);
            w.maybe("settled_per_sec", f.settled_per_sec);
            w.maybe("drain_after_load_seconds", f.drain_after_load_seconds);
            w.dispatch(f.dispatch);
        }
        Figures::Checkout(f) => {
            w.count("journeys", f.journeys);
            w.count("paid", f.paid);
            w.number("load_seconds", f.load_seconds);
            w.number("journeys_per_sec", f.journeys_per_sec);
            w.number("polls_per_journey", f.polls_per_journey);
            w.maybe("paid_per_sec", f.paid_per_sec);
            w.maybe(
                "last_payment_after_start_seconds",
                f.last_payment_after_start_seconds,
            );
            w.dispatch(f.dispatch);
        }
        Figures::Browse(f) => {
            w.count("requests", f.requests);
            w.number("load_seconds", f.load_seconds);
            w.number("requests_per_sec", f.requests_per_sec);
            for (endpoint, per_sec) in &f.per_endpoint {
                w.number(&format!("{endpoint}{PER_SEC}"), *per_sec);
            }
            w.dispatch(f.dispatch);
        }
    }
    w.db(figures.db(), figures.unit());
    w.0
}

/// The figures of a `scenario` from a map. Keys it does not know are left out: a file
/// written by a later version may have more.
pub fn read_scenario(scenario: Scenario, map: FigureMap) -> Result<Figures, FigureMapError> {
    let mut r = Reader(map);
    Ok(match scenario {
        Scenario::FlashSale => Figures::FlashSale(FlashSaleFigures {
            requests: r.count("requests")?,
            load_seconds: r.number("load_seconds")?,
            answered_per_sec: r.number("answered_per_sec")?,
            accepted: r.count("accepted")?,
            accepted_per_sec: r.number("accepted_per_sec")?,
            issued: r.count("issued")?,
            last_issue_after_start_seconds: r.maybe("last_issue_after_start_seconds"),
            coupons_issued_per_sec: r.maybe("coupons_issued_per_sec"),
            accept_to_settled_seconds: r.maybe("accept_to_settled_seconds"),
            settled_per_sec: r.maybe("settled_per_sec"),
            drain_after_load_seconds: r.maybe("drain_after_load_seconds"),
            dispatch: r.dispatch()?,
            db: r.db(WorkUnit::Request)?,
        }),
        Scenario::Checkout => Figures::Checkout(CheckoutFigures {
            journeys: r.count("journeys")?,
            paid: r.count("paid")?,
            load_seconds: r.number("load_seconds")?,
            journeys_per_sec: r.number("journeys_per_sec")?,
            polls_per_journey: r.number("polls_per_journey")?,
            paid_per_sec: r.maybe("paid_per_sec"),
            last_payment_after_start_seconds: r.maybe("last_payment_after_start_seconds"),
            dispatch: r.dispatch()?,
            db: r.db(WorkUnit::PaidOrder)?,
        }),
        Scenario::Browse => {
            let requests = r.count("requests")?;
            let load_seconds = r.number("load_seconds")?;
            let requests_per_sec = r.number("requests_per_sec")?;
            let dispatch = r.dispatch()?;
            let db = r.db(WorkUnit::Request)?;
            // What is left is each endpoint's rate, under its label.
            let per_endpoint =
                r.0.into_iter()
                    .filter_map(|(key, value)| Some((key.strip_suffix(PER_SEC)?.to_owned(), value)))
                    .collect();
            Figures::Browse(BrowseFigures {
                requests,
                load_seconds,
                requests_per_sec,
                per_endpoint,
                dispatch,
                db,
            })
        }
    })
}

/// A baseline variant's figures as a map.
pub fn write_baseline(figures: &BaselineFigures) -> FigureMap {
    let mut w = Writer::default();
    w.number("tps", figures.tps);
    w.count("transactions", figures.transactions);
    match &figures.outcome {
        BaselineOutcome::FlashSale {
            issued,
            issue_window_seconds,
            issue_tps,
        } => {
            w.count("issued", *issued);
            w.maybe("issue_window_seconds", *issue_window_seconds);
            w.maybe("issue_tps", *issue_tps);
        }
        BaselineOutcome::Checkout { paid } => w.count("paid", *paid),
    }
    w.db(&figures.db, WorkUnit::Transaction);
    w.0
}

/// The figures of a baseline variant of `scenario` from a map.
pub fn read_baseline(scenario: Scenario, map: FigureMap) -> Result<BaselineFigures, FigureMapError> {
    let mut r = Reader(map);
    let outcome = match scenario {
        Scenario::FlashSale => BaselineOutcome::FlashSale {
            issued: r.count("issued")?,
            issue_window_seconds: r.maybe("issue_window_seconds"),
            issue_tps: r.maybe("issue_tps"),
        },
        Scenario::Checkout => BaselineOutcome::Checkout {
            paid: r.count("paid")?,
        },
        Scenario::Browse => return Err(FigureMapError::NoBaseline(scenario)),
    };
    Ok(BaselineFigures {
        tps: r.number("tps")?,
        transactions: r.count("transactions")?,
        db: r.db(WorkUnit::Transaction)?,
        outcome,
    })
}

/// How an endpoint's rate is keyed: `GET /products per sec`.
const PER_SEC: &str = " per sec";

/// Open loop only, both or neither.
const LATE_DISPATCHES: &str = "late_dispatches";
const WORST_DISPATCH_LAG_MS: &str = "worst_dispatch_lag_ms";

/// PostgreSQL's counters by key; per unit of work, the key followed by ` per {unit}`.
fn db_cost(cost: &DbCost) -> [(&'static str, f64); 7] {
    [
        ("db_commits", cost.commits),
        ("db_rollbacks", cost.rollbacks),
        ("db_rows_inserted", cost.rows_inserted),
        ("db_rows_updated", cost.rows_updated),
        ("db_rows_deleted", cost.rows_deleted),
        ("wal_bytes (server)", cost.wal_bytes),
        ("wal_syncs (server)", cost.wal_syncs),
    ]
}

#[derive(Default)]
struct Writer(FigureMap);

impl Writer {
    fn number(&mut self, key: &str, value: f64) {
        self.0.insert(key.to_owned(), value);
    }

    fn count(&mut self, key: &str, value: u64) {
        self.number(key, value as f64);
    }

    fn maybe(&mut self, key: &str, value: Option<f64>) {
        if let Some(value) = value {
            self.number(key, value);
        }
    }

    fn dispatch(&mut self, lag: Option<DispatchLag>) {
        if let Some(lag) = lag {
            self.count(LATE_DISPATCHES, lag.late_dispatches);
            self.number(WORST_DISPATCH_LAG_MS, lag.worst_dispatch_lag_ms);
        }
    }

    fn db(&mut self, db: &DbActivity, unit: WorkUnit) {
        for (key, value) in db_cost(&db.total) {
            self.number(key, value);
        }
        if let Some(per_unit) = &db.per_unit {
            for (key, value) in db_cost(per_unit) {
                self.number(&format!("{key} per {}", unit.name()), value);
            }
        }
    }
}

/// Takes the figures out of a map, one by one.
struct Reader(FigureMap);

impl Reader {
    fn maybe(&mut self, key: &str) -> Option<f64> {
        self.0.remove(key)
    }

    fn number(&mut self, key: &str) -> Result<f64, FigureMapError> {
        self.maybe(key)
            .ok_or_else(|| FigureMapError::Missing(key.to_owned()))
    }

    fn count(&mut self, key: &str) -> Result<u64, FigureMapError> {
        as_count(key, self.number(key)?)
    }

    fn dispatch(&mut self) -> Result<Option<DispatchLag>, FigureMapError> {
        let Some(late) = self.maybe(LATE_DISPATCHES) else {
            return Ok(None);
        };
        Ok(Some(DispatchLag {
            late_dispatches: as_count(LATE_DISPATCHES, late)?,
            worst_dispatch_lag_ms: self.number(WORST_DISPATCH_LAG_MS)?,
        }))
    }

    fn db(&mut self, unit: WorkUnit) -> Result<DbActivity, FigureMapError> {
        let total = self.db_cost("")?;
        // Written only when some unit of work was done.
        let suffix = format!(" per {}", unit.name());
        let per_unit = if self.0.contains_key(&format!("db_commits{suffix}")) {
            Some(self.db_cost(&suffix)?)
        } else {
            None
        };
        Ok(DbActivity { total, per_unit })
    }

    fn db_cost(&mut self, suffix: &str) -> Result<DbCost, FigureMapError> {
        let mut take = |key: &str| self.number(&format!("{key}{suffix}"));
        Ok(DbCost {
            commits: take("db_commits")?,
            rollbacks: take("db_rollbacks")?,
            rows_inserted: take("db_rows_inserted")?,
            rows_updated: take("db_rows_updated")?,
            rows_deleted: take("db_rows_deleted")?,
            wal_bytes: take("wal_bytes (server)")?,
            wal_syncs: take("wal_syncs (server)")?,
        })
    }
}

/// Counts are written as numbers: whole, and far below 2^53, where `f64` starts to round.
fn as_count(key: &str, value: f64) -> Result<u64, FigureMapError> {
    const EXACT: f64 = 9_007_199_254_740_992.0;
    if (0.0..EXACT).contains(&value) && value.fract() == 0.0 {
        Ok(value as u64)
    } else {
        Err(FigureMapError::NotACount {
            key: key.to_owned(),
            value,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The keys and values of a result file written before the figures were types.
    fn written(entries: &[(&str, f64)]) -> FigureMap {
        entries.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
    }

    fn db_entries(unit: &str) -> Vec<(String, f64)> {
        let mut entries = Vec::new();
        for (i, key) in [
            "db_commits",
            "db_rollbacks",
            "db_rows_deleted",
            "db_rows_inserted",
            "db_rows_updated",
            "wal_bytes (server)",
            "wal_syncs (server)",
        ]
        .into_iter()
        .enumerate()
        {
            entries.push((key.to_owned(), 100.0 * (i + 1) as f64));
            entries.push((format!("{key} per {unit}"), 0.5 * (i + 1) as f64));
        }
        entries
    }

    fn with_db(mut map: FigureMap, unit: &str) -> FigureMap {
        map.extend(db_entries(unit));
        map
    }

    #[test]
    fn a_flash_sale_reads_and_writes_the_keys_it_always_had() {
        let map = with_db(
            written(&[
                ("accept_to_settled_seconds", 0.47),
                ("accepted", 682.0),
                ("accepted_per_sec", 1153.8),
                ("answered_per_sec", 3891.3),
                ("coupons_issued_per_sec", 1325.2),
                ("drain_after_load_seconds", 0.0017),
                ("issued", 500.0),
                ("last_issue_after_start_seconds", 0.377),
                ("late_dispatches", 3.0),
                ("load_seconds", 0.59),
                ("requests", 2300.0),
                ("settled_per_sec", 1318.8),
                ("worst_dispatch_lag_ms", 9.38),
            ]),
            "request",
        );
        let figures = read_scenario(Scenario::FlashSale, map.clone()).expect("a flash sale");
        let sale = figures.flash_sale().expect("a flash sale");
        assert_eq!(sale.coupons_issued_per_sec, Some(1325.2));
        assert_eq!(sale.answered_per_sec, 3891.3);
        assert_eq!(sale.issued, 500);
        assert_eq!(
            sale.dispatch,
            Some(DispatchLag {
                late_dispatches: 3,
                worst_dispatch_lag_ms: 9.38
            })
        );
        assert_eq!(figures.db_per(WorkUnit::Request).map(|c| c.commits), Some(0.5));
        assert_eq!(figures.db_per(WorkUnit::PaidOrder), None);
        assert_eq!(write_scenario(&figures), map);
    }

    #[test]
    fn what_a_run_may_leave_out_stays_out() {
        // The peer: no request rows, no drain; a closed loop: no dispatch lag.
        let map = with_db(
            written(&[
                ("accepted", 500.0),
                ("accepted_per_sec", 650.4),
                ("answered_per_sec", 2991.9),
                ("coupons_issued_per_sec", 719.9),
                ("issued", 500.0),
                ("last_issue_after_start_seconds", 0.69),
                ("load_seconds", 0.77),
                ("requests", 2300.0),
            ]),
            "request",
        );
        let figures = read_scenario(Scenario::FlashSale, map.clone()).expect("a flash sale");
        let sale = figures.flash_sale().expect("a flash sale");
        assert_eq!(sale.accept_to_settled_seconds, None);
        assert_eq!(sale.drain_after_load_seconds, None);
        assert_eq!(sale.dispatch, None);
        assert_eq!(write_scenario(&figures), map);

        // Nothing done: no cost per unit.
        let mut idle = map;
        idle.retain(|k, _| !k.ends_with(" per request"));
        let figures = read_scenario(Scenario::FlashSale, idle.clone()).expect("a flash sale");
        assert_eq!(figures.db().per_unit, None);
        assert_eq!(write_scenario(&figures), idle);
    }

    #[test]
    fn a_checkout_reads_and_writes_the_keys_it_always_had() {
        let map = with_db(
            written(&[
                ("journeys", 360.0),
                ("journeys_per_sec", 15.02),
                ("last_payment_after_start_seconds", 23.95),
                ("load_seconds", 23.95),
                ("paid", 360.0),
                ("paid_per_sec", 15.03),
                ("polls_per_journey", 0.0),
            ]),
            "paid order",
        );
        let figures = read_scenario(Scenario::Checkout, map.clone()).expect("a checkout");
        assert_eq!(figures.checkout().and_then(|c| c.paid_per_sec), Some(15.03));
        assert_eq!(
            figures.db_per(WorkUnit::PaidOrder).map(|c| c.wal_syncs),
            Some(3.5)
        );
        assert_eq!(figures.db_per(WorkUnit::Request), None);
        assert_eq!(write_scenario(&figures), map);
    }

    #[test]
    fn a_browse_keeps_each_endpoints_rate_under_its_label() {
        let map = with_db(
            written(&[
                ("GET /products per sec", 300.0),
                ("GET /users/{id}/balance per sec", 299.0),
                ("load_seconds", 10.0),
                ("requests", 12000.0),
                ("requests_per_sec", 1199.0),
            ]),
            "request",
        );
        let figures = read_scenario(Scenario::Browse, map.clone()).expect("a browse");
        let browse = figures.browse().expect("a browse");
        assert_eq!(browse.per_endpoint.get("GET /products"), Some(&300.0));
        assert_eq!(browse.per_endpoint.len(), 2);
        assert_eq!(write_scenario(&figures), map);
    }

    #[test]
    fn baselines_read_and_write_the_keys_they_always_had() {
        let sale = with_db(
            written(&[
                ("issue_tps", 662.6),
                ("issue_window_seconds", 0.75),
                ("issued", 500.0),
                ("tps", 2026.0),
                ("transactions", 2000.0),
            ]),
            "transaction",
        );
        let figures = read_baseline(Scenario::FlashSale, sale.clone()).expect("a baseline");
        assert_eq!(figures.issue_tps(), Some(662.6));
        assert_eq!(write_baseline(&figures), sale);

        let checkout = with_db(
            written(&[("paid", 2000.0), ("tps", 2026.0), ("transactions", 2000.0)]),
            "transaction",
        );
        let figures = read_baseline(Scenario::Checkout, checkout.clone()).expect("a baseline");
        assert_eq!(figures.issue_tps(), None);
        assert_eq!(figures.tps, 2026.0);
        assert_eq!(write_baseline(&figures), checkout);
    }

    #[test]
    fn a_map_without_a_figure_or_with_a_broken_count_is_refused() {
        let map = with_db(written(&[("load_seconds", 1.0), ("requests", 10.0)]), "request");
        assert_eq!(
            read_scenario(Scenario::Browse, map.clone()),
            Err(FigureMapError::Missing("requests_per_sec".to_owned()))
        );
        let mut map = map;
        map.insert("requests_per_sec".to_owned(), 10.0);
        map.insert("requests".to_owned(), 10.5);
        assert_eq!(
            read_scenario(Scenario::Browse, map),
            Err(FigureMapError::NotACount {
                key: "requests".to_owned(),
                value: 10.5
            })
        );
    }
}
