//! The integration tests of `worker`, as one test binary: each binary links the whole
//! dependency tree, so one per crate rather than one per file saves most of the build.
//! Tests share this process, so each makes what it asserts its own (a database per
//! test, a topology prefix per app).
//!
//! Those that assert process-wide state (the metrics of the one recorder) are binaries of
//! their own beside it: `group_commit`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed unwrap is a failed test

mod cancelling;
mod command_log;
mod consistency_audit;
mod events;
mod flash_sale;
mod limits;
mod orders;
mod outages;
mod queue_position;
mod refusals;
mod request_stream;
mod resilience;
mod round_trips;
mod stalled_partitions;
mod waiting;
