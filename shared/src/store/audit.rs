//! The consistency audit: what the stored data must add up to whatever ran against it,
//! checked after the fact. The batch runs it on a schedule and exports what it finds; the
//! api's `POST /admin/batch/consistency-audit/run` runs it on demand; the fault suite runs
//! it after every scenario. Each check is one statement, so it reads one snapshot: every
//! pair it compares is written by one transaction (stock and order, balance and ledger,
//! issued count and holder, payment and event), and a check never sees half of one.
//!
//! The checks, by their stable names ([`Check::name`]):
//! - `product_reserved_units`: a product's `reserved` is the units of its `RESERVED` orders
//!   (the definition the load generator's checks use).
//! - `balance_ledger`: a balance is its `CHARGE` and `REFUND` entries less its `PAYMENT`
//!   entries (as [`super::invariants::balances_off_ledger`] counts).
//! - `coupon_issued_holders`: a coupon's `issued_quantity` is its `user_coupons` rows.
//! - `order_paid_event`: a `PAID` order has exactly one `order.paid` event, any other order
//!   none. The relay deletes an outbox row once the broker confirmed it, so a published
//!   event leaves no row behind; what stays is `orders.paid_event_id`, written with the
//!   payment. The events of an order are that id and every `order.paid` row still in the
//!   outbox that names it, each counted once. So the audit sees an event that was never
//!   written, a second one, and one of an order that is not paid; that a written event
//!   reached the broker it takes from the relay, which deletes only what was confirmed
//!   (its backlog has metrics and alerts of its own).
//! - `request_pending_overdue`: no request `PENDING` longer than its bound.
//! - `order_reserved_overdue`: no order `RESERVED` longer than its bound past
//!   `reserved_until` (the reservation-expiry job runs every minute).
//!
//! Each violation's detail names the row (its id) and the two numbers that disagree. At
//! most [`LISTED_PER_CHECK`] rows are listed per check; [`Audit::found`] counts them all.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use crate::config::{var, ConfigError};

/// Violations listed per check at most; past it one more line says how many were not.
pub const LISTED_PER_CHECK: i64 = 100;

/// What the audit checks. The names are stable: alerts, dashboards and clients key on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Check {
    ProductReservedUnits,
    BalanceLedger,
    CouponIssuedHolders,
    OrderPaidEvent,
    RequestPendingOverdue,
    OrderReservedOverdue,
}

impl Check {
    pub const ALL: [Check; 6] = [
        Check::ProductReservedUnits,
        Check::BalanceLedger,
        Check::CouponIssuedHolders,
        Check::OrderPaidEvent,
        Check::RequestPendingOverdue,
        Check::OrderReservedOverdue,
    ];

    /// The snake_case name in answers, logs and the `check` label of the metric.
    pub fn name(self) -> &'static str {
        match self {
            Check::ProductReservedUnits => "product_reserved_units",
            Check::BalanceLedger => "balance_ledger",
            Check::CouponIssuedHolders => "coupon_issued_holders",
            Check::OrderPaidEvent => "order_paid_event",
            Check::RequestPendingOverdue => "request_pending_overdue",
            Check::OrderReservedOverdue => "order_reserved_overdue",
        }
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How long past its bound a row must be before the audit calls it stuck. Generous: the
/// audit reports what no retry or job will mend by itself, not what is merely slow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditBounds {
    /// `AUDIT_REQUEST_PENDING_SECS`: the longest a request may stay `PENDING`. Commands
    /// accepted while RabbitMQ is down wait in PostgreSQL, so this is well above the
    /// seconds a command normally takes.
    pub request_pending: Duration,
    /// `AUDIT_RESERVATION_OVERDUE_SECS`: the longest a `RESERVED` order may outlive its
    /// `reserved_until` (the reservation TTL, `RESERVATION_TTL_SECS`, after it was
    /// reserved) before expiry should have ended it.
    pub reservation_overdue: Duration,
}

