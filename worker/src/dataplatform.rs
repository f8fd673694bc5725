//! A stand-in for the external data platform (`worker data-platform`): it binds a durable
//! queue of its own to `ecommerce.events` for `order.paid`, deduplicates deliveries on
//! `eventId`, and records what it received in `received_events`, logging each event. It
//! shows the events arriving, and lets tests and operators count them.

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use shared::messaging::broker::Broker;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::WorkerConfig;

/// The queue the stand-in consumes (`DATA_PLATFORM_QUEUE`).
pub fn queue_name(config: &WorkerConfig) -> String {
    shared::config::var("DATA_PLATFORM_QUEUE", config.topology.data_platform_queue())
        .unwrap_or_else(|e| e.value)
}

pub async fn run(config: WorkerConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let db = shared::store::db::connect_and_migrate(&config.database, "data-platform").await?;
    let broker = Broker::new(&config.broker, format!("{}-data-platform", config.name));
    while !shutdown.is_cancelled() {
        match consume(&config, &db, &broker, &shutdown).await {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "data-platform consumer failed; reconnecting"
                );
                tokio::select! {
                    () = shutdown.cancelled() => {}
                    () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                }
            }
        }
    }
    broker.close().await;
    Ok(())
}

async fn consume(
    config: &WorkerConfig,
    db: &sqlx::PgPool,
    broker: &Broker,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let channel = broker.channel().await?;
    config.topology.declare_events(&channel).await?;
    let queue = queue_name(config);
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    if let Some(ms) = config.topology.queue_expires_ms {
        args.insert("x-expires".into(), AMQPValue::LongUInt(ms));
    }
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await?;
    channel
        .queue_bind(
            queue.as_str().into(),
            config.topology.events_exchange().into(),
            "order.paid".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    channel.basic_qos(50, BasicQosOptions::default()).await?;
    let mut deliveries = channel
        .basic_consume(
            queue.as_str().into(),
            "data-platform".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    tracing::info!(%queue, "data platform stand-in ready");
    loop {
        let delivery = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            next = deliveries.next() => match next {
                Some(delivery) => delivery?,
                None => return Ok(()),
            },
        };
        let payload: serde_json::Value = serde_json::from_slice(&delivery.data).unwrap_or_default();
        let event_id = payload
            .get("eventId")
            .and_then(|v| v.as_str())
            .and_then(|s| Uuid::parse_str(s).ok());
        match event_id {
            Some(event_id) => {
                let deliveries: i32 = sqlx::query_scalar!(
                    "INSERT INTO received_events (event_id, routing_key, payload) VALUES ($1, $2, $3)
                     ON CONFLICT (event_id) DO UPDATE SET deliveries = received_events.deliveries + 1
                     RETURNING deliveries",
                    event_id,
                    delivery.routing_key.as_str(),
                    &payload,
                )
                .fetch_one(db)
                .await?;
                if deliveries == 1 {
                    // Plain fields (no JSON wrappers) for people and log shippers alike.
                    let text = |field: &str| {
                        payload
                            .get(field)
                            .and_then(|v| v.as_str())
                            .unwrap_or("")
                            .to_owned()
                    };
                    let number = |field: &str| {
                        payload
                            .get(field)
                            .and_then(serde_json::Value::as_i64)
                            .unwrap_or(0)
                    };
                    tracing::info!(
                        %event_id,
                        order_id = %text("orderId"),
                        user_id = number("userId"),
                        paid_amount = number("paidAmount"),
                        discount_amount = number("discountAmount"),
                        "order.paid received"
                    );
                } else {
                    tracing::info!(%event_id, deliveries, "duplicate order.paid ignored");
                }
            }
            None => tracing::warn!("an event without an eventId; ignored"),
        }
        delivery.acker.ack(BasicAckOptions::default()).await?;
    }
}
