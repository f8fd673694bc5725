//! The per-user limits where orders settle, under real concurrency and with several worker
//! processes: the unpaid-order cap (`MAX_RESERVED_ORDERS_PER_USER`) and a product's
//! `maxPerCustomer`. The api refuses what it already knows at once; these tests make it let
//! bursts through (a high cap of its own, or orders sent before any is settled), so that
//! what holds the limits is the worker's count under its locks.

use std::collections::HashMap;

use futures::future::join_all;
use reqwest::{Method, StatusCode};
use serde_json::json;
use shared::domain::command::{CommandMessage, Family, RequestKind};
use testkit::System;

/// The cap the workers of these tests enforce.
const CAP: i64 = 10;

/// A system whose api lets any number of unpaid orders through (as an api of another
/// configuration, or the race of a burst at its widest, would), with `workers` workers
/// that enforce [`CAP`].
async fn system_with_lax_api(workers: usize) -> System {
    let system = System::start_with(0, |config| config.max_reserved_orders_per_user = 1_000).await;
    for _ in 0..workers {
        spawn_worker(&system).await;
    }
    system
}

async fn spawn_worker(system: &System) {
    system
        .spawn_worker_with(&[("MAX_RESERVED_ORDERS_PER_USER", CAP.to_string())])
        .await;
}

