//! The fault suite, run by the `faults` binary over the rest of this library: its loads,
//! their patient clients and their checks.
//!
//! Each scenario gets a database and an AMQP prefix of its own and starts the system from
//! its release binaries (api, worker replicas, the batch, the data-platform stand-in). It
//! runs a flash sale and a checkout at once, open loop, with patient clients (they send a
//! request again with the same `Idempotency-Key` when there was no answer or a
//! 429/502/503/504, as the contract asks of clients), and injects its fault during the
//! load. Once the load has settled it runs each load's own checks, then the invariants of
//! the whole database and the events check, and prints how long the system took to
//! recover from each fault.
//!
//! A scenario that breaks an invariant, does not recover within the bound, has a process
//! that does not stop gracefully on SIGTERM, or does not end within its time limit fails
//! the suite; the next scenario still runs, while the suite's own time limit lasts.
//!
//! - [`system`]: the processes under test, started, stopped and killed.
//! - [`recovery`]: when the system is whole again after a fault.
//! - [`repeat`]: the suite run several times over (`--repeat`).
//! - [`proxy`]: a TCP proxy whose connections can be made to go silent.

pub mod proxy;
pub mod recovery;
pub mod repeat;
pub mod system;

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use chrono::Utc;
use clap::ValueEnum;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::checks;
use crate::cli::{CheckoutArgs, Common, EventsSeenBy, Fault, FaultsArgs, FlashSaleArgs};
use crate::client::{Api, Unavailable};
use crate::scenarios::{checkout, flash_sale};
use proxy::Proxy;
use recovery::Watch;
use system::{Role, System};

/// How long the api may take to start (it creates and migrates the database).
const STARTUP: Duration = Duration::from_secs(90);
/// How long events may take to reach the data platform once the load has settled.
const EVENTS_PATIENCE: Duration = Duration::from_secs(60);
/// How long a patient client keeps sending a request again.
const CLIENT_PATIENCE: Duration = Duration::from_secs(120);
/// Less time than this left in the suite, and a scenario is not started: startup, the
/// longest load (36 s) and its checks.
const MINIMUM_SCENARIO: Duration = Duration::from_secs(90);
/// Kept from a scenario's time for what follows it: every process stopped (each may take
/// its SIGTERM patience, 30 s) and the database and queues removed.
const WIND_DOWN: Duration = Duration::from_secs(45);

impl Fault {
    fn name(self) -> String {
        self.to_possible_value()
            .map(|v| v.get_name().to_owned())
            .unwrap_or_default()
    }

    /// Whether the scenario runs on the 3-node RabbitMQ cluster instead of the single node.
    fn on_cluster(self) -> bool {
        matches!(self, Fault::LoseBrokerNode | Fault::KillBrokerNode)
    }

    /// Which processes reach which server through the scenario's proxy, by which variable.
    fn through_proxy(self) -> Option<(Role, &'static str)> {
        match self {
            Fault::SilenceDatabase => Some((Role::Worker, "DATABASE_URL")),
            Fault::SilenceBroker => Some((Role::Api, "AMQP_URL")),
            _ => None,
        }
    }

    /// Worker replicas when the load starts.
    fn workers_at_start(self) -> usize {
        match self {
            Fault::Scale => 1,
            _ => 3,
        }
    }

    /// How long this scenario's load lasts. A kill is only over once the victim's leases
    /// have expired (`WORKER_LEASE_TTL_MS`, 6 s), so killing each of the three replicas in
    /// turn takes half as long again as the other faults.
    fn load(self, args: &FaultsArgs) -> Duration {
        let load = Duration::from_secs(args.load_secs.max(1));
        match self {
            Fault::KillWorkers => load.mul_f64(1.5),
            _ => load,
        }
    }
}

/// One fault and how the system came back from it.
struct Event {
    /// Seconds since the load started.
    at: f64,
    what: String,
    /// From the repair to whole again; or what was seen when the bound ran out.
    recovery: Result<Duration, recovery::State>,
}

/// How one scenario went.
struct Outcome {
    fault: Fault,
    seconds: f64,
    events: Vec<Event>,
    violations: usize,
    error: Option<String>,
    /// Figures the scenario measured besides its recoveries, printed under the table.
    figures: Vec<String>,
}