impl Default for AuditBounds {
    fn default() -> Self {
        Self {
            request_pending: Duration::from_secs(900),
            reservation_overdue: Duration::from_secs(600),
        }
    }
}

impl AuditBounds {
    pub fn from_env() -> Result<Self, ConfigError> {
        let default = Self::default();
        Ok(Self {
            request_pending: Duration::from_secs(var(
                "AUDIT_REQUEST_PENDING_SECS",
                default.request_pending.as_secs(),
            )?),
            reservation_overdue: Duration::from_secs(var(
                "AUDIT_RESERVATION_OVERDUE_SECS",
                default.reservation_overdue.as_secs(),
            )?),
        })
    }
}

/// One thing found that does not add up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub check: Check,
    /// What was found: the row's id and the two numbers that disagree.
    pub detail: String,
}

/// What one run of the audit found.
#[derive(Debug, Clone)]
pub struct Audit {
    /// When the audit started.
    pub checked_at: DateTime<Utc>,
    /// Violations in [`Check::ALL`]'s order, at most [`LISTED_PER_CHECK`] rows per check.
    pub violations: Vec<Violation>,
    /// Every row found per check, listed or not; every check has an entry.
    found: BTreeMap<Check, i64>,
}

impl Audit {
    /// Rows `check` found, including those past the listing's limit.
    pub fn found(&self, check: Check) -> i64 {
        self.found.get(&check).copied().unwrap_or(0)
    }

    pub fn is_clean(&self) -> bool {
        self.found.values().all(|&n| n == 0)
    }

    /// Adds what `check` found: `listed`, the details of the first rows, of `total`.
    fn record(&mut self, check: Check, total: i64, listed: Vec<String>) {
        let shown = i64::try_from(listed.len()).unwrap_or(i64::MAX);
        self.violations
            .extend(listed.into_iter().map(|detail| Violation { check, detail }));
        if total > shown {
            self.violations.push(Violation {
                check,
                detail: format!("{} more not listed", total - shown),
            });
        }
        self.found.insert(check, total);
    }

    /// Adds what `check`'s statement returned: its rows, each carrying the total found
    /// (`count(*) OVER ()`, over the rows before the limit; no row means none found), each
    /// listed as `detail` says.
    fn record_rows<T>(
        &mut self,
        check: Check,
        rows: Vec<T>,
        total: impl Fn(&T) -> i64,
        detail: impl FnMut(T) -> String,
    ) {
        let total = rows.first().map(total).unwrap_or(0);
        self.record(check, total, rows.into_iter().map(detail).collect());
    }
}

/// Seconds of a bound, as the statements take them.
fn seconds(bound: Duration) -> i64 {
    i64::try_from(bound.as_secs()).unwrap_or(i64::MAX)
}

/// Runs every check. Read-only: no lock beyond a statement's snapshot, nothing written.
pub async fn run(db: &PgPool, bounds: &AuditBounds) -> sqlx::Result<Audit> {
    let mut audit = Audit {
        checked_at: Utc::now(),
        violations: Vec::new(),
        found: BTreeMap::new(),
    };
    product_reserved_units(db, &mut audit).await?;
    balance_ledger(db, &mut audit).await?;
    coupon_issued_holders(db, &mut audit).await?;
    order_paid_event(db, &mut audit).await?;
    request_pending_overdue(db, bounds, &mut audit).await?;
    order_reserved_overdue(db, bounds, &mut audit).await?;
    Ok(audit)
}

