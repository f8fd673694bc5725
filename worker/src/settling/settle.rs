//! Settling a batch of commands: one transaction of three round trips, then one ack.
//!
//! The transaction checks the partition lease (fencing), locks the request rows, skips
//! those already terminal (redeliveries and re-published duplicates), lets the family's
//! rules decide the rest in broker order, writes the family's effects with every terminal
//! status, its result or error, in one statement, and changes the rows many partitions
//! share in the message that commits ([`crate::settling::pipeline`] says what a family provides and
//! why). Only after commit are the messages acked, all at once. A batch whose shared rows
//! moved under it is settled again at once with them locked up front.
//!
//! A batch that fails for a reason other than an unreachable database is settled again one
//! command at a time, in order, so one bad command cannot hold back the others. A command
//! that keeps failing is dead-lettered (its request is then marked failed by
//! [`crate::dead_letters::dead_letter_consumer`]). An unreachable database is waited out
//! without giving up the messages, so an outage never burns through delivery attempts.

use std::collections::{HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::{FutureExt, StreamExt, TryStreamExt};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicRejectOptions};
use shared::domain::command::Family;
use shared::domain::command::{CommandMessage, RequestStatus};
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgArguments, PgQueryResult, PgRow};
use sqlx::{Arguments, Either, Executor, FromRow, PgConnection, Postgres, Row};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::partitions::leases::Lease;
use crate::settling::acks::within_answer_time;
use crate::settling::pipeline::{self, CommandFamily, RequestRow, SharedRows};
pub use crate::settling::pipeline::{Decision, PendingRequest, SettleError};
use crate::Context;

impl SettleError {
    /// Errors that go away by themselves: retried without counting as an attempt.
    fn is_transient(&self) -> bool {
        match self {
            SettleError::Database(e) => {
                shared::store::db::is_unavailable(e)
                    || matches!(e, sqlx::Error::Database(db) if matches!(db.code().as_deref(), Some("40001" | "40P01")))
            }
            _ => false,
        }
    }
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
    /// The requests settled, for the notice sent after the commit.
    ids: Vec<Uuid>,
    /// Whether the family wrote outbox events.
    wrote_events: bool,
    /// Statements sent with the `COMMIT` ([`pipeline::Decided::at_commit`]).
    at_commit: Vec<String>,
}

enum Attempt {
    Settled(Settled),
    Stopped,
    LeaseLost,
    GaveUp(String),
}

/// Settles and acks one batch of deliveries from the lease's partition.
pub async fn settle_and_ack(
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
            within_answer_time(last.acker.ack(BasicAckOptions { multiple: true })).await?;
            record(lease, &settled);
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
                        within_answer_time(delivery.acker.ack(BasicAckOptions::default())).await?;
                        record(lease, &settled);
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
    let noted = sqlx::query!(
        "INSERT INTO settle_failures (request_id, detail) VALUES ($1, $2)
         ON CONFLICT (request_id) DO UPDATE SET detail = EXCLUDED.detail, noted_at = now()",
        message.request_id,
        detail,
    )
    .execute(&ctx.db)
    .await;
    if let Err(e) = noted {
        tracing::warn!(request_id = %message.request_id, error = %e, "could not note why the command is dead-lettered");
    }
}

async fn dead_letter(family: Family, delivery: &Delivery) -> anyhow::Result<()> {
    within_answer_time(delivery.acker.reject(BasicRejectOptions { requeue: false })).await?;
    metrics::counter!("worker_dead_lettered_total", "family" => family.as_str()).increment(1);
    Ok(())
}

