//! Domain rules and plumbing shared by the `api`, `worker` and `batch` binaries.
//!
//! # Layout
//! - [`domain`]: the rules, without I/O (no PostgreSQL, no RabbitMQ, no runtime): ids,
//!   money and discounts, order states, partitioning, coupon decisions, commands and their
//!   results, events, error codes, tokens, the popular-products ranking.
//! - [`store`]: PostgreSQL: the pool and the migrations, how domain types are stored, and
//!   the statements more than one binary runs.
//! - [`messaging`]: RabbitMQ: the connection, the command topology, publishing commands.
//! - [`config`]: settings read from environment variables, with defaults that work on a
//!   developer machine.
//! - [`telemetry`]: tracing setup, as text for people or JSON for log shippers.
//! - [`metric_help`]: the `# HELP` text of every metric the binaries emit.
//! - [`shutdown`]: SIGTERM and Ctrl-C turned into one cancellation token.

pub mod config;
pub mod domain;
pub mod messaging;
pub mod metric_help;
pub mod shutdown;
pub mod store;
pub mod telemetry;
