//! Results: what a scenario or a baseline run wrote (JSON), the detailed printout of one
//! run, and the side-by-side table of ours against the synchronous peer and the baseline,
//! as medians over runs.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::Path;

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::checks::Check;
use crate::cli::ReportArgs;
use crate::db_activity::Wait;
use crate::histogram::{fmt_ms, LatencySummary};
use crate::prometheus::Stage;
use crate::resources::{CpuUse, Memory};

/// What one scenario run measured and checked.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScenarioResult {
    pub scenario: String,
    pub label: String,
    pub pace: String,
    pub params: BTreeMap<String, String>,
    pub started_at: DateTime<Utc>,
    /// Throughputs, counts and durations, by key (see each scenario's module).
    pub figures: BTreeMap<String, f64>,
    pub latencies: BTreeMap<String, LatencySummary>,
    /// HTTP answers by `status code`.
    pub outcomes: BTreeMap<String, u64>,
    pub checks: Vec<Check>,
    pub violations: usize,
    pub stages: Vec<Stage>,
    pub cpu: Vec<CpuUse>,
    pub memory: Vec<Memory>,
    pub db_waits: Vec<Wait>,
    pub notes: Vec<String>,
}

/// What one baseline run measured and checked.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BaselineResult {
    pub scenario: String,
    pub requested_clients: usize,
    pub variants: Vec<BaselineVariant>,
}

/// One pgbench script.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BaselineVariant {
    pub name: String,
    pub description: String,
    pub clients: usize,
    pub figures: BTreeMap<String, f64>,
    pub latency: LatencySummary,
    pub checks: Vec<Check>,
    pub violations: usize,
    pub db_waits: Vec<Wait>,
    pub cpu: Vec<CpuUse>,
}

pub fn write_json<T: Serialize>(path: &Path, value: &T) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

fn read_json<T: DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    let text = fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not a result file", path.display()))
}

fn fmt_num(v: f64) -> String {
    if v.abs() >= 100.0 {
        let whole = v.round() as i64;
        let digits = whole.abs().to_string();
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        if whole < 0 {
            format!("-{out}")
        } else {
            out
        }
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// The detailed printout of one scenario run.
pub fn print_scenario(r: &ScenarioResult) {
    let mut out = String::new();
    let _ = writeln!(out, "\n== {} ({}) {}", r.scenario, r.pace, r.label);
    let params: Vec<String> = r.params.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let _ = writeln!(out, "   {}", params.join(" "));
    let _ = writeln!(out, "-- figures");
    for (k, v) in &r.figures {
        let _ = writeln!(out, "   {k:<44} {:>14}", fmt_num(*v));
    }
    let _ = writeln!(out, "-- answers");
    for (k, v) in &r.outcomes {
        let _ = writeln!(out, "   {k:<44} {v:>14}");
    }
    let _ = writeln!(
        out,
        "-- latency (ms)                                   count      p50      p90      p99      max"
    );
    for (k, s) in &r.latencies {
        let _ = writeln!(
            out,
            "   {k:<44} {:>8} {:>8} {:>8} {:>8} {:>8}",
            s.count,
            fmt_ms(s.p50_ms),
            fmt_ms(s.p90_ms),
            fmt_ms(s.p99_ms),
            fmt_ms(s.max_ms)
        );
    }
    print_stages(&mut out, &r.stages);
    print_cpu(&mut out, &r.cpu);
    print_waits(&mut out, &r.db_waits);
    if !r.memory.is_empty() {
        let _ = writeln!(
            out,
            "-- memory (MiB)                                 peak RSS   RSS now"
        );
        for m in &r.memory {
            let _ = writeln!(
                out,
                "   {:<44} {:>8.1} {:>9.1}",
                m.process,
                m.peak_rss_kib as f64 / 1024.0,
                m.rss_kib as f64 / 1024.0
            );
        }
    }
    print_checks(&mut out, &r.checks);
    for note in &r.notes {
        let _ = writeln!(out, "   note: {note}");
    }
    print!("{out}");
}

fn print_stages(out: &mut String, stages: &[Stage]) {
    if stages.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "-- stages (from /metrics)                          count      /s     mean      p50      p99"
    );
    for s in stages {
        let unit = if s.unit == "ms" { "" } else { " (commands)" };
        let q = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), fmt_ms);
        let _ = writeln!(
            out,
            "   {:<44} {:>8} {:>7} {:>8} {:>8} {:>8}",
            format!("{}{unit}", s.stage),
            fmt_num(s.count),
            fmt_num(s.per_sec),
            fmt_ms(s.mean),
            q(s.p50),
            q(s.p99)
        );
    }
}