impl Outcome {
    fn passed(&self) -> bool {
        self.error.is_none() && self.violations == 0 && self.events.iter().all(|e| e.recovery.is_ok())
    }
}

/// The command line of the `faults` binary.
#[derive(Debug, clap::Parser)]
#[command(
    name = "faults",
    version,
    about = "The fault suite: a flash sale and a checkout under worker kills, broker and database \
             restarts, scaling, and a stop and a kill of everything, with the invariants checked \
             after each"
)]
pub struct Cli {
    #[command(flatten)]
    pub args: FaultsArgs,
}

pub async fn run(args: &FaultsArgs) -> anyhow::Result<()> {
    if args.repeat <= 1 {
        return suite(args, None).await;
    }
    repeat::run(args.repeat, |repetition| suite(args, Some(repetition))).await
}

/// The chosen scenarios once; `repetition` names the run's databases, queues and logs apart
/// from the other repetitions'.
async fn suite(args: &FaultsArgs, repetition: Option<u32>) -> anyhow::Result<()> {
    let faults = if args.faults.is_empty() {
        Fault::value_variants().to_vec()
    } else {
        args.faults.clone()
    };
    let mut stamp = Utc::now().format("%Y%m%dT%H%M%SZ").to_string();
    if let Some(repetition) = repetition {
        stamp.push_str(&format!("_r{repetition}"));
    }
    let series = args.log_dir.join(&stamp);
    // The suite as a whole is bounded too: each scenario gets its own limit or what is left
    // of the suite's, whichever is less, and one that would start with too little left is
    // not run (and fails the suite).
    let suite_ends = Instant::now() + Duration::from_secs(args.suite_timeout_secs);
    let mut outcomes = Vec::new();
    for fault in faults {
        let left = suite_ends
            .saturating_duration_since(Instant::now())
            .saturating_sub(WIND_DOWN);
        let bound = left.min(Duration::from_secs(args.scenario_timeout_secs));
        let outcome = if bound < MINIMUM_SCENARIO {
            say(&fault.name(), "not run: the suite's time limit is reached");
            Outcome {
                fault,
                seconds: 0.0,
                events: Vec::new(),
                violations: 0,
                error: Some(format!(
                    "not run within the suite's {} s",
                    args.suite_timeout_secs
                )),
                figures: Vec::new(),
            }
        } else {
            scenario(args, fault, &series, &stamp, bound).await
        };
        outcomes.push(outcome);
    }

    println!("\nfault suite ({}):", series.display());
    println!(
        "  {:<18} {:>8} {:>7} {:>14} {:>10}  result",
        "scenario", "seconds", "faults", "max recovery", "violated"
    );
    for o in &outcomes {
        let worst = o
            .events
            .iter()
            .filter_map(|e| e.recovery.as_ref().ok())
            .max()
            .map_or("-".to_owned(), |d| format!("{:.1} s", d.as_secs_f64()));
        let result = match (&o.error, o.passed()) {
            (Some(e), _) => format!("FAILED: {e}"),
            (None, true) => "passed".to_owned(),
            (None, false) => "FAILED".to_owned(),
        };
        println!(
            "  {:<18} {:>8.0} {:>7} {:>14} {:>10}  {result}",
            o.fault.name(),
            o.seconds,
            o.events.len(),
            worst,
            o.violations
        );
    }
    for o in &outcomes {
        for figure in &o.figures {
            println!("  {}: {figure}", o.fault.name());
        }
    }
    let failed = outcomes.iter().filter(|o| !o.passed()).count();
    if failed > 0 {
        bail!("{failed} of {} fault scenarios failed", outcomes.len());
    }
    Ok(())
}

