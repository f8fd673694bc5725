//! The batch's configuration, from environment variables.

use std::net::SocketAddr;
use std::time::Duration;

use shared::config::{var, ConfigError, DatabaseSettings, TelemetrySettings};
use shared::store::audit::AuditBounds;

use crate::cron::CronSchedule;

/// The contract keeps idempotency keys at least this long, so no setting may go below it.
pub const MIN_IDEMPOTENCY_KEY_RETENTION_HOURS: u64 = 24;

#[derive(Debug, Clone)]
pub struct BatchConfig {
    /// `BATCH_NAME`: how this replica appears in logs and in `job_runs.runner`.
    pub name: String,
    /// `BATCH_METRICS_ADDR`: where `/metrics` and `/health/live` are served (0 picks a free
    /// port).
    pub metrics_addr: SocketAddr,
    /// When each job runs.
    pub schedules: Schedules,
    /// `BATCH_CATCH_UP_SECS`: how often every job's latest slot is checked and run when no
    /// run of it succeeded (a slot missed while the batch was down, or a run that failed).
    pub catch_up_interval: Duration,
    /// `IDEMPOTENCY_KEY_RETENTION_HOURS`: idempotency keys older than this are pruned.
    pub idempotency_key_retention: Duration,
    /// `REQUEST_RETENTION_DAYS`: settled requests older than this are pruned.
    pub request_retention: Duration,
    /// `AUDIT_REQUEST_PENDING_SECS`, `AUDIT_RESERVATION_OVERDUE_SECS`: when the consistency
    /// audit calls a request or a reservation stuck.
    pub audit_bounds: AuditBounds,
    pub database: DatabaseSettings,
    pub telemetry: TelemetrySettings,
}

/// Cron expressions in tokio-cron-scheduler's six fields (`sec min hour day month weekday`),
/// in UTC.
#[derive(Debug, Clone)]
pub struct Schedules {
    /// `BATCH_POPULAR_PRODUCTS_CRON`: the sales rollup and the popular-products snapshot.
    /// Shortly after midnight, so that payments committing around midnight are in.
    pub popular_products: CronSchedule,
    /// `BATCH_RESERVATION_EXPIRY_CRON`: expiry of overdue reservations.
    pub reservation_expiry: CronSchedule,
    /// `BATCH_HOUSEKEEPING_CRON`: pruning of old idempotency keys, requests and job runs.
    pub housekeeping: CronSchedule,
    /// `BATCH_CONSISTENCY_AUDIT_CRON`: the consistency audit. Hourly, away from the
    /// housekeeping's minute: it reads every balance, order and ledger entry.
    pub consistency_audit: CronSchedule,
}

impl Schedules {
    pub const DEFAULT_POPULAR_PRODUCTS: &'static str = "0 5 0 * * *";
    pub const DEFAULT_RESERVATION_EXPIRY: &'static str = "0 * * * * *";
    pub const DEFAULT_HOUSEKEEPING: &'static str = "0 10 * * * *";
    pub const DEFAULT_CONSISTENCY_AUDIT: &'static str = "0 40 * * * *";

    pub fn from_env() -> Result<Self, ConfigError> {
        Ok(Self {
            popular_products: cron_var("BATCH_POPULAR_PRODUCTS_CRON", Self::DEFAULT_POPULAR_PRODUCTS)?,
            reservation_expiry: cron_var("BATCH_RESERVATION_EXPIRY_CRON", Self::DEFAULT_RESERVATION_EXPIRY)?,
            housekeeping: cron_var("BATCH_HOUSEKEEPING_CRON", Self::DEFAULT_HOUSEKEEPING)?,
            consistency_audit: cron_var("BATCH_CONSISTENCY_AUDIT_CRON", Self::DEFAULT_CONSISTENCY_AUDIT)?,
        })
    }
}

fn cron_var(name: &str, default: &str) -> Result<CronSchedule, ConfigError> {
    let expression = var(name, default.to_owned())?;
    CronSchedule::parse(&expression).map_err(|e| ConfigError {
        name: name.to_owned(),
        value: expression.clone(),
        reason: e.to_string(),
    })
}

/// Reads `name` as a whole number of at least `min`.
fn at_least(name: &str, default: u64, min: u64) -> Result<u64, ConfigError> {
    let value = var(name, default)?;
    if value < min {
        return Err(ConfigError {
            name: name.to_owned(),
            value: value.to_string(),
            reason: format!("must be at least {min}"),
        });
    }
    Ok(value)
}

impl BatchConfig {
    pub fn from_env() -> Result<Self, ConfigError> {
        let hours = at_least(
            "IDEMPOTENCY_KEY_RETENTION_HOURS",
            MIN_IDEMPOTENCY_KEY_RETENTION_HOURS,
            MIN_IDEMPOTENCY_KEY_RETENTION_HOURS,
        )?;
        let days = at_least("REQUEST_RETENTION_DAYS", 7, 1)?;
        Ok(Self {
            name: var("BATCH_NAME", format!("batch-{}", std::process::id()))?,
            metrics_addr: var("BATCH_METRICS_ADDR", SocketAddr::from(([127, 0, 0, 1], 9200)))?,
            schedules: Schedules::from_env()?,
            catch_up_interval: Duration::from_secs(at_least("BATCH_CATCH_UP_SECS", 60, 1)?),
            idempotency_key_retention: Duration::from_secs(hours * 3600),
            request_retention: Duration::from_secs(days * 86_400),
            audit_bounds: AuditBounds::from_env()?,
            database: DatabaseSettings::from_env()?,
            telemetry: TelemetrySettings::from_env()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Each test uses its own variable names: the environment is shared by the test threads.
    #[test]
    fn retention_settings_below_their_floor_are_refused() {
        std::env::set_var("BATCH_TEST_RETENTION_LOW", "23");
        let low = at_least(
            "BATCH_TEST_RETENTION_LOW",
            24,
            MIN_IDEMPOTENCY_KEY_RETENTION_HOURS,
        );
        std::env::remove_var("BATCH_TEST_RETENTION_LOW");
        assert!(low.is_err());
        assert_eq!(at_least("BATCH_TEST_RETENTION_UNSET", 24, 24).ok(), Some(24));
    }

    #[test]
    fn a_cron_that_does_not_parse_names_its_variable() {
        std::env::set_var("BATCH_TEST_CRON_BAD", "every day at noon");
        let bad = cron_var("BATCH_TEST_CRON_BAD", "0 5 0 * * *");
        std::env::remove_var("BATCH_TEST_CRON_BAD");
        let message = bad.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(message.contains("BATCH_TEST_CRON_BAD"), "{message}");
    }

    #[test]
    fn the_default_schedules_parse() {
        for default in [
            Schedules::DEFAULT_POPULAR_PRODUCTS,
            Schedules::DEFAULT_RESERVATION_EXPIRY,
            Schedules::DEFAULT_HOUSEKEEPING,
            Schedules::DEFAULT_CONSISTENCY_AUDIT,
        ] {
            assert!(CronSchedule::parse(default).is_ok(), "{default}");
        }
    }
}
