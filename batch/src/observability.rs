//! The metrics of job runs (served on the batch's own port by
//! [`shared::telemetry::serve_metrics`]):
//! - `batch_job_runs_total{job, outcome}`: runs this process did, `succeeded` or `failed`;
//! - `batch_job_duration_seconds{job}`: how long they took, whatever the outcome;
//! - `batch_job_last_success_timestamp_seconds{job}`: Unix time of the last success here,
//!   so an alert can fire when a job has not succeeded for longer than its schedule;
//! - `consistency_violations{check}`: what the last consistency audit run here found, per
//!   check (0 when clean), and `consistency_audit_last_run_timestamp_seconds`: when that
//!   run finished. With several batch replicas each slot runs on one of them, so the
//!   current figures are those of the replica with the latest run (the alert picks it).

use std::time::Duration;

use shared::store::audit::{Audit, Check};

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

/// Exports what an audit found and logs each violation.
pub fn record_audit(audit: &Audit) {
    for check in Check::ALL {
        metrics::gauge!("consistency_violations", "check" => check.name()).set(audit.found(check) as f64);
    }
    for violation in &audit.violations {
        tracing::warn!(check = violation.check.name(), detail = %violation.detail, "consistency violation");
    }
    if audit.is_clean() {
        tracing::info!("consistency audit: no violation");
    }
    let now = chrono::Utc::now().timestamp_millis() as f64 / 1000.0;
    metrics::gauge!("consistency_audit_last_run_timestamp_seconds").set(now);
}
