//! Settling a batch of commands: one transaction, then one ack.
//!
//! The transaction checks the partition lease (fencing), locks the request rows, skips
//! those already terminal (redeliveries and re-published duplicates), lets the family's
//! rules decide the rest in broker order, and writes every terminal status with its result
//! or error. Only after commit are the messages acked, all at once.
//!
//! A batch that fails for a reason other than an unreachable database is settled again one
//! command at a time, in order, so one bad command cannot hold back the others. A command
//! that keeps failing is dead-lettered (its request is then marked failed by
//! [`crate::deadletters`]). An unreachable database is waited out without giving up the
//! messages, so an outage never burns through delivery attempts.

use std::collections::{HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::FutureExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicRejectOptions};
use serde::Serialize;
use shared::command::{CommandMessage, RequestKind};
use shared::error::ErrorBody;
use shared::topology::Family;
use sqlx::PgConnection;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::leases::Lease;
use crate::{coupons, orders, Context};

/// Why a settlement did not commit.
#[derive(Debug, thiserror::Error)]
pub enum SettleError {
    #[error("the partition lease was lost")]
    LeaseLost,
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error("request {id} cannot be settled: {reason}")]
    Unsettleable { id: Uuid, reason: String },
}

impl SettleError {
    /// Errors that go away by themselves: retried without counting as an attempt.
    fn is_transient(&self) -> bool {
        match self {
            SettleError::Database(e) => {
                shared::db::is_unavailable(e)
                    || matches!(e, sqlx::Error::Database(db) if matches!(db.code().as_deref(), Some("40001" | "40P01")))
            }
            _ => false,
        }
    }
}

/// A request that is still `PENDING`, as read under its row lock.
#[derive(Debug, Clone)]
pub struct PendingRequest {
    pub id: Uuid,
    pub kind: RequestKind,
    pub payload: serde_json::Value,
    pub created_at: DateTime<Utc>,
}

/// How the family's rules settled one request.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Succeeded(serde_json::Value),
    Failed(ErrorBody),
}

/// Whether the partition's consumer should go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Continue {
    Yes,
    /// The lease is gone or a stop was asked for: close the channel without acking what is
    /// left, so the broker hands it to the next owner in order.
    No,
}

/// What one committed settlement did, for metrics.
struct Settled {
    succeeded: usize,
    failed: usize,
    duplicates: usize,
    accepted_at: Vec<DateTime<Utc>>,
}

enum Attempt {
    Settled(Settled),
    Stopped,
    LeaseLost,
    GaveUp(String),
}

/// Settles and acks one batch of deliveries from the lease's partition.
pub async fn process_batch(
    ctx: &Context,
    lease: &Lease,
    batch: Vec<Delivery>,
    stop: &CancellationToken,
) -> anyhow::Result<Continue> {
    let family = lease.family.as_str();
    let redelivered = batch.iter().filter(|d| d.redelivered).count();
    metrics::counter!("worker_redeliveries_total", "family" => family).increment(redelivered as u64);

    let mut commands = Vec::with_capacity(batch.len());
    for delivery in batch {
        match serde_json::from_slice::<CommandMessage>(&delivery.data) {
            Ok(message) if message.kind.family() == lease.family => commands.push((delivery, message)),
            _ => {
                tracing::error!(family, "undecodable command message; dead-lettering it");
                dead_letter(lease.family, &delivery).await?;
            }
        }
    }
    let Some((last, _)) = commands.last() else {
        return Ok(Continue::Yes);
    };
    metrics::histogram!("worker_batch_size", "family" => family).record(commands.len() as f64);

    let ids: Vec<Uuid> = commands.iter().map(|(_, m)| m.request_id).collect();
    let started = Instant::now();
    match settle_with_retries(ctx, lease, &ids, 1, stop).await {
        Attempt::Settled(settled) => {
            last.acker.ack(BasicAckOptions { multiple: true }).await?;
            record(lease.family, &settled);
            // The activity trail: one line per batch, whatever its size.
            tracing::info!(
                family,
                partition = lease.partition,
                commands = ids.len(),
                succeeded = settled.succeeded,
                failed = settled.failed,
                duplicates = settled.duplicates,
                redelivered,
                ms = started.elapsed().as_millis() as u64,
                "batch settled"
            );
            Ok(Continue::Yes)
        }
        Attempt::Stopped | Attempt::LeaseLost => Ok(Continue::No),
        Attempt::GaveUp(reason) => {
            tracing::warn!(family, partition = lease.partition, %reason, "batch failed; settling its commands one by one");
            for (delivery, message) in &commands {
                match settle_with_retries(
                    ctx,
                    lease,
                    &[message.request_id],
                    ctx.config.settle_attempts,
                    stop,
                )
                .await
                {
                    Attempt::Settled(settled) => {
                        delivery.acker.ack(BasicAckOptions::default()).await?;
                        record(lease.family, &settled);
                    }
                    Attempt::Stopped | Attempt::LeaseLost => return Ok(Continue::No),
                    Attempt::GaveUp(reason) => {
                        tracing::error!(family, request_id = %message.request_id, %reason, "command cannot be settled; dead-lettering it");
                        note_why(ctx, message, &reason).await;
                        dead_letter(lease.family, delivery).await?;
                    }
                }
            }
            Ok(Continue::Yes)
        }
    }
}

