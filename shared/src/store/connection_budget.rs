//! The connection budget: the pools of every running process against what PostgreSQL
//! allows.
//!
//! Each process holds a pool of up to `DATABASE_MAX_CONNECTIONS` connections. PostgreSQL
//! refuses connections past `max_connections` (less the `superuser_reserved_connections`),
//! and a process refused at a bad moment answers 503s or stalls its partitions. So every
//! process writes its pool size into `process_pools` at start and heartbeats the row; then
//! it adds up the live rows and warns when their sum exceeds what the server allows: the
//! operator learns it when scaling, not during the next burst. The sum counts pools at
//! their maximum, as a burst fills them.

use std::time::Duration;

use sqlx::PgPool;
use uuid::Uuid;

/// How often a process says it is still alive.
const HEARTBEAT: Duration = Duration::from_secs(10);
/// A row not heard from for this long is a process that is gone (three missed heartbeats).
const LIVE_WITHIN: Duration = Duration::from_secs(30);

/// The live processes' pools against the server's limit, read at one process's start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Processes heard from within [`LIVE_WITHIN`], this one included.
    pub processes: i64,
    /// The sum of their pool sizes.
    pub claimed: i64,
    /// `max_connections`.
    pub max_connections: i64,
    /// `superuser_reserved_connections`: kept for administrators, not for us.
    pub reserved: i64,
}

impl Budget {
    /// Connections ordinary roles may hold.
    pub fn allowed(&self) -> i64 {
        self.max_connections - self.reserved
    }

    pub fn exceeded(&self) -> bool {
        self.claimed > self.allowed()
    }
}

/// Records this process's pool (`process`: api, worker, …), heartbeats it while the pool
/// is open, and returns the budget as it stands with this process counted. Logs the pool
/// size, and a warning when the budget is exceeded.
pub async fn claim(db: &PgPool, process: &str, pool_size: u32) -> Result<Budget, sqlx::Error> {
    let id = Uuid::now_v7();
    let host = hostname();
    sqlx::query!(
        "INSERT INTO process_pools (id, process, host, pid, pool_size) VALUES ($1, $2, $3, $4, $5)",
        id,
        process,
        host,
        i32::try_from(std::process::id()).unwrap_or(i32::MAX),
        i32::try_from(pool_size).unwrap_or(i32::MAX),
    )
    .execute(db)
    .await?;
    let budget = read(db).await?;
    tracing::info!(
        pool_size,
        live_processes = budget.processes,
        claimed = budget.claimed,
        allowed = budget.allowed(),
        "database connection pool"
    );
    if budget.exceeded() {
        tracing::warn!(
            claimed = budget.claimed,
            allowed = budget.allowed(),
            max_connections = budget.max_connections,
            superuser_reserved_connections = budget.reserved,
            live_processes = budget.processes,
            "the pools of the live processes add up to more connections than PostgreSQL allows: \
             under load some will be refused; lower DATABASE_MAX_CONNECTIONS, run fewer replicas \
             or raise max_connections (see the runbook's connection budget)"
        );
    }
    tokio::spawn(heartbeat(db.clone(), id));
    Ok(budget)
}

/// The budget as the live rows and the server's settings give it now.
pub async fn read(db: &PgPool) -> Result<Budget, sqlx::Error> {
    sqlx::query_as!(
        Budget,
        r#"SELECT count(*) AS "processes!", coalesce(sum(pool_size), 0)::bigint AS "claimed!",
                current_setting('max_connections')::bigint AS "max_connections!",
                current_setting('superuser_reserved_connections')::bigint AS "reserved!"
         FROM process_pools WHERE heartbeat_at > now() - make_interval(secs => $1)"#,
        LIVE_WITHIN.as_secs_f64(),
    )
    .fetch_one(db)
    .await
}

/// Keeps the row alive until the pool closes; the row then lapses after [`LIVE_WITHIN`]
/// (a process cannot remove it once its pool is closed, and one killed would not). Rows
/// older than a day are deleted by whoever heartbeats.
async fn heartbeat(db: PgPool, id: Uuid) {
    loop {
        tokio::time::sleep(HEARTBEAT).await;
        if db.is_closed() {
            return;
        }
        let beat = sqlx::query!(
            "WITH gone AS (DELETE FROM process_pools WHERE heartbeat_at < now() - interval '1 day')
             UPDATE process_pools SET heartbeat_at = now() WHERE id = $1",
            id,
        )
        .execute(&db)
        .await;
        if let Err(e) = beat {
            // PostgreSQL away for a while: the row may lapse meanwhile, and the next beat
            // brings it back.
            tracing::debug!(error = %e, "cannot heartbeat the connection pool's row");
        }
    }
}

/// The machine's name, for operators reading `process_pools`.
fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}