async fn product_reserved_units(db: &PgPool, audit: &mut Audit) -> sqlx::Result<()> {
    let rows = sqlx::query!(
        r#"SELECT p.id, p.reserved, COALESCE(r.units, 0)::int8 AS "held!", count(*) OVER () AS "total!"
         FROM products p
         LEFT JOIN (SELECT oi.product_id, sum(oi.quantity) AS units
                    FROM order_items oi JOIN orders o ON o.id = oi.order_id
                    WHERE o.status = 'RESERVED' GROUP BY oi.product_id) r ON r.product_id = p.id
         WHERE p.reserved <> COALESCE(r.units, 0)
         ORDER BY p.id LIMIT $1"#,
        LISTED_PER_CHECK,
    )
    .fetch_all(db)
    .await?;
    audit.record_rows(
        Check::ProductReservedUnits,
        rows,
        |r| r.total,
        |r| {
            format!(
                "product {}: reserved {}, RESERVED orders hold {}",
                r.id, r.reserved, r.held
            )
        },
    );
    Ok(())
}

async fn balance_ledger(db: &PgPool, audit: &mut Audit) -> sqlx::Result<()> {
    let rows = sqlx::query!(
        r#"SELECT b.user_id, b.amount, COALESCE(l.total, 0)::int8 AS "ledger!", count(*) OVER () AS "total!"
         FROM balances b
         LEFT JOIN (SELECT user_id, sum(CASE kind WHEN 'PAYMENT' THEN -amount ELSE amount END) AS total
                    FROM balance_transactions GROUP BY user_id) l USING (user_id)
         WHERE b.amount <> COALESCE(l.total, 0)
         ORDER BY b.user_id LIMIT $1"#,
        LISTED_PER_CHECK,
    )
    .fetch_all(db)
    .await?;
    audit.record_rows(
        Check::BalanceLedger,
        rows,
        |r| r.total,
        |r| format!("user {}: balance {}, ledger {}", r.user_id, r.amount, r.ledger),
    );
    Ok(())
}

async fn coupon_issued_holders(db: &PgPool, audit: &mut Audit) -> sqlx::Result<()> {
    let rows = sqlx::query!(
        r#"SELECT c.id, c.issued_quantity, COALESCE(h.holders, 0) AS "holders!", count(*) OVER () AS "total!"
         FROM coupons c
         LEFT JOIN (SELECT coupon_id, count(*) AS holders FROM user_coupons GROUP BY coupon_id) h
                ON h.coupon_id = c.id
         WHERE c.issued_quantity <> COALESCE(h.holders, 0)
         ORDER BY c.id LIMIT $1"#,
        LISTED_PER_CHECK,
    )
    .fetch_all(db)
    .await?;
    audit.record_rows(
        Check::CouponIssuedHolders,
        rows,
        |r| r.total,
        |r| {
            format!(
                "coupon {}: issued {}, held by {}",
                r.id, r.issued_quantity, r.holders
            )
        },
    );
    Ok(())
}

async fn order_paid_event(db: &PgPool, audit: &mut Audit) -> sqlx::Result<()> {
    // An order's events: the one its payment recorded and those still in the outbox, the
    // same event in both counted once (UNION). Orders are matched on the payload's text:
    // a payload naming no order (or no UUID) is an event of no order, not a failed cast.
    let rows = sqlx::query!(
        r#"WITH events AS (
             SELECT id::text AS order_ref, paid_event_id AS event_id FROM orders
             WHERE paid_event_id IS NOT NULL
             UNION
             SELECT payload->>'orderId', id FROM outbox WHERE routing_key = 'order.paid'
         ), per_order AS (
             SELECT order_ref, count(*) AS events, array_agg(event_id ORDER BY event_id) AS ids
             FROM events GROUP BY order_ref
         )
         SELECT COALESCE(o.id::text, e.order_ref) AS "order_ref!", o.status AS "status?",
                COALESCE(e.events, 0) AS "events!", COALESCE(e.ids, '{}') AS "ids!: Vec<Uuid>",
                CASE WHEN o.status = 'PAID' THEN 1 ELSE 0 END AS "expected!",
                count(*) OVER () AS "total!"
         FROM per_order e FULL JOIN orders o ON o.id::text = e.order_ref
         WHERE COALESCE(e.events, 0) <> CASE WHEN o.status = 'PAID' THEN 1 ELSE 0 END
         ORDER BY 1 LIMIT $1"#,
        LISTED_PER_CHECK,
    )
    .fetch_all(db)
    .await?;
    audit.record_rows(
        Check::OrderPaidEvent,
        rows,
        |r| r.total,
        |r| {
            let ids = r.ids.iter().map(Uuid::to_string).collect::<Vec<_>>().join(", ");
            let order = match &r.status {
                Some(status) => format!("order {} ({status})", r.order_ref),
                None => format!("order {:?} (no such order)", r.order_ref),
            };
            format!(
                "{order}: {} order.paid events [{ids}], expected {}",
                r.events, r.expected
            )
        },
    );
    Ok(())
}

