//! Backpressure: with no worker settling, a family's queues fill up; past the limit the
//! API answers 429 `ERR_OVERLOADED` with `Retry-After` and accepts nothing new, and it
//! accepts again once the queues drain. A key that already has an answer keeps getting it,
//! families are refused independently, and a limit of 0 refuses nothing while the depth is
//! still published.
//!
//! A test binary of its own, not a module of `tests/it`: it reads
//! `api_command_queue_depth`, a gauge of the process-wide metrics recorder that other
//! tests' commands would move.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed unwrap is a failed test

use std::time::Duration;

use lapin::options::QueuePurgeOptions;
use reqwest::StatusCode;
use serde_json::json;
use shared::domain::command::Family;
use testkit::{spawn_app_with, Answer};

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

/// Sends a new command at a time until one is refused with 429: nothing settles them, so
/// the family's queues grow until the sampler sees them pass the limit. Returns the
/// accepted answers, in the order sent, and the refusal.
async fn send_until_overloaded<F, Fut>(send: F) -> (Vec<Answer>, Answer)
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Answer>,
{
    let mut accepted = Vec::new();
    for attempt in 0..25 {
        let answer = send(attempt).await;
        match answer.status {
            StatusCode::ACCEPTED => accepted.push(answer),
            StatusCode::TOO_MANY_REQUESTS => return (accepted, answer),
            other => panic!("unexpected {other}: {answer:?}"),
        }
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    panic!("still accepted after {} commands", accepted.len());
}

fn assert_overloaded(answer: &Answer) {
    assert_eq!(answer.status, StatusCode::TOO_MANY_REQUESTS, "{answer:?}");
    assert_eq!(answer.code(), "ERR_OVERLOADED");
    assert!(answer.headers.get("retry-after").is_some(), "{answer:?}");
}

fn a_coupon() -> serde_json::Value {
    json!({
        "name": "C", "discountType": "FIXED", "discountValue": 100, "totalQuantity": 100,
        "expiresAt": (chrono::Utc::now() + chrono::Duration::days(1)).to_rfc3339(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_overload_a_key_that_has_an_answer_gets_it_and_only_a_new_command_gets_429() {
    let app = spawn_app_with(|config| {
        config.command_queue_limit = 3;
        config.command_queue_sample = Duration::from_millis(50);
    })
    .await;
    let coupon = app.create_coupon(a_coupon()).await;
    let users = app.create_users(30).await;
    let spare = *users.last().unwrap();
    let path = format!("/coupons/{coupon}/issue");
    let first = app
        .post_with_key(&path, json!({ "userId": users[0] }), "first")
        .await;
    assert_eq!(first.status, StatusCode::ACCEPTED, "{first:?}");
    let (_, overloaded) = send_until_overloaded(|i| app.post(&path, json!({ "userId": users[1 + i] }))).await;
    assert_overloaded(&overloaded);
    let before = app.row_counts().await;

    // The client's retry of the accepted request: its first answer, not 429.
    let replay = app
        .post_with_key(&path, json!({ "userId": users[0] }), "first")
        .await;
    assert_eq!(replay.status, StatusCode::ACCEPTED, "{replay:?}");
    assert_eq!(replay.body, first.body);
    assert_eq!(replay.headers["idempotent-replayed"], "true");
    assert_eq!(replay.headers["location"], first.headers["location"]);
    assert!(replay.headers.get("retry-after").is_some());

    // Keys are per user: the same key from another user, like a key never seen, would
    // create a command: refused, and not spent.
    for key in ["first", "fresh"] {
        let fresh = app.post_with_key(&path, json!({ "userId": spare }), key).await;
        assert_overloaded(&fresh);
    }
    assert_eq!(
        app.row_counts().await,
        before,
        "an answer under overload stored something"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_over_their_limit_are_refused_and_store_nothing_while_coupons_are_accepted() {
    let app = spawn_app_with(|config| {
        config.command_queue_limit = 3;
        config.command_queue_sample = Duration::from_millis(50);
    })
    .await;
    let pen = app.create_product("Pen", 1_000, 1_000).await;
    let coupon = app.create_coupon(a_coupon()).await;
    let users = app.create_users(30).await;
    let spare = *users.last().unwrap();
    let new_order = |user: i64| json!({ "userId": user, "items": [{ "productId": pen, "quantity": 1 }] });

    let (placed, overloaded) = send_until_overloaded(|i| app.post("/orders", new_order(users[i]))).await;
    assert_overloaded(&overloaded);
    // Still PENDING (nothing settles it), so its payment passes the API's checks and would
    // be queued.
    let order = placed[0].body["orderId"].as_str().unwrap().to_owned();
    let payment = format!("/orders/{order}/payment");
    let before = app.row_counts().await;

    for (what, refused) in [
        ("an order", app.post("/orders", new_order(spare)).await),
        (
            "an order with a key",
            app.post_with_key("/orders", new_order(spare), "order-later")
                .await,
        ),
        (
            "a payment",
            app.post(&payment, json!({ "userId": users[0] })).await,
        ),
        (
            "a payment with a key",
            app.post_with_key(&payment, json!({ "userId": users[0] }), "pay-later")
                .await,
        ),
    ] {
        assert_eq!(
            refused.status,
            StatusCode::TOO_MANY_REQUESTS,
            "{what}: {refused:?}"
        );
        assert_overloaded(&refused);
    }
    assert_eq!(
        app.row_counts().await,
        before,
        "a refused command stored something"
    );

    // The coupon family's queues are short: its commands are still accepted.
    let issued = app
        .post(&format!("/coupons/{coupon}/issue"), json!({ "userId": spare }))
        .await;
    assert_eq!(issued.status, StatusCode::ACCEPTED, "{issued:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_limit_off_nothing_is_refused_and_the_queue_depth_is_still_published() {
    // The gauge is process-wide and the other tests here publish theirs too, but none of
    // them lets a family's queues reach this depth, so reading it means this app's sampler
    // published it.
    const DEPTH: i64 = 25;
    let app = spawn_app_with(|config| {
        config.command_queue_limit = 0;
        config.command_queue_sample = Duration::from_millis(20);
    })
    .await;
    let coupon = app.create_coupon(a_coupon()).await;
    let path = format!("/coupons/{coupon}/issue");
    for user in app.create_users(DEPTH).await {
        let answer = app.post(&path, json!({ "userId": user })).await;
        assert_eq!(answer.status, StatusCode::ACCEPTED, "{answer:?}");
    }

    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let metrics = app.metrics().await;
        let text = metrics.text().await.unwrap();
        let depth = text
            .lines()
            .find(|line| line.starts_with("api_command_queue_depth{family=\"coupon\"}"))
            .and_then(|line| line.split_whitespace().last())
            .and_then(|value| value.parse::<f64>().ok());
        if depth == Some(DEPTH as f64) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the coupon queue depth never read {DEPTH}: {depth:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
