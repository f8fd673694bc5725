//! CPU time and memory of the processes in a run, from `/proc` (Linux).
//!
//! On a small machine the first question about a throughput figure is who used the CPU:
//! the api, the workers, PostgreSQL (this database's backends, and its shared background
//! processes), RabbitMQ, pgbench, the load generator itself, or something else on the
//! machine (other people's builds, on a shared box).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Clock ticks per second of `/proc` CPU times (`USER_HZ`), 100 on every Linux port.
const TICKS_PER_SEC: f64 = 100.0;

/// Cumulative CPU ticks (user + system) of a process, `None` once it is gone.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: count fields after the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // Fields 14 and 15 of the line (utime, stime) are 12 and 13 after the name and state.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn comm(pid: u32) -> Option<String> {
    Some(
        fs::read_to_string(format!("/proc/{pid}/comm"))
            .ok()?
            .trim()
            .to_owned(),
    )
}

/// `VmHWM` (peak resident set) and `VmRSS` of a process, in KiB.
pub fn memory_kib(pid: u32) -> Option<(u64, u64)> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("VmHWM:")?, field("VmRSS:")?))
}

/// Busy and total ticks of the whole machine (`/proc/stat`, all CPUs).
fn machine_ticks() -> Option<(u64, u64)> {
    let stat = fs::read_to_string("/proc/stat").ok()?;
    let values: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = values.iter().sum();
    // idle and iowait are the 4th and 5th values.
    let idle = values.get(3).copied().unwrap_or(0) + values.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

fn pids_named(name: &str) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| comm(*pid).as_deref() == Some(name))
        .collect()
}

/// Which group each process of interest belongs to, and its CPU ticks, at one moment: the
/// named ones (`api=1234`; workers are summed), this database's PostgreSQL backends,
/// PostgreSQL's other processes, RabbitMQ, pgbench, and this load generator.
async fn snapshot(named: &[(String, u32)], db: &PgPool) -> HashMap<u32, (String, u64)> {
    let mut seen = HashMap::new();
    let mut add = |group: &str, pid: u32| {
        if let Some(ticks) = cpu_ticks(pid) {
            seen.insert(pid, (group.to_owned(), ticks));
        }
    };
    for (name, pid) in named {
        // Workers are summed: the question is what the tier costs.
        let group = if name.starts_with("worker") {
            "workers"
        } else {
            name.as_str()
        };
        add(group, *pid);
    }
    let backends: HashSet<u32> =
        sqlx::query_scalar::<_, i32>("SELECT pid FROM pg_stat_activity WHERE datname = current_database()")
            .fetch_all(db)
            .await
            .unwrap_or_default()
            .into_iter()
            .filter_map(|p| u32::try_from(p).ok())
            .collect();
    for pid in pids_named("postgres") {
        let group = if backends.contains(&pid) {
            "postgres (this database's backends)"
        } else {
            "postgres (other processes)"
        };
        add(group, pid);
    }
    for pid in pids_named("beam.smp") {
        add("rabbitmq", pid);
    }
    for pid in pids_named("pgbench") {
        add("pgbench", pid);
    }
    add("loadgen", std::process::id());
    seen
}

/// CPU used by one group over a run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CpuUse {
    pub group: String,
    pub cpu_seconds: f64,
    /// Of one core: 100 % is a whole core busy for the whole run.
    pub percent_of_core: f64,
}

/// Accounts CPU time by group over a run. Processes are sampled every few hundred
/// milliseconds, so one that starts and ends during the run (a pgbench connection's
/// backend) is counted up to its last sample; one that appears counts from zero.
pub struct CpuTracker {
    stop: oneshot::Sender<()>,
    task: JoinHandle<Vec<CpuUse>>,
}