/// Notes why this worker gives up on a command, for `worker dead-letters list`, before the
/// broker dead-letters it (the broker's own reason is only `rejected`); the dead-letter
/// consumer takes the note over when it opens the letter. Best effort: the dead letter does
/// not depend on it, and the database may be what failed.
async fn note_why(ctx: &Context, message: &CommandMessage, reason: &str) {
    // Enough to read the error; a pathological message must not bloat the row.
    let detail: String = reason.chars().take(1_000).collect();
    let noted = sqlx::query(
        "INSERT INTO settle_failures (request_id, detail) VALUES ($1, $2)
         ON CONFLICT (request_id) DO UPDATE SET detail = EXCLUDED.detail, noted_at = now()",
    )
    .bind(message.request_id)
    .bind(detail)
    .execute(&ctx.db)
    .await;
    if let Err(e) = noted {
        tracing::warn!(request_id = %message.request_id, error = %e, "could not note why the command is dead-lettered");
    }
}

async fn dead_letter(family: Family, delivery: &Delivery) -> anyhow::Result<()> {
    delivery
        .acker
        .reject(BasicRejectOptions { requeue: false })
        .await?;
    metrics::counter!("worker_dead_lettered_total", "family" => family.as_str()).increment(1);
    Ok(())
}

fn record(family: Family, settled: &Settled) {
    let family = family.as_str();
    metrics::counter!("worker_commands_settled_total", "family" => family, "outcome" => "succeeded")
        .increment(settled.succeeded as u64);
    metrics::counter!("worker_commands_settled_total", "family" => family, "outcome" => "failed")
        .increment(settled.failed as u64);
    metrics::counter!("worker_commands_duplicate_total", "family" => family)
        .increment(settled.duplicates as u64);
    let now = Utc::now();
    for accepted in &settled.accepted_at {
        let latency = (now - *accepted).to_std().unwrap_or_default();
        metrics::histogram!("worker_command_latency_seconds", "family" => family)
            .record(latency.as_secs_f64());
    }
}