fn print_cpu(out: &mut String, cpu: &[CpuUse]) {
    if cpu.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "-- CPU over the run                             CPU s  % of a core"
    );
    for c in cpu {
        let _ = writeln!(
            out,
            "   {:<44} {:>6.1} {:>8.0} %",
            c.group, c.cpu_seconds, c.percent_of_core
        );
    }
}

fn print_waits(out: &mut String, waits: &[Wait]) {
    if waits.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "-- active PostgreSQL backends (sampled)       avg backends   share"
    );
    for w in waits.iter().take(8) {
        let _ = writeln!(
            out,
            "   {:<44} {:>8.2} {:>7.1} %",
            w.wait, w.average_backends, w.share_percent
        );
    }
}

fn print_checks(out: &mut String, checks: &[Check]) {
    let failed = checks.iter().filter(|c| !c.passed).count();
    let _ = writeln!(
        out,
        "-- checks: {} passed, {failed} violated",
        checks.len() - failed
    );
    for c in checks {
        let mark = if c.passed { "ok  " } else { "FAIL" };
        let _ = writeln!(out, "   {mark} {} ({})", c.name, c.detail);
    }
}

/// The detailed printout of one baseline run.
pub fn print_baseline(r: &BaselineResult) {
    let mut out = String::new();
    for v in &r.variants {
        let _ = writeln!(
            out,
            "\n== baseline {} / {}: {} ({} pgbench clients, {} asked)",
            r.scenario, v.name, v.description, v.clients, r.requested_clients
        );
        for (k, value) in &v.figures {
            let _ = writeln!(out, "   {k:<44} {:>14}", fmt_num(*value));
        }
        let _ = writeln!(
            out,
            "   transaction latency p50/p90/p99/max ms      {}",
            v.latency.compact()
        );
        print_cpu(&mut out, &v.cpu);
        print_waits(&mut out, &v.db_waits);
        print_checks(&mut out, &v.checks);
    }
    print!("{out}");
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    values.retain(|v| v.is_finite());
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

fn median_latency(all: &[LatencySummary]) -> Option<LatencySummary> {
    if all.is_empty() {
        return None;
    }
    let m = |f: fn(&LatencySummary) -> f64| median(all.iter().map(f).collect()).unwrap_or_default();
    Some(LatencySummary {
        count: all.iter().map(|s| s.count).sum::<u64>() / all.len() as u64,
        mean_ms: m(|s| s.mean_ms),
        p50_ms: m(|s| s.p50_ms),
        p90_ms: m(|s| s.p90_ms),
        p99_ms: m(|s| s.p99_ms),
        max_ms: m(|s| s.max_ms),
    })
}

/// What the comparison table shows for a scenario: the headline throughput (ours, the
/// baseline's key), a second throughput, and the latency.
struct Columns {
    headline: (&'static str, &'static str, &'static str),
    second: Option<(&'static str, &'static str, &'static str)>,
    latency: &'static str,
}

fn columns(scenario: &str) -> Columns {
    match scenario {
        "flash-sale" => Columns {
            headline: ("coupons issued/s", "coupons_issued_per_sec", "issue_tps"),
            second: Some(("answered/s (tx/s)", "answered_per_sec", "tps")),
            latency: "answer (all)",
        },
        "checkout" => Columns {
            headline: ("orders paid/s", "paid_per_sec", "tps"),
            second: None,
            latency: "POST /orders",
        },
        _ => Columns {
            headline: ("requests/s", "requests_per_sec", ""),
            second: None,
            latency: "all",
        },
    }
}

/// One line of the table: a system, median over the runs.
struct Line {
    system: String,
    clients: String,
    headline: Option<f64>,
    /// The peer and the baselines: the median over runs of (our headline ÷ this one's) in
    /// the same run.
    ratio: Option<f64>,
    second: Option<f64>,
    latency: Option<LatencySummary>,
    violations: usize,
}

/// The median of the ratios `ours / theirs` over the runs that measured both.
fn median_ratio(pairs: impl Iterator<Item = (Option<f64>, Option<f64>)>) -> Option<f64> {
    median(
        pairs
            .filter_map(|(ours, theirs)| Some((ours?, theirs?)))
            .filter(|(_, theirs)| *theirs > 0.0)
            .map(|(ours, theirs)| ours / theirs)
            .collect(),
    )
}

/// `loadgen report DIR…`: ours, the synchronous peer and every baseline variant side by
/// side, medians over the runs, with the ratio of our headline figure to each of theirs.
pub fn print_runs(args: &ReportArgs) -> anyhow::Result<()> {
    let mut ours: Vec<ScenarioResult> = Vec::new();
    let mut baselines: Vec<BaselineResult> = Vec::new();
    // Each run's own baseline, to compare within a run.
    let mut pairs: Vec<(f64, BaselineResult)> = Vec::new();
    // Each run's own peer result, beside ours of the same run.
    let mut peers: Vec<(ScenarioResult, ScenarioResult)> = Vec::new();
    for dir in &args.runs {
        let result: ScenarioResult = read_json(&dir.join("scenario.json"))?;
        let peer = dir.join("peer.json");
        if peer.exists() {
            peers.push((result.clone(), read_json(&peer)?));
        }
        let baseline = dir.join("baseline.json");
        if baseline.exists() {
            let baseline: BaselineResult = read_json(&baseline)?;
            if let Some(headline) = result.figures.get(columns(&result.scenario).headline.1) {
                pairs.push((*headline, baseline.clone()));
            }
            baselines.push(baseline);
        }
        ours.push(result);
    }
    let Some(first) = ours.first() else {
        anyhow::bail!("no runs given");
    };
    let cols = columns(&first.scenario);
    let fig = |key: &str| median(ours.iter().filter_map(|r| r.figures.get(key).copied()).collect());
    let lat = |key: &str| {
        median_latency(
            &ours
                .iter()
                .filter_map(|r| r.latencies.get(key).copied())
                .collect::<Vec<_>>(),
        )
    };

    let peer_results: Vec<&ScenarioResult> = peers.iter().map(|(_, peer)| peer).collect();
    let peer_fig = |key: &str| {
        median(
            peer_results
                .iter()
                .filter_map(|r| r.figures.get(key).copied())
                .collect(),
        )
    };
    let peer_lat = |key: &str| {
        median_latency(
            &peer_results
                .iter()
                .filter_map(|r| r.latencies.get(key).copied())
                .collect::<Vec<_>>(),
        )
    };

    let mut lines = vec![Line {
        system: format!("ours ({})", first.label),
        clients: first.params.get("concurrency").cloned().unwrap_or_default(),
        headline: fig(cols.headline.1),
        ratio: None,
        second: cols.second.and_then(|c| fig(c.1)),
        latency: lat(cols.latency),
        violations: ours.iter().map(|r| r.violations).sum(),
    }];
    if let Some(peer) = peer_results.first() {
        lines.push(Line {
            system: "sync HTTP peer (loadgen peer)".to_owned(),
            clients: peer.params.get("concurrency").cloned().unwrap_or_default(),
            headline: peer_fig(cols.headline.1),
            ratio: median_ratio(peers.iter().map(|(ours, peer)| {
                let key = cols.headline.1;
                (ours.figures.get(key).copied(), peer.figures.get(key).copied())
            })),
            second: cols.second.and_then(|c| peer_fig(c.1)),
            latency: peer_lat(cols.latency),
            violations: peer_results.iter().map(|r| r.violations).sum(),
        });
    }
    let names: Vec<String> = baselines
        .first()
        .map(|b| b.variants.iter().map(|v| v.name.clone()).collect())
        .unwrap_or_default();
    for name in &names {
        let runs: Vec<&BaselineVariant> = baselines
            .iter()
            .flat_map(|b| b.variants.iter().filter(|v| &v.name == name))
            .collect();
        let vfig = |key: &str| median(runs.iter().filter_map(|v| v.figures.get(key).copied()).collect());
        lines.push(Line {
            system: format!("sync baseline: {name}"),
            clients: runs.first().map(|v| v.clients.to_string()).unwrap_or_default(),
            headline: vfig(cols.headline.2),
            ratio: median(
                pairs
                    .iter()
                    .filter_map(|(ours, b)| {
                        let theirs = b
                            .variants
                            .iter()
                            .find(|v| &v.name == name)?
                            .figures
                            .get(cols.headline.2)?;
                        (*theirs > 0.0).then(|| ours / theirs)
                    })
                    .collect(),
            ),
            second: cols.second.and_then(|c| vfig(c.2)),
            latency: median_latency(&runs.iter().map(|v| v.latency).collect::<Vec<_>>()),
            violations: runs.iter().map(|v| v.violations).sum(),
        });
    }

    let mut out = String::new();
    let runs = ours.len();
    let _ = writeln!(
        out,
        "\n{}: {}, {} run{}{}",
        first.scenario,
        first.pace,
        runs,
        if runs == 1 { "" } else { "s" },
        if runs > 1 { ", medians" } else { "" }
    );
    let params: Vec<String> = first.params.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let _ = writeln!(out, "{}", params.join(" "));
    let second_title = cols.second.map_or("", |c| c.0);
    let _ = writeln!(
        out,
        "{:<48} {:>7} {:>17} {:>9} {:>17} {:>30} {:>10}",
        "system",
        "clients",
        cols.headline.0,
        "ratio",
        second_title,
        "latency ms p50/p90/p99/max",
        "violations"
    );
    for (i, line) in lines.iter().enumerate() {
        let ratio = match (i, line.ratio) {
            (0, _) => String::new(),
            (_, Some(r)) => format!("{r:.2}x"),
            _ => "-".to_owned(),
        };
        let _ = writeln!(
            out,
            "{:<48} {:>7} {:>17} {:>9} {:>17} {:>30} {:>10}",
            line.system,
            line.clients,
            line.headline.map_or_else(|| "-".to_owned(), fmt_num),
            ratio,
            if cols.second.is_some() {
                line.second.map_or_else(|| "-".to_owned(), fmt_num)
            } else {
                String::new()
            },
            line.latency.map_or_else(|| "-".to_owned(), |l| l.compact()),
            line.violations
        );
    }
    if lines.len() > 1 {
        let _ = writeln!(
            out,
            "(ratio: our {} divided by that system's in the same run; median over runs)",
            cols.headline.0
        );
    }
    let extra: &[(&str, &str)] = match first.scenario.as_str() {
        "flash-sale" => &[(
            "accept to settled (DB)",
            "ours: accept to settled, per request (DB)",
        )],
        "checkout" => &[
            ("POST /orders/{id}/payment", "ours: payment accept latency"),
            ("accept to paid (DB)", "ours: order accepted to paid (DB)"),
            ("journey (client)", "ours: whole journey with polling (client)"),
        ],
        _ => &[],
    };
    for (key, label) in extra {
        if let Some(l) = lat(key) {
            let _ = writeln!(out, "{label:<66} ms p50/p90/p99/max {}", l.compact());
        }
    }
    let peer_extra: &[(&str, &str)] = match first.scenario.as_str() {
        "checkout" => &[
            ("POST /orders/{id}/payment", "peer: payment latency (settled)"),
            ("accept to paid (DB)", "peer: order placed to paid (DB)"),
            ("journey (client)", "peer: whole journey (client)"),
        ],
        _ => &[],
    };
    for (key, label) in peer_extra {
        if let Some(l) = peer_lat(key) {
            let _ = writeln!(out, "{label:<66} ms p50/p90/p99/max {}", l.compact());
        }
    }
    for (key, label) in [
        (
            "db_commits per paid order",
            "PostgreSQL commits per paid order (ours / peer)",
        ),
        (
            "db_commits per request",
            "PostgreSQL commits per request (ours / peer)",
        ),
    ] {
        if let (Some(o), Some(p)) = (fig(key), peer_fig(key)) {
            let _ = writeln!(out, "{label:<66} {} / {}", fmt_num(o), fmt_num(p));
        }
    }
    for (key, label) in [
        (
            "accept_to_settled_seconds",
            "ours: first accept to last settled, s",
        ),
        ("accepted_per_sec", "ours: 202 answers/s"),
        ("journeys_per_sec", "ours: journeys completed/s (client)"),
    ] {
        if let Some(v) = fig(key) {
            let _ = writeln!(out, "{label:<66} {}", fmt_num(v));
        }
    }
    let mut peaks: BTreeMap<String, f64> = BTreeMap::new();
    for r in &ours {
        for m in &r.memory {
            let group = if m.process.starts_with("worker") {
                "largest worker"
            } else {
                m.process.as_str()
            };
            let peak = peaks.entry(group.to_owned()).or_default();
            *peak = peak.max(m.peak_rss_kib as f64 / 1024.0);
        }
    }
    if !peaks.is_empty() {
        let cells: Vec<String> = peaks
            .iter()
            .map(|(name, mib)| format!("{name} {mib:.1} MiB"))
            .collect();
        let _ = writeln!(
            out,
            "{:<66} {}",
            "ours: peak RSS (VmHWM), max over runs",
            cells.join(", ")
        );
    }
    print!("{out}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(vec![]), None);
    }

    #[test]
    fn ratios_are_taken_within_a_run_and_skip_runs_that_lack_a_side() {
        let runs = [
            (Some(900.0), Some(300.0)),
            (Some(800.0), None),
            (Some(1_000.0), Some(500.0)),
            (Some(600.0), Some(0.0)),
            (Some(700.0), Some(175.0)),
        ];
        assert_eq!(median_ratio(runs.into_iter()), Some(3.0));
        assert_eq!(median_ratio([(None, Some(1.0))].into_iter()), None);
    }

    #[test]
    fn numbers_get_thousands_separators() {
        assert_eq!(fmt_num(1234567.4), "1,234,567");
        assert_eq!(fmt_num(999.6), "1,000");
        assert_eq!(fmt_num(12.345), "12.3");
        assert_eq!(fmt_num(1.234), "1.23");
    }
}