/// One scenario, from a fresh database to its removal, whatever happens in between.
async fn scenario(args: &FaultsArgs, fault: Fault, series: &Path, stamp: &str, bound: Duration) -> Outcome {
    let name = fault.name();
    let started = Instant::now();
    let tag = format!("{}_{}", stamp.to_lowercase(), name.replace('-', "_"));
    let database = format!("faults_{tag}");
    let prefix = format!("faults.{tag}.");
    let database_url = format!("{}/{database}", args.pg_server.trim_end_matches('/'));
    let log_dir = series.join(&name);
    say(
        &name,
        &format!(
            "database {database}, AMQP prefix {prefix}, logs in {}",
            log_dir.display()
        ),
    );

    let mut events = Vec::new();
    let mut figures = Vec::new();
    let mut violations = 0;
    let cluster = if fault.on_cluster() {
        match Cluster::start(&args.cluster, &prefix).await {
            Ok(cluster) => {
                say(&name, &format!("on the 3-node RabbitMQ cluster {}", cluster.urls));
                Some(cluster)
            }
            Err(e) => {
                return Outcome {
                    fault,
                    seconds: started.elapsed().as_secs_f64(),
                    events,
                    violations,
                    error: Some(format!("cannot start the RabbitMQ cluster: {e:#}")),
                    figures,
                };
            }
        }
    } else {
        None
    };
    let amqp_url = cluster
        .as_ref()
        .map_or_else(|| args.amqp_url.clone(), |c| c.urls.clone());
    let env = vec![
        ("DATABASE_URL".to_owned(), database_url.clone()),
        ("AMQP_URL".to_owned(), amqp_url.clone()),
        ("AMQP_PREFIX".to_owned(), prefix.clone()),
        ("ADMIN_TOKEN".to_owned(), args.admin_token.clone()),
        // One api at a time here, but the port of a killed one may linger.
        ("API_METRICS_ADDR".to_owned(), "127.0.0.1:0".to_owned()),
        ("COMMAND_PARTITIONS".to_owned(), args.partitions.to_string()),
    ];
    let system = async {
        let mut system = System::new(&args.bin_dir, &log_dir, env)?;
        let Some((role, variable)) = fault.through_proxy() else {
            return anyhow::Ok((system, None));
        };
        let url = match variable {
            "DATABASE_URL" => database_url.as_str(),
            // The first node: the silence scenarios run on a single broker.
            _ => amqp_url.split(',').next().unwrap_or_default(),
        };
        let proxy = Proxy::start(url).await?;
        say(
            &name,
            &format!("{role:?} processes reach {url} through a proxy on {}", proxy.addr),
        );
        system.set_env_of(role, variable, proxy.url_for(url)?);
        Ok((system, Some(proxy)))
    };
    let error = match system.await {
        Err(e) => Some(format!("{e:#}")),
        Ok((mut system, proxy)) => {
            let exercised = tokio::time::timeout(
                bound,
                exercise(
                    args,
                    Exercise {
                        fault,
                        cluster: cluster.as_ref(),
                        proxy: proxy.as_ref(),
                        database_url: &database_url,
                        log_dir: &log_dir,
                    },
                    &mut system,
                    &mut events,
                    &mut figures,
                ),
            )
            .await;
            let mut error = match exercised {
                Ok(Ok(v)) => {
                    violations = v;
                    None
                }
                Ok(Err(e)) => Some(format!("{e:#}")),
                Err(_) => Some(format!("did not end within {} s", bound.as_secs())),
            };
            let unclean = unclean(&system.stop_all().await);
            if error.is_none() && !unclean.is_empty() {
                error = Some(format!("not a graceful stop at the end: {unclean}"));
            }
            error
        }
    };
    // A scenario cut short may have left a dependency stopped.
    if let Err(e) = services(&args.services, &[]).await {
        say(&name, &format!("cannot bring the services back: {e:#}"));
    }
    if args.keep {
        say(
            &name,
            &format!("kept database {database} and AMQP prefix {prefix}"),
        );
    } else {
        clean_up(args, &amqp_url, &database, &prefix).await;
    }
    if let Some(cluster) = &cluster {
        // Three more brokers are a heavy load on a small machine: they go with the scenario.
        if let Err(e) = cluster.run(&["stop"]).await {
            say(&name, &format!("cannot stop the RabbitMQ cluster: {e:#}"));
        }
    }
    if let Some(e) = &error {
        say(&name, &format!("FAILED: {e}"));
    }
    Outcome {
        fault,
        seconds: started.elapsed().as_secs_f64(),
        events,
        violations,
        error,
        figures,
    }
}