/// Tries to settle `ids` until it commits, the lease is lost, a stop is asked for, or
/// `attempts` tries failed for reasons that do not go away by themselves.
async fn settle_with_retries(
    ctx: &Context,
    lease: &Lease,
    ids: &[Uuid],
    attempts: u32,
    stop: &CancellationToken,
) -> Attempt {
    let mut failures = 0;
    let mut backoff = Duration::from_millis(100);
    loop {
        let started = Instant::now();
        let outcome = AssertUnwindSafe(settle_once(ctx, lease, ids))
            .catch_unwind()
            .await;
        let error = match outcome {
            Ok(Ok(settled)) => {
                metrics::histogram!("worker_settle_duration_seconds", "family" => lease.family.as_str())
                    .record(started.elapsed().as_secs_f64());
                return Attempt::Settled(settled);
            }
            Ok(Err(SettleError::LeaseLost)) => {
                tracing::info!(
                    family = lease.family.as_str(),
                    partition = lease.partition,
                    "lease lost; leaving the batch to the next owner"
                );
                return Attempt::LeaseLost;
            }
            Ok(Err(e)) if e.is_transient() => {
                tracing::warn!(error = %e, "settlement hit a passing failure; retrying");
                None
            }
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some("settlement panicked".to_owned()),
        };
        if let Some(reason) = error {
            failures += 1;
            if failures >= attempts {
                return Attempt::GaveUp(reason);
            }
        }
        tokio::select! {
            () = stop.cancelled() => return Attempt::Stopped,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

#[derive(sqlx::FromRow)]
struct RequestRow {
    id: Uuid,
    kind: String,
    payload: serde_json::Value,
    status: String,
    created_at: DateTime<Utc>,
}

/// Settles the requests `ids` (a batch, in broker order) in one transaction, without
/// retrying; for tests that look at what one settlement costs.
pub async fn settle_batch(ctx: &Context, lease: &Lease, ids: &[Uuid]) -> Result<(), SettleError> {
    settle_once(ctx, lease, ids).await.map(|_| ())
}

async fn settle_once(ctx: &Context, lease: &Lease, ids: &[Uuid]) -> Result<Settled, SettleError> {
    let mut tx = ctx.db.begin().await?;
    if !lease.fence(&mut tx).await? {
        return Err(SettleError::LeaseLost);
    }
    let lock = match lease.family {
        Family::Coupon => {
            "SELECT id, kind, payload, status, created_at FROM requests WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE"
        }
        Family::Order => orders::LOCK_REQUESTS_WITH_CREATIONS,
    };
    let rows: Vec<RequestRow> = sqlx::query_as(lock).bind(ids).fetch_all(&mut *tx).await?;
    let mut rows: HashMap<Uuid, RequestRow> = rows.into_iter().map(|r| (r.id, r)).collect();

    // Broker order, each request once, only those still pending.
    let mut seen = HashSet::new();
    let mut pending = Vec::with_capacity(ids.len());
    for id in ids {
        if !seen.insert(*id) {
            continue;
        }
        let Some(row) = rows.remove(id) else {
            tracing::warn!(request_id = %id, "a command names no stored request; dropping it");
            continue;
        };
        if row.status != "PENDING" {
            continue;
        }
        let kind = RequestKind::parse(&row.kind).ok_or_else(|| SettleError::Unsettleable {
            id: row.id,
            reason: format!("unknown request type {}", row.kind),
        })?;
        pending.push(PendingRequest {
            id: row.id,
            kind,
            payload: row.payload,
            created_at: row.created_at,
        });
    }
    let duplicates = ids.len() - pending.len();
    // What is left was locked beside the batch: creations its payments need first.
    let creations: Vec<PendingRequest> = rows
        .into_values()
        .filter(|row| row.status == "PENDING")
        .filter_map(|row| {
            Some(PendingRequest {
                id: row.id,
                kind: RequestKind::parse(&row.kind).filter(|k| *k == RequestKind::OrderCreate)?,
                payload: row.payload,
                created_at: row.created_at,
            })
        })
        .collect();
    if pending.is_empty() {
        tx.commit().await?;
        return Ok(Settled {
            succeeded: 0,
            failed: 0,
            duplicates,
            accepted_at: Vec::new(),
        });
    }

    let decisions = match lease.family {
        Family::Coupon => coupons::settle(&mut tx, &pending).await?,
        Family::Order => {
            pending = orders::with_creations_first(pending, creations);
            orders::settle(&mut tx, &pending, ctx.config.reservation_ttl).await?
        }
    };
    write_outcomes(&mut tx, &pending, &decisions).await?;
    tx.commit().await?;
    if !shared::settlements::fits_one_notice(pending.len()) {
        let settled: Vec<Uuid> = pending.iter().map(|p| p.id).collect();
        shared::settlements::announce(&ctx.db, &settled).await;
    }
    let paid = pending
        .iter()
        .zip(&decisions)
        .any(|(p, d)| p.kind == RequestKind::OrderPay && matches!(d, Decision::Succeeded(_)));
    if paid {
        // A payment wrote an event: let the outbox relay publish it now.
        ctx.outbox_written.notify_one();
    }

    let succeeded = decisions
        .iter()
        .filter(|d| matches!(d, Decision::Succeeded(_)))
        .count();
    Ok(Settled {
        succeeded,
        failed: decisions.len() - succeeded,
        duplicates,
        accepted_at: pending.iter().map(|p| p.created_at).collect(),
    })
}

#[derive(Serialize)]
struct Outcome<'a> {
    id: Uuid,
    status: &'static str,
    result: Option<&'a serde_json::Value>,
    error: Option<&'a ErrorBody>,
}

/// Writes every terminal status in one statement.
async fn write_outcomes(
    conn: &mut PgConnection,
    pending: &[PendingRequest],
    decisions: &[Decision],
) -> Result<(), SettleError> {
    let outcomes: Vec<Outcome> = pending
        .iter()
        .zip(decisions)
        .map(|(request, decision)| match decision {
            Decision::Succeeded(result) => Outcome {
                id: request.id,
                status: "SUCCEEDED",
                result: Some(result),
                error: None,
            },
            Decision::Failed(error) => Outcome {
                id: request.id,
                status: "FAILED",
                result: None,
                error: Some(error),
            },
        })
        .collect();
    let outcomes = serde_json::to_value(&outcomes).map_err(|e| SettleError::Unsettleable {
        id: pending.first().map(|p| p.id).unwrap_or_default(),
        reason: e.to_string(),
    })?;
    let ids: Vec<Uuid> = pending.iter().map(|p| p.id).collect();
    // `r.id = ANY($2)` is for the planner: it cannot tell how many rows a JSON document
    // holds, guesses 100, and then prefers a sequential scan of the whole requests table to
    // a hundred index lookups (seen in the checkout benchmark: 3 million rows read).
    // The same statement sends the notice that wakes the clients waiting for these requests
    // (`shared::settlements`): delivered when this transaction commits, it costs neither a
    // round trip nor a transaction of its own. A batch too large for one notice's payload
    // is announced after the commit instead (`settle_once`).
    sqlx::query(
        "WITH written AS (
            UPDATE requests r
            SET status = o.status, result = o.result, error = o.error, completed_at = now(), published = true
            FROM jsonb_to_recordset($1) AS o(id uuid, status text, result jsonb, error jsonb)
            WHERE r.id = ANY($2) AND r.id = o.id
            RETURNING r.id)
         SELECT pg_notify($3, ids)
         FROM (SELECT string_agg(id::text, ',') AS ids FROM written) AS batch
         WHERE $4 AND ids IS NOT NULL",
    )
    .bind(outcomes)
    .bind(&ids)
    .bind(shared::settlements::CHANNEL)
    .bind(shared::settlements::fits_one_notice(ids.len()))
    .execute(conn)
    .await?;
    Ok(())
}
