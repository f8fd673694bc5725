//! The consistency audit against a real PostgreSQL: quiet on data that adds up, and naming
//! each kind of drift planted with SQL by its check and its row; the batch job exports what
//! it found per check.
//!
//! A test binary of its own, not a module of `tests/it`: it reads `consistency_violations`,
//! gauges of the process-wide metrics recorder that the other tests' batches set by their
//! own audits.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed unwrap is a failed test

use batch::{Batch, Job};
use chrono::Utc;
use shared::store::audit::{self, Audit, AuditBounds, Check};
use sqlx::PgPool;
use testkit::jobs::{self, order, user};
use uuid::Uuid;

/// Runs `sql` with `binds` bound as `$1…` (ids of all kinds).
async fn exec(db: &PgPool, sql: &str, binds: &[Bind]) {
    let mut query = sqlx::query(sql);
    for b in binds {
        query = match b {
            Bind::Id(v) => query.bind(*v),
            Bind::Uuid(v) => query.bind(*v),
        };
    }
    query.execute(db).await.unwrap();
}

enum Bind {
    Id(i64),
    Uuid(Uuid),
}

/// A small world that adds up: a user with a charged balance and its ledger entry, a
/// product with a reserved order and a paid one (its event recorded, as the worker does),
/// a coupon issued once and held once, a settled request.
struct World {
    user: i64,
    product: i64,
    coupon: i64,
    reserved: Uuid,
    paid: Uuid,
}

async fn world(db: &PgPool) -> World {
    let user = user(db).await;
    exec(
        db,
        "INSERT INTO balances (user_id, amount) VALUES ($1, 7000)
         ON CONFLICT (user_id) DO UPDATE SET amount = 7000",
        &[Bind::Id(user)],
    )
    .await;
    exec(
        db,
        "INSERT INTO balance_transactions (user_id, kind, amount, balance_after)
         VALUES ($1, 'CHARGE', 10000, 10000)",
        &[Bind::Id(user)],
    )
    .await;
    let product = jobs::product(db, "Mouse", 1_000, 100).await;
    let now = Utc::now();
    let reserved = order(
        db,
        user,
        "RESERVED",
        now,
        Some(now + chrono::Duration::minutes(10)),
        &[(product, 2)],
    )
    .await;
    let paid = jobs::paid(db, user, now, &[(product, 3)]).await;
    exec(
        db,
        "INSERT INTO balance_transactions (user_id, kind, amount, balance_after, order_id)
         VALUES ($1, 'PAYMENT', 3000, 7000, $2)",
        &[Bind::Id(user), Bind::Uuid(paid)],
    )
    .await;
    exec(
        db,
        "UPDATE orders SET paid_event_id = $1 WHERE id = $2",
        &[Bind::Uuid(Uuid::now_v7()), Bind::Uuid(paid)],
    )
    .await;
    exec(
        db,
        "UPDATE products SET stock = 97, reserved = 2, sold = 3 WHERE id = $1",
        &[Bind::Id(product)],
    )
    .await;
    let coupon: i64 = sqlx::query_scalar(
        "INSERT INTO coupons (name, discount_type, discount_value, total_quantity, issued_quantity,
                              expires_at, all_products)
         VALUES ('Ten', 'FIXED', 1000, 10, 1, now() + interval '1 day', true) RETURNING id",
    )
    .fetch_one(db)
    .await
    .unwrap();
    exec(
        db,
        "INSERT INTO user_coupons (id, coupon_id, user_id, request_id) VALUES ($1, $2, $3, $4)",
        &[
            Bind::Uuid(Uuid::now_v7()),
            Bind::Id(coupon),
            Bind::Id(user),
            Bind::Uuid(Uuid::now_v7()),
        ],
    )
    .await;
    pending_request(db, user, "2 minutes").await;
    World {
        user,
        product,
        coupon,
        reserved,
        paid,
    }
}

/// A `PENDING` coupon issue of `user`, created `age` ago.
async fn pending_request(db: &PgPool, user: i64, age: &str) -> Uuid {
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO requests (id, kind, partition_key, payload, user_id, created_at)
         VALUES ($1, 'COUPON_ISSUE', 1, '{}', $2, now() - $3::interval)",
    )
    .bind(id)
    .bind(user)
    .bind(age)
    .execute(db)
    .await
    .unwrap();
    id
}

/// An `order.paid` event in the outbox naming `order`.
async fn outbox_event(db: &PgPool, order: Uuid) -> Uuid {
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO outbox (id, routing_key, payload)
         VALUES ($1, 'order.paid', jsonb_build_object('orderId', $2::text))",
    )
    .bind(id)
    .bind(order.to_string())
    .execute(db)
    .await
    .unwrap();
    id
}

