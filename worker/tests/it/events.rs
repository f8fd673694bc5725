//! Events to the data platform: every paid order produces exactly one distinct `order.paid`
//! event on a queue bound to `ecommerce.events`, also when the worker dies between the
//! commit and the publish.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use reqwest::StatusCode;
use testkit::System;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_paid_order_produces_one_distinct_event_even_when_the_worker_dies_before_publishing() {
    let system = System::start(0).await;
    let exchange = system.app.topology.events_exchange();

    // The data platform's side: a queue bound to the exchange before anything is paid.
    let broker = shared::config::BrokerSettings::from_env().unwrap().url;
    let conn = lapin::Connection::connect(&broker, Default::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    system.app.topology.declare_events(&channel).await.unwrap();
    let queue = format!("{}test.order-paid", system.app.topology.prefix);
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                auto_delete: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            queue.as_str().into(),
            exchange.as_str().into(),
            "order.paid".into(),
            QueueBindOptions::default(),
            Default::default(),
        )
        .await
        .unwrap();

    // The data-platform stand-in, with its own durable queue bound before anything is paid.
    let data_platform = tokio::process::Command::new(env!("CARGO_BIN_EXE_worker"))
        .arg("data-platform")
        .env("DATABASE_URL", &system.app.database_url)
        .env("AMQP_PREFIX", &system.app.topology.prefix)
        .env("COMMAND_QUEUE_EXPIRES_MS", "300000")
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stand_in_queue = format!("{}data-platform.order-paid", system.app.topology.prefix);
    let deadline = tokio::time::Instant::now() + testkit::PATIENCE;
    loop {
        let probe = conn.create_channel().await.unwrap();
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        if probe
            .queue_declare(stand_in_queue.as_str().into(), passive, Default::default())
            .await
            .is_ok()
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stand-in never declared its queue"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A worker that commits payments and their events but dies before publishing them:
    // its relay is off, and it is killed once the payments are settled.
    let silent = system
        .spawn_worker_with(&[("OUTBOX_RELAY_ENABLED", "false".to_owned())])
        .await;
    system.wait_for_owners(1).await;
    let product = system.product(3_000, 100).await;
    let users = system.app.create_users(12).await;
    let mut paid_orders = HashSet::new();
    for &user in &users {
        system.app.charge(user, 10_000).await;
        let order = system.reserved_order(user, &[(product, 1)]).await;
        let paid = system.pay(&order, user, None).await;
        assert_eq!(paid.status, StatusCode::ACCEPTED);
        assert_eq!(
            system.outcome(paid.body["requestId"].as_str().unwrap()).await,
            "SUCCEEDED"
        );
        paid_orders.insert(order);
    }
    assert_eq!(
        system
            .scalar("SELECT count(*) FROM outbox WHERE published_at IS NULL")
            .await,
        12
    );
    system.kill_worker(silent).await;

    // Another replica starts; its relay publishes what the dead one left behind.
    system.spawn_worker().await;

    let mut deliveries = channel
        .basic_consume(
            queue.as_str().into(),
            "test".into(),
            BasicConsumeOptions::default(),
            Default::default(),
        )
        .await
        .unwrap();
    let mut events: HashMap<String, serde_json::Value> = HashMap::new();
    let deadline = tokio::time::Instant::now() + testkit::PATIENCE;
    while events.len() < paid_orders.len() {
        let delivery = tokio::time::timeout_at(deadline, deliveries.next())
            .await
            .expect("every event arrives")
            .unwrap()
            .unwrap();
        let event: serde_json::Value = serde_json::from_slice(&delivery.data).unwrap();
        let message_id = delivery.properties.message_id().as_ref().map(|m| m.to_string());
        assert_eq!(
            message_id.as_deref(),
            event["eventId"].as_str(),
            "message_id is the event id"
        );
        assert_eq!(delivery.routing_key.as_str(), "order.paid");
        events.insert(event["eventId"].as_str().unwrap().to_owned(), event);
        delivery.acker.ack(BasicAckOptions::default()).await.unwrap();
    }
    let orders: Vec<String> = events
        .values()
        .map(|e| e["orderId"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        orders.iter().cloned().collect::<HashSet<_>>(),
        paid_orders,
        "one event per paid order"
    );
    assert_eq!(
        orders.len(),
        paid_orders.len(),
        "no order has two distinct events"
    );
    for event in events.values() {
        assert_eq!(event["type"], "order.paid");
        assert_eq!(event["totalAmount"], 3_000);
        assert_eq!(event["paidAmount"], 3_000);
        assert_eq!(event["discountAmount"], 0);
        assert_eq!(event["items"][0]["productId"], product);
        assert!(event["occurredAt"].as_str().is_some());
    }
    // Redelivered duplicates, if any, carry an event id already seen. A fixed wait on
    // purpose: duplicates that may never come are given time to arrive.
    tokio::time::sleep(Duration::from_millis(500)).await;
    while let Ok(Some(Ok(extra))) = tokio::time::timeout(Duration::from_millis(200), deliveries.next()).await
    {
        let event: serde_json::Value = serde_json::from_slice(&extra.data).unwrap();
        assert!(
            events.contains_key(event["eventId"].as_str().unwrap()),
            "an event no order paid for"
        );
        extra.acker.ack(BasicAckOptions::default()).await.unwrap();
    }

    // The data-platform stand-in received and deduplicated them too.
    let deadline = tokio::time::Instant::now() + testkit::PATIENCE;
    while system.scalar("SELECT count(*) FROM received_events").await < 12 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stand-in did not receive every event"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(system.scalar("SELECT count(*) FROM received_events").await, 12);
    assert_eq!(
        system.scalar("SELECT count(*) FROM outbox").await,
        0,
        "published events are deleted"
    );
    drop(data_platform);
}

/// Counts the statements that change outbox rows, and the rows each changed: a
/// statement-level trigger sees every row a statement touched, so a statement per event
/// would show as many rows of one event each, and any claim or mark as an update.
const COUNT_OUTBOX_WRITES: &str = "
CREATE TABLE outbox_writes (id bigserial PRIMARY KEY, op text, rows bigint);
CREATE TABLE outbox_deleted (event_id uuid);
CREATE FUNCTION count_outbox_updates() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO outbox_writes (op, rows) SELECT 'UPDATE', count(*) FROM new_rows;
  RETURN NULL;
END $$;
CREATE FUNCTION count_outbox_deletes() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO outbox_writes (op, rows) SELECT 'DELETE', count(*) FROM old_rows;
  INSERT INTO outbox_deleted (event_id) SELECT id FROM old_rows;
  RETURN NULL;
END $$;
CREATE TRIGGER count_outbox_updates AFTER UPDATE ON outbox
  REFERENCING NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION count_outbox_updates();
CREATE TRIGGER count_outbox_deletes AFTER DELETE ON outbox
  REFERENCING OLD TABLE AS old_rows
  FOR EACH STATEMENT EXECUTE FUNCTION count_outbox_deletes();
";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backlog_of_many_events_is_published_once_each_and_deleted_a_pass_at_a_time() {
    const EVENTS: i64 = 450;
    let system = System::start(0).await;
    sqlx::raw_sql(COUNT_OUTBOX_WRITES)
        .execute(&system.app.db)
        .await
        .unwrap();

    // The data platform's side, bound before anything is published.
    let broker = shared::config::BrokerSettings::from_env().unwrap().url;
    let conn = lapin::Connection::connect(&broker, Default::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    system.app.topology.declare_events(&channel).await.unwrap();
    let queue = format!("{}test.backlog", system.app.topology.prefix);
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                auto_delete: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            queue.as_str().into(),
            system.app.topology.events_exchange().as_str().into(),
            "order.paid".into(),
            QueueBindOptions::default(),
            Default::default(),
        )
        .await
        .unwrap();

    // A backlog such as a relay outage leaves: events a minute old.
    let stored: Vec<uuid::Uuid> = sqlx::query_scalar(
        "INSERT INTO outbox (id, routing_key, payload, created_at)
         SELECT id, 'order.paid', jsonb_build_object('eventId', id, 'type', 'order.paid'),
                now() - interval '1 minute'
         FROM (SELECT gen_random_uuid() AS id FROM generate_series(1, $1)) AS events
         RETURNING id",
    )
    .bind(EVENTS as i32)
    .fetch_all(&system.app.db)
    .await
    .unwrap();
    let ctx = std::sync::Arc::new(system.worker_context());
    let backlog = worker::relay::outbox::backlog(&ctx).await.unwrap();
    assert_eq!(backlog.unpublished, EVENTS);
    assert!(
        backlog.oldest_age_secs >= 60.0,
        "the oldest event waited a minute: {backlog:?}"
    );

    // Another replica's relay holds the lock: this one skips its passes, sweeps included,
    // and publishes nothing.
    let held = worker::relay::outbox::RelayLock::try_acquire(&system.app.db)
        .await
        .unwrap()
        .expect("nobody else relays");
    let stop = tokio_util::sync::CancellationToken::new();
    let relay = tokio::spawn(worker::relay::outbox::run(
        std::sync::Arc::clone(&ctx),
        stop.clone(),
    ));
    ctx.outbox_written.notify_one();
    // A fixed wait on purpose: what is asserted is that nothing is published meanwhile.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(
        system.scalar("SELECT count(*) FROM outbox").await,
        EVENTS,
        "a relay without the lock deleted events"
    );
    let idle = shared::messaging::broker::queue_depth(&channel, &queue)
        .await
        .unwrap();
    assert_eq!(idle, 0, "a relay without the lock published events");
    held.release().await;

    // Once the lock is free, every event arrives, as itself.
    let mut deliveries = channel
        .basic_consume(
            queue.as_str().into(),
            "test".into(),
            BasicConsumeOptions::default(),
            Default::default(),
        )
        .await
        .unwrap();
    let mut received = HashSet::new();
    let deadline = tokio::time::Instant::now() + testkit::PATIENCE;
    while received.len() < stored.len() {
        let delivery = tokio::time::timeout_at(deadline, deliveries.next())
            .await
            .expect("every event arrives")
            .unwrap()
            .unwrap();
        let event: serde_json::Value = serde_json::from_slice(&delivery.data).unwrap();
        let message_id = delivery.properties.message_id().as_ref().map(|m| m.to_string());
        assert_eq!(message_id.as_deref(), event["eventId"].as_str());
        received.insert(event["eventId"].as_str().unwrap().parse::<uuid::Uuid>().unwrap());
        delivery.acker.ack(BasicAckOptions::default()).await.unwrap();
    }
    assert_eq!(received, stored.iter().copied().collect::<HashSet<_>>());

    // Deleted after their confirms; the relay then has nothing left.
    let deadline = tokio::time::Instant::now() + testkit::PATIENCE;
    while system.scalar("SELECT count(*) FROM outbox").await > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "every confirmed event is deleted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    relay.await.unwrap();
    let backlog = worker::relay::outbox::backlog(&ctx).await.unwrap();
    assert_eq!((backlog.unpublished, backlog.oldest_age_secs), (0, 0.0));

    // Nothing claimed or marked: no statement updated an outbox row. Each event deleted
    // once, by statements that each carried a whole pass: at most one per full batch.
    let passes = (EVENTS + worker::relay::outbox::BATCH - 1) / worker::relay::outbox::BATCH;
    let (updates, deletes, deleted): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE op = 'UPDATE' AND rows > 0),
                count(*) FILTER (WHERE op = 'DELETE' AND rows > 0),
                COALESCE(sum(rows) FILTER (WHERE op = 'DELETE'), 0)::bigint
         FROM outbox_writes",
    )
    .fetch_one(&system.app.db)
    .await
    .unwrap();
    assert_eq!(updates, 0, "{updates} statements updated outbox rows");
    assert_eq!(deleted, EVENTS, "every event deleted once");
    let deleted_ids: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT event_id FROM outbox_deleted")
        .fetch_all(&system.app.db)
        .await
        .unwrap();
    assert_eq!(
        deleted_ids.into_iter().collect::<HashSet<_>>(),
        received,
        "the events deleted are the events delivered"
    );
    assert!(
        deletes <= passes,
        "{deletes} statements deleted {EVENTS} events; at most {passes} expected"
    );

    ctx.publisher.close().await;
    ctx.broker.close().await;
    let _ = conn.close(200, "done".into()).await;
}