impl CpuTracker {
    pub async fn start(named: Vec<(String, u32)>, db: PgPool, every: Duration) -> Self {
        let first: HashMap<u32, u64> = snapshot(&named, &db)
            .await
            .into_iter()
            .map(|(pid, (_, t))| (pid, t))
            .collect();
        let machine_first = machine_ticks();
        let started = Instant::now();
        let (stop, mut stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let mut last: HashMap<u32, (String, u64)> = HashMap::new();
            loop {
                for (pid, seen) in snapshot(&named, &db).await {
                    last.insert(pid, seen);
                }
                tokio::select! {
                    _ = &mut stopped => break,
                    () = tokio::time::sleep(every) => {}
                }
            }
            for (pid, seen) in snapshot(&named, &db).await {
                last.insert(pid, seen);
            }
            summarise(
                &first,
                &last,
                machine_first,
                machine_ticks(),
                started.elapsed().as_secs_f64(),
            )
        });
        Self { stop, task }
    }

    pub async fn finish(self) -> Vec<CpuUse> {
        let _ = self.stop.send(());
        self.task.await.unwrap_or_default()
    }
}

fn summarise(
    first: &HashMap<u32, u64>,
    last: &HashMap<u32, (String, u64)>,
    machine_first: Option<(u64, u64)>,
    machine_last: Option<(u64, u64)>,
    seconds: f64,
) -> Vec<CpuUse> {
    let mut by_group: BTreeMap<String, u64> = BTreeMap::new();
    for (pid, (group, ticks)) in last {
        let used = ticks.saturating_sub(first.get(pid).copied().unwrap_or(0));
        *by_group.entry(group.clone()).or_default() += used;
    }
    let mut lines = Vec::new();
    let mut accounted = 0.0;
    for (group, ticks) in by_group {
        let cpu_seconds = ticks as f64 / TICKS_PER_SEC;
        accounted += cpu_seconds;
        lines.push(CpuUse {
            group,
            cpu_seconds,
            percent_of_core: 100.0 * cpu_seconds / seconds.max(1e-9),
        });
    }
    if let (Some((busy0, total0)), Some((busy1, total1))) = (machine_first, machine_last) {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let busy = busy1.saturating_sub(busy0) as f64 / TICKS_PER_SEC;
        // /proc/stat sums every CPU: its ticks over the run are cores × seconds.
        let wall = total1.saturating_sub(total0) as f64 / TICKS_PER_SEC / cores;
        let wall = if wall > 0.0 { wall } else { seconds };
        let others = (busy - accounted).max(0.0);
        lines.push(CpuUse {
            group: "everything else on the machine".to_owned(),
            cpu_seconds: others,
            percent_of_core: 100.0 * others / wall.max(1e-9),
        });
        lines.push(CpuUse {
            group: format!("machine busy (all {cores} cores)"),
            cpu_seconds: busy,
            percent_of_core: 100.0 * busy / wall.max(1e-9),
        });
    }
    lines
}

/// Peak memory of a named process.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Memory {
    pub process: String,
    pub peak_rss_kib: u64,
    pub rss_kib: u64,
}

pub fn memory(named: &[(String, u32)]) -> Vec<Memory> {
    named
        .iter()
        .filter_map(|(name, pid)| {
            let (peak, now) = memory_kib(*pid)?;
            Some(Memory {
                process: name.clone(),
                peak_rss_kib: peak,
                rss_kib: now,
            })
        })
        .collect()
}

/// Parses `name=pid` pairs.
pub fn parse_processes(raw: &[String]) -> anyhow::Result<Vec<(String, u32)>> {
    raw.iter()
        .filter(|r| !r.is_empty())
        .map(|r| {
            let (name, pid) = r
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("--process {r:?}: expected name=pid"))?;
            let pid = pid
                .parse()
                .map_err(|e| anyhow::anyhow!("--process {r:?}: bad pid: {e}"))?;
            Ok((name.to_owned(), pid))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_cpu_time_and_memory() {
        let pid = std::process::id();
        assert!(cpu_ticks(pid).is_some());
        let (peak, now) = memory_kib(pid).unwrap_or_default();
        assert!(peak >= now && now > 0);
    }

    #[test]
    fn processes_are_name_equals_pid() {
        let parsed = parse_processes(&["api=12".to_owned(), "worker-1=34".to_owned()]).unwrap_or_default();
        assert_eq!(parsed, vec![("api".to_owned(), 12), ("worker-1".to_owned(), 34)]);
        assert!(parse_processes(&["api".to_owned()]).is_err());
    }
}