/// What one scenario runs against.
struct Exercise<'a> {
    fault: Fault,
    cluster: Option<&'a Cluster>,
    proxy: Option<&'a Proxy>,
    database_url: &'a str,
    log_dir: &'a Path,
}

/// The 3-node RabbitMQ cluster, through its script (`scripts/cluster`).
struct Cluster {
    script: std::path::PathBuf,
    /// The nodes' AMQP URLs, comma-separated, as `AMQP_URL` takes them.
    urls: String,
    /// The scenario's queue prefix: whose partition queues count for `busiest`.
    prefix: String,
}

impl Cluster {
    /// Starts the cluster (a no-op for nodes already running) and reads its URLs.
    async fn start(script: &Path, prefix: &str) -> anyhow::Result<Self> {
        let mut cluster = Self {
            script: script.to_owned(),
            urls: String::new(),
            prefix: prefix.to_owned(),
        };
        cluster.run(&["start"]).await?;
        cluster.urls = cluster.run(&["urls"]).await?.trim().to_owned();
        anyhow::ensure!(
            !cluster.urls.is_empty(),
            "{} urls printed nothing",
            script.display()
        );
        Ok(cluster)
    }

    /// The node that leads the most of the scenario's queues.
    async fn busiest(&self) -> anyhow::Result<u8> {
        let printed = self.run(&["busiest", &self.prefix]).await?;
        printed
            .trim()
            .parse()
            .with_context(|| format!("busiest printed {printed:?}, not a node number"))
    }

    /// Runs the script with `args`; what it printed.
    async fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        let output = tokio::process::Command::new(&self.script)
            .args(args)
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .await
            .with_context(|| format!("cannot run {}", self.script.display()))?;
        anyhow::ensure!(
            output.status.success(),
            "{} {} failed: {}",
            self.script.display(),
            args.join(" "),
            output.status
        );
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }
}

/// Starts the system, runs the loads with the fault, checks; the number of violated checks.
async fn exercise(
    args: &FaultsArgs,
    run: Exercise<'_>,
    system: &mut System,
    events: &mut Vec<Event>,
    figures: &mut Vec<String>,
) -> anyhow::Result<usize> {
    let Exercise {
        fault,
        cluster,
        proxy,
        database_url,
        log_dir,
    } = run;
    let name = fault.name();
    system.start_all(fault.workers_at_start())?;
    let api = Api::new(&system.api_url(), &args.admin_token, 8, Duration::from_secs(10))?;
    api.wait_until_ready(STARTUP).await?;
    let db = PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(5))
        .connect(database_url)
        .await
        .with_context(|| format!("cannot connect to {database_url}"))?;
    let watch = Watch {
        api: api.clone(),
        db: db.clone(),
        partitions: i64::from(args.partitions),
    };
    let bound = Duration::from_secs(args.recovery_bound_secs);
    if let Err(state) = watch
        .recovered((Instant::now(), Utc::now()), &system.worker_names(), bound)
        .await
    {
        bail!("the system was not whole before the load: {state}");
    }

    let flash_started = Arc::new(Notify::new());
    let checkout_started = Arc::new(Notify::new());
    let unavailable = Arc::new(Unavailable::default());
    let (flash, shop) = loads(
        args,
        fault.load(args),
        &system.api_url(),
        database_url,
        log_dir,
        (&flash_started, &checkout_started),
        &unavailable,
    );
    let loads = async { tokio::join!(flash_sale::run(&flash), checkout::run(&shop)) };
    let faults = async {
        // Setup of the two loads takes a moment; the clock starts with the later of them.
        tokio::try_join!(
            tokio::time::timeout(STARTUP, flash_started.notified()),
            tokio::time::timeout(STARTUP, checkout_started.notified()),
        )
        .context("the loads did not start")?;
        say(&name, "load started");
        let injection = Injection {
            fault,
            cluster,
            proxy,
            unavailable: &unavailable,
        };
        inject(args, injection, system, &watch, events, figures).await
    };
    let ((flash_result, checkout_result), injected) = tokio::join!(loads, faults);
    let mut failures = injected?;
    for (load, result) in [("flash sale", flash_result), ("checkout", checkout_result)] {
        if let Err(e) = result {
            failures.push(format!("{load}: {e:#}"));
        }
    }

    let exited = system.exited();
    if !exited.is_empty() {
        failures.push(format!("exited by themselves: {}", exited.join(", ")));
    }
    wait_for_events(&db).await;
    let checks = checks::whole_system(&db, &api).await?;
    let violated: Vec<_> = checks.into_vec().into_iter().filter(|c| !c.passed).collect();
    for c in &violated {
        say(&name, &format!("VIOLATED: {} ({})", c.description(), c.detail));
    }
    // The consistency audit the batch runs hourly, through the api: each thing it finds is
    // one more invariant failed.
    let audit = api.consistency_audit().await?;
    for (check, detail) in &audit {
        say(&name, &format!("VIOLATED: consistency audit {check} ({detail})"));
    }
    if violated.is_empty() && audit.is_empty() {
        say(
            &name,
            "whole-system invariants hold; the consistency audit finds nothing",
        );
    }
    if !failures.is_empty() {
        bail!("{}", failures.join("; "));
    }
    Ok(violated.len() + audit.len())
}

