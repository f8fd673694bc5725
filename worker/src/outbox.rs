//! The outbox relay: events written by settling transactions are published after commit to
//! the durable topic exchange `ecommerce.events`, persistent and confirmed, with
//! `message_id` = the event id, and marked published only after the broker's confirm.
//!
//! The relay wakes when a batch with a payment commits and every second otherwise, so whatever a crash
//! left unpublished goes out within a second of any replica running. Events are claimed
//! with `FOR NO KEY UPDATE SKIP LOCKED` and a claim that expires, so replicas never publish the
//! same event at the same time, and one that died holding a claim is taken over. Delivery
//! is at least once: a crash between the confirm and the mark publishes an event again, and
//! consumers deduplicate on `eventId`.

use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::Context;

/// Events published per pass at most.
const BATCH: i64 = 200;

pub async fn run(ctx: Arc<Context>, shutdown: CancellationToken) {
    if !ctx.config.outbox_relay {
        tracing::info!("outbox relay disabled on this replica");
        return;
    }
    loop {
        loop {
            match relay_once(&ctx).await {
                Ok(n) if n as i64 == BATCH => continue,
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(
                        error = format!("{e:#}"),
                        "relaying outbox events failed; retrying"
                    );
                    break;
                }
            }
        }
        report_backlog(&ctx).await;
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = ctx.outbox_written.notified() => {}
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// One pass: claims due events, publishes them, marks the confirmed ones published.
pub async fn relay_once(ctx: &Context) -> anyhow::Result<usize> {
    let due: Vec<(Uuid, String, serde_json::Value)> = sqlx::query_as(
        "UPDATE outbox SET claimed_until = now() + interval '30 seconds'
         WHERE id IN (
           SELECT id FROM outbox
           WHERE published_at IS NULL AND (claimed_until IS NULL OR claimed_until < now())
           ORDER BY created_at LIMIT $1
           FOR NO KEY UPDATE SKIP LOCKED)
         RETURNING id, routing_key, payload",
    )
    .bind(BATCH)
    .fetch_all(&ctx.db)
    .await?;
    if due.is_empty() {
        return Ok(0);
    }
    let exchange = ctx.config.topology.events_exchange();
    // Publishes are pipelined on the confirm channel; each confirm is awaited.
    let published = join_all(due.iter().map(|(id, routing_key, payload)| {
        let exchange = &exchange;
        async move {
            let body = serde_json::to_vec(payload).unwrap_or_default();
            ctx.publisher
                .publish(exchange, routing_key, &id.to_string(), &body, false)
                .await
                .map(|()| *id)
        }
    }))
    .await;
    let mut confirmed = Vec::with_capacity(published.len());
    for outcome in published {
        match outcome {
            Ok(id) => confirmed.push(id),
            Err(e) => tracing::warn!(error = %e, "an event was not confirmed; it will be published again"),
        }
    }
    sqlx::query("UPDATE outbox SET published_at = now() WHERE id = ANY($1)")
        .bind(&confirmed)
        .execute(&ctx.db)
        .await?;
    metrics::counter!("outbox_events_published_total").increment(confirmed.len() as u64);
    Ok(due.len())
}

/// Gauges of work waiting: unpublished events and reservations held.
async fn report_backlog(ctx: &Context) {
    let counts: Result<(i64, i64), _> = sqlx::query_as(
        "SELECT (SELECT count(*) FROM outbox WHERE published_at IS NULL),
                (SELECT count(*) FROM orders WHERE status = 'RESERVED')",
    )
    .fetch_one(&ctx.db)
    .await;
    if let Ok((backlog, reserved)) = counts {
        metrics::gauge!("outbox_backlog").set(backlog as f64);
        metrics::gauge!("orders_reserved_now").set(reserved as f64);
    }
}

/// Declares the events exchange; failures are logged, as publishing retries anyway.
pub async fn declare_exchange(ctx: &Context) {
    let declared = async {
        let channel = ctx.broker.channel().await?;
        ctx.config.topology.declare_events(&channel).await?;
        let _ = channel.close(200, "declared".into()).await;
        anyhow::Ok(())
    };
    if let Err(e) = declared.await {
        tracing::warn!(error = format!("{e:#}"), "cannot declare the events exchange");
    }
}
