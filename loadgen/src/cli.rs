//! The command line: one subcommand per scenario, the baseline, the report and the cleanup;
//! and the options of the fault suite (the `faults` binary).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use tokio::sync::Notify;

use crate::schedule::Pace;

#[derive(Debug, Parser)]
#[command(
    name = "loadgen",
    version,
    about = "Load generator and benchmarks of the order pipeline"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// One hot coupon, many users at once, with client retries and second attempts.
    FlashSale(FlashSaleArgs),
    /// Each user orders, waits for the reservation, pays and waits for the payment.
    Checkout(CheckoutArgs),
    /// Catalogue and balance reads.
    Browse(BrowseArgs),
    /// The synchronous baseline: the same per-request transaction with pgbench.
    Baseline(BaselineArgs),
    /// Prints results side by side with the baseline (medians over several runs).
    Report(ReportArgs),
    /// Deletes the RabbitMQ queues and exchanges of one AMQP_PREFIX.
    CleanupAmqp(CleanupArgs),
    /// The soak: a steady mixed load (flash sale, checkout, browsing) for a long while on the
    /// whole system, sampling every process's memory and descriptors, PostgreSQL
    /// connections, queues, pending requests, waits and latency; fails on growth past a
    /// bound after a warm-up, or on a broken invariant at the end.
    Soak(SoakArgs),
}

/// What every scenario needs: where the system is, and how hard to push it.
#[derive(Debug, Clone, Args)]
pub struct Common {
    /// Base URL of the api; several replicas' separated by commas, and clients spread
    /// their requests over them in turn.
    #[arg(long, env = "LOADGEN_API_URL", default_value = "http://127.0.0.1:8080")]
    pub api: String,
    /// flash-sale and checkout: send the three commands (coupon issue, order creation,
    /// payment) to the synchronous peer (the `peer` binary) instead, whose answer is final;
    /// setup, administration and reads still go to `--api`, on the same database, with no
    /// workers.
    #[arg(long)]
    pub commands_url: Option<String>,
    /// The api's database, for setup and for the checks.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:15432/ecommerce"
    )]
    pub database_url: String,
    /// Bearer token of the /admin routes.
    #[arg(long, env = "ADMIN_TOKEN", default_value = "dev-admin-token")]
    pub admin_token: String,
    /// Concurrent clients (closed loop), or most requests in flight (open loop).
    #[arg(long, short = 'c', default_value_t = 200)]
    pub concurrency: usize,
    /// Open loop: requests (checkout: journeys) per second, sent at fixed intervals whatever
    /// the answers; latency counts from the scheduled time. Without it: closed loop.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Seed of the random choices (order of users, products), so runs are repeatable.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// A request that takes longer than this counts as failed.
    #[arg(long, default_value_t = 30)]
    pub request_timeout_secs: u64,
    /// Commands sent before the measured run (checkout: half as many journeys), on their
    /// own users, coupon and products, followed by ANALYZE, so that PostgreSQL plans with
    /// statistics of tables that hold rows, as in a system that has been running. 0 measures
    /// a cold database that was never analyzed.
    #[arg(long, default_value_t = 2_000)]
    pub warmup: usize,
    /// Give up waiting for accepted commands to settle after this long.
    #[arg(long, default_value_t = 120)]
    pub drain_timeout_secs: u64,
    /// `/metrics` URL of the api (its `API_METRICS_ADDR`, apart from the public address), for
    /// the per-stage breakdown.
    #[arg(long, env = "API_METRICS_URL")]
    pub api_metrics: Option<String>,
    /// `/metrics` URLs of worker replicas, for the per-stage breakdown (comma separated).
    #[arg(long, value_delimiter = ',')]
    pub worker_metrics: Vec<String>,
    /// Processes to account CPU time and peak RSS for, as `name=pid` (comma separated).
    #[arg(long = "process", value_delimiter = ',')]
    pub processes: Vec<String>,
    /// A free-form label carried into the result (e.g. `workers=2`).
    #[arg(long, default_value = "")]
    pub label: String,
    /// Where to write the result as JSON.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Seconds to wait before and after the load before reading PostgreSQL's counters
    /// (commits, rows, WAL): an idle backend reports its statistics up to 10 s late
    /// (`PGSTAT_IDLE_INTERVAL`).
    #[arg(long, default_value_t = 11)]
    pub statistics_delay_secs: u64,
    /// Behave as a client of a degraded system: for up to this many seconds, send a request
    /// again with the same Idempotency-Key when it got no answer, 429, 502, 503, 504 or
    /// 409 ERR_IDEMPOTENCY_KEY_IN_USE. 0 (benchmarks): every answer counts as it is.
    #[arg(long, default_value_t = 0)]
    pub patience_secs: u64,
    /// Told when the measured load starts (the fault suite times its faults by it).
    #[arg(skip)]
    pub load_started: Option<Arc<Notify>>,
    /// Where clients write down their `503` answers (the fault suite times them).
    #[arg(skip)]
    pub unavailable: Option<Arc<crate::client::Unavailable>>,
    /// Where latencies also go as they are recorded (the soak reads them every sample).
    #[arg(skip)]
    pub latency_tap: Option<Arc<crate::histogram::LatencyTap>>,
}