/// The two loads: a flash sale and a checkout, sized to last `load` at their rates.
fn loads(
    args: &FaultsArgs,
    load: Duration,
    api: &str,
    database_url: &str,
    log_dir: &Path,
    (flash_started, checkout_started): (&Arc<Notify>, &Arc<Notify>),
    unavailable: &Arc<Unavailable>,
) -> (FlashSaleArgs, CheckoutArgs) {
    let common = |rate: f64, out: &str, started: &Arc<Notify>| Common {
        api: api.to_owned(),
        commands_url: None,
        database_url: database_url.to_owned(),
        admin_token: args.admin_token.clone(),
        concurrency: 200,
        rate: Some(rate),
        seed: 1,
        request_timeout_secs: 30,
        warmup: 0,
        drain_timeout_secs: 180,
        api_metrics: None,
        worker_metrics: Vec::new(),
        processes: Vec::new(),
        label: String::new(),
        out: Some(log_dir.join(out)),
        // The suite reports recoveries and invariants, not PostgreSQL's counters.
        statistics_delay_secs: 0,
        patience_secs: CLIENT_PATIENCE.as_secs(),
        load_started: Some(Arc::clone(started)),
        unavailable: Some(Arc::clone(unavailable)),
        latency_tap: None,
    };
    let seconds = load.as_secs_f64();
    // A flash sale sends about 1.15 requests a user (retries and second attempts). Coupons
    // for nine users in ten: the sale is still selling when the faults come, and sells out
    // before the end, so both answers are exercised.
    let flash_users = ((args.flash_rate * seconds / 1.15) as usize).max(10);
    let flash = FlashSaleArgs {
        common: common(args.flash_rate, "flash-sale.json", flash_started),
        users: flash_users,
        quantity: i64::try_from(flash_users * 9 / 10).unwrap_or(1).max(1),
        retry_share: 0.10,
        second_attempt_share: 0.05,
    };
    let shop = CheckoutArgs {
        common: common(args.checkout_rate, "checkout.json", checkout_started),
        users: ((args.checkout_rate * seconds) as usize).max(1),
        products: 20,
        coupon_share: 0.2,
        charge_share: 0.5,
        // The suite runs the stand-in, and restarts RabbitMQ, which a tap's queue would
        // not survive.
        events_seen_by: EventsSeenBy::DataPlatform,
        amqp_url: String::new(),
        amqp_prefix: String::new(),
    };
    (flash, shop)
}

/// What a fault is injected into, besides the processes.
struct Injection<'a> {
    fault: Fault,
    cluster: Option<&'a Cluster>,
    proxy: Option<&'a Proxy>,
    /// When clients were answered 503.
    unavailable: &'a Unavailable,
}

