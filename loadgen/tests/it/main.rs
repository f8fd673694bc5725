//! The integration tests of `loadgen`, as one test binary: each binary links the whole
//! dependency tree, so one per crate rather than one per file saves most of the build.
//! Tests share this process, so each makes what it asserts its own (a database per
//! test, a topology prefix per app).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed unwrap is a failed test

mod whole_system;
