//! Housekeeping: pruning what is only kept for a while. Idempotency keys past their
//! retention (at least the contract's 24 hours), settled requests past theirs (clients poll
//! a request for minutes, not weeks; request ids stored elsewhere are not foreign keys), and
//! job runs past [`JOB_RUN_RETENTION`]. Pending requests and running jobs are never pruned.
//!
//! Rows go in chunks of [`CHUNK`], each its own statement, so a large backlog after a busy
//! day never holds locks on many rows at once or bloats one transaction.

use std::time::Duration;

use anyhow::Context;
use sqlx::PgPool;

use crate::config::BatchConfig;

/// Rows deleted per statement.
const CHUNK: i64 = 5_000;

/// How long job runs are kept: long enough to look back over a month of schedules.
pub const JOB_RUN_RETENTION: Duration = Duration::from_secs(30 * 86_400);

/// Deletes every prunable row; returns how many went.
pub async fn prune(db: &PgPool, config: &BatchConfig) -> anyhow::Result<u64> {
    let keys = delete_in_chunks(db, Prunable::IdempotencyKeys, config.idempotency_key_retention)
        .await
        .context("cannot prune idempotency keys")?;
    let requests = delete_in_chunks(db, Prunable::SettledRequests, config.request_retention)
        .await
        .context("cannot prune settled requests")?;
    let runs = delete_in_chunks(db, Prunable::JobRuns, JOB_RUN_RETENTION)
        .await
        .context("cannot prune job runs")?;
    tracing::info!(
        idempotency_keys = keys,
        requests,
        job_runs = runs,
        "housekeeping pruned old rows"
    );
    Ok(keys + requests + runs)
}

/// What housekeeping prunes.
#[derive(Debug, Clone, Copy)]
enum Prunable {
    IdempotencyKeys,
    /// Requests settled (not `PENDING`) longer ago than the retention.
    SettledRequests,
    /// Finished job runs.
    JobRuns,
}

/// Deletes `what` older than `retention`, a chunk per statement, until a statement deletes
/// less than a chunk.
async fn delete_in_chunks(db: &PgPool, what: Prunable, retention: Duration) -> sqlx::Result<u64> {
    let mut deleted = 0;
    loop {
        let n = delete_chunk(db, what, retention.as_secs_f64()).await?;
        deleted += n;
        if n < CHUNK as u64 {
            return Ok(deleted);
        }
    }
}

/// Deletes one chunk of `what` older than `retention_secs`; how many rows went.
async fn delete_chunk(db: &PgPool, what: Prunable, retention_secs: f64) -> sqlx::Result<u64> {
    let deleted = match what {
        Prunable::IdempotencyKeys => {
            sqlx::query!(
                "DELETE FROM idempotency_keys WHERE (scope, key) IN (
                   SELECT scope, key FROM idempotency_keys
                   WHERE created_at < now() - make_interval(secs => $1) LIMIT $2)",
                retention_secs,
                CHUNK,
            )
            .execute(db)
            .await?
        }
        Prunable::SettledRequests => {
            sqlx::query!(
                "DELETE FROM requests WHERE id IN (
                   SELECT id FROM requests
                   WHERE status <> 'PENDING' AND completed_at < now() - make_interval(secs => $1) LIMIT $2)",
                retention_secs,
                CHUNK,
            )
            .execute(db)
            .await?
        }
        Prunable::JobRuns => {
            sqlx::query!(
                "DELETE FROM job_runs WHERE id IN (
                   SELECT id FROM job_runs
                   WHERE outcome <> 'RUNNING' AND started_at < now() - make_interval(secs => $1) LIMIT $2)",
                retention_secs,
                CHUNK,
            )
            .execute(db)
            .await?
        }
    };
    Ok(deleted.rows_affected())
}
