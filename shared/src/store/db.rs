//! The PostgreSQL pool and the schema migrations.
//!
//! Every binary runs the migrations at start. sqlx takes a PostgreSQL advisory lock around
//! them, so several processes starting at once apply each migration exactly once; the
//! database itself is created when missing, tolerating a concurrent creator.

use std::time::Duration;

use anyhow::Context;
use sqlx::migrate::{MigrateDatabase, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgPool, Postgres};

use crate::config::DatabaseSettings;

/// The one schema, from the workspace's `migrations/` folder, embedded in every binary.
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

/// How long start-up keeps trying to reach PostgreSQL before giving up: long enough for a
/// database container that starts next to us, short enough to fail visibly when it is absent.
const STARTUP_PATIENCE: Duration = Duration::from_secs(30);

/// Connects (creating the database when it does not exist), applies pending migrations and
/// claims the pool's share of the connection budget ([`crate::store::connection_budget`]), which
/// logs the pool size.
pub async fn connect_and_migrate(settings: &DatabaseSettings, app_name: &str) -> anyhow::Result<PgPool> {
    let deadline = tokio::time::Instant::now() + STARTUP_PATIENCE;
    let mut delay = Duration::from_millis(200);
    loop {
        match try_connect_and_migrate(settings, app_name).await {
            Ok(pool) => return Ok(pool),
            Err(e) if tokio::time::Instant::now() + delay < deadline => {
                tracing::warn!(error = format!("{e:#}"), "PostgreSQL not ready, retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(3));
            }
            Err(e) => return Err(e),
        }
    }
}

/// How long an idle pooled connection is handed out without a ping first.
const TRUSTED_IDLE: Duration = Duration::from_secs(1);

/// How long a connection given back to the pool may take to answer a ping before it is
/// closed instead of pooled again.
const RELEASE_CHECK: Duration = Duration::from_secs(5);

async fn try_connect_and_migrate(settings: &DatabaseSettings, app_name: &str) -> anyhow::Result<PgPool> {
    // The owner creates and migrates; the pool may be a role that cannot (least privilege).
    let owner_url = settings.migration_url.as_deref().unwrap_or(&settings.url);
    create_database_if_missing(owner_url).await?;
    let options: PgConnectOptions = settings
        .url
        .parse()
        .context("DATABASE_URL is not a PostgreSQL URL")?;
    // Set on every connection of the pool: no statement and no idle transaction of this
    // process can hold a connection, or the locks it took, past these limits. The TCP
    // settings make the server find out within about half a minute that this process's end
    // of a connection is gone without a word (its host died, a firewall dropped the
    // connection), and end the session: its locks (the outbox relay's advisory lock among
    // them) and its transaction would otherwise outlive it by the kernel's default of two
    // hours. Idle: probed after 10 s, every 5 s, dead after 3 unanswered probes; sending:
    // dead when data stays unacknowledged for 20 s.
    let options = options.application_name(app_name).options([
        ("statement_timeout", settings.statement_timeout_ms.to_string()),
        (
            "idle_in_transaction_session_timeout",
            settings.idle_in_transaction_timeout_ms.to_string(),
        ),
        ("tcp_keepalives_idle", "10".to_owned()),
        ("tcp_keepalives_interval", "5".to_owned()),
        ("tcp_keepalives_count", "3".to_owned()),
        ("tcp_user_timeout", "20000".to_owned()),
    ]);
    let pool = PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .acquire_timeout(Duration::from_secs(5))
        // sqlx pings every connection it hands out by default: one more round trip for each
        // statement of the api and each batch of a worker. A connection used within the
        // last second is taken as alive; one idle for longer is pinged first. A connection
        // that broke in that second (PostgreSQL restarted) fails its statement, which is
        // answered 503 or retried like any failure of PostgreSQL, and is then discarded.
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for < TRUSTED_IDLE {
                    return Ok(true);
                }
                Ok(conn.ping().await.is_ok())
            })
        })
        // A connection given back by a task that gave up on it (a timeout dropped its
        // statement half-way) is pinged before it is pooled again, by sqlx itself, without a
        // limit: on a connection that went silent that ping waits for ever and the pool
        // loses the connection's slot for good. Pinged here first, within a bound, such a
        // connection is closed instead. Healthy ones answer at once and are pinged twice,
        // off the path of any request.
        .after_release(|conn, _| {
            Box::pin(async move {
                Ok(tokio::time::timeout(RELEASE_CHECK, conn.ping())
                    .await
                    .is_ok_and(|pinged| pinged.is_ok()))
            })
        })
        .connect_with(options)
        .await
        .context("cannot connect to PostgreSQL")?;
    match &settings.migration_url {
        Some(owner_url) => {
            // A pool of one rather than a bare connection: `Migrator::run` over a
            // `&mut PgConnection` makes a future that is not `Send` for every lifetime,
            // and the worker runs this inside `tokio::spawn`.
            let owner = PgPoolOptions::new()
                .max_connections(1)
                .connect(owner_url)
                .await
                .context("cannot connect to PostgreSQL as MIGRATION_DATABASE_URL")?;
            MIGRATOR.run(&owner).await.context("cannot apply migrations")?;
            owner.close().await;
        }
        None => MIGRATOR.run(&pool).await.context("cannot apply migrations")?,
    }
    // The budget only informs: a process that cannot record its pool starts all the same.
    if let Err(e) = crate::store::connection_budget::claim(&pool, app_name, settings.max_connections).await {
        tracing::warn!(error = %e, "cannot record the connection pool in process_pools");
    }
    Ok(pool)
}

