//! A user holds a bounded number of waits (`?wait=`, `Prefer: wait`) at once: one more is
//! refused 429, the waits already held are answered as usual, and other users are not
//! affected.
//!
//! A test binary of its own, not a module of `tests/it`: it reads `api_waits_open`, a gauge
//! of the process-wide metrics recorder that other tests' waits would move.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed unwrap is a failed test

use std::sync::Arc;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::json;
use shared::domain::error::{ErrorBody, ErrorCode};
use testkit::{spawn_app_with, TestApp};

async fn coupon(app: &TestApp) -> i64 {
    let expires = (chrono::Utc::now() + chrono::Duration::days(1)).to_rfc3339();
    app.create_coupon(json!({
        "name": "Flash", "discountType": "FIXED", "discountValue": 1000,
        "totalQuantity": 100, "expiresAt": expires,
    }))
    .await
}

/// A pending request of `user` (no worker runs here: it stays pending).
async fn pending_request(app: &TestApp, coupon: i64, user: i64) -> String {
    let accepted = app
        .command(&format!("/coupons/{coupon}/issue"), json!({ "userId": user }))
        .await;
    assert_eq!(accepted.status, StatusCode::ACCEPTED, "{accepted:?}");
    accepted.body["requestId"].as_str().unwrap().to_owned()
}

async fn waits_open(app: &TestApp) -> i64 {
    let text = app.metrics().await.text().await.unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix("api_waits_open "))
        .and_then(|value| value.trim().parse::<f64>().ok())
        .map_or(0, |value| value as i64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_user_past_the_bound_of_waits_is_refused_and_the_waits_held_are_answered() {
    let app = Arc::new(spawn_app_with(|config| config.max_waits_per_user = 20).await);
    let (ann, bob) = (app.create_user("Ann").await, app.create_user("Bob").await);
    let coupon = coupon(&app).await;
    let request = pending_request(&app, coupon, ann).await;

    let parked: Vec<_> = (0..20)
        .map(|_| {
            let (app, path) = (Arc::clone(&app), format!("/requests/{request}?wait=30"));
            tokio::spawn(async move { app.get(&path).await })
        })
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while waits_open(&app).await < 20 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the 20 waits never parked"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The 21st wait of Ann: refused at once, by either kind.
    let refused = app.get(&format!("/requests/{request}?wait=30")).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS, "{refused:?}");
    assert_eq!(refused.code(), "ERR_RATE_LIMITED");
    assert!(refused.headers.contains_key("retry-after"));
    let other_coupon = self::coupon(&app).await;
    let stored_before = app.row_counts().await;
    let command = app
        .send(
            Method::POST,
            &format!("/coupons/{other_coupon}/issue"),
            Some(json!({ "userId": ann })),
            &[("Prefer", "respond-async, wait=5")],
        )
        .await;
    assert_eq!(command.status, StatusCode::TOO_MANY_REQUESTS, "{command:?}");
    assert_eq!(
        app.row_counts().await,
        stored_before,
        "a refused command stored nothing"
    );
    // Without a wait, Ann is served as ever.
    assert_eq!(
        app.get(&format!("/requests/{request}")).await.status,
        StatusCode::OK
    );

    // Bob waits on his own request, unaffected: after his wait, still pending.
    let bobs = pending_request(&app, coupon, bob).await;
    let waited = app.get(&format!("/requests/{bobs}?wait=1")).await;
    assert_eq!(waited.status, StatusCode::OK, "{waited:?}");
    assert_eq!(waited.body["status"], "PENDING");

    // Ann's request settles (failed, as a cancellation would): all 20 waits answer it.
    let mut conn = app.db.acquire().await.unwrap();
    let settled = shared::store::requests::fail_pending(
        &mut conn,
        request.parse().unwrap(),
        &ErrorBody::new(ErrorCode::ProcessingFailed, "settled by the test"),
    )
    .await
    .unwrap();
    assert!(settled);
    for wait in parked {
        let answer = wait.await.unwrap();
        assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
        assert_eq!(answer.body["status"], "FAILED", "{answer:?}");
    }
    // Her allowance is back.
    let again = app.get(&format!("/requests/{request}?wait=1")).await;
    assert_eq!(again.status, StatusCode::OK, "{again:?}");
}
