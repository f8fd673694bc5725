//! The metrics of job runs (served on the batch's own port by
//! [`shared::telemetry::serve_metrics`]):
//! - `batch_job_runs_total{job, outcome}`: runs this process did, `succeeded` or `failed`;
//! - `batch_job_duration_seconds{job}`: how long they took, whatever the outcome;
//! - `batch_job_last_success_timestamp_seconds{job}`: Unix time of the last success here,
//!   so an alert can fire when a job has not succeeded for longer than its schedule.
//!
//! The consistency audit's own gauges are set by [`crate::consistency_audit`].

use std::time::Duration;

use crate::jobs::Job;

/// Records one run of `job` that took `elapsed`.
pub fn record_run(job: Job, elapsed: Duration, succeeded: bool) {
    let outcome = if succeeded { "succeeded" } else { "failed" };
    metrics::counter!("batch_job_runs_total", "job" => job.name(), "outcome" => outcome).increment(1);
    metrics::histogram!("batch_job_duration_seconds", "job" => job.name()).record(elapsed.as_secs_f64());
    if succeeded {
        let now = chrono::Utc::now().timestamp_millis() as f64 / 1000.0;
        metrics::gauge!("batch_job_last_success_timestamp_seconds", "job" => job.name()).set(now);
    }
}
