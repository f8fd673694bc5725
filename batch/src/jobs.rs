//! The jobs the batch runs and what each one does for a slot. Each is idempotent for its
//! slot: running it twice leaves the data as running it once would.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use crate::config::{BatchConfig, Schedules};
use crate::cron::CronSchedule;
use crate::{consistency_audit, housekeeping};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Job {
    /// The daily sales rollup and the popular-products snapshot.
    PopularProducts,
    /// Overdue reservations expire and their stock goes back on sale.
    ReservationExpiry,
    /// Old idempotency keys, settled requests and job runs are pruned.
    Housekeeping,
    /// The stored data is checked against its invariants; what does not add up is logged
    /// and exported as `consistency_violations{check}`. Writes nothing.
    ConsistencyAudit,
}

impl Job {
    pub const ALL: [Job; 4] = [
        Job::PopularProducts,
        Job::ReservationExpiry,
        Job::Housekeeping,
        Job::ConsistencyAudit,
    ];

    /// The name in `job_runs`, logs, metrics and `batch run <job>`.
    pub fn name(self) -> &'static str {
        match self {
            Job::PopularProducts => shared::domain::popular::JOB,
            Job::ReservationExpiry => "reservation-expiry",
            Job::Housekeeping => "housekeeping",
            Job::ConsistencyAudit => "consistency-audit",
        }
    }

    /// The key of the job's advisory lock (in the batch's namespace).
    pub(crate) fn lock_key(self) -> i32 {
        match self {
            Job::PopularProducts => 1,
            Job::ReservationExpiry => 2,
            Job::Housekeeping => 3,
            Job::ConsistencyAudit => 4,
        }
    }

    /// When the job runs.
    pub fn schedule(self, schedules: &Schedules) -> &CronSchedule {
        match self {
            Job::PopularProducts => &schedules.popular_products,
            Job::ReservationExpiry => &schedules.reservation_expiry,
            Job::Housekeeping => &schedules.housekeeping,
            Job::ConsistencyAudit => &schedules.consistency_audit,
        }
    }

    /// Does the job's work for `slot`; returns the rows it wrote or deleted.
    pub async fn execute(
        self,
        db: &PgPool,
        config: &BatchConfig,
        slot: DateTime<Utc>,
    ) -> anyhow::Result<u64> {
        match self {
            Job::PopularProducts => {
                // The ranking of a slot is as of the slot's UTC day: the whole days before it.
                let refreshed = shared::store::popular::refresh(db, slot.date_naive()).await?;
                let top: Vec<(i64, i64)> = refreshed
                    .ranking
                    .items
                    .iter()
                    .map(|p| (p.product_id, p.sold_quantity))
                    .collect();
                tracing::info!(
                    as_of = %slot.date_naive(),
                    from = %refreshed.ranking.window.from,
                    to = %refreshed.ranking.window.to,
                    rollup_rows = refreshed.rollup_rows,
                    ?top,
                    "popular products computed"
                );
                Ok(refreshed.rollup_rows)
            }
            Job::ReservationExpiry => Ok(shared::store::reservations::expire_overdue(db).await?),
            Job::Housekeeping => housekeeping::prune(db, config).await,
            Job::ConsistencyAudit => consistency_audit::run(db, &config.audit_bounds).await,
        }
    }
}

impl fmt::Display for Job {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A name that is not one of the jobs.
#[derive(Debug, thiserror::Error)]
#[error(
    "unknown job {0:?}; the jobs are popular-products, reservation-expiry, housekeeping, consistency-audit"
)]
pub struct UnknownJob(pub String);

impl FromStr for Job {
    type Err = UnknownJob;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Job::ALL
            .into_iter()
            .find(|job| job.name() == s)
            .ok_or_else(|| UnknownJob(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_are_named_as_the_command_line_names_them() {
        for job in Job::ALL {
            assert_eq!(job.name().parse::<Job>().ok(), Some(job));
        }
        assert!("popular".parse::<Job>().is_err());
    }

    #[test]
    fn every_job_has_its_own_lock() {
        let mut keys: Vec<i32> = Job::ALL.iter().map(|j| j.lock_key()).collect();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len(), Job::ALL.len());
    }
}
