//! Running a job once, everywhere: the advisory lock that lets one session at a time run a
//! job, the `job_runs` row that claims a scheduled slot, and the record of every run.
//!
//! A run goes:
//! 1. Take the job's session-level advisory lock on a connection of its own, without
//!    waiting: a replica that cannot get it leaves the slot to the one running it. (An
//!    on-demand run waits for it instead.) The lock goes with the session, so a replica
//!    that dies mid-run frees it at once.
//! 2. Under the lock, any run of the job still marked `RUNNING` belongs to a process that
//!    died (no live session holds the lock), so it is marked `ABANDONED`; then the slot is
//!    claimed with `INSERT … ON CONFLICT DO NOTHING` on the unique index of scheduled runs
//!    that are running or succeeded. No row back: the slot already ran, nothing to do.
//! 3. Do the job, record the outcome (rows, or the error) on the claimed row, release the
//!    lock. A failed run leaves its slot free for the next catch-up.
//!
//! The lock keeps replicas from racing; the unique index is what makes a second run of a
//! slot impossible whatever the code does. Should a database outage end the lock's session
//! mid-run, another replica may run the slot again: every job is idempotent for its slot,
//! so that costs time, not correctness.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, PgPool, Postgres};
use tokio::sync::RwLock;
use tokio_util::sync::CancellationToken;

use crate::config::BatchConfig;
use crate::jobs::Job;
use crate::observability;

/// Namespace of the jobs' advisory locks (the first of the two-key form): "jobs".
const LOCK_NAMESPACE: i32 = 0x6a6f_6273;

/// How long an on-demand run waits for a scheduled run of the same job to finish.
const ON_DEMAND_PATIENCE: Duration = Duration::from_secs(600);

/// Why a run was started, as `job_runs.trigger` records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// The cron, or the catch-up of a slot with no successful run.
    Schedule,
    /// `batch run <job>`.
    Manual,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Trigger::Schedule => "SCHEDULE",
            Trigger::Manual => "MANUAL",
        }
    }
}

/// What became of a request to run a job's slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// This process ran it; the job wrote or deleted `rows` rows.
    Ran { run_id: i64, rows: u64 },
    /// A run of this slot had already succeeded.
    AlreadyDone,
    /// Another session is running the job right now.
    Busy,
    /// The batch is stopping; nothing was started.
    Stopping,
}

/// Runs jobs for this replica: what the scheduler, the catch-up loop and `batch run` call.
pub struct Runner {
    db: PgPool,
    config: BatchConfig,
    /// Every run holds this for reading; [`Runner::drain`] takes it for writing, which
    /// waits until the runs in progress have finished.
    in_progress: RwLock<()>,
    stopping: CancellationToken,
}

impl Runner {
    pub fn new(db: PgPool, config: BatchConfig) -> Self {
        Self {
            db,
            config,
            in_progress: RwLock::new(()),
            stopping: CancellationToken::new(),
        }
    }

    pub fn db(&self) -> &PgPool {
        &self.db
    }

    pub fn config(&self) -> &BatchConfig {
        &self.config
    }

    /// Runs `job`'s latest slot unless it already ran or is running elsewhere. Failures are
    /// logged and recorded, not returned: the next catch-up retries them.
    pub async fn run_due(&self, job: Job) {
        let Some(slot) = job.schedule(&self.config.schedules).latest_slot(Utc::now()) else {
            tracing::warn!(job = job.name(), "the schedule has no past occurrence yet");
            return;
        };
        match self.run_scheduled(job, slot).await {
            Ok(Outcome::Busy) => {
                tracing::debug!(job = job.name(), %slot, "running elsewhere, skipped");
            }
            Ok(_) => {}
            Err(e) => {
                tracing::error!(job = job.name(), %slot, error = format!("{e:#}"), "job run failed");
            }
        }
    }

    /// Runs `job` for the scheduled `slot`, once across every replica.
    pub async fn run_scheduled(&self, job: Job, slot: DateTime<Utc>) -> anyhow::Result<Outcome> {
        let Some(_running) = self.enter() else {
            return Ok(Outcome::Stopping);
        };
        let Some(lock) = JobLock::try_acquire(&self.db, job).await? else {
            return Ok(Outcome::Busy);
        };
        self.run_locked(lock, job, slot, Trigger::Schedule).await
    }

    /// Runs `job` now, whether or not its slot already ran (after a run in progress
    /// elsewhere finishes); for `batch run <job>`. The period recorded is now.
    pub async fn run_on_demand(&self, job: Job) -> anyhow::Result<u64> {
        let Some(_running) = self.enter() else {
            anyhow::bail!("the batch is stopping");
        };
        let lock = JobLock::acquire(&self.db, job, ON_DEMAND_PATIENCE).await?;
        match self.run_locked(lock, job, Utc::now(), Trigger::Manual).await? {
            Outcome::Ran { rows, .. } => Ok(rows),
            other => anyhow::bail!("the run did not happen: {other:?}"),
        }
    }

    /// Stops new runs and waits for those in progress to finish.
    pub async fn drain(&self) {
        self.stopping.cancel();
        let _all_finished = self.in_progress.write().await;
    }

