//! Whether anything grew during the soak, judged on the samples taken after a warm-up.
//!
//! - Resident memory: each process's last sample may be at most [`RSS_GROWTH`] above its
//!   first sample after the warm-up. Allocators and caches fill during the first minutes
//!   (the warm-up); after it a steady load should need steady memory.
//! - Open descriptors (each process) and PostgreSQL connections (the system's): the median
//!   of the last third of the samples after the warm-up may not exceed the median of the
//!   first third by more than a slack (see [`fd_slack`], [`connection_slack`]). Medians,
//!   because both move with the load from one moment to the next; a leak moves the median.

use super::sample::Sample;

/// How much a process's resident memory may grow after the warm-up, as a share.
pub const RSS_GROWTH: f64 = 0.20;

/// The warm-up: the first 20 % of the run or two minutes, whichever is shorter, as a
/// number of samples; at least one, and always leaving at least three samples after it
/// (the judged part needs a first and a last third).
pub fn warmup_samples(samples: usize, every_secs: f64, run_secs: f64) -> usize {
    let warmup_secs = (0.2 * run_secs).min(120.0);
    let wanted = (warmup_secs / every_secs.max(1e-9)).ceil() as usize;
    wanted.max(1).min(samples.saturating_sub(3))
}

/// Open descriptors move with the load: each connection a client keeps alive to an api,
/// each pooled PostgreSQL connection opened or closed by the pool's idle timeout, is one.
/// The open loop allows up to 100 requests in flight per load, so a slow moment can open a
/// few dozen connections to the apis; a median over several samples absorbs most of it.
/// Ten descriptors or a tenth, whichever is more, lets that noise through and catches a
/// leak of one descriptor a minute over a 20-minute soak (about seven in the last third).
pub fn fd_slack(early_median: f64) -> f64 {
    (0.1 * early_median).max(10.0)
}

/// The pools open connections on demand up to their size and close them after their idle
/// timeout, so their count follows the load's small swings: three connections, or a tenth
/// of the count, whichever is more, is that noise; a leak is not bounded by it.
pub fn connection_slack(early_median: f64) -> f64 {
    (0.1 * early_median).max(3.0)
}

/// One judged figure.
#[derive(Debug, Clone, PartialEq)]
pub struct Figure {
    /// `worker-1 RSS (MiB)`, `PostgreSQL connections`, …
    pub what: String,
    /// At the end of the warm-up (RSS: the first sample after it; the others: the median of
    /// the first third after it).
    pub after_warmup: f64,
    /// At the end (RSS: the last sample; the others: the median of the last third).
    pub end: f64,
    /// The highest value the end may have.
    pub limit: f64,
    /// The highest sample after the warm-up.
    pub peak: f64,
}

impl Figure {
    pub fn passed(&self) -> bool {
        self.end <= self.limit
    }

    /// `+12.3 %`.
    pub fn change(&self) -> String {
        if self.after_warmup == 0.0 {
            return format!("{:+.0}", self.end - self.after_warmup);
        }
        format!("{:+.1} %", 100.0 * (self.end / self.after_warmup - 1.0))
    }
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len() % 2 == 0 {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    })
}

/// The first and the last third of `values` (at least one value each).
fn thirds(values: &[f64]) -> (&[f64], &[f64]) {
    let third = (values.len() / 3).max(1).min(values.len());
    (&values[..third], &values[values.len() - third..])
}

/// Every figure judged over the samples after the first `warmup` ones; `names`: the
/// processes, in the samples' order.
pub fn judge(names: &[String], samples: &[Sample], warmup: usize) -> Vec<Figure> {
    let after = samples.get(warmup..).unwrap_or_default();
    let mut figures = Vec::new();
    for (index, name) in names.iter().enumerate() {
        let rss: Vec<f64> = after
            .iter()
            .filter_map(|s| s.processes.get(index)?.rss_kib)
            .map(|kib| kib as f64 / 1024.0)
            .collect();
        if let (Some(first), Some(last)) = (rss.first(), rss.last()) {
            figures.push(Figure {
                what: format!("{name} RSS (MiB)"),
                after_warmup: *first,
                end: *last,
                limit: first * (1.0 + RSS_GROWTH),
                peak: rss.iter().copied().fold(f64::MIN, f64::max),
            });
        }
        let fds: Vec<f64> = after
            .iter()
            .filter_map(|s| s.processes.get(index)?.fds)
            .map(|n| n as f64)
            .collect();
        figures.extend(not_growing(&format!("{name} open fds"), &fds, fd_slack));
    }
    let connections: Vec<f64> = after
        .iter()
        .filter_map(|s| s.pg_connections)
        .map(|n| n as f64)
        .collect();
    figures.extend(not_growing(
        "PostgreSQL connections",
        &connections,
        connection_slack,
    ));
    figures
}

