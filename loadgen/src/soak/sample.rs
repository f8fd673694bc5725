//! What the soak samples every few seconds: each process's resident memory and open file
//! descriptors (from `/proc`), the system's PostgreSQL connections, the partition queues'
//! depth, the pending requests, the api's open waits, and the latency of the load's
//! requests since the previous sample. Written out as CSV, one row a sample.

use std::fmt::Write as _;
use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde_json::Value;
use sqlx::PgPool;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

use crate::client::Api;
use crate::histogram::LatencyTap;
use crate::prometheus;
use crate::resources;

/// The `application_name` of the load generator's own connections, which are not the
/// system's.
pub const LOADGEN_APPLICATION: &str = "loadgen";

/// One process at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessSample {
    /// Resident set (`VmRSS`), KiB; `None` once the process is gone.
    pub rss_kib: Option<u64>,
    pub fds: Option<u64>,
}

/// Everything at one moment. A figure that could not be read is `None` (a blank in the
/// CSV), not a zero that would look like a fall.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Seconds since the load started.
    pub at_secs: f64,
    /// In the order of [`Sampler::start`]'s processes.
    pub processes: Vec<ProcessSample>,
    /// Backends of the soak's database that are not the load generator's.
    pub pg_connections: Option<i64>,
    /// Messages in the partition queues, ready and unacknowledged.
    pub queue_depth: Option<i64>,
    /// Requests `PENDING` in the database.
    pub pending: Option<i64>,
    /// `api_waits_open`, summed over the api replicas: answers held for a command or a
    /// `?wait=` read.
    pub waiters: Option<f64>,
    /// Requests of the load answered since the previous sample, and their latency.
    pub requests: u64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

/// Where the figures are read.
pub struct Sources {
    /// Name and pid of every process of the system.
    pub processes: Vec<(String, u32)>,
    /// The soak's own connection to the database (`application_name` [`LOADGEN_APPLICATION`]).
    pub db: PgPool,
    pub api: Api,
    /// The api replicas' `/metrics`.
    pub api_metrics: Vec<String>,
    pub tap: Arc<LatencyTap>,
}

/// Samples every `every` in the background until stopped.
pub struct Sampler {
    stop: oneshot::Sender<()>,
    task: JoinHandle<Vec<Sample>>,
}

impl Sampler {
    /// Takes the first sample at once, then one every `every`, until `until` (inclusive of
    /// a sample due at it) or [`Sampler::finish`]; each sample is printed as it is taken.
    pub fn start(sources: Sources, every: Duration, until: Duration) -> anyhow::Result<Self> {
        let http = prometheus::http_client()?;
        let (stop, mut stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let mut ticks = tokio::time::interval(every);
            ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
            // The window before the first sample is not the load's.
            sources.tap.take();
            let mut samples = Vec::new();
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    _ = ticks.tick() => {}
                }
                let at = started.elapsed();
                if at > until + every / 2 {
                    break;
                }
                let sample = take(&sources, &http, at.as_secs_f64()).await;
                println!("soak: {}", describe(&sources.processes, &sample));
                samples.push(sample);
            }
            samples
        });
        Ok(Self { stop, task })
    }

    /// Waits for the sampling to reach its end; the samples.
    pub async fn finish(self) -> Vec<Sample> {
        let Self { stop, task } = self;
        let samples = task.await.unwrap_or_default();
        drop(stop);
        samples
    }
}

async fn take(sources: &Sources, http: &reqwest::Client, at_secs: f64) -> Sample {
    let processes = sources
        .processes
        .iter()
        .map(|(_, pid)| ProcessSample {
            rss_kib: resources::memory_kib(*pid).map(|(_, rss)| rss),
            fds: open_fds(*pid),
        })
        .collect();
    let pg_connections = sqlx::query_scalar::<_, i64>(
        "SELECT count(*) FROM pg_stat_activity
         WHERE datname = current_database() AND application_name IS DISTINCT FROM $1",
    )
    .bind(LOADGEN_APPLICATION)
    .fetch_one(&sources.db)
    .await
    .ok();
    let pending = sqlx::query_scalar::<_, i64>("SELECT count(*) FROM requests WHERE status = 'PENDING'")
        .fetch_one(&sources.db)
        .await
        .ok();
    let queue_depth = sources.api.partitions().await.ok().map(|items| queued(&items));
    let waiters = waits_open(http, &sources.api_metrics).await;
    let latency = sources.tap.take();
    let summary = (!latency.is_empty()).then(|| latency.summary());
    Sample {
        at_secs,
        processes,
        pg_connections,
        queue_depth,
        pending,
        waiters,
        requests: latency.len(),
        p50_ms: summary.map(|s| s.p50_ms),
        p99_ms: summary.map(|s| s.p99_ms),
    }
}

/// Entries of `/proc/<pid>/fd`.
fn open_fds(pid: u32) -> Option<u64> {
    let entries = fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    Some(entries.count() as u64)
}

