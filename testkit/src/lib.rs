//! What the tests of every crate share: the api in-process over a database of the test's
//! own, worker replicas as processes of the real binary, a TCP proxy that plays a
//! dependency going down, and the batch's fabricated history. A dev-dependency of api,
//! worker, batch and loadgen. The invariants of the data they assert are in
//! `shared::store::invariants`, beside the load generator's checks that use them too.
//!
//! - [`app`]: `spawn_app()` and typed helpers to drive the api.
//! - [`system`]: the whole pipeline: the api and worker processes, to stop, kill and scale.
//! - [`proxy`]: a TCP proxy to cut and restore.
//! - [`starving_proxy`]: a proxy in front of RabbitMQ that drops deliveries to consumers.
//! - [`database`]: a database per test, dropped when the test ends.
//! - [`isolation`]: what keeps tests apart in one process: unique databases and topologies,
//!   each test's logs in its own output, cleanups callable from `Drop`.
//! - [`jobs`]: the batch's configuration and order history made with SQL.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed unwrap is a failed test

pub mod app;
pub mod database;
pub mod isolation;
pub mod jobs;
pub mod proxy;
pub mod starving_proxy;
pub mod system;

pub use app::{read, spawn_app, spawn_app_with, Answer, TestApp, ADMIN_TOKEN};
pub use proxy::{socket_of, Proxy};
pub use starving_proxy::StarvingProxy;
pub use system::{broker_connection, sample, System, PATIENCE};

/// The path of a binary of the workspace (`api`, `worker`), built next to the test
/// executable that asks (`target/<profile>/deps/<test>` → `target/<profile>/<name>`).
pub fn binary(name: &str) -> std::path::PathBuf {
    let test = std::env::current_exe().expect("the test executable's path");
    let profile_dir = test
        .parent()
        .and_then(std::path::Path::parent)
        .expect("a test executable under target/<profile>/deps");
    let binary = profile_dir.join(name);
    assert!(
        binary.exists(),
        "{} is not built: run the tests with `cargo test --workspace`",
        binary.display()
    );
    binary
}
