//! Events to the data platform: every paid order produces exactly one distinct `order.paid`
//! event on a queue bound to `ecommerce.events`, also when the worker dies between the
//! commit and the publish.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed unwrap is a failed test

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::System;
use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use reqwest::StatusCode;

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
    let deadline = tokio::time::Instant::now() + common::PATIENCE;
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
    let deadline = tokio::time::Instant::now() + common::PATIENCE;
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
    // Redelivered duplicates, if any, carry an event id already seen.
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
    let deadline = tokio::time::Instant::now() + common::PATIENCE;
    while system.scalar("SELECT count(*) FROM received_events").await < 12 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stand-in did not receive every event"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(system.scalar("SELECT count(*) FROM received_events").await, 12);
    assert_eq!(
        system
            .scalar("SELECT count(*) FROM outbox WHERE published_at IS NULL")
            .await,
        0
    );
    drop(data_platform);
}
