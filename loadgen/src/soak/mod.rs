//! `soak`: the whole system under a steady mixed load for a long while, watched for what
//! grows.
//!
//! It starts the system from its release binaries as the fault suite does (two api
//! replicas, worker replicas, the batch, the data-platform stand-in) on a database and an
//! AMQP prefix of its own, runs a flash sale, a checkout and browsing at once at steady
//! rates for the chosen time, and samples every few seconds what a leak would make grow.
//! After the load it runs each load's own checks, the invariants of the whole database and
//! the consistency audit, writes the samples (CSV) and the chart (PNG), prints the figures,
//! stops every process and removes the database and the queues. It fails on a figure grown
//! past its bound after the warm-up ([`bounds`]), a broken invariant, a process that exited
//! or did not stop gracefully.
//!
//! - [`load`]: the three loads and their rates.
//! - [`sample`]: what is sampled, and the CSV.
//! - [`bounds`]: the warm-up and the bounds.
//! - [`chart`]: the PNG.

pub mod bounds;
pub mod chart;
pub mod load;
pub mod sample;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use chrono::Utc;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

use crate::checks;
use crate::cli::SoakArgs;
use crate::client::Api;
use crate::faults::system::System;
use crate::histogram::LatencyTap;
use crate::scenarios::{browse, checkout, flash_sale};
use sample::{Sampler, Sources, LOADGEN_APPLICATION};

/// How long the apis may take to start (the first creates and migrates the database).
const STARTUP: Duration = Duration::from_secs(90);

pub async fn run(args: &SoakArgs) -> anyhow::Result<()> {
    let stamp = Utc::now().format("%Y%m%dT%H%M%SZ").to_string();
    let tag = stamp.to_lowercase();
    let database = format!("soak_{tag}");
    let prefix = format!("soak.{tag}.");
    let server = args.pg_server.trim_end_matches('/');
    let database_url = format!("{server}/{database}");
    std::fs::create_dir_all(&args.out_dir)
        .with_context(|| format!("cannot create {}", args.out_dir.display()))?;
    say(&format!(
        "{:.1} minutes of load; database {database}, AMQP prefix {prefix}, results in {}",
        args.duration().as_secs_f64() / 60.0,
        args.out_dir.display()
    ));
    let env = vec![
        ("DATABASE_URL".to_owned(), database_url.clone()),
        ("AMQP_URL".to_owned(), args.amqp_url.clone()),
        ("AMQP_PREFIX".to_owned(), prefix.clone()),
        ("ADMIN_TOKEN".to_owned(), args.admin_token.clone()),
        ("COMMAND_PARTITIONS".to_owned(), args.partitions.to_string()),
    ];
    let mut system = System::new(&args.bin_dir, &args.out_dir.join("logs"), env)?;
    let outcome = soak(args, &mut system, &database_url).await;
    let stopped = system.stop_all().await;
    let unclean: Vec<String> = stopped
        .iter()
        .filter(|s| !s.clean())
        .map(|s| s.describe())
        .collect();
    if args.keep {
        say(&format!("kept database {database} and AMQP prefix {prefix}"));
    } else {
        clean_up(args, &database, &prefix).await;
    }
    let mut failures = match outcome {
        Ok(failures) => failures,
        Err(e) => vec![format!("{e:#}")],
    };
    if !unclean.is_empty() {
        failures.push(format!("not a graceful stop at the end: {}", unclean.join(", ")));
    }
    if failures.is_empty() {
        say("passed");
        return Ok(());
    }
    for failure in &failures {
        say(&format!("FAILED: {failure}"));
    }
    bail!("the soak failed: {}", failures.join("; "))
}