impl Common {
    pub fn pace(&self) -> Pace {
        match self.rate {
            Some(rate) => Pace::Open {
                rate,
                max_in_flight: self.concurrency.max(1),
            },
            None => Pace::Closed {
                concurrency: self.concurrency.max(1),
            },
        }
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs.max(1))
    }

    pub fn drain_timeout(&self) -> Duration {
        Duration::from_secs(self.drain_timeout_secs)
    }
}

#[derive(Debug, Clone, Args)]
pub struct FlashSaleArgs {
    #[command(flatten)]
    pub common: Common,
    /// Distinct users asking for the coupon.
    #[arg(long, short = 'u', default_value_t = 20_000)]
    pub users: usize,
    /// Coupons on sale.
    #[arg(long, short = 'q', default_value_t = 5_000)]
    pub quantity: i64,
    /// Share of requests sent again with the same Idempotency-Key (a client retry).
    #[arg(long, default_value_t = 0.10)]
    pub retry_share: f64,
    /// Share of users who ask a second time, with a new key.
    #[arg(long, default_value_t = 0.05)]
    pub second_attempt_share: f64,
}

#[derive(Debug, Clone, Args)]
pub struct CheckoutArgs {
    #[command(flatten)]
    pub common: Common,
    /// Users; each places and pays one order.
    #[arg(long, short = 'u', default_value_t = 5_000)]
    pub users: usize,
    /// Products the orders are spread over.
    #[arg(long, short = 'p', default_value_t = 50)]
    pub products: usize,
    /// Share of users who hold a coupon and pay with it.
    #[arg(long, default_value_t = 0.2)]
    pub coupon_share: f64,
    /// Share of users who first charge their balance (`POST /users/{id}/balance/charge`
    /// with an `Idempotency-Key`), so that charges and their keys are exercised too.
    #[arg(long, default_value_t = 0.0)]
    pub charge_share: f64,
    /// Where the check of one `order.paid` per paid order finds the events the relay
    /// published (it deletes them from the outbox): `tap`, a queue of the run's own bound to
    /// the events exchange before the load; `data-platform`, the `received_events` of the
    /// data-platform stand-in (`worker data-platform`), which must then run. Ignored with
    /// `--commands-url`: nothing publishes the peer's events.
    #[arg(long, value_enum, default_value_t = EventsSeenBy::Tap)]
    pub events_seen_by: EventsSeenBy,
    /// RabbitMQ, for the tap.
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:15682/%2f"
    )]
    pub amqp_url: String,
    /// The `AMQP_PREFIX` the api and workers run with, for the tap.
    #[arg(long, env = "AMQP_PREFIX", default_value = "")]
    pub amqp_prefix: String,
}

/// See [`CheckoutArgs::events_seen_by`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EventsSeenBy {
    Tap,
    DataPlatform,
}