async fn create_database_if_missing(url: &str) -> anyhow::Result<()> {
    if Postgres::database_exists(url)
        .await
        .context("cannot reach PostgreSQL")?
    {
        return Ok(());
    }
    match Postgres::create_database(url).await {
        Ok(()) => {
            tracing::info!("created the database");
            Ok(())
        }
        // Another process created it between our check and our create.
        Err(_) if Postgres::database_exists(url).await.unwrap_or(false) => Ok(()),
        Err(e) => Err(e).context("cannot create the database"),
    }
}

/// True when a database error means "PostgreSQL cannot serve us right now" rather than
/// "this query is wrong", so callers can answer 503 and let clients retry, and workers wait
/// it out without spending a command's attempts: unreachable (I/O, a closed or exhausted
/// pool, class `08`), shutting down or starting up (`57P`), or out of resources (class `53`:
/// too many connections, out of memory, disk full). Taken for a bad command, the last would
/// dead-letter healthy commands whenever replicas outnumber `max_connections`.
pub fn is_unavailable(error: &sqlx::Error) -> bool {
    matches!(
        error,
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Tls(_)
    ) || matches!(error, sqlx::Error::Database(db) if db.code().is_some_and(|c| is_unavailable_code(&c)))
}

/// The SQLSTATEs of [`is_unavailable`].
fn is_unavailable_code(sqlstate: &str) -> bool {
    ["08", "53", "57P"]
        .iter()
        .any(|class| sqlstate.starts_with(class))
}

/// Runs `work`, which waits on PostgreSQL, and gives up when it has not finished within
/// `limit` (`None`: no limit), with an I/O error of kind `TimedOut`, which
/// [`is_unavailable`] counts as PostgreSQL being unreachable: callers retry as they do when
/// it is down. A connection that went silent (its peer vanished without closing it) answers
/// nothing and fails nothing, so without a limit of its own the work waits for ever; given
/// up, its connection is closed rather than pooled again (see `after_release` above).
pub async fn answered_within<T, E>(
    limit: Option<Duration>,
    work: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, E>
where
    E: From<sqlx::Error>,
{
    let Some(limit) = limit else {
        return work.await;
    };
    match tokio::time::timeout(limit, work).await {
        Ok(result) => result,
        Err(_) => Err(E::from(sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("PostgreSQL did not answer within {limit:?}"),
        )))),
    }
}

/// The name of the constraint a statement violated, if that is why it failed.
pub fn violated_constraint(error: &sqlx::Error) -> Option<&str> {
    match error {
        sqlx::Error::Database(db) => db.constraint(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_shortages_and_lost_connections_are_unavailability_not_bad_queries() {
        for code in ["53300", "53200", "53100", "08006", "57P01", "57P03"] {
            assert!(is_unavailable_code(code), "{code}");
        }
        for code in ["23505", "40001", "42P01", "22003", "P0001"] {
            assert!(!is_unavailable_code(code), "{code}");
        }
    }
}
