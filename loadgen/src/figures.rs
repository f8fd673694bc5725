//! What a run measured, as types: each scenario's figures and the pgbench baseline's, each
//! with its unit. Result files hold them as a map of key to number ([`crate::figure_map`]).

use std::collections::BTreeMap;

use crate::db_activity::{DbActivity, DbCost};

/// A scenario of the load generator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    FlashSale,
    Checkout,
    Browse,
}

impl Scenario {
    /// Its name on the command line and in result files.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::FlashSale => "flash-sale",
            Scenario::Checkout => "checkout",
            Scenario::Browse => "browse",
        }
    }

    pub fn named(name: &str) -> Option<Scenario> {
        [Scenario::FlashSale, Scenario::Checkout, Scenario::Browse]
            .into_iter()
            .find(|s| s.name() == name)
    }
}

/// What a run's PostgreSQL cost is divided by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkUnit {
    Request,
    PaidOrder,
    Transaction,
}

impl WorkUnit {
    pub fn name(self) -> &'static str {
        match self {
            WorkUnit::Request => "request",
            WorkUnit::PaidOrder => "paid order",
            WorkUnit::Transaction => "transaction",
        }
    }
}

/// How far an open-loop schedule slipped (a closed loop has no schedule to slip).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DispatchLag {
    /// Jobs that started more than `schedule::LATE` after they were due (count).
    pub late_dispatches: u64,
    /// The worst delay of a job's start after it was due, ms.
    pub worst_dispatch_lag_ms: f64,
}

/// What a scenario run measured; which scenario it was.
#[derive(Debug, Clone, PartialEq)]
pub enum Figures {
    FlashSale(FlashSaleFigures),
    Checkout(CheckoutFigures),
    Browse(BrowseFigures),
}

impl Figures {
    pub fn scenario(&self) -> Scenario {
        match self {
            Figures::FlashSale(_) => Scenario::FlashSale,
            Figures::Checkout(_) => Scenario::Checkout,
            Figures::Browse(_) => Scenario::Browse,
        }
    }

    pub fn flash_sale(&self) -> Option<&FlashSaleFigures> {
        match self {
            Figures::FlashSale(f) => Some(f),
            _ => None,
        }
    }

    pub fn checkout(&self) -> Option<&CheckoutFigures> {
        match self {
            Figures::Checkout(f) => Some(f),
            _ => None,
        }
    }

    pub fn browse(&self) -> Option<&BrowseFigures> {
        match self {
            Figures::Browse(f) => Some(f),
            _ => None,
        }
    }

    /// What the scenario's PostgreSQL cost is divided by.
    pub fn unit(&self) -> WorkUnit {
        match self {
            Figures::FlashSale(_) | Figures::Browse(_) => WorkUnit::Request,
            Figures::Checkout(_) => WorkUnit::PaidOrder,
        }
    }

    pub fn db(&self) -> &DbActivity {
        match self {
            Figures::FlashSale(f) => &f.db,
            Figures::Checkout(f) => &f.db,
            Figures::Browse(f) => &f.db,
        }
    }

    /// PostgreSQL's cost per `unit` of work, if the scenario counts its work in that unit.
    pub fn db_per(&self, unit: WorkUnit) -> Option<&DbCost> {
        if self.unit() == unit {
            self.db().per_unit.as_ref()
        } else {
            None
        }
    }
}

