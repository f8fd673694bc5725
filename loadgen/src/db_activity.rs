//! What PostgreSQL does during a run: what this database's backends are doing, sampled
//! from `pg_stat_activity` every few milliseconds (running on a CPU, waiting for a row lock,
//! for the WAL to reach the disk, or for the client's next statement), and how many
//! transactions, rows and WAL the run cost (`pg_stat_database`, `pg_stat_wal`).
//!
//! Shares of the samples say where transactions spend their time inside PostgreSQL;
//! commits and WAL per request say how much work each request is. Backends report their
//! counters at most once a second, so the last second of a run may be missing from them;
//! WAL position and `pg_stat_wal` cover the whole server (other databases included).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A share of the active-backend samples.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Wait {
    /// `CPU` when running, else `type:event` (`Lock:transactionid`, `IO:WALSync`, …).
    pub wait: String,
    /// Average backends in this state at a sample.
    pub average_backends: f64,
    pub share_percent: f64,
}

/// A running sampler; [`Sampler::finish`] stops it and returns the shares.
pub struct Sampler {
    stop: oneshot::Sender<()>,
    task: JoinHandle<(BTreeMap<String, u64>, u64)>,
}

impl Sampler {
    pub fn start(db: PgPool, every: Duration) -> Self {
        let (stop, mut stopped) = oneshot::channel();
        let task = tokio::spawn(async move {
            let mut counts: BTreeMap<String, u64> = BTreeMap::new();
            let mut samples = 0_u64;
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    _ = tick.tick() => {}
                }
                // Backends in a transaction or running a statement, this one excepted.
                let rows: Result<Vec<(String, i64)>, _> = sqlx::query_as(
                    "SELECT CASE WHEN wait_event IS NULL THEN 'CPU'
                                 ELSE wait_event_type || ':' || wait_event END, count(*)
                     FROM pg_stat_activity
                     WHERE datname = current_database() AND pid <> pg_backend_pid()
                       AND backend_type = 'client backend' AND state <> 'idle'
                     GROUP BY 1",
                )
                .fetch_all(&db)
                .await;
                if let Ok(rows) = rows {
                    samples += 1;
                    for (wait, n) in rows {
                        *counts.entry(wait).or_default() += u64::try_from(n).unwrap_or(0);
                    }
                }
            }
            (counts, samples)
        });
        Self { stop, task }
    }

    pub async fn finish(self) -> Vec<Wait> {
        let _ = self.stop.send(());
        let Ok((counts, samples)) = self.task.await else {
            return Vec::new();
        };
        let total: u64 = counts.values().sum();
        let mut waits: Vec<Wait> = counts
            .into_iter()
            .map(|(wait, n)| Wait {
                wait,
                average_backends: n as f64 / samples.max(1) as f64,
                share_percent: 100.0 * n as f64 / total.max(1) as f64,
            })
            .collect();
        waits.sort_by(|a, b| b.share_percent.total_cmp(&a.share_percent));
        waits
    }
}

/// Cumulative counters at one moment.
#[derive(Debug, Clone, Copy, Default, sqlx::FromRow)]
pub struct Counters {
    commits: i64,
    rollbacks: i64,
    inserted: i64,
    updated: i64,
    deleted: i64,
    wal_bytes: f64,
    wal_syncs: i64,
}

pub async fn counters(db: &PgPool) -> Counters {
    sqlx::query_as(
        "SELECT xact_commit AS commits, xact_rollback AS rollbacks, tup_inserted AS inserted,
                tup_updated AS updated, tup_deleted AS deleted,
                pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::float8 AS wal_bytes,
                (SELECT wal_sync FROM pg_stat_wal) AS wal_syncs
         FROM pg_stat_database WHERE datname = current_database()",
    )
    .fetch_one(db)
    .await
    .unwrap_or_default()
}

/// What PostgreSQL did over a window (differences of its cumulative counters), or the same
/// divided by the units of work done in it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DbCost {
    /// Transactions committed in this database.
    pub commits: f64,
    /// Transactions rolled back in this database.
    pub rollbacks: f64,
    /// Rows inserted in this database.
    pub rows_inserted: f64,
    /// Rows updated in this database.
    pub rows_updated: f64,
    /// Rows deleted in this database.
    pub rows_deleted: f64,
    /// Bytes of WAL written by the whole server (other databases included).
    pub wal_bytes: f64,
    /// WAL syncs to disk by the whole server.
    pub wal_syncs: f64,
}

impl DbCost {
    fn per(&self, n: f64) -> DbCost {
        DbCost {
            commits: self.commits / n,
            rollbacks: self.rollbacks / n,
            rows_inserted: self.rows_inserted / n,
            rows_updated: self.rows_updated / n,
            rows_deleted: self.rows_deleted / n,
            wal_bytes: self.wal_bytes / n,
            wal_syncs: self.wal_syncs / n,
        }
    }
}

/// What PostgreSQL did over a run: in all, and per unit of work (request, paid order, …).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DbActivity {
    pub total: DbCost,
    /// `None` when no unit of work was done.
    pub per_unit: Option<DbCost>,
}

/// What happened between two snapshots, in all and per each of `n` units of work.
pub fn delta(before: &Counters, after: &Counters, n: f64) -> DbActivity {
    let total = DbCost {
        commits: (after.commits - before.commits) as f64,
        rollbacks: (after.rollbacks - before.rollbacks) as f64,
        rows_inserted: (after.inserted - before.inserted) as f64,
        rows_updated: (after.updated - before.updated) as f64,
        rows_deleted: (after.deleted - before.deleted) as f64,
        wal_bytes: after.wal_bytes - before.wal_bytes,
        wal_syncs: (after.wal_syncs - before.wal_syncs) as f64,
    };
    DbActivity {
        total,
        per_unit: (n > 0.0).then(|| total.per(n)),
    }
}
