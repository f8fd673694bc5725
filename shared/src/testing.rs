//! Helpers for integration tests: each test gets a database of its own.

use anyhow::Context;
use sqlx::{Connection, Executor, PgConnection};

/// The server tests create their databases on (`TEST_DATABASE_URL`, else a local default).
pub fn server_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// Creates an empty database with a unique name and returns its URL. Names start with
/// `t_`, so `scripts/test` can drop what earlier runs left behind.
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
pub fn isolated_topology() -> crate::topology::Topology {
    crate::topology::Topology {
        prefix: format!("t{}.", &uuid::Uuid::now_v7().simple().to_string()[20..]),
        partitions: 4,
        delivery_limit: 5,
        queue_expires_ms: Some(300_000),
    }
}
