//! When jobs run: tokio-cron-scheduler firing them at their cron expressions ([`crate::cron`]),
//! and the catch-up loop that runs any slot that has no successful run.
//!
//! A job's *slot* (its period) is the latest occurrence of its cron expression at or before
//! a given instant. The cron fires at each occurrence; every replica that fires computes the
//! same slot, and `job_runs` lets only one of them run it. The catch-up loop (at start, then
//! every `BATCH_CATCH_UP_SECS`) asks the same question for every job, so a slot missed
//! while the batch was down, or one whose run failed, is run as soon as possible; slots
//! older than the latest are not replayed one by one, since each job's latest run covers
//! what they would have done (the rollup rebuilds its last 30 days).

use std::sync::Arc;

use tokio_cron_scheduler::{Job as CronJob, JobScheduler};
use tokio_util::sync::CancellationToken;

use crate::jobs::Job;
use crate::runs::Runner;

/// Registers every job with a new scheduler and starts it. Each firing runs the job's
/// current slot through `runner` (which skips it when another replica has it).
pub async fn start(runner: Arc<Runner>) -> anyhow::Result<JobScheduler> {
    let scheduler = JobScheduler::new().await?;
    for job in Job::ALL {
        let expression = job.schedule(&runner.config().schedules).expression().to_owned();
        let runner = Arc::clone(&runner);
        let fired = CronJob::new_async(expression.as_str(), move |_, _| {
            let runner = Arc::clone(&runner);
            Box::pin(async move {
                runner.run_due(job).await;
            })
        })?;
        scheduler.add(fired).await?;
        tracing::info!(job = job.name(), cron = %expression, "job scheduled");
    }
    scheduler.start().await?;
    Ok(scheduler)
}

/// Runs every job's latest slot unless it already ran, the jobs side by side.
pub async fn catch_up(runner: &Runner) {
    let [a, b, c, d] = Job::ALL;
    tokio::join!(
        runner.run_due(a),
        runner.run_due(b),
        runner.run_due(c),
        runner.run_due(d)
    );
}

/// Catches up every `BATCH_CATCH_UP_SECS` until `shutdown` fires.
pub async fn catch_up_periodically(runner: Arc<Runner>, shutdown: CancellationToken) {
    let period = runner.config().catch_up_interval;
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticks.tick() => catch_up(&runner).await,
        }
    }
}