/// `flash-sale` (see its module for what each figure is for).
#[derive(Debug, Clone, PartialEq)]
pub struct FlashSaleFigures {
    /// Requests sent, retries and second attempts included (count).
    pub requests: u64,
    /// From the start of the load to its last answer, s.
    pub load_seconds: f64,
    /// Requests answered per second of load.
    pub answered_per_sec: f64,
    /// `202` answers; against the peer, `200`s, each a coupon issued (count).
    pub accepted: u64,
    /// Those per second of load.
    pub accepted_per_sec: f64,
    /// Coupons the sale issued (`user_coupons` rows, count).
    pub issued: u64,
    /// From the start of the load to the last coupon issued (PostgreSQL's clock), s; `None`
    /// when none was issued.
    pub last_issue_after_start_seconds: Option<f64>,
    /// Coupons issued per second of that: what a flash sale is about, end to end.
    pub coupons_issued_per_sec: Option<f64>,
    /// From the first request accepted to the last settled (DB), s; `None` without request
    /// rows (the peer keeps none).
    pub accept_to_settled_seconds: Option<f64>,
    /// Requests settled per second of that.
    pub settled_per_sec: Option<f64>,
    /// From the end of the load until every request was settled, s; `None` against the
    /// peer, or when some were still pending at the drain timeout.
    pub drain_after_load_seconds: Option<f64>,
    pub dispatch: Option<DispatchLag>,
    /// PostgreSQL's cost, in all and per request sent.
    pub db: DbActivity,
}

/// `checkout` (see its module for what each figure is for).
#[derive(Debug, Clone, PartialEq)]
pub struct CheckoutFigures {
    /// Journeys started (count).
    pub journeys: u64,
    /// Orders of the run's users that are `PAID` (DB, count).
    pub paid: u64,
    /// From the start of the load to its last answer, s.
    pub load_seconds: f64,
    /// Journeys that ended paid, as the client saw them, per second of load.
    pub journeys_per_sec: f64,
    /// Reads of a request's status per journey started.
    pub polls_per_journey: f64,
    /// Orders paid per second from the start of the load to the last payment (PostgreSQL's
    /// clock); `None` when none was paid.
    pub paid_per_sec: Option<f64>,
    /// From the start of the load to the last payment, s.
    pub last_payment_after_start_seconds: Option<f64>,
    pub dispatch: Option<DispatchLag>,
    /// PostgreSQL's cost, in all and per order paid.
    pub db: DbActivity,
}

/// `browse`.
#[derive(Debug, Clone, PartialEq)]
pub struct BrowseFigures {
    /// Reads sent (count).
    pub requests: u64,
    /// From the start of the load to its last answer, s.
    pub load_seconds: f64,
    /// Reads per second of load, every endpoint.
    pub requests_per_sec: f64,
    /// Reads per second of load of each endpoint read, by its label (`GET /products`, …).
    pub per_endpoint: BTreeMap<String, f64>,
    pub dispatch: Option<DispatchLag>,
    /// PostgreSQL's cost, in all and per read.
    pub db: DbActivity,
}

/// One pgbench variant of the synchronous baseline.
#[derive(Debug, Clone, PartialEq)]
pub struct BaselineFigures {
    /// pgbench's own transactions per second, connection time left out.
    pub tps: f64,
    /// Transactions pgbench processed (count).
    pub transactions: u64,
    /// PostgreSQL's cost, in all and per transaction.
    pub db: DbActivity,
    pub outcome: BaselineOutcome,
}

/// What the baseline's transactions did, by scenario.
#[derive(Debug, Clone, PartialEq)]
pub enum BaselineOutcome {
    FlashSale {
        /// Coupons issued (rows, count).
        issued: u64,
        /// From the first coupon issued to the last, s; `None` when that took no time.
        issue_window_seconds: Option<f64>,
        /// Coupons issued per second of that window (the first one starts it).
        issue_tps: Option<f64>,
    },
    Checkout {
        /// Orders paid (payments, count).
        paid: u64,
    },
}

impl BaselineFigures {
    pub fn scenario(&self) -> Scenario {
        match self.outcome {
            BaselineOutcome::FlashSale { .. } => Scenario::FlashSale,
            BaselineOutcome::Checkout { .. } => Scenario::Checkout,
        }
    }

    /// Coupons issued per second, for a flash sale.
    pub fn issue_tps(&self) -> Option<f64> {
        match self.outcome {
            BaselineOutcome::FlashSale { issue_tps, .. } => issue_tps,
            BaselineOutcome::Checkout { .. } => None,
        }
    }
}