fn details(audit: &Audit, check: Check) -> Vec<String> {
    audit
        .violations
        .iter()
        .filter(|v| v.check == check)
        .map(|v| v.detail.clone())
        .collect()
}

fn described(audit: &Audit) -> String {
    audit
        .violations
        .iter()
        .map(|v| format!("{}: {}", v.check, v.detail))
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test]
async fn data_that_adds_up_has_no_violation() {
    let (_url, db) = jobs::fresh_database().await;
    let w = world(&db).await;
    // The paid order's event still in the outbox, as before the relay's pass: one event.
    let event: Uuid = sqlx::query_scalar("SELECT paid_event_id FROM orders WHERE id = $1")
        .bind(w.paid)
        .fetch_one(&db)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO outbox (id, routing_key, payload)
         VALUES ($1, 'order.paid', jsonb_build_object('orderId', $2::text))",
    )
    .bind(event)
    .bind(w.paid.to_string())
    .execute(&db)
    .await
    .unwrap();
    let audit = audit::run(&db, &AuditBounds::default()).await.unwrap();
    assert!(audit.is_clean(), "{}", described(&audit));
    assert!(audit.violations.is_empty());
    for check in Check::ALL {
        assert_eq!(audit.found(check), 0, "{check}");
    }
}

#[tokio::test]
async fn each_kind_of_drift_is_named_by_its_check_with_its_ids_and_numbers() {
    let (_url, db) = jobs::fresh_database().await;
    let w = world(&db).await;
    let now = Utc::now();

    // Reserved units that no order holds.
    exec(
        &db,
        "UPDATE products SET reserved = 5 WHERE id = $1",
        &[Bind::Id(w.product)],
    )
    .await;
    // A balance its ledger does not explain.
    exec(
        &db,
        "UPDATE balances SET amount = 7500 WHERE user_id = $1",
        &[Bind::Id(w.user)],
    )
    .await;
    // An issued count with no holder behind it.
    exec(
        &db,
        "UPDATE coupons SET issued_quantity = 2 WHERE id = $1",
        &[Bind::Id(w.coupon)],
    )
    .await;
    // Events: a paid order with none, a paid order with a second one, an event of an order
    // that is not paid, an event of no order at all.
    let other = jobs::product(&db, "Pad", 500, 100).await;
    let silent = jobs::paid(&db, w.user, now, &[(other, 1)]).await;
    let twice = jobs::paid(&db, w.user, now, &[(other, 1)]).await;
    exec(
        &db,
        "UPDATE orders SET paid_event_id = $1 WHERE id = $2",
        &[Bind::Uuid(Uuid::now_v7()), Bind::Uuid(twice)],
    )
    .await;
    let second = outbox_event(&db, twice).await;
    let unpaid_event = outbox_event(&db, w.reserved).await;
    let nobody = Uuid::now_v7();
    outbox_event(&db, nobody).await;
    // A request long pending, and a reservation long past its deadline (its units held, so
    // that only the deadline is wrong).
    let stuck = pending_request(&db, w.user, "2 hours").await;
    let late = order(
        &db,
        w.user,
        "RESERVED",
        now - chrono::Duration::hours(3),
        Some(now - chrono::Duration::hours(2)),
        &[(other, 4)],
    )
    .await;
    // Pad's columns as its orders say: two paid units, four reserved.
    exec(
        &db,
        "UPDATE products SET stock = 98, reserved = 4, sold = 2 WHERE id = $1",
        &[Bind::Id(other)],
    )
    .await;

    let audit = audit::run(&db, &AuditBounds::default()).await.unwrap();
    let all = described(&audit);
    assert_eq!(
        details(&audit, Check::ProductReservedUnits),
        [format!(
            "product {}: reserved 5, RESERVED orders hold 2",
            w.product
        )],
        "{all}"
    );
    assert_eq!(
        details(&audit, Check::BalanceLedger),
        [format!("user {}: balance 7500, ledger 7000", w.user)],
        "{all}"
    );
    assert_eq!(
        details(&audit, Check::CouponIssuedHolders),
        [format!("coupon {}: issued 2, held by 1", w.coupon)],
        "{all}"
    );
    let events = details(&audit, Check::OrderPaidEvent);
    assert_eq!(events.len(), 4, "{all}");
    let about = |order: Uuid| events.iter().find(|d| d.contains(&order.to_string())).cloned();
    assert_eq!(
        about(silent),
        Some(format!(
            "order {silent} (PAID): 0 order.paid events [], expected 1"
        )),
        "{all}"
    );
    let twice_detail = about(twice).unwrap_or_default();
    assert!(
        twice_detail.starts_with(&format!("order {twice} (PAID): 2 order.paid events ["))
            && twice_detail.contains(&second.to_string())
            && twice_detail.ends_with("], expected 1"),
        "{all}"
    );
    assert_eq!(
        about(w.reserved),
        Some(format!(
            "order {} (RESERVED): 1 order.paid events [{unpaid_event}], expected 0",
            w.reserved
        )),
        "{all}"
    );
    assert!(
        about(nobody).is_some_and(|d| d.contains("(no such order): 1 order.paid events")),
        "{all}"
    );
    let pending = details(&audit, Check::RequestPendingOverdue);
    assert_eq!(pending.len(), 1, "{all}");
    assert!(
        pending[0].starts_with(&format!("request {stuck} (COUPON_ISSUE): PENDING for 7"))
            && pending[0].ends_with(" s, bound 900 s"),
        "{all}"
    );
    let overdue = details(&audit, Check::OrderReservedOverdue);
    assert_eq!(overdue.len(), 1, "{all}");
    assert!(
        overdue[0].starts_with(&format!("order {late}: RESERVED 7")) && overdue[0].ends_with(", bound 600 s"),
        "{all}"
    );
    assert_eq!(audit.found(Check::OrderPaidEvent), 4);
    assert_eq!(audit.violations.len(), 9, "{all}");

    // Bounds are the operator's: a longer one lets the same request and order be.
    let patient = AuditBounds {
        request_pending: std::time::Duration::from_secs(3 * 3600),
        reservation_overdue: std::time::Duration::from_secs(3 * 3600),
    };
    let audit = audit::run(&db, &patient).await.unwrap();
    assert_eq!(audit.found(Check::RequestPendingOverdue), 0);
    assert_eq!(audit.found(Check::OrderReservedOverdue), 0);
}

