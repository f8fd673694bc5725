//! What keeps tests apart when they share a process, a PostgreSQL server and a broker: a
//! database and a command topology of each test's own, the test's logs in its own output,
//! and cleanups that run from `Drop` even while the test's runtime is being torn down.

use anyhow::Context;
use sqlx::{Connection, Executor, PgConnection};

/// The server tests create their databases on (`TEST_DATABASE_URL`, else a local default).
pub fn server_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:15432/test".to_owned())
}

/// Sends the logs of what a test runs in-process (the API) to the test's captured output,
/// so a failing test shows the cause of, say, a 500 next to its assertion. `RUST_LOG`
/// applies; warnings and errors by default.
pub fn capture_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    // Several tests share a process: the first one installs it.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// Creates an empty database with a unique name (`t_<uuid>`) and returns its URL; the
/// test kit's guard (`testkit::database::TestDatabase`) drops it when the test ends.
pub async fn fresh_database_url() -> anyhow::Result<String> {
    let server = server_url();
    let name = format!("t_{}", uuid::Uuid::now_v7().simple());
    let mut conn = PgConnection::connect(&server)
        .await
        .context("cannot reach the test PostgreSQL server")?;
    conn.execute(format!(r#"CREATE DATABASE "{name}""#).as_str())
        .await
        .context("cannot create a test database")?;
    let base = server.rsplit_once('/').map(|(base, _)| base).unwrap_or(&server);
    Ok(format!("{base}/{name}"))
}

/// A command topology no other test shares: a unique name prefix, few partitions (quick to
/// declare), and queues that delete themselves a while after the test stops using them.
pub fn isolated_topology() -> shared::messaging::topology::Topology {
    shared::messaging::topology::Topology {
        prefix: format!("t{}.", &uuid::Uuid::now_v7().simple().to_string()[20..]),
        partitions: 4,
        delivery_limit: 5,
        queue_expires_ms: Some(300_000),
        replicas: 3,
    }
}

/// Deletes a test's topology (and the data-platform queue under its prefix) from RabbitMQ,
/// blocking until done or `CLEANUP_TIMEOUT` passed.
///
/// Meant for `Drop` of test harnesses: every quorum queue holds file descriptors in the
/// broker, and a suite that left them to `x-expires` ran a stock RabbitMQ (1,024 descriptors)
/// out of them, after which it accepted sockets but never answered a handshake. The work runs
/// on a thread with a runtime of its own, so it can be called from inside a test's runtime
/// and still finish while that runtime is being torn down.
pub fn delete_topology_blocking(topology: &shared::messaging::topology::Topology, amqp_url: &str) {
    const CLEANUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
    let topology = topology.clone();
    let amqp_url = amqp_url.to_owned();
    // Best effort: a broker that is down leaves the queues to `x-expires`.
    block_on_own_thread(CLEANUP_TIMEOUT, async move {
        let settings = shared::config::BrokerSettings { url: amqp_url };
        let broker = shared::messaging::broker::Broker::new(&settings, format!("{}cleanup", topology.prefix));
        let connection = broker.connection().await?;
        topology
            .delete(&connection, &[topology.data_platform_queue()])
            .await?;
        broker.close().await;
        anyhow::Ok(())
    });
}

/// Runs `work` for at most `timeout` on a thread with a runtime of its own, and waits for
/// it: for `Drop` of test harnesses, which may run inside a test's runtime, even while that
/// runtime is being torn down. What `work` returns is dropped (cleanups are best effort).
pub fn block_on_own_thread<T>(
    timeout: std::time::Duration,
    work: impl std::future::Future<Output = T> + Send + 'static,
) {
    let running = std::thread::spawn(move || {
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
            return;
        };
        runtime.block_on(async {
            let _ = tokio::time::timeout(timeout, work).await;
        });
    });
    let _ = running.join();
}
