//! RabbitMQ going down and coming back, as the API sees it: 503 with `Retry-After` while it
//! is down, nothing accepted that could later take effect, and recovery without a restart.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed unwrap is a failed test

mod common;

use common::{socket_of, spawn_app_with, Proxy};
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_broker_down_commands_get_503_and_the_api_recovers_by_itself() {
    let broker_url = shared::config::BrokerSettings::from_env().unwrap().url;
    let proxy = Proxy::start(socket_of(&broker_url)).await;
    let proxied = proxy.url_for(&broker_url);
    let app = spawn_app_with(|config| config.broker.url = proxied).await;
    let user = app.create_user("Ann").await;
    let coupon = app
        .create_coupon(json!({
            "name": "C", "discountType": "FIXED", "discountValue": 100, "totalQuantity": 5,
            "expiresAt": (chrono::Utc::now() + chrono::Duration::days(1)).to_rfc3339(),
        }))
        .await;
    let path = format!("/coupons/{coupon}/issue");
    let patience = std::time::Duration::from_secs(60);
    app.eventually(StatusCode::OK, patience, || app.get("/health/ready"))
        .await;
    app.eventually(StatusCode::ACCEPTED, patience, || {
        app.post(&path, json!({ "userId": user }))
    })
    .await;

    proxy.cut();
    let refused = app
        .post_with_key(&path, json!({ "userId": user }), "retry-me")
        .await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE, "{refused:?}");
    assert_eq!(refused.code(), "ERR_UNAVAILABLE");
    assert!(refused.headers.get("retry-after").is_some());
    assert_eq!(app.get("/health/live").await.status, StatusCode::OK);
    assert_eq!(
        app.get("/health/ready").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    // Nothing was accepted: the stored request was withdrawn before any worker could see it.
    let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM requests WHERE status = 'PENDING'")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(
        pending, 1,
        "only the request accepted before the outage is pending"
    );

    proxy.restore().await;
    // Recovery needs no restart: the API reconnects on the next request that needs RabbitMQ.
    // (Each 503 released the key, so the same key is a fresh request every time.)
    let accepted = app
        .eventually(StatusCode::ACCEPTED, patience, || {
            app.post_with_key(&path, json!({ "userId": user }), "retry-me")
        })
        .await;
    assert!(
        accepted.headers.get("idempotent-replayed").is_none(),
        "the 503 was not saved"
    );
    app.eventually(StatusCode::OK, patience, || app.get("/health/ready"))
        .await;
    let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM requests WHERE status = 'PENDING'")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(
        pending, 2,
        "the two accepted requests, and nothing else, are pending"
    );
}