/// A product limited to `max` units per customer, created through the admin api.
async fn limited_product(system: &System, max: i64, stock: i64) -> i64 {
    let created = system
        .app
        .admin(
            Method::POST,
            "/admin/products",
            json!({"name": "Limited edition", "price": 1_000, "stock": stock, "maxPerCustomer": max}),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{created:?}");
    created.body["productId"].as_i64().unwrap()
}

/// `POST /orders` of one unit of `product`.
async fn one_unit(system: &System, user: i64, product: i64) -> testkit::Answer {
    system.order(user, &[(product, 1)]).await
}

/// How each answer ended: `SUCCEEDED`, or the error code, at once or as the request's.
async fn settled_outcomes(system: &System, answers: &[testkit::Answer]) -> HashMap<String, usize> {
    let mut counted = HashMap::new();
    for answer in answers {
        let outcome = if answer.status == StatusCode::ACCEPTED {
            system.outcome(answer.body["requestId"].as_str().unwrap()).await
        } else {
            format!("{} {}", answer.status.as_u16(), answer.code())
        };
        *counted.entry(outcome).or_default() += 1;
    }
    counted
}

async fn orders_of(system: &System, user: i64, status: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM orders WHERE user_id = $1 AND status = $2")
        .bind(user)
        .bind(status)
        .fetch_one(&system.app.db)
        .await
        .unwrap()
}

/// Units of `product` that `user` holds in `RESERVED` and `PAID` orders, as stored.
async fn units_held(system: &System, user: i64, product: i64) -> i64 {
    sqlx::query_scalar(
        "SELECT COALESCE(sum(oi.quantity), 0)::bigint FROM orders o JOIN order_items oi ON oi.order_id = o.id
         WHERE o.user_id = $1 AND oi.product_id = $2 AND o.status IN ('RESERVED', 'PAID')",
    )
    .bind(user)
    .bind(product)
    .fetch_one(&system.app.db)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thirty_orders_at_once_from_one_user_leave_no_more_than_the_cap_reserved() {
    let system = system_with_lax_api(2).await;
    system.wait_for_owners(2).await;
    let product = system.product(1_000, 1_000).await;
    // No balance: nothing is ever paid, so every reserved order stays unpaid.
    let user = system.app.create_users(1).await[0];

    let answers = join_all((0..30).map(|_| one_unit(&system, user, product))).await;
    for answer in &answers {
        assert_eq!(answer.status, StatusCode::ACCEPTED, "{answer:?}");
    }
    let outcomes = settled_outcomes(&system, &answers).await;
    assert_eq!(
        outcomes,
        HashMap::from([
            ("SUCCEEDED".to_owned(), 10),
            ("ERR_ORDER_TOO_MANY_RESERVED".to_owned(), 20)
        ]),
    );
    assert_eq!(orders_of(&system, user, "RESERVED").await, CAP);
    assert_eq!(orders_of(&system, user, "REJECTED").await, 30 - CAP);
    system.assert_stock_reconciles(product, 1_000).await;

    // Paying one makes room for one more, and only one.
    system.app.charge(user, 1_000).await;
    let reserved: String =
        sqlx::query_scalar("SELECT id::text FROM orders WHERE user_id = $1 AND status = 'RESERVED' LIMIT 1")
            .bind(user)
            .fetch_one(&system.app.db)
            .await
            .unwrap();
    let paid = system.pay(&reserved, user, None).await;
    assert_eq!(
        system.outcome(paid.body["requestId"].as_str().unwrap()).await,
        "SUCCEEDED"
    );
    let answers = join_all((0..3).map(|_| one_unit(&system, user, product))).await;
    let outcomes = settled_outcomes(&system, &answers).await;
    assert_eq!(outcomes.get("SUCCEEDED"), Some(&1), "{outcomes:?}");
    assert_eq!(orders_of(&system, user, "RESERVED").await, CAP);
    system.assert_money_invariants().await;
}

/// Should orders of one user ever be routed to several partitions (by hot product, say),
/// two batches of the user settle at once on different workers. The cap still holds: the
/// count is taken under the user's row lock. The messages are moved to every partition by
/// hand, as such routing would send them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cap_holds_when_one_users_orders_settle_in_several_partitions_at_once() {
    let system = system_with_lax_api(0).await;
    let product = system.product(1_000, 1_000).await;
    let user = system.app.create_users(1).await[0];
    let answers = join_all((0..30).map(|_| one_unit(&system, user, product))).await;
    let mut requests = Vec::new();
    for answer in &answers {
        assert_eq!(answer.status, StatusCode::ACCEPTED, "{answer:?}");
        requests.push(answer.body["requestId"].as_str().unwrap().to_owned());
    }
    system.wait_until_queued(Family::Order, user, 30).await;
    // Out of the user's partition, then round the partitions.
    let topology = &system.app.topology;
    let home = shared::domain::partition::partition_of(user, topology.partitions);
    let connection = testkit::broker_connection().await;
    let channel = connection.create_channel().await.unwrap();
    let purged = channel
        .queue_purge(
            topology.queue(Family::Order, home).as_str().into(),
            Default::default(),
        )
        .await
        .unwrap();
    assert_eq!(purged, 30);
    for (i, request) in requests.iter().enumerate() {
        let message = serde_json::to_vec(&CommandMessage {
            request_id: request.parse().unwrap(),
            kind: RequestKind::OrderCreate,
        })
        .unwrap();
        let partition = u16::try_from(i).unwrap() % topology.partitions;
        system.send_raw(Family::Order, partition, &message).await;
    }
    for _ in 0..3 {
        spawn_worker(&system).await;
    }
    system.wait_until_settled().await;

    assert_eq!(orders_of(&system, user, "RESERVED").await, CAP);
    let refused = system
        .scalar("SELECT count(*) FROM requests WHERE error->>'code' = 'ERR_ORDER_TOO_MANY_RESERVED'")
        .await;
    assert_eq!(refused, 30 - CAP);
    system.assert_stock_reconciles(product, 1_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_product_limited_to_two_per_customer_never_lets_one_hold_a_third() {
    // No worker yet: the burst below is accepted whole, since the api counts only units
    // that are reserved or paid, and the workers then settle it.
    let system = system_with_lax_api(0).await;
    let product = limited_product(&system, 2, 100).await;
    let users = system.app.create_users(2).await;
    let (user, other) = (users[0], users[1]);
    assert_eq!(
        system.app.get(&format!("/products/{product}")).await.body["maxPerCustomer"],
        2
    );

    // Three units in one order: refused at once.
    let three = system.order(user, &[(product, 3)]).await;
    assert_eq!(three.status, StatusCode::CONFLICT, "{three:?}");
    assert_eq!(three.code(), "ERR_ORDER_LIMIT_EXCEEDED");

    // One unit at a time, in parallel, settled by three workers: two succeed.
    let burst = join_all((0..8).map(|_| one_unit(&system, user, product))).await;
    let theirs = join_all((0..3).map(|_| one_unit(&system, other, product))).await;
    for _ in 0..3 {
        spawn_worker(&system).await;
    }
    system.wait_for_owners(3).await;
    let mine = settled_outcomes(&system, &burst).await;
    assert_eq!(
        mine,
        HashMap::from([
            ("SUCCEEDED".to_owned(), 2),
            ("ERR_ORDER_LIMIT_EXCEEDED".to_owned(), 6)
        ]),
    );
    let theirs = settled_outcomes(&system, &theirs).await;
    assert_eq!(
        theirs.get("SUCCEEDED"),
        Some(&2),
        "the limit is per customer: {theirs:?}"
    );
    assert_eq!(units_held(&system, user, product).await, 2);
    assert_eq!(units_held(&system, other, product).await, 2);
    let rejected = sqlx::query_scalar::<_, i64>(
        "SELECT count(*) FROM orders o JOIN requests r ON r.order_id = o.id
         WHERE o.user_id = $1 AND o.status = 'REJECTED' AND r.error->>'code' = 'ERR_ORDER_LIMIT_EXCEEDED'",
    )
    .bind(user)
    .fetch_one(&system.app.db)
    .await
    .unwrap();
    assert_eq!(rejected, 6, "each refused order is REJECTED");

    // Paid units still count; now the api knows at once.
    let held: Vec<String> = sqlx::query_scalar(
        "SELECT id::text FROM orders WHERE user_id = $1 AND status = 'RESERVED' ORDER BY id",
    )
    .bind(user)
    .fetch_all(&system.app.db)
    .await
    .unwrap();
    system.app.charge(user, 10_000).await;
    let paid = system.pay(&held[0], user, None).await;
    assert_eq!(
        system.outcome(paid.body["requestId"].as_str().unwrap()).await,
        "SUCCEEDED"
    );
    let more = system.order(user, &[(product, 1)]).await;
    assert_eq!(more.status, StatusCode::CONFLICT, "{more:?}");
    assert_eq!(more.code(), "ERR_ORDER_LIMIT_EXCEEDED");

    // A cancelled order gives its unit back: one more, and only one, can be had.
    let cancelled = system
        .app
        .post(&format!("/orders/{}/cancel", held[1]), json!({"userId": user}))
        .await;
    assert_eq!(cancelled.status, StatusCode::OK, "{cancelled:?}");
    let again = join_all((0..4).map(|_| one_unit(&system, user, product))).await;
    let again = settled_outcomes(&system, &again).await;
    assert_eq!(again.get("SUCCEEDED"), Some(&1), "{again:?}");
    assert_eq!(units_held(&system, user, product).await, 2);
    system.assert_stock_reconciles(product, 100).await;
    system.assert_money_invariants().await;
}

/// Many customers each sending orders of a limited product while three workers settle:
/// answers come at once or as the request's error, and nobody ends above the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crowd_ordering_a_limited_product_over_several_workers_holds_the_limit_each() {
    let system = system_with_lax_api(3).await;
    system.wait_for_owners(3).await;
    let product = limited_product(&system, 2, 10_000).await;
    let users = system.app.create_users(20).await;
    let system = &system;
    let answers = join_all(users.iter().flat_map(|&user| {
        (0..5).map(move |i| async move {
            let quantity = if i == 0 { 2 } else { 1 };
            system.order(user, &[(product, quantity)]).await
        })
    }))
    .await;
    let outcomes = settled_outcomes(system, &answers).await;
    for outcome in outcomes.keys() {
        assert!(
            [
                "SUCCEEDED",
                "ERR_ORDER_LIMIT_EXCEEDED",
                "409 ERR_ORDER_LIMIT_EXCEEDED"
            ]
            .contains(&outcome.as_str()),
            "{outcomes:?}"
        );
    }
    // Each ends with exactly two: once one unit is held, another single one always fits.
    for &user in &users {
        assert_eq!(units_held(system, user, product).await, 2, "user {user}");
    }
    let (_, reserved, _) = system.assert_stock_reconciles(product, 10_000).await;
    assert_eq!(reserved, 2 * 20);
}
