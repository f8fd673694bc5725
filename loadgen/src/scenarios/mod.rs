//! The scenarios, and what they share: connecting, measuring a window (metrics, CPU, what
//! PostgreSQL waits on), counting answers, waiting for settlement, and writing the result.
//!
//! - [`flash_sale`]: many users race for one coupon's limited quantity.
//! - [`checkout`]: users charge, order and pay, some with a coupon.
//! - [`browse`]: the synchronous reads: products, popular products, balances.

pub mod browse;
pub mod checkout;
pub mod flash_sale;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use tokio::time::Instant;

pub use crate::checks::Settler;
use crate::cli::Common;
use crate::client::Api;
use crate::db_activity::{self, DbActivity, Wait};
use crate::figures::DispatchLag;
use crate::histogram::LatencySummary;
use crate::prometheus::{self, Scrape, Stage};
use crate::report;
use crate::resources::{self, CpuTracker, CpuUse};
use crate::results::{self, ScenarioResult};
use crate::schedule::{Pace, Timing};

/// How long to wait for the api to be ready and the workers to own every partition.
const STARTUP_PATIENCE: Duration = Duration::from_secs(90);

/// What every scenario holds while it runs.
pub struct Harness {
    pub api: Api,
    /// Where the three commands go: the api, or the synchronous peer (`--commands-url`).
    pub commands: Api,
    pub settler: Settler,
    pub db: PgPool,
    pub common: Common,
    metrics: reqwest::Client,
    processes: Vec<(String, u32)>,
    notes: Vec<String>,
}

/// A window being measured.
pub struct Window {
    started: Instant,
    before: Scrape,
    cpu: CpuTracker,
    waits: db_activity::Sampler,
    counters: db_activity::Counters,
}

/// What was measured over a window.
pub struct Measured {
    pub seconds: f64,
    pub stages: Vec<Stage>,
    pub cpu: Vec<CpuUse>,
    pub db_waits: Vec<Wait>,
    counters: (db_activity::Counters, db_activity::Counters),
}

impl Measured {
    /// Commits, rows and WAL of the window, also per each of `n` units of work.
    pub fn db_activity(&self, n: f64) -> DbActivity {
        db_activity::delta(&self.counters.0, &self.counters.1, n)
    }
}

