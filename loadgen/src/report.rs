//! The printouts of results: the detailed one of a run, and the side-by-side table of ours
//! against the synchronous peer and the baseline, as medians over runs.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::checks::Check;
use crate::cli::ReportArgs;
use crate::db_activity::Wait;
use crate::figure_map::{self, FigureMap};
use crate::figures::{BaselineFigures, Figures, Scenario, WorkUnit};
use crate::histogram::{fmt_ms, LatencySummary};
use crate::prometheus::Stage;
use crate::resources::CpuUse;
use crate::results::{read_json, BaselineResult, BaselineVariant, ScenarioResult};

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
    let _ = writeln!(out, "\n== {} ({}) {}", r.scenario().name(), r.pace, r.label);
    let params: Vec<String> = r.params.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let _ = writeln!(out, "   {}", params.join(" "));
    let _ = writeln!(out, "-- figures");
    print_figures(&mut out, &figure_map::write_scenario(&r.figures));
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

/// Figures by key, as they are written: the printouts list them in the files' order.
fn print_figures(out: &mut String, figures: &FigureMap) {
    for (k, v) in figures {
        let _ = writeln!(out, "   {k:<44} {:>14}", fmt_num(*v));
    }
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
        let _ = writeln!(out, "   {mark} {} ({})", c.description(), c.detail);
    }
}

