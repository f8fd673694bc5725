//! The worker's configuration, from environment variables.

use std::net::SocketAddr;
use std::time::Duration;

use shared::config::{flag, var, BrokerSettings, ConfigError, DatabaseSettings, TelemetrySettings};
use shared::messaging::topology::Topology;

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// `WORKER_NAME`: how this replica appears in logs and in `worker_replicas`.
    pub name: String,
    /// `WORKER_METRICS_ADDR`: where `/metrics` and `/health/live` are served; each replica
    /// on one host needs its own port (0 picks a free one).
    pub metrics_addr: SocketAddr,
    /// `WORKER_BATCH_SIZE`: most commands settled in one transaction.
    pub batch_size: u16,
    /// `WORKER_PREFETCH`: unacked deliveries the broker may push to one partition consumer
    /// (default twice the batch size, never less than it). Above the batch size, the next
    /// batch is already buffered while one settles, instead of being asked for only when
    /// the settled batch is acked. Every return of an unread prefetched message (a partition
    /// handed over, a replica killed) counts as a delivery in a quorum queue, so it stays a
    /// small multiple.
    pub prefetch: u16,
    /// `WORKER_BATCH_GATHER_MS`: after a batch of more than one command (the partition is
    /// busy), how long the next batch may wait for more deliveries before it settles, if it
    /// is not full already. A partition that was idle settles its first command at once.
    pub batch_gather: Duration,
    /// `WORKER_SETTLE_CONCURRENCY`: batches of one family this replica settles at once,
    /// whatever the number of partitions it consumes. Fewer transactions at once wait less
    /// on each other's locks, and consumers waiting their turn gather larger batches
    /// (default: the machine's cores, at least 2, so one slow batch never stalls a family).
    pub settle_concurrency: usize,
    /// `WORKER_HEARTBEAT_MS`: how often the replica renews its presence and leases and
    /// rebalances partitions.
    pub heartbeat: Duration,
    /// `WORKER_REPLICA_TTL_MS`: a replica not heard from for this long counts as gone.
    pub replica_ttl: Duration,
    /// `WORKER_LEASE_TTL_MS`: a lease not renewed for this long can be taken over.
    pub lease_ttl: Duration,
    /// `STALLED_CONSUMER_AFTER_MS`: how long a partition's queue may hold ready messages
    /// that never reach its waiting consumer before the consumer subscribes again on a new
    /// channel (see `crate::partitions::stall_watch`). The queue is asked every half of it (between 0.25
    /// and 5 s), and only while the consumer waits with nothing in hand.
    pub stalled_consumer_after: Duration,
    /// `WORKER_SETTLE_ATTEMPTS`: tries of a command that fails for a reason other than an
    /// unreachable database, before it is dead-lettered.
    pub settle_attempts: u32,
    /// `RESERVATION_TTL_SECS`: how long reserved stock is held for an unpaid order.
    pub reservation_ttl: Duration,
    /// `MAX_RESERVED_ORDERS_PER_USER`: `RESERVED` orders one user may hold; a creation past
    /// it is refused `ERR_ORDER_TOO_MANY_RESERVED`. The api refuses what it can at once with
    /// the same setting; this is where the cap holds, under the settling locks, so set both
    /// alike.
    pub max_reserved_orders_per_user: i64,
    /// `SHARED_ROWS_AT_COMMIT`: an order batch reads product rows unlocked and changes them
    /// in the message that commits (on by default, see `crate::settling::pipeline`); off, it locks
    /// them up front like every other row (the design before, kept to measure against).
    pub shared_rows_at_commit: bool,
    /// `OUTBOX_RELAY_ENABLED`: publish outbox events from this replica (on by default; off
    /// for a replica that should only settle, e.g. when relays run elsewhere).
    pub outbox_relay: bool,
    /// `OUTBOX_RELAY_INTERVAL_MS`: the shortest time between two passes of the outbox relay
    /// while events keep coming, so that one pass (a select and a delete) carries the events of
    /// many batches. The first event after a quiet spell goes out at once.
    pub outbox_relay_interval: Duration,
    /// `OUTBOX_BACKLOG_REPORT_MS`: how often the relay counts its backlog for the gauges.
    pub outbox_backlog_interval: Duration,
    /// `WORKER_SWEEP_INTERVAL_MS`: how often dead apis' unpublished commands are looked for.
    pub sweep_interval: Duration,
    /// `API_DEAD_AFTER_MS`: an api process whose heartbeat is older than this is dead, and
    /// the sweeper publishes the commands it stored. Well above the api's heartbeat (1 s),
    /// so that a busy api is not swept (which would only send duplicates).
    pub api_dead_after: Duration,
    pub database: DatabaseSettings,
    pub broker: BrokerSettings,
    pub topology: Topology,
    pub telemetry: TelemetrySettings,
}

