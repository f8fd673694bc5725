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
//!
//! A pass costs two statements whatever it carries (the claim, and one mark for every event
//! it confirmed), so under load passes are paced (`OUTBOX_RELAY_INTERVAL_MS`): the events of
//! many settled batches go out together instead of a pass per batch. The first event after a
//! quiet spell goes out at once. The backlog is counted on a timer of its own, not per pass.

use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::Context;

/// Events published per pass at most.
pub const BATCH: i64 = 200;

/// How often the relay looks for events nobody woke it for (a crashed replica's, a relay
/// that was off): the bound on how late such an event goes out.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

pub async fn run(ctx: Arc<Context>, shutdown: CancellationToken) {
    if !ctx.config.outbox_relay {
        tracing::info!("outbox relay disabled on this replica");
        return;
    }
    let pace = ctx.config.outbox_relay_interval;
    let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
    sweep.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut backlog = tokio::time::interval(ctx.config.outbox_backlog_interval);
    backlog.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // So the first wake-up is not held back.
    let mut last_pass = Instant::now().checked_sub(pace).unwrap_or_else(Instant::now);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = backlog.tick() => {
                report_backlog(&ctx).await;
                continue;
            }
            () = ctx.outbox_written.notified() => {
                // Woken again within the pace: let more batches' events gather. Wake-ups
                // meanwhile leave one permit, so they all cost this one pass.
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep_until(last_pass + pace) => {}
                }
            }
            _ = sweep.tick() => {}
        }
        last_pass = Instant::now();
        relay_until_drained(&ctx).await;
        // A sweep is for a quiet relay: one that just passed has nothing left over.
        sweep.reset();
    }
}

/// Passes until one finds fewer events than a full batch.
async fn relay_until_drained(ctx: &Context) {
    loop {
        match relay_once(ctx).await {
            Ok(n) if n as i64 == BATCH => continue,
            Ok(_) => return,
            Err(e) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "relaying outbox events failed; retrying"
                );
                return;
            }
        }
    }
}

/// One pass: claims due events, publishes them, marks the confirmed ones published.
pub async fn relay_once(ctx: &Context) -> anyhow::Result<usize> {
    let due = sqlx::query!(
        "UPDATE outbox SET claimed_until = now() + interval '30 seconds'
         WHERE id IN (
           SELECT id FROM outbox
           WHERE published_at IS NULL AND (claimed_until IS NULL OR claimed_until < now())
           ORDER BY created_at LIMIT $1
           FOR NO KEY UPDATE SKIP LOCKED)
         RETURNING id, routing_key, payload",
        BATCH,
    )
    .fetch_all(&ctx.db)
    .await?;
    if due.is_empty() {
        return Ok(0);
    }
    let exchange = ctx.config.topology.events_exchange();
    // Publishes are pipelined on the confirm channel; each confirm is awaited.
    let published = join_all(due.iter().map(|event| {
        let exchange = &exchange;
        async move {
            let body = serde_json::to_vec(&event.payload).unwrap_or_default();
            ctx.publisher
                .publish(exchange, &event.routing_key, &event.id.to_string(), &body, false)
                .await
                .map(|()| event.id)
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
    if !confirmed.is_empty() {
        // One statement for the whole pass. `published_at IS NULL`: an event whose claim ran
        // out while it was published here, and that another relay published and marked
        // meanwhile, keeps its first mark.
        sqlx::query!(
            "UPDATE outbox SET published_at = now() WHERE id = ANY($1) AND published_at IS NULL",
            &confirmed,
        )
        .execute(&ctx.db)
        .await?;
    }
    metrics::counter!("outbox_events_published_total").increment(confirmed.len() as u64);
    Ok(due.len())
}

/// Work waiting, as one statement counts it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backlog {
    /// Events not yet published.
    pub unpublished: i64,
    /// How long the oldest of them has waited, in seconds (0 with none): a relay that is
    /// stuck shows here long before the count looks unusual.
    pub oldest_age_secs: f64,
    /// Orders `RESERVED` now (stock held, payment awaited).
    pub reserved_orders: i64,
}

/// Counts the backlog with one statement; both counts read partial indexes
/// (`outbox_unpublished`, `orders_reserved_by_deadline`) that hold only the rows counted.
pub async fn backlog(ctx: &Context) -> Result<Backlog, sqlx::Error> {
    let counted = sqlx::query!(
        r#"SELECT count(*) AS "unpublished!",
                COALESCE(EXTRACT(EPOCH FROM now() - min(created_at)), 0)::float8 AS "oldest_age_secs!",
                (SELECT count(*) FROM orders WHERE status = 'RESERVED') AS "reserved_orders!"
         FROM outbox WHERE published_at IS NULL"#,
    )
    .fetch_one(&ctx.db)
    .await?;
    Ok(Backlog {
        unpublished: counted.unpublished,
        oldest_age_secs: counted.oldest_age_secs.max(0.0),
        reserved_orders: counted.reserved_orders,
    })
}

/// Gauges of work waiting, set on a timer (`OUTBOX_BACKLOG_REPORT_MS`).
async fn report_backlog(ctx: &Context) {
    match backlog(ctx).await {
        Ok(backlog) => {
            metrics::gauge!("outbox_backlog").set(backlog.unpublished as f64);
            metrics::gauge!("outbox_oldest_unpublished_seconds").set(backlog.oldest_age_secs);
            metrics::gauge!("orders_reserved_now").set(backlog.reserved_orders as f64);
        }
        Err(e) => tracing::debug!(error = %e, "cannot count the outbox backlog"),
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
