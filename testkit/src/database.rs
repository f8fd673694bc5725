//! A database of the test's own: created empty with a unique name, and dropped when its guard
//! goes, also when the test fails (the guard drops while the panic unwinds). Only the
//! test's own database is dropped: other checkouts' tests may run on the same server.

use std::ops::Deref;
use std::time::Duration;

use sqlx::{Connection, Executor, PgConnection};

/// How long dropping a database may take before the test goes on without it.
const DROP_TIMEOUT: Duration = Duration::from_secs(10);

/// The URL of a database that exists for one test.
pub struct TestDatabase {
    url: String,
}

impl TestDatabase {
    /// Creates an empty database with a unique name (`t_<uuid>`) on the test server
    /// (`TEST_DATABASE_URL`, else the local one).
    pub async fn create() -> Self {
        let url = crate::isolation::fresh_database_url()
            .await
            .expect("a fresh database on the test server");
        Self { url }
    }

    pub fn url(&self) -> &str {
        &self.url
    }
}

impl Deref for TestDatabase {
    type Target = str;

    fn deref(&self) -> &str {
        &self.url
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        drop_database_blocking(&self.url);
    }
}

/// Drops the database at `url` (closing whatever is still connected to it), blocking until
/// done or [`DROP_TIMEOUT`]; callable from `Drop` inside a test's runtime.
fn drop_database_blocking(url: &str) {
    let Some((_, name)) = url.rsplit_once('/') else {
        return;
    };
    // The database the test server's URL names (`test`), never the one being dropped.
    let admin = crate::isolation::server_url();
    let name = name.to_owned();
    // Best effort: a database left behind is only disk, which an operator's `DROP` frees.
    crate::isolation::block_on_own_thread(DROP_TIMEOUT, async move {
        let mut conn = PgConnection::connect(&admin).await?;
        conn.execute(format!(r#"DROP DATABASE IF EXISTS "{name}" WITH (FORCE)"#).as_str())
            .await?;
        conn.close().await
    });
}
