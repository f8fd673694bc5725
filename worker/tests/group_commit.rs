//! Group commit of accepts: commands accepted at the same moment by one api share one
//! statement and one commit, and each still gets its own answer; a batch whose statement
//! fails is stored again one command at a time, so nothing is lost or doubled.
//!
//! A test binary of its own, not a module of `tests/it`: it reads `api_accepts_waiting`, a
//! gauge of the process-wide metrics recorder that other tests' commands would move.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed unwrap is a failed test

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures::future::join_all;
use reqwest::StatusCode;
use serde_json::json;
use testkit::System;
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_hundred_concurrent_commands_are_each_stored_once_and_settled_once() {
    // The workers start once every command is accepted: settling while the burst is still
    // arriving could sell the coupon out first, and the api would then rightly refuse the
    // last issues with 410 instead of accepting them (1 run in many on a busy machine).
    let system = System::start(0).await;
    let users = system.app.create_users(250).await;
    let coupon = system.coupon(100).await;
    let product = system.product(1_000, 10_000).await;

    // Per user: a coupon issue and an order, each with its own key: 500 commands at once.
    // The first 50 users also send their coupon issue's key a second time, concurrently,
    // as a client that timed out would.
    let issue = |user: i64| {
        let app = &system.app;
        async move {
            let answer = app
                .post_with_key(
                    &format!("/coupons/{coupon}/issue"),
                    json!({ "userId": user }),
                    &format!("issue-{user}"),
                )
                .await;
            (format!("issue-{user}"), answer)
        }
    };
    let order = |user: i64| {
        let app = &system.app;
        async move {
            let answer = app
                .post_with_key(
                    "/orders",
                    json!({ "userId": user, "items": [{ "productId": product, "quantity": 1 }] }),
                    &format!("order-{user}"),
                )
                .await;
            (format!("order-{user}"), answer)
        }
    };
    let sends = users
        .iter()
        .map(|&u| futures::future::Either::Left(issue(u)))
        .chain(users.iter().map(|&u| futures::future::Either::Right(order(u))))
        .chain(
            users[..50]
                .iter()
                .map(|&u| futures::future::Either::Left(issue(u))),
        );
    let answers = join_all(sends).await;

    let mut named: HashMap<String, Uuid> = HashMap::new();
    let mut orders = HashSet::new();
    let mut in_use = 0;
    for (key, answer) in &answers {
        if answer.status == StatusCode::CONFLICT {
            // The same key's first request was still being stored.
            assert_eq!(answer.code(), "ERR_IDEMPOTENCY_KEY_IN_USE", "{answer:?}");
            in_use += 1;
            continue;
        }
        assert_eq!(answer.status, StatusCode::ACCEPTED, "{key}: {answer:?}");
        let id: Uuid = answer.body["requestId"].as_str().unwrap().parse().unwrap();
        if let Some(first) = named.insert(key.clone(), id) {
            assert_eq!(first, id, "key {key} answered with two requests");
        }
        if let Some(order) = answer.body["orderId"].as_str() {
            orders.insert(order.to_owned());
        }
    }
    assert_eq!(named.len(), 500, "every command answered with its own request");
    assert!(in_use <= 50);
    assert_eq!(orders.len(), 250, "every order answered with its own order");

    let ids: Vec<Uuid> = named.values().copied().collect();
    let (stored, transactions): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(DISTINCT xmin::text) FROM requests WHERE id = ANY($1)")
            .bind(&ids)
            .fetch_one(&system.app.db)
            .await
            .unwrap();
    assert_eq!(stored, 500, "every accepted command is stored");
    let all: i64 = system.scalar("SELECT count(*) FROM requests").await;
    assert_eq!(all, 500, "and nothing else: no key stored two requests");
    // Rows written by one statement share its transaction id: fewer transactions than
    // commands means accepts were written together.
    assert!(
        transactions < 500,
        "500 commands were written by {transactions} transactions"
    );
    let keys = system
        .scalar("SELECT count(DISTINCT (idempotency_scope, idempotency_key)) FROM requests")
        .await;
    assert_eq!(keys, 500, "each key lives with its own request");
    let key_rows = system.scalar("SELECT count(*) FROM idempotency_keys").await;
    assert_eq!(
        key_rows, 0,
        "one insert per command: no key row beside the request"
    );

    system.spawn_worker().await;
    system.spawn_worker().await;
    system.wait_for_owners(2).await;
    system.wait_until_settled().await;
    // The keys sent twice were claimed by concurrent batches: every batch takes its keys in
    // one order, so none of them deadlocked (and was stored again one by one). A backend
    // reports its counters at most 10 s late (when it goes idle): read after that.
    tokio::time::sleep(Duration::from_secs(11)).await;
    let deadlocks = system
        .scalar("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")
        .await;
    assert_eq!(deadlocks, 0, "no accept batch deadlocked");
    let settled = system
        .scalar("SELECT count(*) FROM requests WHERE status <> 'PENDING' AND completed_at IS NOT NULL")
        .await;
    assert_eq!(settled, 500);
    assert_eq!(system.assert_coupon_invariants(coupon).await, 100);
    let reserved = system
        .scalar("SELECT count(*) FROM orders WHERE status = 'RESERVED'")
        .await;
    assert_eq!(reserved, 250, "every order reserved once");
    system.assert_money_invariants().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_whose_statement_fails_loses_and_doubles_nothing() {
    // One writer, so that the commands sent while it is held all queue for the same batch.
    let system = System::start_with(1, |config| config.intake.writers = 1).await;
    system.wait_for_owners(1).await;
    let users = system.app.create_users(21).await;
    let (opener, users) = (users[0], &users[1..]);
    let poisoned = users[7];
    let coupon = system.coupon(100).await;

    // One row that breaks the batch's statement: a trigger refuses the poisoned user's
    // request, as a constraint would.
    sqlx::raw_sql(&format!(
        "CREATE FUNCTION refuse_poisoned() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN RAISE EXCEPTION 'poisoned row'; END $$;
         CREATE TRIGGER poisoned BEFORE INSERT ON requests FOR EACH ROW
         WHEN (NEW.user_id = {poisoned}) EXECUTE FUNCTION refuse_poisoned();"
    ))
    .execute(&system.app.db)
    .await
    .unwrap();

    // Hold the writer: its first batch (the opener's) waits on a lock of the requests table
    // while the other twenty commands queue behind it.
    let mut holder = system.app.db.begin().await.unwrap();
    sqlx::query("LOCK TABLE requests IN SHARE ROW EXCLUSIVE MODE")
        .execute(&mut *holder)
        .await
        .unwrap();
    let send = |user: i64| {
        let app = &system.app;
        async move {
            let answer = app
                .post_with_key(
                    &format!("/coupons/{coupon}/issue"),
                    json!({ "userId": user }),
                    &format!("k-{user}"),
                )
                .await;
            (user, answer)
        }
    };
    let scenario = async {
        wait_for_blocked_batch(&system).await;
        let rest = join_all(users.iter().map(|&u| send(u)));
        let release = async {
            wait_for_waiting_accepts(&system, users.len()).await;
            holder.commit().await.unwrap();
        };
        tokio::join!(rest, release).0
    };
    let ((_, opened), answers) = tokio::join!(send(opener), scenario);
    assert_eq!(opened.status, StatusCode::ACCEPTED, "{opened:?}");

    let mut accepted = Vec::new();
    for (user, answer) in &answers {
        if *user == poisoned {
            assert_eq!(answer.status, StatusCode::INTERNAL_SERVER_ERROR, "{answer:?}");
            assert_eq!(answer.code(), "ERR_INTERNAL");
        } else {
            assert_eq!(answer.status, StatusCode::ACCEPTED, "{user}: {answer:?}");
            accepted.push(
                answer.body["requestId"]
                    .as_str()
                    .unwrap()
                    .parse::<Uuid>()
                    .unwrap(),
            );
        }
    }
    assert_eq!(accepted.len(), 19);
    let fallbacks = metric(&system, "api_accept_batch_fallbacks_total").await;
    assert!(fallbacks >= 1.0, "the failed batch was stored one by one");

    let stored = system
        .scalar(&format!(
            "SELECT count(*) FROM requests WHERE user_id <> {opener}"
        ))
        .await;
    assert_eq!(
        stored, 19,
        "the others stored once each, the poisoned one not at all"
    );
    let poisoned_key = system
        .scalar(&format!(
            "SELECT (SELECT count(*) FROM idempotency_keys WHERE key = 'k-{poisoned}')
                  + (SELECT count(*) FROM requests WHERE idempotency_key = 'k-{poisoned}')"
        ))
        .await;
    assert_eq!(poisoned_key, 0, "the failed command's key is free for its retry");

    // Its retry, once the fault is gone, is accepted.
    sqlx::raw_sql("DROP TRIGGER poisoned ON requests")
        .execute(&system.app.db)
        .await
        .unwrap();
    let (_, retried) = send(poisoned).await;
    assert_eq!(retried.status, StatusCode::ACCEPTED, "{retried:?}");

    system.wait_until_settled().await;
    assert_eq!(system.assert_coupon_invariants(coupon).await, 21);
}

/// Waits until a batch statement of the api waits for the lock the test holds.
async fn wait_for_blocked_batch(system: &System) {
    let deadline = tokio::time::Instant::now() + testkit::PATIENCE;
    loop {
        let blocked = system
            .scalar(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND wait_event_type = 'Lock'
                   AND query LIKE '%INSERT INTO requests%accepted_by%'",
            )
            .await;
        if blocked == 1 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no batch waits for the lock"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `count` accepts wait for a writer of the api.
async fn wait_for_waiting_accepts(system: &System, count: usize) {
    let deadline = tokio::time::Instant::now() + testkit::PATIENCE;
    loop {
        let waiting = metric(system, "api_accepts_waiting").await;
        if waiting as usize == count {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{waiting} accepts waiting, not {count}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A metric of the api without labels; 0 when it has not been emitted yet.
async fn metric(system: &System, name: &str) -> f64 {
    let text = system.app.metrics().await.text().await.unwrap();
    text.lines()
        .find_map(|line| {
            let (metric, value) = line.split_once(' ')?;
            (metric == name).then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0.0)
}
