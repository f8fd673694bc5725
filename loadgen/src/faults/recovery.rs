//! When the system is whole again after a fault.
//!
//! Recovered means, all at once: every api replica answers ready (it reaches PostgreSQL and RabbitMQ),
//! every partition of both command families is leased to a replica that is running now,
//! every running replica holds at least one (the load is spread again), and the backlog is
//! gone: every request accepted before the repair has reached a terminal status. Measured
//! from the repair: the moment the stopped part was started again.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio::time::Instant;

use crate::client::Api;

/// How often the state is read while waiting.
const EVERY: Duration = Duration::from_millis(100);

/// What was seen last while waiting: tells why a recovery took long, or never came.
#[derive(Debug, Default, Clone)]
pub struct State {
    pub ready: bool,
    pub leased: i64,
    pub holders: i64,
    pub caught_up: bool,
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ready {}, {} partitions leased to running replicas, {} of them holding some, backlog from before the repair settled {}",
            self.ready, self.leased, self.holders, self.caught_up
        )
    }
}

pub struct Watch {
    pub api: Api,
    pub db: PgPool,
    /// Partitions of each family (`COMMAND_PARTITIONS`).
    pub partitions: i64,
}

impl Watch {
    /// Waits until the system is whole with `workers` running; how long after `repaired`,
    /// or the last state seen when `bound` ran out.
    pub async fn recovered(
        &self,
        repaired: (Instant, DateTime<Utc>),
        workers: &[String],
        bound: Duration,
    ) -> Result<Duration, State> {
        let deadline = Instant::now() + bound;
        let mut state = State::default();
        loop {
            // Not before `repaired`'s time: a silence is timed with the requests of its first
            // seconds, and no request not yet accepted can be pending.
            let past = Utc::now() >= repaired.1;
            if past && self.read(repaired.1, workers, &mut state).await == Some(true) {
                return Ok(repaired.0.elapsed());
            }
            if Instant::now() >= deadline {
                return Err(state);
            }
            tokio::time::sleep(EVERY).await;
        }
    }

    /// Reads the state into `state`; whether it is whole, or `None` if it could not be read.
    async fn read(&self, since: DateTime<Utc>, workers: &[String], state: &mut State) -> Option<bool> {
        state.ready = self.api.ready_everywhere().await;
        let (leased, holders, caught_up): (i64, i64, bool) = sqlx::query_as(
            "WITH live AS (
                SELECT l.family, l.partition, r.name FROM partition_leases l
                JOIN worker_replicas r ON r.id = l.owner
                WHERE l.expires_at > now() AND r.name = ANY($1))
             SELECT (SELECT count(*) FROM live),
                    (SELECT count(DISTINCT name) FROM live),
                    NOT EXISTS (SELECT 1 FROM requests WHERE status = 'PENDING' AND created_at <= $2)",
        )
        .bind(workers)
        .bind(since)
        .fetch_one(&self.db)
        .await
        .ok()?;
        state.leased = leased;
        state.holders = holders;
        state.caught_up = caught_up;
        let everyone_holds = holders
            == i64::try_from(workers.len())
                .unwrap_or(i64::MAX)
                .min(2 * self.partitions);
        Some(state.ready && leased == 2 * self.partitions && everyone_holds && caught_up)
    }
}