/// The fault itself, timed from the start of the load. Returns what went wrong without
/// stopping the scenario (a process that did not stop gracefully).
async fn inject(
    args: &FaultsArgs,
    injection: Injection<'_>,
    system: &mut System,
    watch: &Watch,
    events: &mut Vec<Event>,
    figures: &mut Vec<String>,
) -> anyhow::Result<Vec<String>> {
    let Injection {
        fault,
        cluster,
        proxy,
        unavailable,
    } = injection;
    let mut problems = Vec::new();
    let name = fault.name();
    let load_started = Instant::now();
    let load = fault.load(args);
    let bound = Duration::from_secs(args.recovery_bound_secs);
    let outage = Duration::from_secs(args.outage_secs);
    let at = |share: f64| tokio::time::sleep_until(load_started + load.mul_f64(share));
    let mut record = |what: String, recovery: Result<Duration, recovery::State>| {
        let event = Event {
            at: load_started.elapsed().as_secs_f64(),
            what,
            recovery,
        };
        match &event.recovery {
            Ok(d) => say(
                &name,
                &format!(
                    "+{:.1}s recovered from {} in {:.1} s",
                    event.at,
                    event.what,
                    d.as_secs_f64()
                ),
            ),
            Err(state) => say(
                &name,
                &format!(
                    "+{:.1}s NOT recovered from {} within {} s: {state}",
                    event.at,
                    event.what,
                    bound.as_secs()
                ),
            ),
        }
        events.push(event);
    };
    let mark = |what: &str| {
        say(
            &name,
            &format!("+{:.1}s {what}", load_started.elapsed().as_secs_f64()),
        )
    };

    match fault {
        Fault::KillWorkers => {
            // Kill the oldest replica each time (restarted ones join at the end), so each of
            // the three first replicas goes once, in turn; the next kill comes a few seconds
            // after recovery.
            let first = system.worker_names();
            tokio::time::sleep(Duration::from_secs(2)).await;
            let mut victims = Vec::new();
            for _ in 0..first.len() {
                if Instant::now() >= load_started + load {
                    // A kill with no load left to disturb would recover trivially.
                    problems.push("the load ended before each first replica was killed".to_owned());
                    break;
                }
                let victim = system.kill_worker(0).await?;
                let replacement = system.start_worker()?;
                mark(&format!("kill -9 {victim}; started {replacement}"));
                let repaired = (Instant::now(), Utc::now());
                let recovery = watch.recovered(repaired, &system.worker_names(), bound).await;
                let failed = recovery.is_err();
                record(format!("kill -9 {victim}"), recovery);
                victims.push(victim);
                if failed {
                    break;
                }
                tokio::time::sleep(Duration::from_secs(args.kill_every_secs)).await;
            }
            if victims != first {
                problems.push(format!("killed {victims:?}, not each of {first:?} once"));
            }
        }
        Fault::RestartBroker | Fault::RestartDatabase => {
            let (what, service) = match fault {
                Fault::RestartBroker => ("RabbitMQ", "rabbitmq"),
                _ => ("PostgreSQL", "postgres"),
            };
            at(0.3).await;
            mark(&format!("stopping {what}"));
            services(&args.services, &["stop", service]).await?;
            mark(&format!(
                "{what} stopped; starting it again in {} s",
                outage.as_secs()
            ));
            tokio::time::sleep(outage).await;
            services(&args.services, &[]).await?;
            mark(&format!("{what} is back"));
            let repaired = (Instant::now(), Utc::now());
            let recovery = watch.recovered(repaired, &system.worker_names(), bound).await;
            record(format!("a restart of {what}"), recovery);
        }
        Fault::Scale => {
            at(0.2).await;
            let mut added = Vec::new();
            for _ in 0..3 {
                added.push(system.start_worker()?);
            }
            mark(&format!("scaled 1 -> 4: started {}", added.join(", ")));
            let repaired = (Instant::now(), Utc::now());
            let recovery = watch.recovered(repaired, &system.worker_names(), bound).await;
            record("scaling up to 4 workers".to_owned(), recovery);
            at(0.6).await;
            let stopped = system.stop_newest_workers(3).await;
            mark(&format!("scaled 4 -> 1: {}", describe_stops(&stopped)));
            let unclean = unclean(&stopped);
            if !unclean.is_empty() {
                problems.push(format!("scaling down was not graceful: {unclean}"));
            }
            let repaired = (Instant::now(), Utc::now());
            let recovery = watch.recovered(repaired, &system.worker_names(), bound).await;
            record("scaling down to 1 worker".to_owned(), recovery);
        }
        Fault::StopEverything => {
            at(0.3).await;
            let stopped = system.stop_all().await;
            mark(&format!("SIGTERM to every process: {}", describe_stops(&stopped)));
            let unclean = unclean(&stopped);
            if !unclean.is_empty() {
                problems.push(format!("the stop of every process was not graceful: {unclean}"));
            }
            system.start_all(3)?;
            mark("started the apis, 3 workers, the batch and the data-platform stand-in again");
            let repaired = (Instant::now(), Utc::now());
            let recovery = watch.recovered(repaired, &system.worker_names(), bound).await;
            record("a stop of every process".to_owned(), recovery);
        }
        Fault::KillEverything => {
            at(0.3).await;
            let killed = system.kill_all().await;
            mark(&format!("kill -9 every process: {}", killed.join(", ")));
            system.start_all(3)?;
            mark("started the apis, 3 workers, the batch and the data-platform stand-in again");
            let repaired = (Instant::now(), Utc::now());
            let recovery = watch.recovered(repaired, &system.worker_names(), bound).await;
            record("a kill -9 of every process".to_owned(), recovery);
        }
        Fault::LoseBrokerNode | Fault::KillBrokerNode => {
            let cluster = cluster.with_context(|| format!("{name} runs on the cluster"))?;
            let (how, command, done) = match fault {
                Fault::KillBrokerNode => ("kill -9 of", "kill-node", "killed"),
                _ => ("stopping", "stop-node", "stopped"),
            };
            // Asked before the fault's time: on a busy machine the question alone can take
            // seconds, and the leaders do not move while every node runs.
            let node = cluster.busiest().await?;
            at(0.3).await;
            if Instant::now() >= load_started + load {
                problems.push(format!("the load ended before node {node} was {done}"));
            }
            mark(&format!(
                "{how} RabbitMQ node {node}, which leads the most partition queues"
            ));
            let lost = (Instant::now(), Utc::now());
            cluster.run(&[command, &node.to_string()]).await?;
            mark(&format!(
                "node {node} {done}; the load goes on against the two others"
            ));
            // Recovered while the node is still down: that is what quorum queues are for.
            // Timed from the stop, not from a repair: nothing is repaired yet.
            let resettled = watch.recovered(lost, &system.worker_names(), bound).await;
            let took = resettled.as_ref().ok().copied();
            record(format!("the loss ({command}) of RabbitMQ node {node}"), resettled);
            let answered_503 = unavailable.since(lost.0);
            let seen = match answered_503 {
                Some((count, first, last)) => format!(
                    "clients saw 503s for {:.1} s ({count} answers, from +{:.1} s to +{:.1} s after the stop)",
                    (last - first).as_secs_f64(),
                    first.as_secs_f64(),
                    last.as_secs_f64()
                ),
                None => "clients saw no 503".to_owned(),
            };
            let resettled = took.map_or("never".to_owned(), |d| format!("{:.1} s", d.as_secs_f64()));
            mark(&format!(
                "{seen}; every partition settled again {resettled} after the stop"
            ));
            figures.push(format!(
                "node {node} {done} under load: {seen}; every partition settled again after {resettled} (goal: under 10 s each)"
            ));
            // The node comes back while the load still runs, and rejoins.
            at(0.7).await;
            cluster.run(&["start-node", &node.to_string()]).await?;
            mark(&format!("node {node} is back"));
            let repaired = (Instant::now(), Utc::now());
            let recovery = watch.recovered(repaired, &system.worker_names(), bound).await;
            record(format!("the return of RabbitMQ node {node}"), recovery);
        }
        Fault::KillDatabase => {
            at(0.3).await;
            mark("kill -9 of PostgreSQL's postmaster and its backends");
            services(&args.services, &["kill", "postgres"]).await?;
            let killed = Instant::now();
            mark("PostgreSQL killed; starting it again at once (crash recovery)");
            services(&args.services, &[]).await?;
            let back = killed.elapsed();
            mark(&format!(
                "PostgreSQL is back after {:.1} s (crash recovery and start)",
                back.as_secs_f64()
            ));
            let repaired = (Instant::now(), Utc::now());
            let recovery = watch.recovered(repaired, &system.worker_names(), bound).await;
            let took = recovery.as_ref().ok().copied();
            record("a kill -9 of PostgreSQL".to_owned(), recovery);
            figures.push(format!(
                "PostgreSQL answered again {:.1} s after its kill -9; the system was whole {} after that",
                back.as_secs_f64(),
                took.map_or("never".to_owned(), |d| format!("{:.1} s", d.as_secs_f64()))
            ));
        }
        Fault::SilenceDatabase | Fault::SilenceBroker => {
            let proxy = proxy.with_context(|| format!("{name} runs through the proxy"))?;
            let between = match fault {
                Fault::SilenceDatabase => "the workers and PostgreSQL",
                _ => "the apis and RabbitMQ",
            };
            at(0.3).await;
            let silenced = proxy.silence();
            let lost = (Instant::now(), Utc::now());
            mark(&format!(
                "the {silenced} connections between {between} went silent (new ones get through)"
            ));
            // Nothing is repaired: the processes must notice by themselves while the old
            // connections stay silent. Timed from the silence; recovered also means that what
            // was accepted in its first seconds, which went into the silent connections or
            // waited on them, has settled.
            let sent_into_silence = lost.1 + chrono::TimeDelta::seconds(2);
            let recovery = watch
                .recovered((lost.0, sent_into_silence), &system.worker_names(), bound)
                .await;
            let took = recovery.as_ref().ok().copied();
            record(format!("the silence between {between}"), recovery);
            figures.push(format!(
                "connections between {between} silent under load: whole again {} after, while they were still silent",
                took.map_or("never".to_owned(), |d| format!("{:.1} s", d.as_secs_f64()))
            ));
            // The silence ends as a dead peer's does: the server has long forgotten those
            // connections, and their next packet meets a reset.
            proxy.drop_silenced();
            mark("closed the silenced connections");
            let repaired = (Instant::now(), Utc::now());
            let recovery = watch.recovered(repaired, &system.worker_names(), bound).await;
            record(
                format!("the reset of the silent connections between {between}"),
                recovery,
            );
        }
    }
    Ok(problems)
}

