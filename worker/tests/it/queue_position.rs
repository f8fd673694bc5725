//! A pending request's place in its partition's queue (`queuePosition`, `estimatedWaitMs`)
//! and the partitions at a glance (`GET /admin/partitions`), against the api and worker
//! processes over PostgreSQL and RabbitMQ.

use std::collections::HashMap;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use shared::domain::partition::partition_of;
use testkit::{Answer, System};

/// Generous bound for what a busy 2-core machine does in well under a second.
const PATIENCE: Duration = Duration::from_secs(60);

async fn request_as(system: &System, user: i64, id: &str) -> Answer {
    let answer = system.app.get_as(user, &format!("/requests/{id}")).await;
    assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
    answer
}

/// Reads the request until `done` holds of it, failing after [`PATIENCE`].
async fn request_until(system: &System, user: i64, id: &str, mut done: impl FnMut(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let answer = request_as(system, user, id).await;
        if done(&answer.body) {
            return answer.body;
        }
        assert!(tokio::time::Instant::now() < deadline, "still {answer:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pending_issues_stand_in_acceptance_order_and_move_up_as_those_before_them_settle() {
    // No worker yet: every command stays pending.
    let system = System::start(0).await;
    let coupon = system.coupon(100).await;
    let users = system.app.create_users(20).await;

    let mut ids = Vec::new();
    for (n, user) in users.iter().enumerate() {
        let accepted = system.issue(coupon, *user).await;
        assert_eq!(accepted.status, StatusCode::ACCEPTED, "{accepted:?}");
        assert_eq!(accepted.body["queuePosition"], json!(n), "{accepted:?}");
        // Nothing was ever settled in this partition: no estimate, and the usual poll.
        assert!(accepted.body.get("estimatedWaitMs").is_none(), "{accepted:?}");
        assert_eq!(accepted.headers["retry-after"], "1");
        ids.push(accepted.body["requestId"].as_str().unwrap().to_owned());
    }
    for (n, (user, id)) in users.iter().zip(&ids).enumerate() {
        let read = request_as(&system, *user, id).await;
        assert_eq!(read.body["status"], "PENDING");
        assert_eq!(read.body["queuePosition"], json!(n), "{read:?}");
        let listed = system.app.get_as(*user, &format!("/users/{user}/requests")).await;
        assert_eq!(listed.body["items"][0]["requestId"], id.as_str());
        assert_eq!(listed.body["items"][0]["queuePosition"], json!(n), "{listed:?}");
    }

    // A command cancelled ahead of the others moves each of them up by one.
    let cancelled = system
        .app
        .send_as(
            Some(users[0]),
            Method::DELETE,
            &format!("/requests/{}", ids[0]),
            None,
            &[],
        )
        .await;
    assert_eq!(cancelled.status, StatusCode::OK, "{cancelled:?}");
    assert!(cancelled.body.get("queuePosition").is_none(), "{cancelled:?}");
    let last = (users[19], ids[19].as_str());
    request_until(&system, last.0, last.1, |r| r["queuePosition"] == json!(18)).await;
    assert_eq!(
        request_as(&system, users[1], &ids[1]).await.body["queuePosition"],
        0
    );

    // A worker settles them, one per batch so that positions have time to be seen falling:
    // the last one's position only ever falls, until it is settled and has none.
    system
        .spawn_worker_with(&[("WORKER_BATCH_SIZE", "1".to_owned())])
        .await;
    let mut seen = vec![18];
    let settled = request_until(&system, last.0, last.1, |r| {
        if let Some(position) = r["queuePosition"].as_i64() {
            if seen.last() != Some(&position) {
                seen.push(position);
            }
        }
        r["status"] != "PENDING"
    })
    .await;
    assert!(seen.windows(2).all(|w| w[1] < w[0]), "positions seen: {seen:?}");
    eprintln!("positions of the last request seen while a worker settled the queue: {seen:?}");
    assert_eq!(settled["status"], "SUCCEEDED", "{settled:?}");
    assert!(settled.get("queuePosition").is_none() && settled.get("estimatedWaitMs").is_none());
    system.wait_until_settled().await;
    for (user, id) in users.iter().zip(&ids) {
        let read = request_as(&system, *user, id).await;
        assert!(["SUCCEEDED", "FAILED"].contains(&read.body["status"].as_str().unwrap()));
        assert!(read.body.get("queuePosition").is_none(), "{read:?}");
    }

    // With the worker gone again, new commands queue up; the partition settled a moment
    // ago, so each now has an estimated wait, which grows with its place in the queue.
    system.stop_worker(0).await;
    let later = system.app.create_users(3).await;
    let mut queued = Vec::new();
    for (n, user) in later.iter().enumerate() {
        let accepted = system.issue(coupon, *user).await;
        assert_eq!(accepted.status, StatusCode::ACCEPTED, "{accepted:?}");
        assert_eq!(accepted.body["queuePosition"], json!(n), "{accepted:?}");
        queued.push((*user, accepted.body["requestId"].as_str().unwrap().to_owned()));
    }
    let mut waits = Vec::new();
    for (user, id) in &queued {
        let read = request_until(&system, *user, id, |r| r["estimatedWaitMs"].is_u64()).await;
        let retry_after: u64 = request_as(&system, *user, id).await.headers["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=10).contains(&retry_after), "{retry_after}");
        waits.push(read["estimatedWaitMs"].as_u64().unwrap());
    }
    assert!(
        waits.windows(2).all(|w| w[0] <= w[1]),
        "estimated waits: {waits:?}"
    );
}

/// The view's items by (family, partition).
fn by_partition(view: &Value) -> HashMap<(String, u16), Value> {
    view["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| {
            let family = item["family"].as_str().unwrap().to_owned();
            let partition = u16::try_from(item["partition"].as_u64().unwrap()).unwrap();
            ((family, partition), item.clone())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_partitions_view_shows_owners_backlogs_and_settle_rates() {
    let system = System::start(2).await;
    let partitions = system.app.topology.partitions;

    let anonymous = system.app.get("/admin/partitions").await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED, "{anonymous:?}");
    assert_eq!(anonymous.code(), "ERR_UNAUTHORIZED");

    system.wait_for_owners(2).await;
    let product = system.product(1_000, 1_000).await;
    let coupons = [system.coupon(100).await, system.coupon(100).await];
    let users = system.app.create_users(8).await;
    for user in &users {
        for coupon in coupons {
            assert_eq!(system.issue(coupon, *user).await.status, StatusCode::ACCEPTED);
        }
        assert_eq!(
            system.order(*user, &[(product, 1)]).await.status,
            StatusCode::ACCEPTED
        );
    }
    system.wait_until_settled().await;

    let view = system
        .app
        .admin(Method::GET, "/admin/partitions", Value::Null)
        .await;
    assert_eq!(view.status, StatusCode::OK, "{view:?}");
    // No management API on the test broker: ready from AMQP.
    assert_eq!(view.body["source"], "amqp", "{view:?}");
    let items = by_partition(&view.body);
    assert_eq!(items.len(), 2 * usize::from(partitions), "{view:?}");
    let live: Vec<String> = system
        .live_replicas()
        .await
        .iter()
        .map(ToString::to_string)
        .collect();
    for family in ["coupon", "order"] {
        for partition in 0..partitions {
            let item = &items[&(family.to_owned(), partition)];
            assert!(
                live.contains(&item["ownerId"].as_str().unwrap().to_owned()),
                "{item}"
            );
            assert!(item["owner"].as_str().is_some_and(|o| !o.is_empty()), "{item}");
            assert_eq!(item["pending"], 0, "{item}");
            assert!(item.get("oldestPendingAt").is_none(), "{item}");
        }
    }
    // Every partition that settled something says so, with a rate above zero.
    let busy = coupons
        .iter()
        .map(|c| ("coupon", partition_of(*c, partitions)))
        .chain(users.iter().map(|u| ("order", partition_of(*u, partitions))));
    for (family, partition) in busy {
        let item = &items[&(family.to_owned(), partition)];
        assert!(item["settledPerSec"].as_f64().unwrap() > 0.0, "{item}");
        assert!(item["lastSettledAt"].is_string(), "{item}");
    }

    // Workers gone: new commands wait, and the view's backlog is the database's.
    system.stop_worker(0).await;
    system.stop_worker(1).await;
    let more = system.app.create_users(6).await;
    for user in &more {
        assert_eq!(system.issue(coupons[0], *user).await.status, StatusCode::ACCEPTED);
        assert_eq!(
            system.order(*user, &[(product, 1)]).await.status,
            StatusCode::ACCEPTED
        );
    }
    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT kind, partition_key FROM requests WHERE status = 'PENDING'")
            .fetch_all(&system.app.db)
            .await
            .unwrap();
    let mut expected: HashMap<(String, u16), u64> = HashMap::new();
    for (kind, key) in rows {
        let family = if kind == "COUPON_ISSUE" { "coupon" } else { "order" };
        *expected
            .entry((family.to_owned(), partition_of(key, partitions)))
            .or_default() += 1;
    }
    assert_eq!(expected.values().sum::<u64>(), 12);
    // Published after their commit: ready in RabbitMQ once the relay's confirms are in.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let view = system
            .app
            .admin(Method::GET, "/admin/partitions", Value::Null)
            .await;
        let items = by_partition(&view.body);
        let mut all_ready = true;
        for (key, item) in &items {
            let pending = expected.get(key).copied().unwrap_or(0);
            assert_eq!(item["pending"], pending, "{key:?}: {item}");
            assert_eq!(item["oldestPendingAt"].is_string(), pending > 0, "{item}");
            assert!(item.get("owner").is_none(), "no worker runs: {item}");
            let ready = item["ready"].as_u64().unwrap();
            assert_eq!(
                item["unacked"].as_u64().unwrap(),
                pending.saturating_sub(ready),
                "{item}"
            );
            all_ready &= ready == pending;
        }
        if all_ready {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{view:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
