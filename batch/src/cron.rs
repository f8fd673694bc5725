//! Cron expressions and the slots they define, read in UTC.

use chrono::{DateTime, SubsecRound, Utc};
use tokio_cron_scheduler::job::job_data::JobStoredData;
use tokio_cron_scheduler::Job as CronJob;

/// A six-field cron expression (`sec min hour day month weekday`), read in UTC.
#[derive(Debug, Clone)]
pub struct CronSchedule {
    expression: String,
    /// The expression as tokio-cron-scheduler parsed it; it hands out the parsed schedule,
    /// which is what finds past occurrences.
    parsed: JobStoredData,
}

/// A cron expression tokio-cron-scheduler does not accept, or one that never fires.
#[derive(Debug, thiserror::Error)]
pub enum InvalidCron {
    #[error("not a six-field cron expression (sec min hour day month weekday): {0}")]
    Syntax(String),
    #[error("this cron expression never fires")]
    NeverFires,
}

impl CronSchedule {
    pub fn parse(expression: &str) -> Result<Self, InvalidCron> {
        let mut job =
            CronJob::new(expression, |_, _| {}).map_err(|e| InvalidCron::Syntax(format!("{e:?}")))?;
        let parsed = job
            .job_data()
            .map_err(|e| InvalidCron::Syntax(format!("{e:?}")))?;
        let schedule = Self {
            expression: expression.to_owned(),
            parsed,
        };
        // A pattern such as February 30th parses but has no occurrence either way.
        let now = Utc::now();
        let fires = schedule.latest_slot(now).is_some() || schedule.next_slot(now).is_some();
        fires.then_some(schedule).ok_or(InvalidCron::NeverFires)
    }

    pub fn expression(&self) -> &str {
        &self.expression
    }

    /// The latest occurrence at or before `at`: the slot a run at `at` is for.
    pub fn latest_slot(&self, at: DateTime<Utc>) -> Option<DateTime<Utc>> {
        // Cron resolution is the second; croner would keep `at`'s fraction when `at`'s
        // second matches, and every replica would then claim a slot of its own.
        self.parsed
            .schedule()?
            .find_previous_occurrence(&at.trunc_subsecs(0), true)
            .ok()
    }

    /// The first occurrence after `at`.
    pub fn next_slot(&self, at: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.parsed.schedule()?.find_next_occurrence(&at, false).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .map(|t| t.with_timezone(&Utc))
            .unwrap_or_default()
    }

    #[test]
    fn a_slot_is_the_latest_occurrence_at_or_before_the_instant() {
        let daily = CronSchedule::parse("0 5 0 * * *").ok();
        let slot = |s| daily.as_ref().and_then(|d| d.latest_slot(at(s)));
        assert_eq!(
            slot("2026-11-21T00:05:00.400Z"),
            Some(at("2026-11-21T00:05:00Z")),
            "a firing a little late is still for its own occurrence"
        );
        assert_eq!(slot("2026-11-21T00:05:00Z"), Some(at("2026-11-21T00:05:00Z")));
        assert_eq!(
            slot("2026-11-21T00:04:59Z"),
            Some(at("2026-11-20T00:05:00Z")),
            "before the day's occurrence the slot is yesterday's"
        );
        assert_eq!(slot("2026-11-21T23:00:00Z"), Some(at("2026-11-21T00:05:00Z")));
    }

    #[test]
    fn every_minute_has_its_own_slot() {
        let minutely = CronSchedule::parse("0 * * * * *").ok();
        let slot = |s| minutely.as_ref().and_then(|d| d.latest_slot(at(s)));
        assert_eq!(slot("2026-11-21T10:15:42Z"), Some(at("2026-11-21T10:15:00Z")));
        assert_eq!(slot("2026-11-21T10:16:00.1Z"), Some(at("2026-11-21T10:16:00Z")));
    }

    #[test]
    fn expressions_that_do_not_parse_are_refused() {
        for bad in ["", "every day", "0 5 0 * *", "61 * * * * *"] {
            assert!(CronSchedule::parse(bad).is_err(), "{bad:?}");
        }
    }
}
