//! Under overload: reads past their bound are answered 503 at once rather than queued for
//! the pool, and readiness is answered from a check at most a second old.
//!
//! A test binary of its own, not a module of `tests/it`: it counts
//! `api_readiness_checks_total` over a burst, a counter of the process-wide recorder every
//! other test's api adds to.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed unwrap is a failed test

use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use sqlx::Connection;
use testkit::{spawn_app_with, TestApp};

async fn metric(app: &TestApp, name: &str) -> f64 {
    let text = app.metrics().await.text().await.unwrap();
    text.lines()
        .filter(|line| line.starts_with(name) && line[name.len()..].starts_with([' ', '{']))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_read_past_the_bound_is_answered_503_at_once_and_the_reads_in_flight_finish() {
    let app = Arc::new(spawn_app_with(|config| config.max_reads_in_flight = 1).await);
    let product = app.create_product("Lamp", 1_000, 5).await;

    // A read held up in PostgreSQL: the products table is locked by this test.
    let mut blocker = sqlx::PgConnection::connect(&app.database_url).await.unwrap();
    let mut tx = blocker.begin().await.unwrap();
    sqlx::query("LOCK TABLE products IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await
        .unwrap();
    let held = {
        let app = Arc::clone(&app);
        tokio::spawn(async move { app.get(&format!("/products/{product}")).await })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let waiting: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_locks WHERE NOT granted")
            .fetch_one(&app.db)
            .await
            .unwrap();
        if waiting > 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the read never reached PostgreSQL"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The bound is taken: another read is refused at once, whatever it reads.
    let shed = app.get("/products").await;
    assert_eq!(shed.status, StatusCode::SERVICE_UNAVAILABLE, "{shed:?}");
    assert_eq!(shed.code(), "ERR_UNAVAILABLE");
    assert_eq!(shed.headers["retry-after"], "1");
    // What must answer under load still does.
    assert_eq!(app.get("/health/live").await.status, StatusCode::OK);
    assert_eq!(app.get("/health/ready").await.status, StatusCode::OK);
    assert_eq!(app.get("/openapi.json").await.status, StatusCode::OK);

    tx.rollback().await.unwrap();
    let answered = held.await.unwrap();
    assert_eq!(answered.status, StatusCode::OK, "{answered:?}");
    // The permit is back.
    assert_eq!(app.get("/products").await.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readiness_asks_the_dependencies_at_most_once_a_second() {
    let app = Arc::new(spawn_app_with(|_| {}).await);
    let before = metric(&app, "api_readiness_checks_total").await;
    // At least the check of spawn_app, which waits for a ready api: the counter exists.
    assert!(before >= 1.0);
    let started = tokio::time::Instant::now();
    let asked: Vec<_> = (0..200)
        .map(|_| {
            let app = Arc::clone(&app);
            tokio::spawn(async move { app.get("/health/ready").await.status })
        })
        .collect();
    for answer in asked {
        assert_eq!(answer.await.unwrap(), StatusCode::OK);
    }
    let seconds = started.elapsed().as_secs_f64().ceil();
    let checks = metric(&app, "api_readiness_checks_total").await - before;
    // One per second of the burst, and a few for the other test of this binary starting
    // (the recorder is shared by the process); 200 without the cache.
    assert!(checks <= seconds + 4.0, "{checks} checks in {seconds} s");
}
