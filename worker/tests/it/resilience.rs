//! The pipeline under failure: a worker killed mid-sale, replicas joining and leaving, and
//! a command that cannot be settled, for a coupon or an order, and its replay.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use reqwest::StatusCode;
use testkit::System;

/// Sends issue requests for `users`, `concurrency` at a time; returns how many were accepted.
async fn issue_all(system: &System, coupon: i64, users: &[i64], concurrency: usize) -> usize {
    futures::stream::iter(users.iter().map(|&user| system.issue(coupon, user)))
        .buffer_unordered(concurrency)
        .filter(|answer| {
            assert!(
                answer.status == StatusCode::ACCEPTED || answer.code() == "ERR_COUPON_OUT_OF_STOCK",
                "{answer:?}"
            );
            futures::future::ready(answer.status == StatusCode::ACCEPTED)
        })
        .count()
        .await
}

async fn count(system: &System, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(&system.app.db).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_killed_mid_sale_loses_nothing_and_issues_nothing_twice() {
    let system = System::start(2).await;
    system.wait_for_owners(2).await;
    let coupon = system.coupon(400).await;
    let users = system.app.create_users(1_200).await;

    let sending = issue_all(&system, coupon, &users, 40);
    let killing = async {
        // Kill once the sale is under way, with work in flight.
        while count(&system, "SELECT count(*) FROM requests WHERE status <> 'PENDING'").await < 100 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let pid = system.worker_pid(0);
        std::process::Command::new("kill")
            .arg("-KILL")
            .arg(pid.to_string())
            .status()
            .unwrap();
        let settled = count(&system, "SELECT count(*) FROM requests WHERE status <> 'PENDING'").await;
        let stored = count(&system, "SELECT count(*) FROM requests").await;
        eprintln!("killed worker 0 with {settled} of {stored} stored requests settled");
    };
    let (accepted, ()) = tokio::join!(sending, killing);
    system.kill_worker(0).await; // reap the process
    system.wait_until_settled().await;

    let stored = count(&system, "SELECT count(*) FROM requests").await;
    assert_eq!(stored, accepted as i64, "every 202 has its request");
    let issued = system.assert_coupon_invariants(coupon).await;
    assert_eq!(issued, 400.min(accepted as i64));
    let wrong_failures = count(
        &system,
        "SELECT count(*) FROM requests WHERE status = 'FAILED' AND error->>'code' <> 'ERR_COUPON_OUT_OF_STOCK'",
    )
    .await;
    assert_eq!(wrong_failures, 0);
}

/// The names of the worker processes that are running, as the test knows them.
type Alive = Arc<Mutex<HashSet<String>>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partitions_follow_replicas_that_join_and_leave_and_always_have_one_live_owner() {
    let system = System::start(1).await;
    system.wait_for_owners(1).await;
    let prefix = system.app.topology.prefix.clone();
    let alive: Alive = Arc::new(Mutex::new(HashSet::from([format!("{prefix}w0")])));

    // Sample ownership continuously: every lease must be held by a process that runs.
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let db = system.app.db.clone();
        let alive = Arc::clone(&alive);
        let sampling = Arc::clone(&sampling);
        tokio::spawn(async move {
            let mut samples = 0;
            let mut violations = Vec::new();
            while sampling.load(std::sync::atomic::Ordering::SeqCst) {
                // Who runs is read before the leases: a process that exits after this read
                // may still show as an owner, one that exited before must not.
                let running = alive.lock().unwrap().clone();
                let owners: Vec<(String, i32, Option<String>)> = sqlx::query_as(
                    "SELECT l.family, l.partition, r.name FROM partition_leases l
                     LEFT JOIN worker_replicas r ON r.id = l.owner ORDER BY 1, 2",
                )
                .fetch_all(&db)
                .await
                .unwrap();
                for (family, partition, owner) in owners {
                    if !owner.as_ref().is_some_and(|o| running.contains(o)) {
                        violations.push(format!(
                            "{family}.{partition} owned by {owner:?} while {running:?} run"
                        ));
                    }
                }
                samples += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (samples, violations)
        })
    };

    let coupon = system.coupon(100_000).await;
    let users = system.app.create_users(900).await;
    let load = async {
        issue_all(&system, coupon, &users[..300], 10).await;
    };
    load.await;

    let second = system.spawn_worker().await;
    alive.lock().unwrap().insert(format!("{prefix}w{second}"));
    system.wait_for_owners(2).await;
    issue_all(&system, coupon, &users[300..600], 10).await;

    // The first replica leaves: it drains, hands every partition to the second, and exits.
    let stopping = async {
        system.stop_worker(0).await;
        alive.lock().unwrap().remove(&format!("{prefix}w0"));
    };
    tokio::join!(stopping, issue_all(&system, coupon, &users[600..], 10));
    system.wait_for_owners(1).await;
    system.wait_until_settled().await;

    sampling.store(false, std::sync::atomic::Ordering::SeqCst);
    let (samples, violations) = sampler.await.unwrap();
    eprintln!("{samples} ownership samples");
    assert!(samples > 10, "only {samples} samples");
    assert!(
        violations.is_empty(),
        "{} bad samples, e.g. {:?}",
        violations.len(),
        &violations[..violations.len().min(5)]
    );
    assert_eq!(system.assert_coupon_invariants(coupon).await, 900);
}

/// Found by the fault suite (scale 4 -> 1): replicas stopped together handed partitions to
/// each other, and those waited for their leases to expire with nobody consuming them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_stopped_together_leave_no_partition_to_one_another() {
    let system = System::start(4).await;
    system.wait_for_replicas(4).await;
    let stays: uuid::Uuid = sqlx::query_scalar("SELECT id FROM worker_replicas WHERE name = $1")
        .bind(format!("{}w0", system.app.topology.prefix))
        .fetch_one(&system.app.db)
        .await
        .unwrap();

    tokio::join!(
        system.stop_worker(1),
        system.stop_worker(2),
        system.stop_worker(3)
    );

    // Once they have exited, every partition is either the remaining replica's or free for
    // it to take: none is left to a replica that is gone.
    let stranded: Vec<(String, i32)> = sqlx::query_as(
        "SELECT family, partition FROM partition_leases
         WHERE owner IS NOT NULL AND owner <> $1 ORDER BY 1, 2",
    )
    .bind(stays)
    .fetch_all(&system.app.db)
    .await
    .unwrap();
    assert!(stranded.is_empty(), "left to stopped replicas: {stranded:?}");
    system.wait_for_owners(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_command_that_cannot_be_settled_is_dead_lettered_and_its_request_fails() {
    let system = System::start(1).await;
    let coupon = system.coupon(10).await;
    let sender = system.app.create_users(1).await[0];
    // A stored request whose payload no worker can read, left for the sweeper to publish,
    // exactly as if its api had crashed between commit and publish.
    let poison = uuid::Uuid::now_v7();
    sqlx::query(
        "WITH dead_api AS (
            INSERT INTO api_instances (id, name, heartbeat_at)
            VALUES (gen_random_uuid(), 'crashed', '-infinity') RETURNING id)
         INSERT INTO requests (id, kind, partition_key, payload, accepted_by, user_id)
         SELECT $1, 'COUPON_ISSUE', $2, '{\"garbage\": true}', id, $3 FROM dead_api",
    )
    .bind(poison)
    .bind(coupon)
    .bind(sender)
    .execute(&system.app.db)
    .await
    .unwrap();

    let failed = system.app.settled(&poison.to_string(), testkit::PATIENCE).await;
    assert_eq!(failed.body["status"], "FAILED", "{failed:?}");
    assert_eq!(failed.body["error"]["code"], "ERR_PROCESSING_FAILED");

    // The message rests in the family's parked dead-letter queue.
    let parked = system.parked_queue(shared::domain::command::Family::Coupon).await;
    parked.wait_for_depth(1).await;

    // Operators see it, with why it died and what the worker saw go wrong.
    let id = poison.to_string();
    let (ok, listed) = system.worker_command(&["dead-letters", "list"]).await;
    assert!(ok.success(), "{listed}");
    assert!(listed.starts_with("1 dead letter(s)"), "{listed}");
    let mut lines = listed.lines().skip_while(|l| !l.starts_with(&id));
    let line = lines.next().expect(&listed);
    assert!(
        line.contains("COUPON_ISSUE") && line.contains("rejected") && line.contains("FAILED"),
        "{line}"
    );
    let detail = lines.next().expect(&listed);
    assert!(
        detail.starts_with("    ") && detail.contains("payload"),
        "{listed}"
    );
    assert!(
        listed.contains(&format!("{}: 1 parked message(s)", parked.name)),
        "{listed}"
    );

    // Replaying a command whose request is terminal does nothing: nothing sent, nothing
    // changed, the message still parked and the letter still open.
    let (ok, replayed) = system.worker_command(&["dead-letters", "replay", &id]).await;
    assert!(ok.success(), "{replayed}");
    assert!(replayed.contains("nothing was sent"), "{replayed}");
    let after = system.app.settled(&id, testkit::PATIENCE).await;
    assert_eq!(after.body, failed.body);
    assert_eq!(parked.depth().await, 1);
    let (ok, listed_again) = system.worker_command(&["dead-letters", "list"]).await;
    assert!(ok.success());
    assert_eq!(listed_again, listed);

    // Discarding removes it for good, every copy of it: dead letters arrive at least once.
    parked
        .park(poison, shared::domain::command::RequestKind::CouponIssue)
        .await;
    parked.wait_for_depth(2).await;
    let (ok, discarded) = system.worker_command(&["dead-letters", "discard", &id]).await;
    assert!(ok.success(), "{discarded}");
    assert!(discarded.contains("was deleted"), "{discarded}");
    assert_eq!(parked.depth().await, 0);
    let (ok, listed) = system.worker_command(&["dead-letters", "list"]).await;
    assert!(ok.success() && listed.starts_with("0 dead letter(s)"), "{listed}");
    let resolution: String = sqlx::query_scalar("SELECT resolution FROM dead_letters WHERE request_id = $1")
        .bind(poison)
        .fetch_one(&system.app.db)
        .await
        .unwrap();
    assert_eq!(resolution, "discarded");
    let (ok, unknown) = system
        .worker_command(&["dead-letters", "replay", "not-an-id"])
        .await;
    assert!(!ok.success(), "{unknown}");

    // The partition is not blocked: a good command on the same key still settles.
    let user = system.app.create_users(1).await[0];
    let good = system.issue(coupon, user).await;
    assert_eq!(good.status, StatusCode::ACCEPTED);
    let settled = system
        .app
        .settled(good.body["requestId"].as_str().unwrap(), testkit::PATIENCE)
        .await;
    assert_eq!(settled.body["status"], "SUCCEEDED", "{settled:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_lettered_order_creation_rejects_its_order() {
    let system = System::start(1).await;
    let user = system.app.create_users(1).await[0];
    let product = system.product(1_000, 5).await;
    // An order as the API stores it, but with a creation command no worker can read.
    let (order, poison) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
    let mut tx = system.app.db.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO orders (id, user_id, create_request_id, total_amount) VALUES ($1, $2, $3, 1000)",
    )
    .bind(order)
    .bind(user)
    .bind(poison)
    .execute(&mut *tx)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO order_items (order_id, product_id, name, unit_price, quantity)
         VALUES ($1, $2, 'quoted', 1000, 1)",
    )
    .bind(order)
    .bind(product)
    .execute(&mut *tx)
    .await
    .unwrap();
    sqlx::query(
        "WITH dead_api AS (
            INSERT INTO api_instances (id, name, heartbeat_at)
            VALUES (gen_random_uuid(), 'crashed', '-infinity') RETURNING id)
         INSERT INTO requests (id, kind, partition_key, payload, accepted_by, user_id)
         SELECT $1, 'ORDER_CREATE', $2, '{\"garbage\": true}', id, $2 FROM dead_api",
    )
    .bind(poison)
    .bind(user)
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();

    let failed = system.app.settled(&poison.to_string(), testkit::PATIENCE).await;
    assert_eq!(failed.body["status"], "FAILED", "{failed:?}");
    assert_eq!(failed.body["error"]["code"], "ERR_PROCESSING_FAILED");
    // The order is closed, not left PENDING for ever, and it held no stock.
    let read = system.app.get(&format!("/users/{user}/orders/{order}")).await;
    assert_eq!(read.status, StatusCode::OK, "{read:?}");
    assert_eq!(read.body["status"], "REJECTED", "{read:?}");
    assert_eq!(system.assert_stock_reconciles(product, 5).await, (5, 0, 0));

    // A payment sent for it afterwards is refused at once, and charges nothing.
    system.app.charge(user, 5_000).await;
    let pay = system.pay(&order.to_string(), user, None).await;
    assert_eq!(pay.status, StatusCode::BAD_REQUEST, "{pay:?}");
    assert_eq!(pay.code(), "ERR_PAYMENT_INVALID_ORDER_STATUS");
    assert_eq!(system.app.balance(user).await, 5_000);
    system.assert_money_invariants().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partition_queues_dead_letter_at_least_once() {
    let system = System::start(0).await;
    let topology = &system.app.topology;
    let conn = testkit::broker_connection().await;
    // RabbitMQ refuses to re-declare a queue with other arguments than it has: a partition
    // queue declared without the at-least-once strategy is refused (406), with it accepted.
    let declare = |strategy: Option<&'static str>| {
        let conn = &conn;
        let queue = topology.queue(shared::domain::command::Family::Order, 0);
        let dead_letters = topology.dead_letter_exchange();
        let delivery_limit = topology.delivery_limit;
        let expires = topology.queue_expires_ms;
        let replicas = topology.replicas;
        async move {
            use lapin::types::{AMQPValue, FieldTable};
            let mut args = FieldTable::default();
            let text = |s: &str| AMQPValue::LongString(s.into());
            args.insert("x-queue-type".into(), text("quorum"));
            args.insert(
                "x-quorum-initial-group-size".into(),
                AMQPValue::LongUInt(replicas),
            );
            args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
            args.insert("x-delivery-limit".into(), AMQPValue::LongUInt(delivery_limit));
            args.insert("x-dead-letter-exchange".into(), text(&dead_letters));
            args.insert("x-dead-letter-routing-key".into(), text("order"));
            if let Some(strategy) = strategy {
                args.insert("x-dead-letter-strategy".into(), text(strategy));
                args.insert("x-overflow".into(), text("reject-publish"));
            }
            if let Some(ms) = expires {
                args.insert("x-expires".into(), AMQPValue::LongUInt(ms));
            }
            let channel = conn.create_channel().await.unwrap();
            let options = lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            };
            channel
                .queue_declare(queue.as_str().into(), options, args)
                .await
                .map(|_| ())
        }
    };
    let at_most_once = declare(None).await;
    assert!(
        matches!(&at_most_once, Err(e) if format!("{e:?}").contains("PRECONDITION_FAILED")),
        "{at_most_once:?}"
    );
    declare(Some("at-least-once")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_parked_command_whose_request_is_still_pending_is_replayed_and_settles() {
    let system = System::start(1).await;
    let coupon = system.coupon(10).await;
    let user = system.app.create_users(1).await[0];
    // A command parked while its request is still PENDING: the state replay exists for.
    // The workers mark a dead letter's request FAILED as they park it, so it is set up by
    // hand: stored, published, recorded, parked, and nowhere else.
    let id = uuid::Uuid::now_v7();
    sqlx::query(
        "INSERT INTO requests (id, kind, partition_key, payload, published, user_id)
         VALUES ($1, 'COUPON_ISSUE', $2, jsonb_build_object('userId', $3::bigint, 'couponId', $2::bigint), true, $3)",
    )
    .bind(id)
    .bind(coupon)
    .bind(user)
    .execute(&system.app.db)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO dead_letters (request_id, family, kind, reason) VALUES ($1, 'coupon', 'COUPON_ISSUE', 'delivery_limit')",
    )
    .bind(id)
    .execute(&system.app.db)
    .await
    .unwrap();
    let parked = system.parked_queue(shared::domain::command::Family::Coupon).await;
    parked
        .park(id, shared::domain::command::RequestKind::CouponIssue)
        .await;
    let pending = system.app.get(&format!("/requests/{id}")).await;
    assert_eq!(pending.body["status"], "PENDING", "{pending:?}");

    let (ok, replayed) = system
        .worker_command(&["dead-letters", "replay", &id.to_string()])
        .await;
    assert!(ok.success(), "{replayed}");
    assert!(
        replayed.contains("sent back to its partition queue") && !replayed.contains("no parked copy"),
        "{replayed}"
    );
    let settled = system.app.settled(&id.to_string(), testkit::PATIENCE).await;
    assert_eq!(settled.body["status"], "SUCCEEDED", "{settled:?}");
    assert_eq!(system.assert_coupon_invariants(coupon).await, 1);

    // The parked copy is gone, and the decision is on record.
    let (ok, listed) = system.worker_command(&["dead-letters", "list"]).await;
    assert!(ok.success(), "{listed}");
    assert!(listed.starts_with("0 dead letter(s)"), "{listed}");
    assert!(
        listed.contains(&format!("{}: 0 parked message(s)", parked.name)),
        "{listed}"
    );
    let resolution: String = sqlx::query_scalar("SELECT resolution FROM dead_letters WHERE request_id = $1")
        .bind(id)
        .fetch_one(&system.app.db)
        .await
        .unwrap();
    assert_eq!(resolution, "replayed");
}

