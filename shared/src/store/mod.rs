//! PostgreSQL: the pool and the migrations, how domain types are stored, and the statements
//! that more than one binary runs.
//!
//! - [`db`]: the pool and the migrations every binary runs at start.
//! - [`requests`]: request kinds and statuses as `TEXT`, and failing a pending request.
//! - [`invariants`]: invariants of the stored data that several checkers assert.
//! - [`audit`]: the consistency audit, every invariant of the whole database checked at once.
//! - [`connection_budget`]: every process's pool size, added up against `max_connections`.
//! - [`reservations`]: expiry of overdue stock reservations.
//! - [`settlements`]: the notice, per settled batch, that wakes clients waiting for answers.
//! - [`settle_rates`]: each partition's settle rate, kept by its worker with every batch.
//! - [`popular`]: the daily sales rollup and the popular-products snapshot, computed and read.

pub mod audit;
pub mod connection_budget;
pub mod db;
pub mod invariants;
pub mod popular;
pub mod requests;
pub mod reservations;
pub mod settle_rates;
pub mod settlements;