/// The detailed printout of one baseline run.
pub fn print_baseline(r: &BaselineResult) {
    let mut out = String::new();
    for v in &r.variants {
        let _ = writeln!(
            out,
            "\n== baseline {} / {}: {} ({} pgbench clients, {} asked)",
            r.scenario.name(),
            v.name,
            v.description,
            v.clients,
            r.requested_clients
        );
        print_figures(&mut out, &figure_map::write_baseline(&v.figures));
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

/// Reads one of a scenario's figures, if it has it.
type Figure = fn(&Figures) -> Option<f64>;
/// Reads one of a baseline variant's figures, if it has it.
type BaselineFigure = fn(&BaselineFigures) -> Option<f64>;

/// A throughput of the table: its title, and how to read it from our figures and from a
/// baseline variant's.
#[derive(Clone, Copy)]
struct Column {
    title: &'static str,
    ours: Figure,
    baseline: BaselineFigure,
}

/// What the comparison table shows for a scenario: the headline throughput, a second
/// throughput, and the latency.
struct Columns {
    headline: Column,
    second: Option<Column>,
    latency: &'static str,
}

fn columns(scenario: Scenario) -> Columns {
    match scenario {
        Scenario::FlashSale => Columns {
            headline: Column {
                title: "coupons issued/s",
                ours: |f| f.flash_sale()?.coupons_issued_per_sec,
                baseline: BaselineFigures::issue_tps,
            },
            second: Some(Column {
                title: "answered/s (tx/s)",
                ours: |f| f.flash_sale().map(|f| f.answered_per_sec),
                baseline: |b| Some(b.tps),
            }),
            latency: "answer (all)",
        },
        Scenario::Checkout => Columns {
            headline: Column {
                title: "orders paid/s",
                ours: |f| f.checkout()?.paid_per_sec,
                baseline: |b| Some(b.tps),
            },
            second: None,
            latency: "POST /orders",
        },
        Scenario::Browse => Columns {
            headline: Column {
                title: "requests/s",
                ours: |f| f.browse().map(|f| f.requests_per_sec),
                // pgbench has no baseline of reads.
                baseline: |_| None,
            },
            second: None,
            latency: "all",
        },
    }
}

/// The median over `results` of a figure, from those that have it.
fn median_figure<'a>(
    results: impl IntoIterator<Item = &'a ScenarioResult>,
    figure: impl Fn(&Figures) -> Option<f64>,
) -> Option<f64> {
    median(results.into_iter().filter_map(|r| figure(&r.figures)).collect())
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
            if let Some(headline) = (columns(result.scenario()).headline.ours)(&result.figures) {
                pairs.push((headline, baseline.clone()));
            }
            baselines.push(baseline);
        }
        ours.push(result);
    }
    let Some(first) = ours.first() else {
        anyhow::bail!("no runs given");
    };
    let cols = columns(first.scenario());
    let fig = |figure: &dyn Fn(&Figures) -> Option<f64>| median_figure(&ours, figure);
    let lat = |key: &str| {
        median_latency(
            &ours
                .iter()
                .filter_map(|r| r.latencies.get(key).copied())
                .collect::<Vec<_>>(),
        )
    };

    let peer_results: Vec<&ScenarioResult> = peers.iter().map(|(_, peer)| peer).collect();
    let peer_fig =
        |figure: &dyn Fn(&Figures) -> Option<f64>| median_figure(peer_results.iter().copied(), figure);
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
        headline: fig(&cols.headline.ours),
        ratio: None,
        second: cols.second.and_then(|c| fig(&c.ours)),
        latency: lat(cols.latency),
        violations: ours.iter().map(|r| r.violations).sum(),
    }];
    if let Some(peer) = peer_results.first() {
        lines.push(Line {
            system: "sync HTTP peer (peer)".to_owned(),
            clients: peer.params.get("concurrency").cloned().unwrap_or_default(),
            headline: peer_fig(&cols.headline.ours),
            ratio: median_ratio(peers.iter().map(|(ours, peer)| {
                let headline = cols.headline.ours;
                (headline(&ours.figures), headline(&peer.figures))
            })),
            second: cols.second.and_then(|c| peer_fig(&c.ours)),
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
        let vfig = |figure: BaselineFigure| median(runs.iter().filter_map(|v| figure(&v.figures)).collect());
        lines.push(Line {
            system: format!("sync baseline: {name}"),
            clients: runs.first().map(|v| v.clients.to_string()).unwrap_or_default(),
            headline: vfig(cols.headline.baseline),
            ratio: median(
                pairs
                    .iter()
                    .filter_map(|(ours, b)| {
                        let variant = b.variants.iter().find(|v| &v.name == name)?;
                        let theirs = (cols.headline.baseline)(&variant.figures)?;
                        (theirs > 0.0).then(|| ours / theirs)
                    })
                    .collect(),
            ),
            second: cols.second.and_then(|c| vfig(c.baseline)),
            latency: median_latency(&runs.iter().map(|v| v.latency).collect::<Vec<_>>()),
            violations: runs.iter().map(|v| v.violations).sum(),
        });
    }

    let mut out = String::new();
    let runs = ours.len();
    let _ = writeln!(
        out,
        "\n{}: {}, {} run{}{}",
        first.scenario().name(),
        first.pace,
        runs,
        if runs == 1 { "" } else { "s" },
        if runs > 1 { ", medians" } else { "" }
    );
    let params: Vec<String> = first.params.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let _ = writeln!(out, "{}", params.join(" "));
    let second_title = cols.second.map_or("", |c| c.title);
    let _ = writeln!(
        out,
        "{:<48} {:>7} {:>17} {:>9} {:>17} {:>30} {:>10}",
        "system",
        "clients",
        cols.headline.title,
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
            cols.headline.title
        );
    }
    let extra: &[(&str, &str)] = match first.scenario() {
        Scenario::FlashSale => &[(
            "accept to settled (DB)",
            "ours: accept to settled, per request (DB)",
        )],
        Scenario::Checkout => &[
            ("POST /orders/{id}/payment", "ours: payment accept latency"),
            ("accept to paid (DB)", "ours: order accepted to paid (DB)"),
            ("journey (client)", "ours: whole journey with polling (client)"),
        ],
        Scenario::Browse => &[],
    };
    for (key, label) in extra {
        if let Some(l) = lat(key) {
            let _ = writeln!(out, "{label:<66} ms p50/p90/p99/max {}", l.compact());
        }
    }
    let peer_extra: &[(&str, &str)] = match first.scenario() {
        Scenario::Checkout => &[
            ("POST /orders/{id}/payment", "peer: payment latency (settled)"),
            ("accept to paid (DB)", "peer: order placed to paid (DB)"),
            ("journey (client)", "peer: whole journey (client)"),
        ],
        Scenario::FlashSale | Scenario::Browse => &[],
    };
    for (key, label) in peer_extra {
        if let Some(l) = peer_lat(key) {
            let _ = writeln!(out, "{label:<66} ms p50/p90/p99/max {}", l.compact());
        }
    }
    for (unit, label) in [
        (
            WorkUnit::PaidOrder,
            "PostgreSQL commits per paid order (ours / peer)",
        ),
        (WorkUnit::Request, "PostgreSQL commits per request (ours / peer)"),
    ] {
        let commits = |f: &Figures| f.db_per(unit).map(|cost| cost.commits);
        if let (Some(o), Some(p)) = (fig(&commits), peer_fig(&commits)) {
            let _ = writeln!(out, "{label:<66} {} / {}", fmt_num(o), fmt_num(p));
        }
    }
    let ours_only: [(Figure, &str); 3] = [
        (
            |f| f.flash_sale()?.accept_to_settled_seconds,
            "ours: first accept to last settled, s",
        ),
        (
            |f| f.flash_sale().map(|f| f.accepted_per_sec),
            "ours: 202 answers/s",
        ),
        (
            |f| f.checkout().map(|f| f.journeys_per_sec),
            "ours: journeys completed/s (client)",
        ),
    ];
    for (figure, label) in ours_only {
        if let Some(v) = fig(&figure) {
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
