//! Reservation expiry and housekeeping, run as the batch runs them.

use testkit::jobs;

use std::time::Duration;

use batch::{Job, Outcome, Runner};
use chrono::Utc;
use testkit::jobs::{order, user};
use uuid::Uuid;

async fn status_of(db: &sqlx::PgPool, order: Uuid) -> String {
    sqlx::query_scalar("SELECT status FROM orders WHERE id = $1")
        .bind(order)
        .fetch_one(db)
        .await
        .unwrap()
}

#[tokio::test]
async fn expiry_releases_the_stock_of_overdue_reservations_and_leaves_paid_and_fresh_ones_alone() {
    let (url, db) = jobs::fresh_database().await;
    let u = user(&db).await;
    let a = jobs::product(&db, "A", 1_000, 100).await;
    let b = jobs::product(&db, "B", 2_000, 100).await;
    let now = Utc::now();
    let overdue = order(
        &db,
        u,
        "RESERVED",
        now - chrono::Duration::minutes(15),
        Some(now - chrono::Duration::minutes(5)),
        &[(a, 3), (b, 1)],
    )
    .await;
    let fresh = order(
        &db,
        u,
        "RESERVED",
        now,
        Some(now + chrono::Duration::minutes(10)),
        &[(a, 4)],
    )
    .await;
    // Paid after its deadline had been set, and the deadline has passed since: still paid.
    let paid = order(
        &db,
        u,
        "PAID",
        now - chrono::Duration::minutes(20),
        None,
        &[(a, 5)],
    )
    .await;
    sqlx::query("UPDATE orders SET reserved_until = $2 WHERE id = $1")
        .bind(paid)
        .bind(now - chrono::Duration::minutes(10))
        .execute(&db)
        .await
        .unwrap();
    // Stock columns as the worker leaves them: A on hand 95 (5 sold), 7 reserved; B 1 reserved.
    sqlx::query("UPDATE products SET stock = 95, reserved = 7, sold = 5 WHERE id = $1")
        .bind(a)
        .execute(&db)
        .await
        .unwrap();
    sqlx::query("UPDATE products SET reserved = 1 WHERE id = $1")
        .bind(b)
        .execute(&db)
        .await
        .unwrap();

    let runner = Runner::new(db.clone(), jobs::config(&url, "test"));
    let outcome = runner
        .run_scheduled(Job::ReservationExpiry, jobs::quiet_slot())
        .await
        .unwrap();
    assert!(matches!(outcome, Outcome::Ran { rows: 1, .. }), "{outcome:?}");

    assert_eq!(status_of(&db, overdue).await, "EXPIRED");
    assert_eq!(status_of(&db, fresh).await, "RESERVED");
    assert_eq!(status_of(&db, paid).await, "PAID");
    let closed: bool = sqlx::query_scalar("SELECT closed_at IS NOT NULL FROM orders WHERE id = $1")
        .bind(overdue)
        .fetch_one(&db)
        .await
        .unwrap();
    assert!(closed);
    let stock: Vec<(i64, i64, i64)> =
        sqlx::query_as("SELECT stock, reserved, sold FROM products ORDER BY id")
            .fetch_all(&db)
            .await
            .unwrap();
    assert_eq!(
        stock,
        vec![(95, 4, 5), (100, 0, 0)],
        "only the overdue units came back"
    );

    // Nothing is left to expire: running on demand expires nothing more.
    assert_eq!(runner.run_on_demand(Job::ReservationExpiry).await.unwrap(), 0);
}

#[tokio::test]
async fn housekeeping_prunes_only_what_is_past_its_retention() {
    let (url, db) = jobs::fresh_database().await;
    for (key, age_hours) in [("old", 25), ("young", 23)] {
        sqlx::query(
            "INSERT INTO idempotency_keys (scope, key, request, created_at)
             VALUES ('POST /users', $1, '{}', now() - make_interval(hours => $2))",
        )
        .bind(key)
        .bind(age_hours)
        .execute(&db)
        .await
        .unwrap();
    }
    let settled_old = Uuid::now_v7();
    let settled_young = Uuid::now_v7();
    let pending_old = Uuid::now_v7();
    for (id, status, age_days) in [
        (settled_old, "SUCCEEDED", 8),
        (settled_young, "FAILED", 6),
        (pending_old, "PENDING", 8),
    ] {
        sqlx::query(
            "INSERT INTO requests (id, kind, partition_key, payload, status, result, error, created_at, completed_at)
             VALUES ($1, 'COUPON_ISSUE', 1, '{}', $2,
                     CASE WHEN $2 = 'SUCCEEDED' THEN '{}'::jsonb END,
                     CASE WHEN $2 = 'FAILED' THEN '{}'::jsonb END,
                     now() - make_interval(days => $3),
                     CASE WHEN $2 <> 'PENDING' THEN now() - make_interval(days => $3) END)",
        )
        .bind(id)
        .bind(status)
        .bind(age_days)
        .execute(&db)
        .await
        .unwrap();
    }
    sqlx::query(
        "INSERT INTO job_runs (job, period, trigger, outcome, runner, started_at, finished_at, rows)
         VALUES ('reservation-expiry', now() - interval '31 days', 'SCHEDULE', 'SUCCEEDED', 'old', now() - interval '31 days', now() - interval '31 days', 0),
                ('reservation-expiry', now() - interval '29 days', 'SCHEDULE', 'SUCCEEDED', 'recent', now() - interval '29 days', now() - interval '29 days', 0)",
    )
    .execute(&db)
    .await
    .unwrap();

    let runner = Runner::new(db.clone(), jobs::config(&url, "test"));
    let outcome = runner
        .run_scheduled(Job::Housekeeping, jobs::quiet_slot())
        .await
        .unwrap();
    assert!(matches!(outcome, Outcome::Ran { rows: 3, .. }), "{outcome:?}");

    let keys: Vec<String> = sqlx::query_scalar("SELECT key FROM idempotency_keys")
        .fetch_all(&db)
        .await
        .unwrap();
    assert_eq!(keys, vec!["young"]);
    let mut requests: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM requests")
        .fetch_all(&db)
        .await
        .unwrap();
    requests.sort();
    let mut expected = vec![settled_young, pending_old];
    expected.sort();
    assert_eq!(requests, expected, "pending requests stay whatever their age");
    let runners: Vec<String> =
        sqlx::query_scalar("SELECT runner FROM job_runs WHERE job = 'reservation-expiry'")
            .fetch_all(&db)
            .await
            .unwrap();
    assert_eq!(runners, vec!["recent"]);
}

#[tokio::test]
async fn retention_follows_the_configuration() {
    let (url, db) = jobs::fresh_database().await;
    sqlx::query(
        "INSERT INTO idempotency_keys (scope, key, request, created_at)
         VALUES ('POST /users', 'two days', '{}', now() - interval '47 hours')",
    )
    .execute(&db)
    .await
    .unwrap();
    let mut config = jobs::config(&url, "test");
    config.idempotency_key_retention = Duration::from_secs(48 * 3600);
    let runner = Runner::new(db.clone(), config);
    assert_eq!(runner.run_on_demand(Job::Housekeeping).await.unwrap(), 0);

    let mut config = jobs::config(&url, "test");
    config.idempotency_key_retention = Duration::from_secs(46 * 3600);
    let runner = Runner::new(db.clone(), config);
    assert_eq!(runner.run_on_demand(Job::Housekeeping).await.unwrap(), 1);
}