/// Found in review: `discard` and `replay` looked for their message by reading the parked
/// queue and returning all the others unacked. A quorum queue counts each return as a
/// delivery, and RabbitMQ 4 drops a message past its (default) delivery limit: parked
/// copies would vanish as operators worked through the others. They are read once and
/// published again instead, never returned.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn looking_through_the_parked_queue_returns_no_other_message_to_it() {
    use shared::domain::command::RequestKind;
    let system = System::start(0).await;
    let parked = system.parked_queue(shared::domain::command::Family::Coupon).await;
    let [gone, kept] = [uuid::Uuid::now_v7(), uuid::Uuid::now_v7()];
    for id in [gone, kept] {
        sqlx::query(
            "INSERT INTO dead_letters (request_id, family, kind, reason) VALUES ($1, 'coupon', 'COUPON_ISSUE', 'rejected')",
        )
        .bind(id)
        .execute(&system.app.db)
        .await
        .unwrap();
    }
    // Dead letters arrive at least once: the letter discarded has two copies.
    for id in [gone, kept, gone] {
        parked.park(id, RequestKind::CouponIssue).await;
    }

    let (ok, discarded) = system
        .worker_command(&["dead-letters", "discard", &gone.to_string()])
        .await;
    assert!(ok.success() && discarded.contains("was deleted"), "{discarded}");
    assert_eq!(
        parked.depth().await,
        1,
        "both copies of {gone} are gone, {kept} is not"
    );
    let left = parked.take().await.expect("the other letter is still parked");
    let command: shared::domain::command::CommandMessage =
        serde_json::from_slice(&left.delivery.data).unwrap();
    assert_eq!(command.request_id, kept);
    assert!(
        !left.delivery.redelivered,
        "{kept} was returned to the queue: {left:?}"
    );
    assert_eq!(
        left.delivery.properties.message_id().as_ref().map(|m| m.as_str()),
        Some(kept.to_string().as_str()),
        "it keeps the name operators know it by"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_message_that_is_not_a_command_of_its_queue_is_parked_as_unreadable_and_can_be_discarded() {
    use shared::domain::command::Family;
    let system = System::start(1).await;
    let coupon = system.coupon(10).await;
    let user = system.app.create_users(1).await[0];
    let issued = system.issue(coupon, user).await;
    let request = issued.body["requestId"].as_str().unwrap().to_owned();
    let settled = system.app.settled(&request, testkit::PATIENCE).await;
    assert_eq!(settled.body["status"], "SUCCEEDED", "{settled:?}");

    // A body no worker can decode, with a NUL in it (PostgreSQL text cannot hold one), on a
    // coupon partition; and a copy of the coupon command on an order partition, where it is
    // not a command of the family.
    let garbage = b"\x00not a command".to_vec();
    let misrouted = serde_json::to_vec(&shared::domain::command::CommandMessage {
        request_id: request.parse().unwrap(),
        kind: shared::domain::command::RequestKind::CouponIssue,
    })
    .unwrap();
    system.send_raw(Family::Coupon, 0, &garbage).await;
    system.send_raw(Family::Order, 3, &misrouted).await;
    let coupon_parked = system.parked_queue(Family::Coupon).await;
    let order_parked = system.parked_queue(Family::Order).await;
    coupon_parked.wait_for_depth(1).await;
    order_parked.wait_for_depth(1).await;

    let id_of = |body: Vec<u8>| {
        let db = system.app.db.clone();
        async move {
            sqlx::query_scalar::<_, uuid::Uuid>("SELECT md5($1)::uuid")
                .bind(body)
                .fetch_one(&db)
                .await
                .unwrap()
                .to_string()
        }
    };
    let (garbage_id, misrouted_id) = (id_of(garbage).await, id_of(misrouted).await);
    let (ok, listed) = system.worker_command(&["dead-letters", "list"]).await;
    assert!(ok.success(), "{listed}");
    assert!(listed.starts_with("0 dead letter(s)"), "{listed}");
    assert!(listed.contains("2 unreadable message(s)"), "{listed}");
    let mut lines = listed.lines().skip_while(|l| !l.starts_with(&garbage_id));
    let line = lines.next().expect(&listed);
    assert!(
        line.contains("coupon") && line.contains("rejected") && line.contains("14 byte(s)"),
        "{line}"
    );
    assert_eq!(lines.next(), Some("    \\0not a command"), "{listed}");
    let line = listed
        .lines()
        .find(|l| l.starts_with(&misrouted_id))
        .expect(&listed);
    assert!(line.contains("order"), "{line}");

    // Nothing was failed or recorded against the request the misrouted copy names.
    let after = system.app.get(&format!("/requests/{request}")).await;
    assert_eq!(after.body, settled.body);
    assert_eq!(
        system
            .scalar(&format!(
                "SELECT count(*) FROM dead_letters WHERE request_id = '{request}'"
            ))
            .await,
        0
    );

    // There is no command to replay, only a message to discard: each from its own queue.
    let (ok, replayed) = system
        .worker_command(&["dead-letters", "replay", &garbage_id])
        .await;
    assert!(
        !ok.success() && replayed.contains("nothing to replay"),
        "{replayed}"
    );
    assert_eq!(coupon_parked.depth().await, 1);
    for (id, queue) in [(&garbage_id, &coupon_parked), (&misrouted_id, &order_parked)] {
        let (ok, discarded) = system.worker_command(&["dead-letters", "discard", id]).await;
        assert!(ok.success(), "{discarded}");
        assert!(discarded.contains("was deleted"), "{discarded}");
        assert_eq!(queue.depth().await, 0, "{}", queue.name);
    }
    let (ok, listed) = system.worker_command(&["dead-letters", "list"]).await;
    assert!(
        ok.success() && listed.contains("0 unreadable message(s)"),
        "{listed}"
    );

    // The coupon partition was not blocked: a good command still settles there.
    let other = system.app.create_users(1).await[0];
    let good = system.issue(coupon, other).await;
    let good = system
        .app
        .settled(good.body["requestId"].as_str().unwrap(), testkit::PATIENCE)
        .await;
    assert_eq!(good.body["status"], "SUCCEEDED", "{good:?}");
    assert_eq!(system.assert_coupon_invariants(coupon).await, 2);
}

/// Found in review: a lease handed to a replica that, by its own view of the live list,
/// does not own the partition (a replica joined between the two views) was renewed by it
/// for ever and never consumed, and the partition's owner could never acquire it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lease_held_without_a_consumer_is_handed_on_to_the_partitions_owner() {
    let system = System::start(2).await;
    system.wait_for_replicas(2).await;
    let coupon = system.coupon(10).await;
    let partition = shared::domain::partition::partition_of(coupon, system.app.topology.partitions);
    let live = system.live_replicas().await;
    let owner = shared::domain::partition::rendezvous_owner(&live, "coupon", partition).unwrap();
    let other = *live.iter().find(|r| **r != owner).expect("two live replicas");
    let partition = i32::from(partition);
    let holder = || async {
        sqlx::query_scalar::<_, Option<uuid::Uuid>>(
            "SELECT owner FROM partition_leases WHERE family = 'coupon' AND partition = $1",
        )
        .bind(partition)
        .fetch_one(&system.app.db)
        .await
        .unwrap()
    };
    // The second replica's partitions come to it over a few heartbeats: wait for this one.
    let deadline = tokio::time::Instant::now() + testkit::PATIENCE;
    while holder().await != Some(owner) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the partition never reached its owner"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The lease as such a handover leaves it: with the other replica, fresh, a new epoch.
    sqlx::query(
        "UPDATE partition_leases SET owner = $2, epoch = epoch + 1, expires_at = now() + interval '1 hour'
         WHERE family = 'coupon' AND partition = $1",
    )
    .bind(partition)
    .bind(other)
    .execute(&system.app.db)
    .await
    .unwrap();

    // A command on that partition still settles: the lease came back to its owner.
    let user = system.app.create_users(1).await[0];
    let issued = system.issue(coupon, user).await;
    let settled = system
        .app
        .settled(issued.body["requestId"].as_str().unwrap(), testkit::PATIENCE)
        .await;
    assert_eq!(settled.body["status"], "SUCCEEDED", "{settled:?}");
    assert_eq!(holder().await, Some(owner));
    assert_eq!(system.assert_coupon_invariants(coupon).await, 1);
}