fn describe_stops(stopped: &[system::Stopped]) -> String {
    stopped
        .iter()
        .map(system::Stopped::describe)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The processes that did not stop gracefully, described; empty if all did.
fn unclean(stopped: &[system::Stopped]) -> String {
    stopped
        .iter()
        .filter(|s| !s.clean())
        .map(system::Stopped::describe)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Waits until every event is published and the data platform has received one per paid
/// order (or [`EVENTS_PATIENCE`] runs out: the checks then say what is missing).
pub(crate) async fn wait_for_events(db: &PgPool) {
    let deadline = Instant::now() + EVENTS_PATIENCE;
    while Instant::now() < deadline {
        let caught_up: Result<bool, _> = sqlx::query_scalar(
            "SELECT NOT EXISTS (SELECT 1 FROM outbox)
                AND (SELECT count(*) FROM received_events WHERE routing_key = 'order.paid')
                  = (SELECT count(*) FROM orders WHERE status = 'PAID')",
        )
        .fetch_one(db)
        .await;
        if matches!(caught_up, Ok(true)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs the services script with `args` (stop one dependency, or start what is down).
async fn services(script: &Path, args: &[&str]) -> anyhow::Result<()> {
    let status = tokio::process::Command::new(script)
        .args(args)
        .stdin(Stdio::null())
        .status()
        .await
        .with_context(|| format!("cannot run {}", script.display()))?;
    anyhow::ensure!(
        status.success(),
        "{} {} failed: {status}",
        script.display(),
        args.join(" ")
    );
    Ok(())
}

/// Drops the scenario's database and deletes its queues (on the broker at `amqp_url`).
async fn clean_up(args: &FaultsArgs, amqp_url: &str, database: &str, prefix: &str) {
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
        eprintln!("faults: cannot drop database {database}: {e:#}");
    }
    let topology = crate::amqp_cleanup::topology(prefix, args.partitions);
    let extra = [topology.data_platform_queue()];
    if let Err(e) = crate::amqp_cleanup::delete(amqp_url, &topology, &extra).await {
        eprintln!("faults: cannot delete the queues of {prefix}: {e:#}");
    }
}

fn say(scenario: &str, what: &str) {
    println!("faults[{scenario}] {what}");
}