fn not_growing(what: &str, values: &[f64], slack: fn(f64) -> f64) -> Option<Figure> {
    let (early, late) = thirds(values);
    let early = median(early.to_vec())?;
    let late = median(late.to_vec())?;
    Some(Figure {
        what: what.to_owned(),
        after_warmup: early,
        end: late,
        limit: early + slack(early),
        peak: values.iter().copied().fold(f64::MIN, f64::max),
    })
}

/// The figures as a table, a line each.
pub fn table(figures: &[Figure]) -> String {
    let mut out = format!(
        "  {:<34} {:>12} {:>10} {:>10} {:>10} {:>10}  result\n",
        "figure", "after warm-up", "end", "change", "limit", "peak"
    );
    for f in figures {
        out.push_str(&format!(
            "  {:<34} {:>12.1} {:>10.1} {:>10} {:>10.1} {:>10.1}  {}\n",
            f.what,
            f.after_warmup,
            f.end,
            f.change(),
            f.limit,
            f.peak,
            if f.passed() { "ok" } else { "GREW" }
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::sample::ProcessSample;
    use super::*;

    fn sample(rss_mib: u64, fds: u64, connections: i64) -> Sample {
        Sample {
            at_secs: 0.0,
            processes: vec![ProcessSample {
                rss_kib: Some(rss_mib * 1024),
                fds: Some(fds),
            }],
            pg_connections: Some(connections),
            queue_depth: None,
            pending: None,
            waiters: None,
            requests: 0,
            p50_ms: None,
            p99_ms: None,
        }
    }

    #[test]
    fn the_warmup_is_a_fifth_of_the_run_at_most_two_minutes_and_leaves_samples_to_judge() {
        // 20 minutes, a sample every 10 s: two minutes.
        assert_eq!(warmup_samples(121, 10.0, 1200.0), 12);
        // 90 s: 18 s, two samples.
        assert_eq!(warmup_samples(10, 10.0, 90.0), 2);
        // Always one, and never so many that fewer than three are left.
        assert_eq!(warmup_samples(10, 10.0, 1.0), 1);
        assert_eq!(warmup_samples(4, 10.0, 1200.0), 1);
    }

    #[test]
    fn memory_that_settles_after_the_warmup_passes_and_memory_that_keeps_growing_fails() {
        let names = vec!["worker-1".to_owned()];
        // Grows fast during the warm-up (two samples), then by 10 % in all.
        let settles: Vec<Sample> = [50, 90, 100, 104, 106, 108, 110]
            .into_iter()
            .map(|rss| sample(rss, 30, 10))
            .collect();
        let figures = judge(&names, &settles, 2);
        assert!(figures.iter().all(Figure::passed), "{figures:?}");
        // 25 % after the warm-up.
        let leaks: Vec<Sample> = [50, 90, 100, 105, 110, 115, 120, 125]
            .into_iter()
            .map(|rss| sample(rss, 30, 10))
            .collect();
        let figures = judge(&names, &leaks, 2);
        let failed: Vec<&str> = figures
            .iter()
            .filter(|f| !f.passed())
            .map(|f| f.what.as_str())
            .collect();
        assert_eq!(failed, ["worker-1 RSS (MiB)"]);
    }

    #[test]
    fn descriptors_and_connections_may_swing_but_not_climb() {
        let names = vec!["api-1".to_owned()];
        let swinging: Vec<Sample> = [(40, 10), (60, 14), (45, 11), (70, 9), (42, 12), (58, 10)]
            .into_iter()
            .map(|(fds, pg)| sample(100, fds, pg))
            .collect();
        assert!(judge(&names, &swinging, 0).iter().all(Figure::passed));
        let climbing: Vec<Sample> = [(40, 10), (45, 12), (52, 14), (60, 16), (66, 18), (75, 20)]
            .into_iter()
            .map(|(fds, pg)| sample(100, fds, pg))
            .collect();
        let figures = judge(&names, &climbing, 0);
        let failed: Vec<&str> = figures
            .iter()
            .filter(|f| !f.passed())
            .map(|f| f.what.as_str())
            .collect();
        assert_eq!(failed, ["api-1 open fds", "PostgreSQL connections"]);
    }
}
