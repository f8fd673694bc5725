//! Backpressure: with no worker settling, a family's queues fill up; past the limit the
//! API answers 429 `ERR_OVERLOADED` with `Retry-After` and accepts nothing, and it accepts
//! again once the queues drain.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed unwrap is a failed test

mod common;

use std::time::Duration;

use common::spawn_app_with;
use lapin::options::QueuePurgeOptions;
use reqwest::StatusCode;
use serde_json::json;
use shared::topology::Family;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_queue_limit_commands_get_429_until_the_queues_drain() {
    let app = spawn_app_with(|config| {
        config.command_queue_limit = 3;
        config.command_queue_sample = Duration::from_millis(50);
    })
    .await;
    let coupon = app
        .create_coupon(json!({
            "name": "C", "discountType": "FIXED", "discountValue": 100, "totalQuantity": 100,
            "expiresAt": (chrono::Utc::now() + chrono::Duration::days(1)).to_rfc3339(),
        }))
        .await;
    let users = app.create_users(20).await;
    let path = format!("/coupons/{coupon}/issue");
    let patience = Duration::from_secs(30);

    // Nothing settles these: the coupon's queue grows until the sampler sees it pass 3.
    let mut accepted = 0;
    let mut next_user = users.iter();
    let overloaded = loop {
        let user = next_user
            .next()
            .expect("the limit is reached before the users run out");
        let answer = app.post(&path, json!({ "userId": user })).await;
        match answer.status {
            StatusCode::ACCEPTED => accepted += 1,
            StatusCode::TOO_MANY_REQUESTS => break answer,
            other => panic!("unexpected {other}: {answer:?}"),
        }
        tokio::time::sleep(Duration::from_millis(60)).await;
    };
    assert!(
        accepted > 3,
        "429 before the limit was passed ({accepted} accepted)"
    );
    assert_eq!(overloaded.code(), "ERR_OVERLOADED");
    assert!(overloaded.headers.get("retry-after").is_some());
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM requests")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(stored, accepted, "a 429 stored a request");

    // Refused with a key, the key is not spent: the same request goes through later.
    let waiting_user = next_user.next().unwrap();
    let refused = app
        .post_with_key(&path, json!({ "userId": waiting_user }), "later")
        .await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS, "{refused:?}");

    // The queues drain (as workers would settle them): accepted again.
    let broker = shared::config::BrokerSettings::from_env().unwrap().url;
    let conn = lapin::Connection::connect(&broker, Default::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    for partition in 0..app.topology.partitions {
        let queue = app.topology.queue(Family::Coupon, partition);
        channel
            .queue_purge(queue.as_str().into(), QueuePurgeOptions::default())
            .await
            .unwrap();
    }
    let again = app
        .eventually(StatusCode::ACCEPTED, patience, || {
            app.post_with_key(&path, json!({ "userId": waiting_user }), "later")
        })
        .await;
    assert!(again.headers.get("idempotent-replayed").is_none());
    let _ = conn.close(200, "done".into()).await;
}