/// Starts the system, runs the load while sampling, checks; what failed.
async fn soak(args: &SoakArgs, system: &mut System, database_url: &str) -> anyhow::Result<Vec<String>> {
    let api_metrics = system.fix_api_metrics_addrs()?;
    system.start_apis()?;
    let api = Api::new(&system.api_url(), &args.admin_token, 4, Duration::from_secs(10))?;
    api.wait_until_ready(STARTUP).await?;
    // The api has created and migrated the database: the others can start.
    for _ in 0..args.workers.max(1) {
        system.start_worker()?;
    }
    system.start_batch()?;
    system.start_data_platform()?;
    let processes = system.pids();
    let names: Vec<String> = processes.iter().map(|(name, _)| name.clone()).collect();
    // The load generator's connections are named, so that they are not counted as the
    // system's.
    let loadgen_url = format!("{database_url}?application_name={LOADGEN_APPLICATION}");
    let db = PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(10))
        .connect(&loadgen_url)
        .await
        .with_context(|| format!("cannot connect to {database_url}"))?;

    let tap = Arc::new(LatencyTap::new(load::REQUEST_LABELS));
    let loads = load::loads(args, &system.api_url(), &loadgen_url, &args.out_dir, &tap);
    say(&format!(
        "load: flash sale {}/s, checkout {} journeys/s, browsing {}/s (about {:.0} requests/s); {} workers",
        args.flash_rate,
        args.checkout_rate,
        args.browse_rate,
        load::requests_per_sec(args),
        args.workers.max(1)
    ));
    let running = async {
        tokio::join!(
            flash_sale::run(&loads.flash),
            checkout::run(&loads.checkout),
            browse::run(&loads.browse),
        )
    };
    let every = Duration::from_secs(args.sample_secs.max(1));
    let sampled = async {
        // Setup of the three loads takes a moment; the clock starts with the last of them.
        for started in &loads.started {
            tokio::time::timeout(STARTUP, started.notified())
                .await
                .context("the loads did not start")?;
        }
        say("load started");
        let sources = Sources {
            processes: processes.clone(),
            db: db.clone(),
            api: api.clone(),
            api_metrics: api_metrics.clone(),
            tap: Arc::clone(&tap),
        };
        let sampler = Sampler::start(sources, every, args.duration())?;
        anyhow::Ok(sampler.finish().await)
    };
    let ((flash, shop, reads), samples) = tokio::join!(running, sampled);
    let mut failures = Vec::new();
    for (load, result) in [("flash sale", flash), ("checkout", shop), ("browsing", reads)] {
        if let Err(e) = result {
            failures.push(format!("{load}: {e:#}"));
        }
    }
    let samples = samples?;

    let exited = system.exited();
    if !exited.is_empty() {
        failures.push(format!("exited by themselves: {}", exited.join(", ")));
    }
    failures.extend(invariants(&db, &api).await?);

    let warmup = bounds::warmup_samples(samples.len(), every.as_secs_f64(), args.duration().as_secs_f64());
    let warmup_end = samples.get(warmup).map_or(0.0, |s| s.at_secs);
    let figures = bounds::judge(&names, &samples, warmup);
    sample::write_csv(&args.out_dir.join("samples.csv"), &processes, &samples)?;
    let title = format!(
        "Soak {}: {:.1} min at about {:.0} requests/s, {} api, {} workers (warm-up to the dashed line)",
        Utc::now().format("%Y-%m-%d"),
        args.duration().as_secs_f64() / 60.0,
        load::requests_per_sec(args),
        names.iter().filter(|n| n.starts_with("api")).count(),
        args.workers.max(1)
    );
    let png = args.out_dir.join("soak.png");
    chart::draw(&png, &title, &names, &samples, warmup_end)?;
    println!(
        "\nsoak: {} samples every {} s, warm-up {} samples (to +{warmup_end:.0} s); {} and {}",
        samples.len(),
        every.as_secs(),
        warmup,
        args.out_dir.join("samples.csv").display(),
        png.display()
    );
    print!("{}", bounds::table(&figures));
    println!("{}", latency_line(&samples[warmup.min(samples.len())..]));
    for f in figures.iter().filter(|f| !f.passed()) {
        failures.push(format!(
            "{} grew from {:.1} to {:.1} after the warm-up (limit {:.1})",
            f.what, f.after_warmup, f.end, f.limit
        ));
    }
    if samples.len() < warmup + 3 {
        failures.push(format!("only {} samples: too few to judge growth", samples.len()));
    }
    Ok(failures)
}

/// The whole-system invariants and the consistency audit once the load has settled; each
/// broken one described.
async fn invariants(db: &PgPool, api: &Api) -> anyhow::Result<Vec<String>> {
    crate::faults::wait_for_events(db).await;
    let mut broken = Vec::new();
    let checks = checks::whole_system(db, api).await?;
    for c in checks.into_vec().into_iter().filter(|c| !c.passed) {
        broken.push(format!("invariant violated: {} ({})", c.description(), c.detail));
    }
    for (check, detail) in api.consistency_audit().await? {
        broken.push(format!("consistency audit: {check} ({detail})"));
    }
    if broken.is_empty() {
        say("whole-system invariants hold; the consistency audit finds nothing");
    }
    Ok(broken)
}

/// The latency over the judged samples: the median and the worst of the windows' p50 and
/// p99, and the load's answers per second.
fn latency_line(samples: &[sample::Sample]) -> String {
    let p50: Vec<f64> = samples.iter().filter_map(|s| s.p50_ms).collect();
    let p99: Vec<f64> = samples.iter().filter_map(|s| s.p99_ms).collect();
    let answers: u64 = samples.iter().skip(1).map(|s| s.requests).sum();
    let seconds = match (samples.first(), samples.last()) {
        (Some(first), Some(last)) => last.at_secs - first.at_secs,
        _ => 0.0,
    };
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    let worst = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    format!(
        "  latency after the warm-up, per {}-sample window: p50 median {:.1} ms (worst {:.1}), p99 median {:.1} ms (worst {:.1}); {:.0} answers/s",
        samples.len(),
        median(&p50),
        worst(&p50),
        median(&p99),
        worst(&p99),
        if seconds > 0.0 { answers as f64 / seconds } else { 0.0 }
    )
}

/// Drops the soak's database and deletes its queues.
async fn clean_up(args: &SoakArgs, database: &str, prefix: &str) {
    let admin_url = format!("{}/postgres", args.pg_server.trim_end_matches('/'));
    let dropped = async {
        let db = PgPoolOptions::new()
            .max_connections(1)
            .connect(&admin_url)
            .await?;
        sqlx::query(&format!("DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)"))
            .execute(&db)
            .await?;
        db.close().await;
        anyhow::Ok(())
    };
    if let Err(e) = dropped.await {
        say(&format!("cannot drop database {database}: {e:#}"));
    }
    let topology = crate::amqp_cleanup::topology(prefix, args.partitions);
    let extra = [topology.data_platform_queue()];
    if let Err(e) = crate::amqp_cleanup::delete(&args.amqp_url, &topology, &extra).await {
        say(&format!("cannot delete the queues of {prefix}: {e:#}"));
    }
}

fn say(what: &str) {
    println!("soak: {what}");
}