#[tokio::test]
async fn past_the_listing_limit_the_rest_is_counted_not_listed() {
    let (_url, db) = jobs::fresh_database().await;
    sqlx::query(
        "WITH u AS (INSERT INTO users (name) SELECT 'u' || g FROM generate_series(1, 105) g RETURNING id)
         INSERT INTO balances (user_id, amount) SELECT id, 1 FROM u
         ON CONFLICT (user_id) DO UPDATE SET amount = 1",
    )
    .execute(&db)
    .await
    .unwrap();
    let audit = audit::run(&db, &AuditBounds::default()).await.unwrap();
    let ledger = details(&audit, Check::BalanceLedger);
    assert_eq!(audit.found(Check::BalanceLedger), 105);
    assert_eq!(ledger.len(), 101);
    assert_eq!(ledger.last().map(String::as_str), Some("5 more not listed"));
}

/// One test starts the batch: the metrics recorder is the process's, so two batches in one
/// test binary would share their gauges.
#[tokio::test]
async fn the_batch_audits_on_its_schedule_and_exports_violations_per_check() {
    let (url, db) = jobs::fresh_database().await;
    world(&db).await;
    // Started, the batch runs every job's latest slot: the audit finds nothing.
    let batch = Batch::start(jobs::config(&url, "audit")).await.unwrap();
    let runs = jobs::runs_of(&db, "consistency-audit").await;
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert_eq!(
        (runs[0].0.as_str(), runs[0].1.as_str()),
        ("SCHEDULE", "SUCCEEDED")
    );
    let metrics = scrape(&batch).await;
    for check in Check::ALL {
        assert_eq!(gauge(&metrics, check), Some(0.0), "{check} in\n{metrics}");
    }
    assert!(
        metrics.contains("consistency_audit_last_run_timestamp_seconds"),
        "{metrics}"
    );

    // Two balances off their ledgers, found by the next run.
    sqlx::query("UPDATE balances SET amount = amount + 1")
        .execute(&db)
        .await
        .unwrap();
    let u = user(&db).await;
    exec(
        &db,
        "INSERT INTO balances (user_id, amount) VALUES ($1, 10) ON CONFLICT (user_id) DO UPDATE SET amount = 10",
        &[Bind::Id(u)],
    )
    .await;
    batch.runner().run_on_demand(Job::ConsistencyAudit).await.unwrap();
    let metrics = scrape(&batch).await;
    assert_eq!(gauge(&metrics, Check::BalanceLedger), Some(2.0), "{metrics}");
    assert_eq!(
        gauge(&metrics, Check::ProductReservedUnits),
        Some(0.0),
        "{metrics}"
    );
    batch.stop().await;
}

async fn scrape(batch: &Batch) -> String {
    reqwest::get(format!("http://{}/metrics", batch.metrics_addr()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of `consistency_violations{check}` in a scrape.
fn gauge(metrics: &str, check: Check) -> Option<f64> {
    let series = format!("consistency_violations{{check=\"{check}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&series))
        .and_then(|v| v.trim().parse().ok())
}
