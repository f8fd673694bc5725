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
    let keys = delete_in_chunks(
        db,
        "DELETE FROM idempotency_keys WHERE (scope, key) IN (
           SELECT scope, key FROM idempotency_keys
           WHERE created_at < now() - make_interval(secs => $1) LIMIT $2)",
        config.idempotency_key_retention,
    )
    .await
    .context("cannot prune idempotency keys")?;
    let requests = delete_in_chunks(
        db,
        "DELETE FROM requests WHERE id IN (
           SELECT id FROM requests
           WHERE status <> 'PENDING' AND completed_at < now() - make_interval(secs => $1) LIMIT $2)",
        config.request_retention,
    )
    .await
    .context("cannot prune settled requests")?;
    let runs = delete_in_chunks(
        db,
        "DELETE FROM job_runs WHERE id IN (
           SELECT id FROM job_runs
           WHERE outcome <> 'RUNNING' AND started_at < now() - make_interval(secs => $1) LIMIT $2)",
        JOB_RUN_RETENTION,
    )
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

/// Runs `statement` (with `$1` the retention in seconds and `$2` the chunk size) until it
/// deletes less than a chunk.
async fn delete_in_chunks(db: &PgPool, statement: &str, retention: Duration) -> sqlx::Result<u64> {
    let mut deleted = 0;
    loop {
        let n = sqlx::query(statement)
            .bind(retention.as_secs_f64())
            .bind(CHUNK)
            .execute(db)
            .await?
            .rows_affected();
        deleted += n;
        if n < CHUNK as u64 {
            return Ok(deleted);
        }
    }
}