/// Takes one delivery of the oldest message of `queue` and gives it back unread, as a
/// consumer whose channel closes with prefetched messages does; false if it was empty.
async fn return_unread(connection: &lapin::Connection, queue: &str) -> bool {
    // A consumer, not basic.get: partition queues have a single active consumer.
    let channel = connection.create_channel().await.unwrap();
    channel.basic_qos(1, Default::default()).await.unwrap();
    let mut deliveries = channel
        .basic_consume(
            queue.into(),
            "returns-unread".into(),
            Default::default(),
            Default::default(),
        )
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_millis(500), deliveries.next())
        .await
        .is_ok_and(|d| d.is_some_and(|d| d.is_ok()));
    channel.close(200, "returned unread".into()).await.unwrap();
    got
}

/// Found in review: a quorum queue counts a message returned unread (prefetched by a
/// consumer whose partition was handed over, killed or cut off) as a delivery, so a healthy
/// command could be dead-lettered and its request failed without any worker having tried
/// it. Such a command is now sent back to its partition, a bounded number of times.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_command_returned_unread_past_its_delivery_limit_is_sent_back_a_bounded_number_of_times() {
    use shared::domain::command::Family;
    let system = System::start(0).await;
    let partitions = system.app.topology.partitions;
    // Every partition is leased, for an hour, to a replica that does not run: the worker
    // started below drains the dead letters but settles nothing until the leases are freed.
    let absent = uuid::Uuid::now_v7();
    sqlx::query("INSERT INTO worker_replicas (id, name, heartbeat_at) VALUES ($1, 'absent', '-infinity')")
        .bind(absent)
        .execute(&system.app.db)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO partition_leases (family, partition, owner, epoch, expires_at)
         SELECT f, p, $1, 1, now() + interval '1 hour'
         FROM unnest(ARRAY['coupon', 'order']) AS f, generate_series(0, $2 - 1) AS p",
    )
    .bind(absent)
    .bind(i32::from(partitions))
    .execute(&system.app.db)
    .await
    .unwrap();
    system.spawn_worker().await;

    // Two requests on two partitions: one returned unread past its limit once, the other
    // every time it comes back.
    let (first, second) = loop {
        let (a, b) = (system.coupon(10).await, system.coupon(10).await);
        if shared::domain::partition::partition_of(a, partitions)
            != shared::domain::partition::partition_of(b, partitions)
        {
            break (a, b);
        }
    };
    let user = system.app.create_users(1).await[0];
    let mut requests = Vec::new();
    for coupon in [first, second] {
        let issued = system.issue(coupon, user).await;
        assert_eq!(issued.status, StatusCode::ACCEPTED, "{issued:?}");
        let queue = system.app.topology.queue(
            Family::Coupon,
            shared::domain::partition::partition_of(coupon, partitions),
        );
        requests.push((issued.body["requestId"].as_str().unwrap().to_owned(), queue));
    }
    let connection = testkit::broker_connection().await;
    let revivals = |id: String| {
        let db = system.app.db.clone();
        async move {
            sqlx::query_scalar::<_, i32>("SELECT revivals FROM dead_letters WHERE request_id = $1::uuid")
                .bind(id)
                .fetch_optional(&db)
                .await
                .unwrap()
                .unwrap_or(0)
        }
    };
    // Returns the message unread until the broker dead-letters it, then waits for the
    // dead-letter consumer's decision: sent back (counted), or failed.
    let deliveries = system.app.topology.delivery_limit + 1;
    let exhaust = |id: String, queue: String, expected: i32| {
        let (connection, db) = (&connection, system.app.db.clone());
        async move {
            let deadline = tokio::time::Instant::now() + testkit::PATIENCE;
            // Exactly its deliveries: a copy sent back must not be taken for this one.
            for _ in 0..deliveries {
                while !return_unread(connection, &queue).await {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "nothing to return in {queue}"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            loop {
                let (status, back): (String, bool) = sqlx::query_as(
                    "SELECT r.status, COALESCE(d.revivals, 0) = $2
                     FROM requests r LEFT JOIN dead_letters d ON d.request_id = r.id WHERE r.id = $1::uuid",
                )
                .bind(&id)
                .bind(expected)
                .fetch_one(&db)
                .await
                .unwrap();
                let requeued = shared::messaging::broker::queue_depth(
                    &connection.create_channel().await.unwrap(),
                    &queue,
                )
                .await
                .unwrap()
                    == 1;
                if status == "FAILED" || (back && requeued) {
                    return status;
                }
                assert!(tokio::time::Instant::now() < deadline, "no decision on {id}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };

    // The second: sent back twice, still PENDING; the third time it is taken as poison.
    let (id, queue) = requests[1].clone();
    for round in 1..=worker::dead_letters::dead_letter_consumer::REVIVALS {
        assert_eq!(exhaust(id.clone(), queue.clone(), round).await, "PENDING");
        assert_eq!(revivals(id.clone()).await, round);
    }
    assert_eq!(exhaust(id.clone(), queue.clone(), -1).await, "FAILED");
    let failed = system.app.settled(&id, testkit::PATIENCE).await;
    assert_eq!(
        failed.body["error"]["code"], "ERR_PROCESSING_FAILED",
        "{failed:?}"
    );
    let (ok, listed) = system.worker_command(&["dead-letters", "list"]).await;
    assert!(
        ok.success() && listed.starts_with("1 dead letter(s)") && listed.contains(&id),
        "{listed}"
    );

    // The first: sent back once, then settled once its partition has a consumer again.
    let (id, queue) = requests[0].clone();
    assert_eq!(exhaust(id.clone(), queue, 1).await, "PENDING");
    sqlx::query("UPDATE partition_leases SET owner = NULL, expires_at = '-infinity'")
        .execute(&system.app.db)
        .await
        .unwrap();
    let settled = system.app.settled(&id, testkit::PATIENCE).await;
    assert_eq!(settled.body["status"], "SUCCEEDED", "{settled:?}");
    assert_eq!(system.assert_coupon_invariants(first).await, 1);
    assert_eq!(system.assert_coupon_invariants(second).await, 0);
    let _ = connection.close(200, "done".into()).await;
}