impl WorkerConfig {
    pub fn from_env() -> Result<Self, ConfigError> {
        // The host and the pid: replicas on one machine differ by pid, replicas in
        // containers (where every pid is 1) by host name.
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".to_owned());
        let default_name = format!("worker-{host}-{}", std::process::id());
        let batch_size = var("WORKER_BATCH_SIZE", 100_u16)?.max(1);
        Ok(Self {
            name: var("WORKER_NAME", default_name)?,
            metrics_addr: var("WORKER_METRICS_ADDR", SocketAddr::from(([127, 0, 0, 1], 9100)))?,
            batch_size,
            prefetch: var("WORKER_PREFETCH", batch_size.saturating_mul(2))?.max(batch_size),
            settle_concurrency: var("WORKER_SETTLE_CONCURRENCY", default_settle_concurrency())?.max(1),
            batch_gather: Duration::from_millis(var("WORKER_BATCH_GATHER_MS", 0)?),
            heartbeat: Duration::from_millis(var("WORKER_HEARTBEAT_MS", 1_000)?),
            replica_ttl: Duration::from_millis(var("WORKER_REPLICA_TTL_MS", 5_000)?),
            lease_ttl: Duration::from_millis(var("WORKER_LEASE_TTL_MS", 6_000)?),
            stalled_consumer_after: Duration::from_millis(var("STALLED_CONSUMER_AFTER_MS", 10_000)?.max(500)),
            settle_attempts: var("WORKER_SETTLE_ATTEMPTS", 3_u32)?.max(1),
            reservation_ttl: Duration::from_secs(var("RESERVATION_TTL_SECS", 600)?),
            max_reserved_orders_per_user: var("MAX_RESERVED_ORDERS_PER_USER", 10)?,
            shared_rows_at_commit: flag("SHARED_ROWS_AT_COMMIT", true)?,
            outbox_relay: flag("OUTBOX_RELAY_ENABLED", true)?,
            outbox_relay_interval: Duration::from_millis(var("OUTBOX_RELAY_INTERVAL_MS", 100)?),
            outbox_backlog_interval: Duration::from_millis(var("OUTBOX_BACKLOG_REPORT_MS", 5_000)?.max(100)),
            sweep_interval: Duration::from_millis(var("WORKER_SWEEP_INTERVAL_MS", 2_000)?),
            api_dead_after: Duration::from_millis(var("API_DEAD_AFTER_MS", 10_000)?.max(2_000)),
            database: worker_database()?,
            broker: BrokerSettings::from_env()?,
            topology: Topology::from_env()?,
            telemetry: TelemetrySettings::from_env()?,
        })
    }
}

/// The database settings, where PostgreSQL ends a transaction of this worker idle for
/// `DATABASE_ANSWER_TIMEOUT_MS` (10 s) unless `DATABASE_IDLE_IN_TRANSACTION_TIMEOUT_MS` says
/// otherwise. A settlement is a few back-to-back round trips: a transaction idle that long
/// has behind it a worker that gave up on it, or one whose connection went silent, and its
/// row locks would hold up whoever settles the partition next.
fn worker_database() -> Result<DatabaseSettings, ConfigError> {
    let mut database = DatabaseSettings::from_env()?;
    let idle_in_transaction_set = !var("DATABASE_IDLE_IN_TRANSACTION_TIMEOUT_MS", String::new())?.is_empty();
    if !idle_in_transaction_set && database.answer_timeout_ms > 0 {
        database.idle_in_transaction_timeout_ms = database.answer_timeout_ms;
    }
    Ok(database)
}

/// Batches of a family settled at once by default: the cores this process may use, at
/// least 2. Measured on 2 cores with 16 partitions (BENCHMARKS.md): no limit gave order
/// batches of 1.35 commands, 2 gave 2.6 and more paid orders per second.
fn default_settle_concurrency() -> usize {
    std::thread::available_parallelism()
        .map(usize::from)
        .unwrap_or(2)
        .max(2)
}