#[derive(Debug, Clone, Args)]
pub struct BrowseArgs {
    #[command(flatten)]
    pub common: Common,
    /// Users whose balance is read.
    #[arg(long, short = 'u', default_value_t = 1_000)]
    pub users: usize,
    /// Products in the catalogue.
    #[arg(long, short = 'p', default_value_t = 100)]
    pub products: usize,
    /// How long to read.
    #[arg(long, default_value_t = 15)]
    pub duration_secs: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BaselineScenario {
    FlashSale,
    Checkout,
}

#[derive(Debug, Clone, Args)]
pub struct BaselineArgs {
    /// Which transaction to run.
    #[arg(value_enum)]
    pub scenario: BaselineScenario,
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:15432/ecommerce"
    )]
    pub database_url: String,
    /// pgbench clients (connections); lowered to what PostgreSQL's max_connections leaves free.
    #[arg(long, short = 'c', default_value_t = 200)]
    pub concurrency: usize,
    /// Also run with this many clients (a synchronous server's connection pool, as large as
    /// the api's: 30); 0 to skip.
    #[arg(long, default_value_t = 30)]
    pub pooled_clients: usize,
    /// Transactions in all, one per distinct user (rounded up to a multiple of the clients).
    #[arg(long, short = 'u', default_value_t = 20_000)]
    pub users: usize,
    /// Flash sale: coupons on sale.
    #[arg(long, short = 'q', default_value_t = 5_000)]
    pub quantity: i64,
    /// Checkout: products.
    #[arg(long, short = 'p', default_value_t = 50)]
    pub products: usize,
    /// Directory of the pgbench scripts.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/pgbench"))]
    pub scripts: PathBuf,
    /// Where to write the result as JSON.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct ReportArgs {
    /// Run directories, each with `scenario.json` and optionally `peer.json` (the same
    /// scenario against the synchronous peer) and `baseline.json`; with several, every
    /// figure is the median over them.
    #[arg(required = true)]
    pub runs: Vec<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct CleanupArgs {
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:15682/%2f"
    )]
    pub amqp_url: String,
    /// The prefix to delete; must not be empty.
    #[arg(long, env = "AMQP_PREFIX")]
    pub prefix: String,
    #[arg(long, env = "COMMAND_PARTITIONS", default_value_t = 16)]
    pub partitions: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Fault {
    /// `kill -9` one of three workers every few seconds, and start it again.
    KillWorkers,
    /// Stop RabbitMQ mid-run, and start it again.
    RestartBroker,
    /// Stop PostgreSQL mid-run, and start it again.
    RestartDatabase,
    /// One worker, then four, then one again (SIGTERM), under load.
    Scale,
    /// SIGTERM to every process mid-run, then start them all again.
    StopEverything,
    /// `kill -9` every process mid-run (the api too, with requests in flight), then start
    /// them all again.
    KillEverything,
    /// On a 3-node RabbitMQ cluster (started with `--cluster`): stop the node that leads
    /// the most partition queues mid-run, keep the load going on the two others, then
    /// start it again.
    LoseBrokerNode,
    /// On the 3-node RabbitMQ cluster: `kill -9` the node that leads the most partition
    /// queues mid-run (no clean shutdown: its connections and queue replicas die with it),
    /// keep the load going on the two others, then start it again.
    KillBrokerNode,
    /// `kill -9` PostgreSQL's postmaster mid-run, and its backends with it (`<services> kill
    /// postgres`), then start it again: crash recovery, not a clean restart.
    KillDatabase,
    /// The workers reach PostgreSQL through a proxy; mid-run every connection open through
    /// it goes silent (nothing forwarded, sockets kept open) while new connections get
    /// through. The workers must notice and go on by themselves.
    SilenceDatabase,
    /// The apis reach RabbitMQ through a proxy; mid-run their connections go silent, as in
    /// silence-database.
    SilenceBroker,
}

#[derive(Debug, Clone, Args)]
pub struct SoakArgs {
    /// How long the load runs.
    #[arg(long, default_value_t = 20.0, conflicts_with = "seconds")]
    pub minutes: f64,
    /// How long the load runs, in seconds (instead of --minutes).
    #[arg(long)]
    pub seconds: Option<f64>,
    /// Seconds between two samples.
    #[arg(long, default_value_t = 10)]
    pub sample_secs: u64,
    /// Where the `api`, `worker` and `batch` binaries are (release builds).
    #[arg(long, env = "FAULTS_BIN_DIR")]
    pub bin_dir: PathBuf,
    /// PostgreSQL server; the soak creates a database of its own there and drops it after.
    #[arg(
        long,
        env = "SOAK_PG_SERVER",
        default_value = "postgres://postgres@127.0.0.1:15432"
    )]
    pub pg_server: String,
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:15682/%2f"
    )]
    pub amqp_url: String,
    #[arg(long, env = "ADMIN_TOKEN", default_value = "dev-admin-token")]
    pub admin_token: String,
    #[arg(long, env = "COMMAND_PARTITIONS", default_value_t = 16)]
    pub partitions: u16,
    /// Worker replicas (next to two api replicas, the batch and the data-platform stand-in).
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Flash sale: coupon requests per second.
    #[arg(long, default_value_t = 40.0)]
    pub flash_rate: f64,
    /// Checkout: journeys (a charge for half of them, an order, its payment) per second.
    #[arg(long, default_value_t = 8.0)]
    pub checkout_rate: f64,
    /// Browsing: reads per second.
    #[arg(long, default_value_t = 40.0)]
    pub browse_rate: f64,
    /// The samples (CSV), the chart (PNG), each load's result and every process's log.
    #[arg(long, default_value = ".run/soak")]
    pub out_dir: PathBuf,
    /// Keep the database and the queues (for inspection).
    #[arg(long)]
    pub keep: bool,
}

