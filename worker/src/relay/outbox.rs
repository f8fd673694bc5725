//! The outbox relay: events written by settling transactions are published after commit to
//! the durable topic exchange `ecommerce.events`, persistent and confirmed, with
//! `message_id` = the event id, and deleted only after the broker's confirm.
//!
//! The relay wakes when a batch with a payment commits and every second otherwise, so whatever a crash
//! left unpublished goes out within a second of any replica running. An event costs one row
//! write after its insert, the delete: nothing claims or marks it. Instead one relay at a
//! time passes, holding a session-level advisory lock ([`RelayLock`]) while it selects due
//! events (no row lock, no write), publishes them and deletes the confirmed ones. A replica
//! that finds the lock taken skips its pass: the holder drains until it finds less than a
//! full batch, and what it missed (committed after its last select) goes out on the next
//! wake-up or sweep of any replica, within a second. Delivery is at least once: a crash
//! between the confirm and the delete publishes an event again, and consumers deduplicate
//! on `eventId`.
//!
//! A pass costs four statements whatever it carries (lock, select, one delete for every
//! event it confirmed, unlock), so under load passes are paced (`OUTBOX_RELAY_INTERVAL_MS`):
//! the events of many settled batches go out together instead of a pass per batch. The
//! first event after a quiet spell goes out at once. The backlog is counted on a timer of
//! its own, not per pass.

use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, PgPool, Postgres};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::Context;

/// Events published per pass at most.
pub const BATCH: i64 = 200;

/// How often the relay looks for events nobody woke it for (a crashed replica's, a relay
/// that was off, a pass skipped while another replica held the lock): the bound on how
/// late such an event goes out.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// The relay's advisory lock (namespace, key), in the two-key form: "outb", apart from the
/// batch's job locks ("jobs") and the popular-products refresh ("popu").
const RELAY_LOCK: (i32, i32) = (0x6f75_7462, 0);

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
        if relay_until_drained(&ctx).await {
            // A sweep is for a quiet relay: one that just passed has nothing left over. One
            // that skipped (another replica held the lock) keeps its sweep, which catches
            // what the holder's last select was too early for.
            sweep.reset();
        }
    }
}

/// Under the relay lock, passes until one finds fewer events than a full batch. False when
/// it did not pass: another replica holds the lock, or PostgreSQL could not be asked.
async fn relay_until_drained(ctx: &Context) -> bool {
    let mut lock = match RelayLock::try_acquire(&ctx.db).await {
        Ok(Some(lock)) => lock,
        Ok(None) => {
            tracing::debug!("another replica is relaying outbox events; skipping this pass");
            return false;
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot take the outbox relay lock; retrying");
            return false;
        }
    };
    loop {
        match relay_once(ctx, lock.conn()).await {
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
    lock.release().await;
    true
}

/// One pass on `conn`, which holds the relay lock: selects due events, publishes them,
/// deletes the confirmed ones. How many events it selected.
pub async fn relay_once(ctx: &Context, conn: &mut PgConnection) -> anyhow::Result<usize> {
    // No row lock and no claim: the advisory lock keeps other relays of this version out.
    // A relay of the previous version (rolling upgrade) still claims with `claimed_until`
    // and marks with `published_at`; skipping what it claimed or marked spares most double
    // publishes, and any left are deduplicated on `eventId`. `outbox_unpublished` (on
    // `created_at`, where `published_at IS NULL`) serves the order and the limit.
    let due = sqlx::query!(
        "SELECT id, routing_key, payload FROM outbox
         WHERE published_at IS NULL AND (claimed_until IS NULL OR claimed_until < now())
         ORDER BY created_at LIMIT $1",
        BATCH,
    )
    .fetch_all(&mut *conn)
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
        // One statement for the whole pass, and the one write an event costs after its
        // insert. A crash before it publishes these events again on the next pass.
        sqlx::query!("DELETE FROM outbox WHERE id = ANY($1)", &confirmed)
            .execute(&mut *conn)
            .await?;
    }
    metrics::counter!("outbox_events_published_total").increment(confirmed.len() as u64);
    Ok(due.len())
}

/// The relay's session-level advisory lock, held by a pool connection taken for the pass.
pub struct RelayLock {
    conn: PoolConnection<Postgres>,
    /// Set once unlocked; a lock dropped without it closes its session instead.
    released: bool,
}

impl RelayLock {
    /// The lock, or `None` when another session holds it (no waiting: see the module docs).
    pub async fn try_acquire(db: &PgPool) -> sqlx::Result<Option<Self>> {
        let mut conn = db.acquire().await?;
        let locked = sqlx::query_scalar!(
            r#"SELECT pg_try_advisory_lock($1, $2) AS "locked!""#,
            RELAY_LOCK.0,
            RELAY_LOCK.1,
        )
        .fetch_one(&mut *conn)
        .await?;
        Ok(locked.then_some(Self {
            conn,
            released: false,
        }))
    }

    pub fn conn(&mut self) -> &mut PgConnection {
        &mut self.conn
    }

    pub async fn release(mut self) {
        let unlocked = sqlx::query_scalar!("SELECT pg_advisory_unlock($1, $2)", RELAY_LOCK.0, RELAY_LOCK.1)
            .fetch_one(&mut *self.conn)
            .await;
        match unlocked {
            Ok(_) => self.released = true,
            Err(e) => tracing::warn!(
                error = %e,
                "cannot release the outbox relay lock; closing its connection"
            ),
        }
    }
}

impl Drop for RelayLock {
    fn drop(&mut self) {
        // Not unlocked (the unlock failed, or the pass's future was cancelled at shutdown):
        // back in the pool the connection would hold the lock, and every relay would skip
        // every pass, for as long as the pool kept it; its session ends instead, which is
        // what releases a session-level lock for sure.
        if !self.released {
            self.conn.close_on_drop();
        }
    }
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