fn record(lease: &Lease, settled: &Settled) {
    let family = lease.family.as_str();
    // Per partition, for the partitions' view on the dashboard: one counter per partition.
    metrics::counter!("worker_partition_settled_total", "family" => family, "partition" => lease.partition.to_string())
        .increment((settled.succeeded + settled.failed) as u64);
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
    let mut shared = first_try(ctx);
    loop {
        let started = Instant::now();
        // A connection that went silent would hold the partition for ever: given up after
        // the bound, it counts as PostgreSQL unreachable (retried, no attempt spent), and a
        // commit that did land meanwhile makes the retry find its requests settled.
        let limit = ctx.config.database.answer_timeout();
        let settled = shared::store::db::answered_within(limit, settle_once(ctx, lease, ids, shared));
        let outcome = AssertUnwindSafe(settled).catch_unwind().await;
        let error = match outcome {
            Ok(Ok(settled)) => {
                metrics::histogram!("worker_settle_duration_seconds", "family" => lease.family.as_str())
                    .record(started.elapsed().as_secs_f64());
                return Attempt::Settled(settled);
            }
            Ok(Err(SettleError::SharedRowsMoved)) if shared == SharedRows::AtCommit => {
                // Not a failure: the stock moved under an unlocked read. At once, locked.
                metrics::counter!("worker_batches_settled_again_locked_total", "family" => lease.family.as_str())
                    .increment(1);
                shared = SharedRows::Locked;
                continue;
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

/// How a batch takes its shared rows at its first try (`SHARED_ROWS_AT_COMMIT`).
fn first_try(ctx: &Context) -> SharedRows {
    if ctx.config.shared_rows_at_commit {
        SharedRows::AtCommit
    } else {
        SharedRows::Locked
    }
}

/// Settles the requests `ids` (a batch, in broker order) in one transaction, without
/// retrying; for tests that look at what one settlement costs.
pub async fn settle_batch(ctx: &Context, lease: &Lease, ids: &[Uuid]) -> Result<(), SettleError> {
    match settle_once(ctx, lease, ids, first_try(ctx)).await {
        Err(SettleError::SharedRowsMoved) => settle_once(ctx, lease, ids, SharedRows::Locked).await,
        settled => settled,
    }
    .map(|_| ())
}

/// A transaction opened by the lock statement's own message rather than by sqlx's
/// `begin()`, which would cost a round trip of its own. sqlx does not know it is open, so
/// this guard ends it: committed or rolled back here, or, when the settlement is dropped
/// half-way (a panic, a cancelled task), the connection is closed rather than given back
/// to the pool in the middle of a transaction, and PostgreSQL rolls it back.
struct OpenTransaction {
    conn: PoolConnection<Postgres>,
    open: bool,
}

impl OpenTransaction {
    /// Runs `at_commit` and commits, and announces the settled `ids` in the same message
    /// ([`shared::store::settlements::announcement`]): the batch's third and last round trip.
    /// A failure after the `COMMIT` succeeded (the notices only) is logged, not returned: the
    /// batch is settled, and its waiters find it at their next poll. A failure before it
    /// (a statement of `at_commit`) leaves nothing committed: the transaction is rolled back.
    async fn commit_and_announce(mut self, at_commit: &[String], ids: &[Uuid]) -> Result<(), sqlx::Error> {
        let mut message = String::new();
        for statement in at_commit {
            message.push_str(statement);
            message.push_str(";\n");
        }
        message.push_str("COMMIT; ");
        message.push_str(&shared::store::settlements::announcement(ids));
        // The `COMMIT`'s result is the one after those of `at_commit`'s statements.
        let commit_result = at_commit.len() + 1;
        // dynamic: the changes, the COMMIT and the notice go as one message, which the macros cannot build.
        let mut results = self.conn.fetch_many(sqlx::raw_sql(&message));
        let mut finished = 0;
        let mut failed = None;
        while let Some(result) = results.next().await {
            match result {
                Ok(Either::Left(_)) => finished += 1,
                Ok(Either::Right(_)) => {}
                Err(e) if finished >= commit_result => {
                    tracing::debug!(error = %e, "cannot announce settled requests; waiters will poll");
                    break;
                }
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        drop(results);
        if let Some(e) = failed {
            self.rollback().await;
            return Err(e);
        }
        self.open = false;
        Ok(())
    }

    async fn rollback(mut self) {
        // Not a macro: like sqlx's own rollback, a simple-protocol statement, never prepared
        // (a prepared one would cost a fresh connection a round trip more).
        if self.conn.execute("ROLLBACK").await.is_ok() {
            self.open = false;
        }
    }
}

impl Drop for OpenTransaction {
    fn drop(&mut self) {
        if self.open {
            self.conn.close_on_drop();
        }
    }
}

/// The first round trip: `BEGIN`, the lease fence, the family's request lock and its state
/// locks, in one simple-protocol message. Returns the result set of each statement after
/// `BEGIN`, in order.
async fn lock_and_fence(
    conn: &mut PoolConnection<Postgres>,
    lease: &Lease,
    family: &dyn CommandFamily,
    ids: &[Uuid],
    shared: SharedRows,
) -> Result<Vec<Vec<PgRow>>, sqlx::Error> {
    let ids = pipeline::uuid_array(ids);
    // The fence: the lease row stays share-locked until commit, so the lease cannot change
    // hands under a batch in flight. It also reads the transaction's `now()`, which the
    // family's decisions stamp (`now()` is the same for the whole transaction).
    let mut message = format!(
        "BEGIN;
         SELECT now() AS now FROM partition_leases
         WHERE family = {} AND partition = {} AND owner = '{}' AND epoch = {} FOR SHARE;
         {};",
        pipeline::text(lease.family.as_str()),
        lease.partition,
        lease.owner,
        lease.epoch,
        family.lock_requests(&ids),
    );
    for statement in family.lock_state(&ids, shared) {
        message.push_str(&statement);
        message.push(';');
    }
    // Rows come statement by statement, each closed by its command result.
    // dynamic: BEGIN, the fence and the locks go as one message, which the macros cannot build.
    let items: Vec<Either<PgQueryResult, PgRow>> =
        conn.fetch_many(sqlx::raw_sql(&message)).try_collect().await?;
    let mut sets = vec![Vec::new()];
    for item in items {
        match item {
            Either::Left(_) => sets.push(Vec::new()),
            Either::Right(row) => {
                if let Some(set) = sets.last_mut() {
                    set.push(row);
                }
            }
        }
    }
    // The set after `BEGIN`'s result is the fence's; the one after the last statement is
    // always empty.
    sets.remove(0);
    sets.pop();
    Ok(sets)
}

async fn settle_once(
    ctx: &Context,
    lease: &Lease,
    ids: &[Uuid],
    shared: SharedRows,
) -> Result<Settled, SettleError> {
    let (family, write_statement) = ctx.families.of(lease.family)?;
    let mut tx = OpenTransaction {
        conn: ctx.db.acquire().await?,
        open: true,
    };
    match settle_in(&mut tx, family.as_ref(), &write_statement, lease, ids, shared).await {
        Ok(Some(settled)) => {
            tx.commit_and_announce(&settled.at_commit, &settled.ids)
                .await
                .map_err(|e| match e {
                    // A change to a shared row no longer fits (another partition's batch took
                    // the stock): the schema's constraint said so, and nothing committed.
                    sqlx::Error::Database(db)
                        if shared == SharedRows::AtCommit && db.code().as_deref() == Some("23514") =>
                    {
                        SettleError::SharedRowsMoved
                    }
                    e => SettleError::Database(e),
                })?;
            if settled.wrote_events {
                // Let the outbox relay publish them now.
                ctx.outbox_written.notify_one();
            }
            Ok(settled)
        }
        Ok(None) => {
            tx.rollback().await;
            Err(SettleError::LeaseLost)
        }
        Err(e) => {
            tx.rollback().await;
            Err(e)
        }
    }
}

/// Everything but the commit; `None` when the lease is lost.
async fn settle_in(
    tx: &mut OpenTransaction,
    family: &dyn CommandFamily,
    write_statement: &str,
    lease: &Lease,
    ids: &[Uuid],
    shared: SharedRows,
) -> Result<Option<Settled>, SettleError> {
    let mut sets = lock_and_fence(&mut tx.conn, lease, family, ids, shared)
        .await?
        .into_iter();
    let fence = sets.next().unwrap_or_default();
    let Some(now) = fence.first() else {
        return Ok(None);
    };
    let now: DateTime<Utc> = now.try_get("now")?;
    let rows = sets
        .next()
        .unwrap_or_default()
        .iter()
        .map(RequestRow::from_row)
        .collect::<Result<Vec<_>, _>>()?;
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
        if row.status == RequestStatus::Pending {
            pending.push(PendingRequest::from(row));
        }
    }
    let duplicates = ids.len() - pending.len();
    // What is left was locked beside the batch (say, creations its payments need first).
    let beside: Vec<PendingRequest> = rows
        .into_values()
        .filter(|row| row.status == RequestStatus::Pending)
        .map(PendingRequest::from)
        .collect();
    if pending.is_empty() {
        return Ok(Some(Settled {
            succeeded: 0,
            failed: 0,
            duplicates,
            accepted_at: Vec::new(),
            ids: Vec::new(),
            wrote_events: false,
            at_commit: Vec::new(),
        }));
    }

    let pending = family.settling_order(pending, beside);
    let decided = family.decide(&pending, pipeline::LockedState::new(sets.collect()), now, shared)?;
    write(
        &mut tx.conn,
        write_statement,
        &pending,
        decided.decisions.as_slice(),
        decided.writes,
    )
    .await?;

    let succeeded = decided
        .decisions
        .iter()
        .filter(|d| matches!(d, Decision::Succeeded(_)))
        .count();
    // The partition's settle rate, written with the batch's commit: one row per batch.
    let mut at_commit = decided.at_commit;
    at_commit.push(shared::store::settle_rates::record(
        lease.family,
        lease.partition,
        pending.len(),
    ));
    Ok(Some(Settled {
        succeeded,
        failed: decided.decisions.len() - succeeded,
        duplicates,
        accepted_at: pending.iter().map(|p| p.created_at).collect(),
        ids: pending.iter().map(|p| p.id).collect(),
        wrote_events: decided.wrote_events,
        at_commit,
    }))
}

/// The write statement of a family: its CTEs, then every terminal status in one `UPDATE`.
///
/// `r.id = ANY($1)` is for the planner: it cannot tell how many rows the `UNNEST` holds
/// under a generic plan, and guessing many once preferred a sequential scan of the whole
/// requests table to a hundred index lookups (seen in the checkout benchmark: 3 million
/// rows read).
///
/// The notice that wakes the clients waiting for these requests (`shared::store::settlements`) is
/// not sent from here but after the commit: a transaction that notifies holds PostgreSQL's
/// notify-queue lock from its commit until its WAL is flushed, which serialized every
/// batch's commit (and the row locks it holds) behind every other's flush.
pub fn write_statement(family_ctes: &str) -> String {
    format!(
        "WITH {family_ctes},
         written AS (
            UPDATE requests r
            SET status = o.status, result = o.result, error = o.error, completed_at = now()
            FROM UNNEST($1::uuid[], $2::text[], $3::jsonb[], $4::jsonb[]) AS o(id, status, result, error)
            WHERE r.id = ANY($1) AND r.id = o.id
            RETURNING r.id)
         SELECT count(*) FROM written"
    )
}

/// The second round trip: the family's writes and every outcome, in one statement.
async fn write(
    conn: &mut PgConnection,
    statement: &str,
    pending: &[PendingRequest],
    decisions: &[Decision],
    family_writes: pipeline::BindWrites,
) -> Result<(), SettleError> {
    let unencodable = |e: sqlx::error::BoxDynError| SettleError::Database(sqlx::Error::Encode(e));
    let ids: Vec<Uuid> = pending.iter().map(|p| p.id).collect();
    let statuses: Vec<RequestStatus> = decisions.iter().map(Decision::status).collect();
    let mut results = Vec::with_capacity(decisions.len());
    let mut errors = Vec::with_capacity(decisions.len());
    for decision in decisions {
        let (result, error) = match decision {
            Decision::Succeeded(result) => (Some(serde_json::to_value(result)), None),
            Decision::Failed(error) => (None, Some(serde_json::to_value(error))),
        };
        results.push(result.transpose().map_err(|e| unencodable(e.into()))?);
        errors.push(error.transpose().map_err(|e| unencodable(e.into()))?);
    }
    let mut args = PgArguments::default();
    args.add(ids).map_err(unencodable)?;
    args.add(statuses).map_err(unencodable)?;
    args.add(results).map_err(unencodable)?;
    args.add(errors).map_err(unencodable)?;
    family_writes(&mut args).map_err(unencodable)?;
    // dynamic: composed at start from the family's CTEs, which bind their own parameters.
    sqlx::query_with(statement, args).execute(conn).await?;
    Ok(())
}
