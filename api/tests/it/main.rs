//! The integration tests of `api`, as one test binary: each binary links the whole
//! dependency tree, so one per crate rather than one per file saves most of the build.
//! Tests share this process, so each makes what it asserts its own (a database per
//! test, a topology prefix per app).
//!
//! Those that assert process-wide state (the metrics of the one recorder) are binaries of
//! their own beside it: `backpressure`, `shedding`, `waits`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed unwrap is a failed test

mod authorization;
mod bad_input;
mod balance;
mod broker_outage;
mod concurrency;
mod connections;
mod coupons;
mod idempotency;
mod identity;
mod least_privilege;
mod operations;
mod orders;
mod popular;
mod products;
mod requests;
mod tokens;
