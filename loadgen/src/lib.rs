//! A load generator for the HTTP contract, and the benchmarks that compare the pipeline with
//! the synchronous design users would otherwise build: a synchronous HTTP server on the same
//! stack (the `peer` crate, driven through `--commands-url`), and the bare transaction in
//! pgbench ([`baseline`]). The fault suite ([`faults`], the `faults` binary) runs these loads
//! under faults.
//!
//! Every scenario sets up what it needs (through SQL where that is not what is measured),
//! drives the measured commands over HTTP, closed loop (`--concurrency` clients, each sending
//! its next request when the last one answered) or open loop (`--rate`: requests scheduled at
//! fixed intervals whatever the answers, latency counted from the scheduled time so that a
//! slow server cannot hide behind its own backlog), waits until every accepted command is
//! settled, and checks the result read back from the API and from PostgreSQL.
//!
//! # Layout
//! - [`cli`]: the command line.
//! - [`client`]: a typed client of the HTTP contract.
//! - [`schedule`]: the load engine: closed loop, or an open-loop constant-rate schedule.
//! - [`histogram`]: latency histograms (HdrHistogram) and their percentiles.
//! - [`setup`]: users, balances, products and coupons for a scenario.
//! - [`scenarios`]: `flash-sale`, `checkout`, `browse`.
//! - [`checks`]: the correctness checks run at the end of every scenario.
//! - [`event_tap`]: a queue of a run's own on the events exchange, where the checkout's
//!   checks count the `order.paid` events the relay published (and deleted from the outbox).
//! - [`baseline`]: the synchronous baseline, run with `pgbench` on scratch tables.
//! - [`prometheus`]: scrapes `/metrics` of the api and the workers for a per-stage breakdown.
//! - [`resources`]: CPU time and peak memory of the processes involved, from `/proc`.
//! - [`db_activity`]: what PostgreSQL's backends wait on during a run, and what it cost
//!   (commits, rows, WAL).
//! - [`figures`]: what each scenario and the baseline measured, as types.
//! - [`figure_map`]: figures as result files hold them, a map by key.
//! - [`results`]: what a run measured and checked, and its result file (JSON).
//! - [`report`]: the printout of a result, and the side-by-side table with the peer and the
//!   baseline.
//! - [`amqp_cleanup`]: deletes the queues and exchanges of a benchmark's `AMQP_PREFIX`.
//! - [`faults`]: the fault suite: the loads under worker kills, broker and database
//!   restarts, scaling, and a stop and a kill of everything, with recovery times and
//!   invariants.
//! - [`soak`]: a steady mixed load for a long while, sampling what could leak (memory,
//!   descriptors, connections, queues, waits) and failing on growth after a warm-up.

pub mod amqp_cleanup;
pub mod baseline;
pub mod checks;
pub mod cli;
pub mod client;
pub mod db_activity;
pub mod event_tap;
pub mod faults;
pub mod figure_map;
pub mod figures;
pub mod histogram;
pub mod prometheus;
pub mod report;
pub mod resources;
pub mod results;
pub mod scenarios;
pub mod schedule;
pub mod setup;
pub mod soak;

use cli::{Cli, Command};

/// Runs one subcommand.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::FlashSale(args) => scenarios::flash_sale::run(&args).await,
        Command::Checkout(args) => scenarios::checkout::run(&args).await,
        Command::Browse(args) => scenarios::browse::run(&args).await,
        Command::Baseline(args) => baseline::run(&args).await,
        Command::Report(args) => report::print_runs(&args),
        Command::CleanupAmqp(args) => amqp_cleanup::run(&args).await,
        Command::Soak(args) => soak::run(&args).await,
    }
}