/// Ready and unacknowledged messages over the partitions of `GET /admin/partitions`.
fn queued(items: &[Value]) -> i64 {
    let field = |item: &Value, name: &str| item.get(name).and_then(Value::as_i64).unwrap_or(0);
    items
        .iter()
        .map(|item| field(item, "ready") + field(item, "unacked"))
        .sum()
}

/// `api_waits_open` summed over the replicas; `None` if one could not be read.
async fn waits_open(http: &reqwest::Client, urls: &[String]) -> Option<f64> {
    let mut open = 0.0;
    for url in urls {
        let text = http.get(url).send().await.ok()?.text().await.ok()?;
        open += prometheus::parse(&text)
            .iter()
            .filter(|s| s.name == "api_waits_open")
            .map(|s| s.value)
            .sum::<f64>();
    }
    Some(open)
}

fn describe(processes: &[(String, u32)], sample: &Sample) -> String {
    let mut line = format!("+{:>5.0}s", sample.at_secs);
    for ((name, _), p) in processes.iter().zip(&sample.processes) {
        let rss = p
            .rss_kib
            .map_or("-".to_owned(), |k| format!("{:.1}", k as f64 / 1024.0));
        let fds = p.fds.map_or("-".to_owned(), |f| f.to_string());
        let _ = write!(line, " {name} {rss} MiB/{fds} fds;");
    }
    let show = |v: Option<i64>| v.map_or("-".to_owned(), |v| v.to_string());
    let _ = write!(
        line,
        " pg {}, queued {}, pending {}, waits {}, {} answers p50 {} p99 {} ms",
        show(sample.pg_connections),
        show(sample.queue_depth),
        show(sample.pending),
        sample.waiters.map_or("-".to_owned(), |w| format!("{w:.0}")),
        sample.requests,
        sample.p50_ms.map_or("-".to_owned(), |v| format!("{v:.1}")),
        sample.p99_ms.map_or("-".to_owned(), |v| format!("{v:.1}")),
    );
    line
}

/// The samples as CSV: a row a sample, two columns (`<name>_rss_kib`, `<name>_fds`) a
/// process.
pub fn to_csv(processes: &[(String, u32)], samples: &[Sample]) -> String {
    let mut csv = String::from("at_secs");
    for (name, _) in processes {
        let _ = write!(csv, ",{name}_rss_kib,{name}_fds");
    }
    csv.push_str(",pg_connections,queue_depth,pending,waiters,requests,p50_ms,p99_ms\n");
    let cell = |v: Option<String>| v.unwrap_or_default();
    for s in samples {
        let _ = write!(csv, "{:.1}", s.at_secs);
        for p in &s.processes {
            let _ = write!(
                csv,
                ",{},{}",
                cell(p.rss_kib.map(|v| v.to_string())),
                cell(p.fds.map(|v| v.to_string()))
            );
        }
        let _ = writeln!(
            csv,
            ",{},{},{},{},{},{},{}",
            cell(s.pg_connections.map(|v| v.to_string())),
            cell(s.queue_depth.map(|v| v.to_string())),
            cell(s.pending.map(|v| v.to_string())),
            cell(s.waiters.map(|v| format!("{v:.0}"))),
            s.requests,
            cell(s.p50_ms.map(|v| format!("{v:.2}"))),
            cell(s.p99_ms.map(|v| format!("{v:.2}"))),
        );
    }
    csv
}

pub fn write_csv(path: &Path, processes: &[(String, u32)], samples: &[Sample]) -> anyhow::Result<()> {
    fs::write(path, to_csv(processes, samples)).with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_open_descriptors() {
        assert!(open_fds(std::process::id()).is_some_and(|n| n >= 3));
    }

    #[test]
    fn queued_counts_ready_and_unacknowledged_messages_of_every_partition() {
        let items: Vec<Value> = serde_json::from_str(
            r#"[{"partition": 0, "ready": 3, "unacked": 2, "pending": 9},
                {"partition": 1, "ready": 0, "unacked": 1},
                {"partition": 2}]"#,
        )
        .unwrap_or_default();
        assert_eq!(queued(&items), 6);
    }

    #[test]
    fn the_csv_has_two_columns_a_process_and_blanks_for_what_was_not_read() {
        let processes = vec![("api-1".to_owned(), 1), ("worker-1".to_owned(), 2)];
        let sample = Sample {
            at_secs: 10.0,
            processes: vec![
                ProcessSample {
                    rss_kib: Some(2048),
                    fds: Some(40),
                },
                ProcessSample {
                    rss_kib: None,
                    fds: None,
                },
            ],
            pg_connections: Some(12),
            queue_depth: None,
            pending: Some(0),
            waiters: Some(3.0),
            requests: 1200,
            p50_ms: Some(4.5),
            p99_ms: Some(30.25),
        };
        let csv = to_csv(&processes, &[sample]);
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(
            lines,
            [
                "at_secs,api-1_rss_kib,api-1_fds,worker-1_rss_kib,worker-1_fds,pg_connections,queue_depth,pending,waiters,requests,p50_ms,p99_ms",
                "10.0,2048,40,,,12,,0,3,1200,4.50,30.25",
            ]
        );
    }
}
