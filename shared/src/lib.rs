//! Domain rules and plumbing shared by the `api`, `worker` and `batch` binaries.
//!
//! # Layout
//! - [`config`]: settings read from environment variables, with defaults that work on a
//!   developer machine.
//! - [`telemetry`]: tracing setup, as text for people or JSON for log shippers.
//! - [`metric_help`]: the `# HELP` text of every metric the binaries emit.
//! - [`db`]: the PostgreSQL pool and the migrations every binary runs at start.
//! - [`connection_budget`]: every process's pool size, added up against `max_connections`.
//! - [`broker`]: the RabbitMQ connection, re-established on demand after the broker restarts.
//! - [`shutdown`]: SIGTERM and Ctrl-C turned into one cancellation token.
//! - [`error`]: the contract's machine-readable error codes and error body.
//! - [`events`]: the `order.paid` event to the data platform, as a type.
//! - [`domain`]: ids, money and the other rules that need no I/O.
//! - [`identity`]: customer bearer tokens: how they are made and how they are stored.
//! - [`command`]: asynchronous requests and the messages that carry them.
//! - [`coupon`]: who gets a coupon from a batch of issue requests.
//! - [`partition`]: which partition a key goes to, which replica owns a partition.
//! - [`topology`]: the command exchanges and partition queues.
//! - [`money`]: order totals and coupon discounts.
//! - [`reservations`]: expiry of overdue stock reservations.
//! - [`settlements`]: the notice, per settled batch, that wakes clients waiting for answers.
//! - [`popular`]: the daily sales rollup and the popular-products ranking, computed and read.

pub mod broker;
pub mod command;
pub mod config;
pub mod connection_budget;
pub mod coupon;
pub mod db;
pub mod domain;
pub mod error;
pub mod events;
pub mod identity;
pub mod metric_help;
pub mod money;
pub mod order;
pub mod partition;
pub mod popular;
pub mod reservations;
pub mod settlements;
pub mod shutdown;
pub mod telemetry;
pub mod topology;

#[cfg(feature = "test-support")]
pub mod testing;
