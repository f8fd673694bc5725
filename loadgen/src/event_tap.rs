//! A tap on the events exchange: a queue of the run's own, bound to `ecommerce.events` for
//! `order.paid` before the load, from which the checkout's checks read what the relay
//! published. The relay deletes an outbox row once the broker confirmed its event, so after
//! a benchmark, where no data-platform stand-in runs, the published events are nowhere else.
//!
//! The queue is exclusive and auto-deleted (a classic queue: gone with the tap's
//! connection, whatever becomes of the run) and is not read during the load: the broker
//! routes each event to one more queue and holds it, and nothing of the tap competes with
//! the system for CPU while it is measured.

use std::collections::HashMap;

use anyhow::Context;
use lapin::options::{BasicGetOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::Channel;
use shared::config::BrokerSettings;
use shared::messaging::broker::Broker;
use tokio::sync::Mutex;
use uuid::Uuid;

/// A bound tap; [`EventTap::seen`] reads it.
pub struct EventTap {
    broker: Broker,
    channel: Channel,
    queue: String,
    /// Every event taken from the queue so far: event id → order id. Kept, so that a second
    /// reading still sees what the first one took.
    seen: Mutex<HashMap<Uuid, Uuid>>,
}

impl EventTap {
    /// Binds a queue of its own to the events exchange of `prefix` (declared if missing, as
    /// the relay declares it) on the broker at `amqp_url`.
    pub async fn bind(amqp_url: &str, prefix: &str) -> anyhow::Result<Self> {
        let topology = crate::amqp_cleanup::topology(prefix, 1);
        let settings = BrokerSettings {
            url: amqp_url.to_owned(),
        };
        let broker = Broker::new(&settings, format!("{prefix}loadgen-event-tap"));
        let channel = broker.channel().await.context("cannot connect to RabbitMQ")?;
        topology.declare_events(&channel).await?;
        let declared = channel
            .queue_declare(
                // Named by the broker: two runs never share a tap.
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        let queue = declared.name().as_str().to_owned();
        channel
            .queue_bind(
                queue.as_str().into(),
                topology.events_exchange().as_str().into(),
                "order.paid".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(Self {
            broker,
            channel,
            queue,
            seen: Mutex::new(HashMap::new()),
        })
    }

    /// Takes whatever the queue holds now and returns every event seen so far, as event id
    /// → order id. Deliveries of an event id seen before (the relay publishes again what it
    /// could not delete) count once.
    pub async fn seen(&self) -> anyhow::Result<HashMap<Uuid, Uuid>> {
        let mut seen = self.seen.lock().await;
        // One message a round trip: a few thousand on loopback take a second or two, after
        // the measured window.
        while let Some(message) = self
            .channel
            .basic_get(self.queue.as_str().into(), BasicGetOptions { no_ack: true })
            .await?
        {
            let event: serde_json::Value = serde_json::from_slice(&message.delivery.data)
                .context("an order.paid event that is not JSON")?;
            let id = |field: &str| {
                event
                    .get(field)
                    .and_then(serde_json::Value::as_str)
                    .and_then(|s| Uuid::parse_str(s).ok())
            };
            let (Some(event_id), Some(order_id)) = (id("eventId"), id("orderId")) else {
                anyhow::bail!("an order.paid event without an eventId or an orderId: {event}");
            };
            seen.insert(event_id, order_id);
        }
        Ok(seen.clone())
    }

    pub async fn close(self) {
        let _ = self.channel.close(200, "done".into()).await;
        self.broker.close().await;
    }
}