async fn request_pending_overdue(db: &PgPool, bounds: &AuditBounds, audit: &mut Audit) -> sqlx::Result<()> {
    let bound = seconds(bounds.request_pending);
    let rows = sqlx::query!(
        r#"SELECT id, kind, extract(epoch FROM now() - created_at)::int8 AS "pending_secs!",
                  count(*) OVER () AS "total!"
         FROM requests
         WHERE status = 'PENDING' AND created_at < now() - $1::int8 * interval '1 second'
         ORDER BY created_at LIMIT $2"#,
        bound,
        LISTED_PER_CHECK,
    )
    .fetch_all(db)
    .await?;
    audit.record_rows(
        Check::RequestPendingOverdue,
        rows,
        |r| r.total,
        |r| {
            format!(
                "request {} ({}): PENDING for {} s, bound {bound} s",
                r.id, r.kind, r.pending_secs
            )
        },
    );
    Ok(())
}

async fn order_reserved_overdue(db: &PgPool, bounds: &AuditBounds, audit: &mut Audit) -> sqlx::Result<()> {
    let bound = seconds(bounds.reservation_overdue);
    let rows = sqlx::query!(
        r#"SELECT id, reserved_until AS "reserved_until!",
                  extract(epoch FROM now() - reserved_until)::int8 AS "overdue_secs!",
                  count(*) OVER () AS "total!"
         FROM orders
         WHERE status = 'RESERVED' AND reserved_until < now() - $1::int8 * interval '1 second'
         ORDER BY reserved_until LIMIT $2"#,
        bound,
        LISTED_PER_CHECK,
    )
    .fetch_all(db)
    .await?;
    audit.record_rows(
        Check::OrderReservedOverdue,
        rows,
        |r| r.total,
        |r| {
            format!(
                "order {}: RESERVED {} s past its reserved_until {}, bound {bound} s",
                r.id,
                r.overdue_secs,
                r.reserved_until.to_rfc3339()
            )
        },
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_names_are_distinct_snake_case() {
        let mut names: Vec<&str> = Check::ALL.iter().map(|c| c.name()).collect();
        assert!(names
            .iter()
            .all(|n| n.chars().all(|c| c.is_ascii_lowercase() || c == '_')));
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Check::ALL.len());
    }

    #[test]
    fn rows_past_the_listing_are_counted_and_said() {
        let mut audit = Audit {
            checked_at: Utc::now(),
            violations: Vec::new(),
            found: BTreeMap::new(),
        };
        audit.record(
            Check::BalanceLedger,
            3,
            vec!["user 1: balance 5, ledger 4".into()],
        );
        audit.record(Check::CouponIssuedHolders, 0, Vec::new());
        assert_eq!(audit.found(Check::BalanceLedger), 3);
        assert_eq!(audit.found(Check::CouponIssuedHolders), 0);
        assert!(!audit.is_clean());
        let details: Vec<&str> = audit.violations.iter().map(|v| v.detail.as_str()).collect();
        assert_eq!(details, ["user 1: balance 5, ledger 4", "2 more not listed"]);
    }
}