impl Harness {
    /// Connects to PostgreSQL and the api, and waits until the api is ready and, when worker
    /// metrics are given, the workers own every partition between them.
    pub async fn connect(common: &Common) -> anyhow::Result<Self> {
        let db = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(30))
            .connect(&common.database_url)
            .await
            .with_context(|| format!("cannot connect to {}", common.database_url))?;
        let api = Api::new(
            &common.api,
            &common.admin_token,
            common.concurrency,
            common.request_timeout(),
        )?;
        api.wait_until_ready(STARTUP_PATIENCE).await?;
        let mut api = api.patient(Duration::from_secs(common.patience_secs));
        if let Some(log) = &common.unavailable {
            api = api.noting_unavailability(Arc::clone(log));
        }
        let (commands, settler) = match &common.commands_url {
            Some(url) => {
                let peer = api.at(url);
                peer.wait_until_ready(STARTUP_PATIENCE).await?;
                (peer, Settler::Peer)
            }
            None => (api.clone(), Settler::Pipeline),
        };
        let mut harness = Self {
            api,
            commands,
            settler,
            db,
            common: common.clone(),
            metrics: prometheus::http_client()?,
            processes: resources::parse_processes(&common.processes)?,
            notes: Vec::new(),
        };
        harness.wait_for_partitions().await;
        Ok(harness)
    }

    /// Rebalancing takes a few heartbeats after the workers start: measuring before every
    /// partition has its consumer would measure the start-up.
    async fn wait_for_partitions(&mut self) {
        if self.common.worker_metrics.is_empty() {
            return;
        }
        let partitions: f64 = std::env::var("COMMAND_PARTITIONS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(16.0);
        let wanted = 2.0 * partitions;
        let deadline = Instant::now() + STARTUP_PATIENCE;
        let mut stable = 0;
        while Instant::now() < deadline {
            let scrape = prometheus::scrape(
                &self.metrics,
                self.common.api_metrics.as_deref(),
                &self.common.worker_metrics,
            )
            .await;
            let owned: Vec<f64> = scrape
                .workers
                .iter()
                .map(|w| {
                    w.iter()
                        .filter(|s| s.name == "worker_partitions_owned")
                        .map(|s| s.value)
                        .sum()
                })
                .collect();
            let everyone_has_some = owned.iter().all(|o| *o > 0.0) || owned.len() as f64 > wanted;
            if owned.iter().sum::<f64>() == wanted && everyone_has_some {
                stable += 1;
                if stable >= 3 {
                    return;
                }
            } else {
                stable = 0;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        self.notes
            .push("the workers did not settle on owning every partition before the run".to_owned());
    }

    /// Refreshes the planner statistics of every table (after a warm-up has put rows in
    /// them); the api's and the workers' cached plans are re-planned on next use.
    pub async fn analyze(&self) -> anyhow::Result<()> {
        sqlx::query("ANALYZE")
            .execute(&self.db)
            .await
            .context("ANALYZE failed")?;
        Ok(())
    }

    /// A closed-loop pace for warm-ups: gentle enough not to matter, busy enough to plan.
    pub fn warmup_pace(&self) -> Pace {
        Pace::Closed {
            concurrency: self.common.concurrency.clamp(1, 50),
        }
    }

    pub async fn begin(&self) -> Window {
        // What the setup and the warm-up made the other processes' backends do must be
        // reported before the window starts, or it is counted in it (see `end`).
        self.settle_statistics().await;
        self.flush_statistics().await;
        let before = prometheus::scrape(
            &self.metrics,
            self.common.api_metrics.as_deref(),
            &self.common.worker_metrics,
        )
        .await;
        if let Some(started) = &self.common.load_started {
            started.notify_one();
        }
        Window {
            started: Instant::now(),
            counters: db_activity::counters(&self.db).await,
            before,
            cpu: CpuTracker::start(
                self.processes.clone(),
                self.db.clone(),
                Duration::from_millis(500),
            )
            .await,
            waits: db_activity::Sampler::start(self.db.clone(), Duration::from_millis(20)),
        }
    }

    /// Waits until the other processes' backends have reported what they did: an idle
    /// backend reports up to ten seconds late, and nothing makes it report sooner. Without
    /// it a short run against the peer counted 386 rows inserted for 500 coupons issued at
    /// the end of its window, and twice the rows a journey writes from its warm-up.
    async fn settle_statistics(&self) {
        tokio::time::sleep(Duration::from_secs(self.common.statistics_delay_secs)).await;
    }

    /// Backends report their counters to `pg_stat_database` at most once a second and an
    /// idle one up to ten seconds late: make this process's connections report what setup
    /// and warm-up did now, so that it is not counted in the measured window.
    async fn flush_statistics(&self) {
        let mut held = Vec::new();
        for _ in 0..self.db.options().get_max_connections() {
            match tokio::time::timeout(Duration::from_millis(200), self.db.acquire()).await {
                Ok(Ok(mut conn)) => {
                    let _ = sqlx::query("SELECT pg_stat_force_next_flush()")
                        .execute(&mut *conn)
                        .await;
                    held.push(conn);
                }
                _ => break,
            }
        }
    }

    pub async fn end(&self, window: Window) -> Measured {
        let seconds = window.started.elapsed().as_secs_f64();
        let db_waits = window.waits.finish().await;
        let cpu = window.cpu.finish().await;
        let after = prometheus::scrape(
            &self.metrics,
            self.common.api_metrics.as_deref(),
            &self.common.worker_metrics,
        )
        .await;
        self.settle_statistics().await;
        Measured {
            seconds,
            stages: prometheus::breakdown(&window.before, &after, seconds),
            cpu,
            db_waits,
            counters: (window.counters, db_activity::counters(&self.db).await),
        }
    }

    /// Waits until `sql` (a count of pending requests, binding `$1`) reads zero; the time
    /// it took, or `None` after the drain timeout. Against the peer, whose answers were
    /// final, at once.
    pub async fn wait_until_settled<T>(&self, sql: &str, bind: T) -> anyhow::Result<Option<Duration>>
    where
        T: for<'q> sqlx::Encode<'q, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Clone + Send,
    {
        if self.settler == Settler::Peer {
            return Ok(Some(Duration::ZERO));
        }
        let started = Instant::now();
        let deadline = started + self.common.drain_timeout();
        loop {
            let pending: i64 = sqlx::query_scalar(sql)
                .bind(bind.clone())
                .fetch_one(&self.db)
                .await?;
            if pending == 0 {
                return Ok(Some(started.elapsed()));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Writes the result (JSON, if asked) and prints it.
    pub fn finish(&self, mut result: ScenarioResult) -> anyhow::Result<()> {
        result.memory = resources::memory(&self.processes);
        for (outcome, n) in self.api.retried() {
            result.outcomes.insert(format!("(sent again after {outcome})"), n);
        }
        result.notes.extend(self.notes.iter().cloned());
        report::print_scenario(&result);
        if let Some(out) = &self.common.out {
            results::write_json(out, &result)?;
        }
        // A run that broke an invariant fails, so that scripts and CI stop on it.
        anyhow::ensure!(
            result.violations == 0,
            "{} correctness check(s) violated; see the checks above",
            result.violations
        );
        Ok(())
    }
}

/// Answers counted by outcome (`202`, `410 ERR_COUPON_OUT_OF_STOCK`, `transport error`).
#[derive(Debug, Default)]
pub struct Outcomes {
    counts: Mutex<BTreeMap<String, u64>>,
    unexpected: AtomicU64,
}

impl Outcomes {
    pub fn count(&self, outcome: &str, expected: bool) {
        *self
            .counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(outcome.to_owned())
            .or_default() += 1;
        if !expected {
            self.unexpected.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn unexpected(&self) -> u64 {
        self.unexpected.load(Ordering::Relaxed)
    }

    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        self.counts.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

/// Percentiles of a set of durations in milliseconds computed by PostgreSQL: `sql` selects
/// one float8 column `ms` and binds `$1`.
pub async fn db_latency<T>(db: &PgPool, sql: &str, bind: T) -> anyhow::Result<Option<LatencySummary>>
where
    T: for<'q> sqlx::Encode<'q, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send,
{
    #[derive(sqlx::FromRow)]
    struct Row {
        count: i64,
        mean: Option<f64>,
        p50: Option<f64>,
        p90: Option<f64>,
        p99: Option<f64>,
        max: Option<f64>,
    }
    let row: Row = sqlx::query_as(&format!(
        "SELECT count(*) AS count, avg(ms) AS mean,
                percentile_cont(0.5) WITHIN GROUP (ORDER BY ms) AS p50,
                percentile_cont(0.9) WITHIN GROUP (ORDER BY ms) AS p90,
                percentile_cont(0.99) WITHIN GROUP (ORDER BY ms) AS p99,
                max(ms) AS max
         FROM ({sql}) AS d"
    ))
    .bind(bind)
    .fetch_one(db)
    .await
    .context("cannot compute latencies in PostgreSQL")?;
    Ok((row.count > 0).then(|| LatencySummary {
        count: u64::try_from(row.count).unwrap_or(0),
        mean_ms: row.mean.unwrap_or_default(),
        p50_ms: row.p50.unwrap_or_default(),
        p90_ms: row.p90.unwrap_or_default(),
        p99_ms: row.p99.unwrap_or_default(),
        max_ms: row.max.unwrap_or_default(),
    }))
}

/// How far the schedule slipped, open loop (`--rate`) only.
pub fn dispatch_lag(common: &Common, timing: &Timing) -> Option<DispatchLag> {
    common.rate.map(|_| DispatchLag {
        late_dispatches: timing.late,
        worst_dispatch_lag_ms: timing.worst_lag.as_secs_f64() * 1e3,
    })
}

/// The pace and the knobs every result carries.
pub fn base_params(common: &Common) -> BTreeMap<String, String> {
    let mut params = BTreeMap::new();
    params.insert("concurrency".to_owned(), common.concurrency.to_string());
    if let Some(rate) = common.rate {
        params.insert("rate".to_owned(), rate.to_string());
    }
    params.insert("warmup".to_owned(), common.warmup.to_string());
    if common.commands_url.is_some() {
        params.insert("commands".to_owned(), "synchronous peer".to_owned());
    }
    params
}