impl SoakArgs {
    pub fn duration(&self) -> Duration {
        let seconds = self.seconds.unwrap_or(self.minutes * 60.0);
        Duration::from_secs_f64(seconds.max(1.0))
    }
}

#[derive(Debug, Clone, Args)]
pub struct FaultsArgs {
    /// Scenarios to run, one at a time (default: all, in the order listed here).
    #[arg(long = "fault", value_enum)]
    pub faults: Vec<Fault>,
    /// Where the `api` and `worker` binaries are.
    #[arg(long, env = "FAULTS_BIN_DIR")]
    pub bin_dir: PathBuf,
    /// The script that stops and starts PostgreSQL and RabbitMQ: `<script> stop rabbitmq`,
    /// `<script> stop postgres`, `<script> kill postgres` (`kill -9` of the postmaster), and
    /// `<script>` to start whatever is down and wait for it. It must act on the server of
    /// `--pg-server`.
    #[arg(long, default_value = "scripts/services")]
    pub services: PathBuf,
    /// The script that runs the 3-node RabbitMQ cluster of `lose-broker-node` and
    /// `kill-broker-node`: `<script> start|stop|urls|busiest PREFIX|stop-node N|kill-node
    /// N|start-node N`.
    #[arg(long, default_value = "scripts/cluster")]
    pub cluster: PathBuf,
    /// PostgreSQL server; each scenario gets a database of its own there.
    #[arg(
        long,
        env = "FAULTS_PG_SERVER",
        default_value = "postgres://postgres@127.0.0.1:15432"
    )]
    pub pg_server: String,
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:15682/%2f"
    )]
    pub amqp_url: String,
    #[arg(long, env = "ADMIN_TOKEN", default_value = "dev-admin-token")]
    pub admin_token: String,
    #[arg(long, env = "COMMAND_PARTITIONS", default_value_t = 16)]
    pub partitions: u16,
    /// Seconds of load in each scenario (open loop); the faults fall inside them.
    /// kill-workers runs 1.5 times as long, to kill each of its three replicas once.
    #[arg(long, default_value_t = 24)]
    pub load_secs: u64,
    /// Flash sale: coupon requests per second.
    #[arg(long, default_value_t = 150.0)]
    pub flash_rate: f64,
    /// Checkout: journeys (order, then payment) started per second.
    #[arg(long, default_value_t = 15.0)]
    pub checkout_rate: f64,
    /// How long a dependency stays down when it is restarted: longer than the leases
    /// (`WORKER_LEASE_TTL_MS`, 6 s) and the replicas' presence (5 s), so that a database
    /// outage lets every lease expire and the replicas must take them again.
    #[arg(long, default_value_t = 10)]
    pub outage_secs: u64,
    /// kill-workers: seconds between one recovery and the next kill.
    #[arg(long, default_value_t = 3)]
    pub kill_every_secs: u64,
    /// How long the system may take to recover from one fault before the scenario fails.
    #[arg(long, default_value_t = 60)]
    pub recovery_bound_secs: u64,
    /// A scenario that takes longer than this is stopped and fails.
    #[arg(long, default_value_t = 240)]
    pub scenario_timeout_secs: u64,
    /// The whole suite's limit: a scenario gets at most what is left of it (less 45 s to
    /// stop and clean up), and one that would start with less than 90 s is not run (and
    /// fails the suite).
    #[arg(long, default_value_t = 1080)]
    pub suite_timeout_secs: u64,
    /// Logs of every process and the results, one directory per scenario.
    #[arg(long, default_value = ".run/faults")]
    pub log_dir: PathBuf,
    /// Keep each scenario's database and queues (for inspection).
    #[arg(long)]
    pub keep: bool,
    /// Run the chosen scenarios this many times over, for a fault that fails now and then:
    /// each repetition is a suite of its own (databases, queues, log directory and the
    /// suite's time limit), its outcome printed as it ends, then "N of M passed".
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub repeat: u32,
}
