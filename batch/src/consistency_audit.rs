//! The `consistency-audit` job: runs [`shared::store::audit`], logs each violation and
//! exports what it found on the batch's metrics:
//! - `consistency_violations{check}`: rows the last audit run here found breaking each
//!   check (every check has its series, 0 when clean);
//! - `consistency_audit_last_run_timestamp_seconds`: when that run finished. With several
//!   batch replicas each slot runs on one of them, so the current figures are those of the
//!   replica with the latest run (the `ConsistencyViolation` alert picks it).

use shared::store::audit::{self, Audit, AuditBounds, Check};
use sqlx::PgPool;

/// Runs the audit and reports it; the rows written, none (the audit only reads).
pub async fn run(db: &PgPool, bounds: &AuditBounds) -> anyhow::Result<u64> {
    let audit = audit::run(db, bounds).await?;
    report(&audit);
    Ok(0)
}

fn report(audit: &Audit) {
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
