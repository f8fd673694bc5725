//! The integration tests of `batch`, as one test binary: each binary links the whole
//! dependency tree, so one per crate rather than one per file saves most of the build.
//! Tests share this process, so each makes what it asserts its own (a database per
//! test, a topology prefix per app).
//!
//! Those that assert process-wide state (the metrics of the one recorder) are binaries of
//! their own beside it: `consistency_audit`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed unwrap is a failed test

mod jobs;
mod once;
mod popular_products;