    /// Admits a run unless the batch is stopping. Once [`Runner::drain`] waits for the
    /// write lock, `try_read` fails too, so nothing starts after it began waiting.
    fn enter(&self) -> Option<tokio::sync::RwLockReadGuard<'_, ()>> {
        if self.stopping.is_cancelled() {
            return None;
        }
        self.in_progress.try_read().ok()
    }

    async fn run_locked(
        &self,
        mut lock: JobLock,
        job: Job,
        slot: DateTime<Utc>,
        trigger: Trigger,
    ) -> anyhow::Result<Outcome> {
        let claimed = claim(lock.conn(), job, slot, trigger, &self.config.name).await;
        let run_id = match claimed {
            Ok(Some(id)) => id,
            Ok(None) => {
                lock.release().await;
                tracing::debug!(job = job.name(), %slot, "slot already ran");
                return Ok(Outcome::AlreadyDone);
            }
            Err(e) => {
                lock.release().await;
                return Err(e).context("cannot claim the job's slot");
            }
        };
        tracing::info!(job = job.name(), %slot, trigger = trigger.as_str(), run_id, "job run started");
        let started = Instant::now();
        let result = job.execute(&self.db, &self.config, slot).await;
        let elapsed = started.elapsed();
        observability::record_run(job, elapsed, result.is_ok());
        let recorded = finish(lock.conn(), run_id, &result).await;
        lock.release().await;
        if let Err(e) = recorded {
            // The row stays RUNNING until the next run of the job marks it abandoned; the
            // slot then runs again, which the job's idempotence makes harmless.
            tracing::warn!(
                job = job.name(),
                run_id,
                error = format!("{e:#}"),
                "cannot record the run's outcome"
            );
        }
        let rows = result.with_context(|| format!("job {job} failed"))?;
        tracing::info!(
            job = job.name(),
            %slot,
            run_id,
            rows,
            duration_ms = elapsed.as_millis() as u64,
            "job run succeeded"
        );
        Ok(Outcome::Ran { run_id, rows })
    }
}

/// Marks runs orphaned by a dead process, then claims `slot` (scheduled runs) or just
/// records the run (on-demand ones). `None`: a scheduled run of the slot already succeeded
/// or is under way. The caller holds the job's lock.
async fn claim(
    conn: &mut PgConnection,
    job: Job,
    slot: DateTime<Utc>,
    trigger: Trigger,
    runner: &str,
) -> sqlx::Result<Option<i64>> {
    let abandoned = sqlx::query!(
        "UPDATE job_runs
         SET outcome = 'ABANDONED', finished_at = now(),
             error = 'the process running it stopped before it finished'
         WHERE job = $1 AND outcome = 'RUNNING'",
        job.name(),
    )
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if abandoned > 0 {
        tracing::warn!(
            job = job.name(),
            runs = abandoned,
            "runs of a process that died marked abandoned"
        );
    }
    sqlx::query_scalar!(
        "INSERT INTO job_runs (job, period, trigger, runner) VALUES ($1, $2, $3, $4)
         ON CONFLICT (job, period) WHERE trigger = 'SCHEDULE' AND outcome IN ('RUNNING', 'SUCCEEDED')
         DO NOTHING
         RETURNING id",
        job.name(),
        slot,
        trigger.as_str(),
        runner,
    )
    .fetch_optional(conn)
    .await
}

async fn finish(conn: &mut PgConnection, run_id: i64, result: &anyhow::Result<u64>) -> sqlx::Result<()> {
    let (outcome, rows, error) = match result {
        Ok(rows) => ("SUCCEEDED", Some(i64::try_from(*rows).unwrap_or(i64::MAX)), None),
        Err(e) => ("FAILED", None, Some(format!("{e:#}"))),
    };
    sqlx::query!(
        "UPDATE job_runs SET outcome = $2, finished_at = now(), rows = $3, error = $4
         WHERE id = $1 AND outcome = 'RUNNING'",
        run_id,
        outcome,
        rows,
        error,
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// A job's session-level advisory lock, held by a pool connection taken for the run.
struct JobLock {
    job: Job,
    conn: PoolConnection<Postgres>,
    /// Set once unlocked; a lock dropped without it closes its session instead.
    released: bool,
}

impl JobLock {
    /// The lock, or `None` when another session holds it.
    async fn try_acquire(db: &PgPool, job: Job) -> sqlx::Result<Option<Self>> {
        let mut conn = db.acquire().await?;
        let locked = sqlx::query_scalar!(
            r#"SELECT pg_try_advisory_lock($1, $2) AS "locked!""#,
            LOCK_NAMESPACE,
            job.lock_key(),
        )
        .fetch_one(&mut *conn)
        .await?;
        Ok(locked.then_some(Self {
            job,
            conn,
            released: false,
        }))
    }

    /// The lock, waiting up to `patience` for the session holding it. Polls rather than
    /// blocking in `pg_advisory_lock`, so giving up never leaves a lock granted to a
    /// connection nobody watches.
    async fn acquire(db: &PgPool, job: Job, patience: Duration) -> anyhow::Result<Self> {
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            if let Some(lock) = Self::try_acquire(db, job).await? {
                return Ok(lock);
            }
            if tokio::time::Instant::now() >= deadline {
                anyhow::bail!("job {job} is still running elsewhere after {patience:?}");
            }
            tracing::info!(job = job.name(), "running elsewhere; waiting for it to finish");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    fn conn(&mut self) -> &mut PgConnection {
        &mut self.conn
    }

    async fn release(mut self) {
        let unlocked = sqlx::query_scalar!(
            "SELECT pg_advisory_unlock($1, $2)",
            LOCK_NAMESPACE,
            self.job.lock_key(),
        )
        .fetch_one(&mut *self.conn)
        .await;
        match unlocked {
            Ok(_) => self.released = true,
            Err(e) => tracing::warn!(
                job = self.job.name(),
                error = %e,
                "cannot release the job lock; closing its connection"
            ),
        }
    }
}

impl Drop for JobLock {
    fn drop(&mut self) {
        // Not unlocked (the unlock failed, or the run's future was cancelled): back in the
        // pool the connection would hold the lock forever, so its session ends instead,
        // which is what releases a session-level lock for sure.
        if !self.released {
            self.conn.close_on_drop();
        }
    }
}
