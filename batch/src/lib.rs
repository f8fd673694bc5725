//! The batch: scheduled jobs over the order data. Run as many replicas as you like; each
//! job still runs once per slot.
//!
//! - `popular-products`: the daily sales rollup of paid orders and the popular-products
//!   snapshot that `GET /products/popular` serves (daily, shortly after midnight UTC).
//! - `reservation-expiry`: overdue reservations expire and their stock returns (every
//!   minute).
//! - `housekeeping`: old idempotency keys, settled requests and job runs are pruned
//!   (hourly).
//! - `consistency-audit`: the stored data is checked against its invariants
//!   ([`shared::store::audit`]); violations are logged and exported (hourly).
//!
//! The batch needs PostgreSQL only; it does not connect to RabbitMQ.
//!
//! # Layout
//! - [`config`]: the batch's settings, schedules included.
//! - [`jobs`]: the jobs and what each does for a slot; [`housekeeping`]: the pruning;
//!   [`consistency_audit`]: the audit's report, logs and gauges.
//! - [`cron`]: cron expressions and the slots they define.
//! - [`schedule`]: the scheduler, and the catch-up of slots that did not run.
//! - [`runs`]: once everywhere: advisory locks, `job_runs` claims and records.
//! - [`observability`]: the metrics of job runs (served with [`shared::telemetry::serve_metrics`]).
//! - [`Batch`]: start-up, and the graceful stop that waits for runs in progress;
//!   [`run_job_now`]: `batch run <job>`.

pub mod config;
pub mod consistency_audit;
pub mod cron;
pub mod housekeeping;
pub mod jobs;
pub mod observability;
pub mod runs;
pub mod schedule;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_cron_scheduler::JobScheduler;
use tokio_util::sync::CancellationToken;

pub use config::BatchConfig;
pub use jobs::Job;
pub use runs::{Outcome, Runner};

/// What the command line asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// `batch`: run the schedule until SIGTERM or Ctrl-C.
    Serve,
    /// `batch run <job>`: run one job now and exit, non-zero on failure.
    Run(Job),
}

/// Command-line arguments that are not a command.
#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    #[error(transparent)]
    UnknownJob(#[from] jobs::UnknownJob),
    #[error("usage: batch [run popular-products|reservation-expiry|housekeeping|consistency-audit]")]
    Usage,
}

impl Command {
    /// Reads the arguments after the program name.
    pub fn parse(args: &[String]) -> Result<Self, UsageError> {
        match args {
            [] => Ok(Command::Serve),
            [run, job] if run == "run" => Ok(Command::Run(job.parse()?)),
            _ => Err(UsageError::Usage),
        }
    }
}

/// A started batch: the scheduler, the catch-up loop and the metrics port.
pub struct Batch {
    runner: Arc<Runner>,
    scheduler: JobScheduler,
    metrics_addr: SocketAddr,
    /// Stops the catch-up loop and the metrics server.
    background: CancellationToken,
    catch_up: JoinHandle<()>,
    metrics: JoinHandle<()>,
}

impl Batch {
    /// Connects to PostgreSQL (migrating it), serves metrics, starts the schedule and runs
    /// every job's latest slot that has not run yet (a batch that was down at midnight
    /// computes the day's ranking now). Returns once that catch-up is done.
    pub async fn start(config: BatchConfig) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(config.metrics_addr)
            .await
            .with_context(|| format!("cannot listen on {}", config.metrics_addr))?;
        let metrics_addr = listener.local_addr()?;
        let db = shared::store::db::connect_and_migrate(&config.database, "batch").await?;
        let recorder = shared::telemetry::metrics_recorder()?;
        let name = config.name.clone();
        let runner = Arc::new(Runner::new(db, config));
        let background = CancellationToken::new();
        let metrics = tokio::spawn(shared::telemetry::serve_metrics(
            listener,
            recorder,
            background.clone(),
        ));
        let scheduler = match schedule::start(Arc::clone(&runner)).await {
            Ok(scheduler) => scheduler,
            Err(e) => {
                background.cancel();
                return Err(e.context("cannot start the scheduler"));
            }
        };
        schedule::catch_up(&runner).await;
        let catch_up = tokio::spawn(schedule::catch_up_periodically(
            Arc::clone(&runner),
            background.clone(),
        ));
        tracing::info!(%name, %metrics_addr, "batch ready");
        Ok(Self {
            runner,
            scheduler,
            metrics_addr,
            background,
            catch_up,
            metrics,
        })
    }

    /// Where `/metrics` is served (the bound port when the configured one was 0).
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    pub fn runner(&self) -> &Runner {
        &self.runner
    }

    /// Stops firing jobs, waits for the runs in progress, and closes the pool.
    pub async fn stop(mut self) {
        self.background.cancel();
        if let Err(e) = self.scheduler.shutdown().await {
            tracing::warn!(error = ?e, "the scheduler did not shut down cleanly");
        }
        self.runner.drain().await;
        let _ = tokio::join!(self.catch_up, self.metrics);
        self.runner.db().close().await;
        tracing::info!("batch stopped");
    }
}

/// Starts the batch and runs it until `shutdown` fires.
pub async fn run(config: BatchConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let batch = Batch::start(config).await?;
    shutdown.cancelled().await;
    batch.stop().await;
    Ok(())
}

/// Runs `job` once now (`batch run <job>`), after any run of it in progress elsewhere;
/// returns the rows it wrote or deleted.
pub async fn run_job_now(config: BatchConfig, job: Job) -> anyhow::Result<u64> {
    let db = shared::store::db::connect_and_migrate(&config.database, "batch").await?;
    let runner = Runner::new(db.clone(), config);
    let rows = runner.run_on_demand(job).await;
    db.close().await;
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn the_command_line_serves_or_runs_one_job() {
        assert_eq!(Command::parse(&args(&[])).ok(), Some(Command::Serve));
        assert_eq!(
            Command::parse(&args(&["run", "popular-products"])).ok(),
            Some(Command::Run(Job::PopularProducts))
        );
        assert_eq!(
            Command::parse(&args(&["run", "housekeeping"])).ok(),
            Some(Command::Run(Job::Housekeeping))
        );
        assert!(Command::parse(&args(&["run", "nothing"])).is_err());
        assert!(Command::parse(&args(&["run"])).is_err());
        assert!(Command::parse(&args(&["serve", "now", "please"])).is_err());
    }
}
