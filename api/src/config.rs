//! The API's configuration, from environment variables.

use std::net::SocketAddr;
use std::time::Duration;

use axum::http::HeaderName;
use secrecy::{ExposeSecret, SecretString};
use shared::config::{flag, var, BrokerSettings, ConfigError, DatabaseSettings, TelemetrySettings};
use shared::messaging::topology::Topology;
use shared::store::audit::AuditBounds;

use crate::commands::intake::IntakeSettings;
use crate::http::connections::ConnectionSettings;

/// The admin token used when `ADMIN_TOKEN` is unset, accepted only in development mode.
pub const DEV_ADMIN_TOKEN: &str = "dev-admin-token";

/// The shortest admin token accepted outside development mode.
pub const MIN_ADMIN_TOKEN_CHARS: usize = 32;

/// The API's default pool. Every request holds a connection only for a statement or two,
/// and with fewer connections than about a tenth of the concurrent clients, requests wait
/// for a connection rather than for PostgreSQL: in the flash-sale benchmark (200 clients)
/// 30 connections settled 1.4x the coupons per second that 10 did.
pub const DEFAULT_POOL: u32 = 30;

#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// `HTTP_ADDR`: where the API listens. Port 0 picks a free port (tests do).
    pub http_addr: SocketAddr,
    /// `API_METRICS_ADDR`: where `/metrics` is served, away from the public address.
    pub metrics_addr: SocketAddr,
    /// `ADMIN_TOKEN`: the bearer token of the `/admin` routes. Never printed.
    pub admin_token: SecretString,
    /// `DEVELOPMENT_MODE`: accept a weak admin token (the default one included). Never in
    /// production.
    pub development_mode: bool,
    /// `ACCESS_LOG`: one log line per request from the start (SIGUSR1 switches it too).
    pub access_log: bool,
    /// `MAX_BODY_BYTES`: larger request bodies are answered 413.
    pub max_body_bytes: usize,
    /// `COMMAND_QUEUE_LIMIT`: ready messages a family's queues may hold before new commands
    /// of that family are answered 429 (0: no limit).
    pub command_queue_limit: u64,
    /// `COMMAND_QUEUE_SAMPLE_MS`: how often the queue depth is sampled.
    pub command_queue_sample: Duration,
    /// `MAX_RESERVED_ORDERS_PER_USER`: unpaid orders (pending or reserved) one user may hold
    /// at once; one more is refused `409 ERR_ORDER_TOO_MANY_RESERVED`, so nobody can keep a
    /// product's stock out of everyone else's reach. The api's refusal is the early one; the
    /// worker enforces the same setting (its own variable of that name) where orders settle.
    pub max_reserved_orders_per_user: i64,
    pub http: HttpTimeouts,
    /// How many connections are admitted, and TCP keepalive.
    pub connections: ConnectionSettings,
    pub limits: RateLimitSettings,
    /// `REQUEST_WAIT_POLL_MS`: how often a client that waits for its request reads it again
    /// without being woken (a notice can be lost while a listener reconnects).
    pub request_wait_poll: Duration,
    /// `MAX_READS_IN_FLIGHT`: reads (`GET`) run at once; one more is answered `503
    /// ERR_UNAVAILABLE` at once (0: 32 per database connection of the pool).
    pub max_reads_in_flight: usize,
    /// `AUDIT_REQUEST_PENDING_SECS`, `AUDIT_RESERVATION_OVERDUE_SECS`: the bounds of the
    /// consistency audit that `POST /admin/batch/consistency-audit/run` runs (the batch
    /// reads the same variables).
    pub audit_bounds: AuditBounds,
    /// `MAX_WAITS_PER_USER`: waits (`Prefer: wait`, `?wait=`) one user may hold at once in
    /// one api process; one more is `429 ERR_RATE_LIMITED` (0: no bound).
    pub max_waits_per_user: usize,
    /// `MAX_WAIT_SECS`: the longest a client may wait (`Prefer: wait`, `?wait=`), 1 to 30.
    pub max_wait: Duration,
    /// `REQUEST_STREAM_KEEPALIVE_MS`: how long a request stream stays silent before it sends
    /// a comment line, at most 15 s (the contract's bound), so that proxies and clients
    /// see it alive.
    pub request_stream_keepalive: Duration,
    /// `TOKEN_CACHE_TTL_MS`: how long a verified (or refused) token is believed without
    /// asking PostgreSQL; a revoked token is refused by every replica after at most this.
    pub token_cache_ttl: Duration,
    /// How long tokens live and how many a user may hold.
    pub tokens: TokenPolicy,
    /// How concurrent accepts are written together (`ACCEPT_BATCH_MAX`, `ACCEPT_GATHER_US`,
    /// `ACCEPT_WRITERS`).
    pub intake: IntakeSettings,
    /// `RABBITMQ_MANAGEMENT_URL`: the RabbitMQ management API
    /// (`http://user:password@host:15672`), where `/admin/partitions` reads each queue's
    /// unacked messages; unset, it counts ready messages over AMQP only. Never printed.
    pub rabbitmq_management_url: Option<SecretString>,
    pub database: DatabaseSettings,
    pub broker: BrokerSettings,
    pub topology: Topology,
    pub telemetry: TelemetrySettings,
}

/// How long a client may take, so slow clients cannot hold connections.
#[derive(Debug, Clone, Copy)]
pub struct HttpTimeouts {
    /// `HTTP_HEADER_TIMEOUT_MS`: from the connection's start, or the end of its previous
    /// answer, to the end of the next request's headers. Hyper uses the one timer for both,
    /// so this is the idle keep-alive limit as well. Past it the connection is closed.
    pub header: Duration,
    /// `HTTP_BODY_TIMEOUT_MS`: from the end of the headers to the end of the body. Past it
    /// the answer is `408 ERR_REQUEST_TIMEOUT` and the connection is closed.
    pub body: Duration,
    /// `HTTP_WRITE_TIMEOUT_MS`: the longest an answer may make no progress (the client does
    /// not read it); past it the connection is closed.
    pub write: Duration,
    /// `HTTP_HANDLER_TIMEOUT_MS`: the most the API works on one request once it has read
    /// it; past it the answer is `503 ERR_UNAVAILABLE`.
    pub handler: Duration,
}

/// The lifecycle of customer tokens.
#[derive(Debug, Clone, Copy)]
pub struct TokenPolicy {
    /// `TOKEN_TTL_DAYS`: how long a new token is accepted (0: forever). A stolen token stops
    /// working at the latest this long after it was issued.
    pub ttl: Option<Duration>,
    /// `TOKEN_LAST_USED_WRITE_MS`: how often the uses of tokens seen by this process are
    /// written (one statement for all of them), so `lastUsedAt` is exact to about this.
    pub record_uses_every: Duration,
    /// `MAX_TOKENS_PER_USER`: live (unrevoked, unexpired) tokens one user may hold; one more
    /// is refused `409 ERR_TOO_MANY_TOKENS`, so that a stolen token cannot mint siblings
    /// without end.
    pub max_per_user: i64,
}

/// Per-user and per-client-address rate limits (`429 ERR_RATE_LIMITED` with `Retry-After`).
#[derive(Debug, Clone)]
pub struct RateLimitSettings {
    /// `RATE_LIMIT_USER_WRITES_PER_SEC`: sustained rate of one user's commands, charges,
    /// cancellations and new tokens (0: no limit).
    pub user_writes_per_sec: u32,
    /// `RATE_LIMIT_USER_WRITES_BURST`: how many of those may come at once.
    pub user_writes_burst: u32,
    /// `RATE_LIMIT_SIGNUPS_PER_MIN`: registrations (`POST /users`) from one client address
    /// (0: no limit).
    pub signups_per_min: u32,
    /// `RATE_LIMIT_SIGNUPS_BURST`.
    pub signups_burst: u32,
    /// `RATE_LIMIT_AUTH_FAILURES_PER_MIN`: invalid tokens one client address may present;
    /// past it, its unknown tokens are refused 429 without a database lookup (0: no limit).
    pub auth_failures_per_min: u32,
    /// `RATE_LIMIT_AUTH_FAILURES_BURST`.
    pub auth_failures_burst: u32,
    /// `TRUSTED_CLIENT_IP_HEADER`: the header in which trusted proxies append the address
    /// of their peer (`X-Forwarded-For` style); unset: `x-forwarded-for`. Read only from
    /// the peers of `TRUSTED_PROXIES`.
    pub trusted_client_ip_header: Option<HeaderName>,
    /// `TRUSTED_PROXIES`: the networks of the reverse proxies in front of the api
    /// (`10.0.0.0/8,192.0.2.10`). Only a connection from one of them has its forwarded
    /// header believed, read from the right past every trusted hop; empty (the default):
    /// the client is the connection's peer, whatever the header says.
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

impl ApiConfig {
    pub fn from_env() -> Result<Self, ConfigError> {
        let development_mode = flag("DEVELOPMENT_MODE", false)?;
        let admin_token = std::env::var("ADMIN_TOKEN")
            .ok()
            .filter(|t| !t.trim().is_empty())
            .unwrap_or_else(|| DEV_ADMIN_TOKEN.to_owned());
        let config = Self {
            http_addr: var("HTTP_ADDR", SocketAddr::from(([127, 0, 0, 1], 8080)))?,
            metrics_addr: var("API_METRICS_ADDR", SocketAddr::from(([127, 0, 0, 1], 9300)))?,
            admin_token: SecretString::from(admin_token.trim().to_owned()),
            development_mode,
            access_log: flag("ACCESS_LOG", false)?,
            max_body_bytes: var("MAX_BODY_BYTES", 64 * 1024)?,
            command_queue_limit: var("COMMAND_QUEUE_LIMIT", 100_000)?,
            command_queue_sample: Duration::from_millis(var("COMMAND_QUEUE_SAMPLE_MS", 500)?),
            max_reserved_orders_per_user: var("MAX_RESERVED_ORDERS_PER_USER", 10)?,
            http: HttpTimeouts {
                header: Duration::from_millis(var("HTTP_HEADER_TIMEOUT_MS", 10_000)?),
                body: Duration::from_millis(var("HTTP_BODY_TIMEOUT_MS", 10_000)?),
                write: Duration::from_millis(var("HTTP_WRITE_TIMEOUT_MS", 10_000)?),
                handler: Duration::from_millis(var("HTTP_HANDLER_TIMEOUT_MS", 60_000)?),
            },
            connections: ConnectionSettings {
                max_total: var("MAX_CONNECTIONS", 0)?,
                max_per_client: var("MAX_CONNECTIONS_PER_CLIENT", 256)?,
                keepalive: Duration::from_secs(var("TCP_KEEPALIVE_SECS", 60)?),
            },
            limits: RateLimitSettings {
                user_writes_per_sec: var("RATE_LIMIT_USER_WRITES_PER_SEC", 10)?,
                user_writes_burst: var("RATE_LIMIT_USER_WRITES_BURST", 20)?,
                signups_per_min: var("RATE_LIMIT_SIGNUPS_PER_MIN", 30)?,
                signups_burst: var("RATE_LIMIT_SIGNUPS_BURST", 30)?,
                auth_failures_per_min: var("RATE_LIMIT_AUTH_FAILURES_PER_MIN", 60)?,
                auth_failures_burst: var("RATE_LIMIT_AUTH_FAILURES_BURST", 30)?,
                trusted_client_ip_header: optional_header("TRUSTED_CLIENT_IP_HEADER")?,
                trusted_proxies: networks("TRUSTED_PROXIES")?,
            },
            request_stream_keepalive: Duration::from_millis(
                var::<u64>("REQUEST_STREAM_KEEPALIVE_MS", 15_000)?.clamp(100, 15_000),
            ),
            token_cache_ttl: Duration::from_millis(var("TOKEN_CACHE_TTL_MS", 3_000)?),
            tokens: TokenPolicy {
                // At most a century: a date past chrono's range would fail every issue.
                ttl: match var::<u64>("TOKEN_TTL_DAYS", 90)?.min(36_500) {
                    0 => None,
                    days => Some(Duration::from_secs(days * 86_400)),
                },
                record_uses_every: Duration::from_millis(
                    var::<u64>("TOKEN_LAST_USED_WRITE_MS", 60_000)?.max(100),
                ),
                max_per_user: var::<i64>("MAX_TOKENS_PER_USER", 20)?.max(1),
            },
            request_wait_poll: Duration::from_millis(var("REQUEST_WAIT_POLL_MS", 1_000)?),
            max_waits_per_user: var("MAX_WAITS_PER_USER", 20)?,
            max_reads_in_flight: var("MAX_READS_IN_FLIGHT", 0)?,
            max_wait: Duration::from_secs(var::<u64>("MAX_WAIT_SECS", 30)?.clamp(1, 30)),
            rabbitmq_management_url: std::env::var("RABBITMQ_MANAGEMENT_URL")
                .ok()
                .map(|url| url.trim().to_owned())
                .filter(|url| !url.is_empty())
                .map(SecretString::from),
            intake: IntakeSettings {
                batch_max: var("ACCEPT_BATCH_MAX", IntakeSettings::default().batch_max)?.clamp(1, 10_000),
                gather: Duration::from_micros(var("ACCEPT_GATHER_US", 1_000)?),
                writers: var("ACCEPT_WRITERS", IntakeSettings::default().writers)?.clamp(1, 64),
            },
            database: DatabaseSettings::from_env_with_pool(DEFAULT_POOL)?,
            broker: BrokerSettings::from_env()?,
            topology: Topology::from_env()?,
            telemetry: TelemetrySettings::from_env()?,
            audit_bounds: AuditBounds::from_env()?,
        };
        // Room for the accept itself after the longest wait: the deadline cuts the answer.
        if config.http.handler < config.max_wait + Duration::from_secs(20) {
            return Err(ConfigError {
                name: "HTTP_HANDLER_TIMEOUT_MS".to_owned(),
                value: config.http.handler.as_millis().to_string(),
                reason: format!(
                    "must exceed the longest wait (MAX_WAIT_SECS, {} s) by at least 20 s",
                    config.max_wait.as_secs()
                ),
            });
        }
        if config.token_cache_ttl > Duration::from_secs(5) {
            return Err(ConfigError {
                name: "TOKEN_CACHE_TTL_MS".to_owned(),
                value: config.token_cache_ttl.as_millis().to_string(),
                reason: "a revoked token must be refused within 5 s: at most 5000".to_owned(),
            });
        }
        Ok(config)
    }

    /// The reads that may run at once: as configured, or 32 per pooled connection, at least
    /// 256. A read holds a connection for a statement or two (about a millisecond), so 32
    /// queued per connection wait tens of milliseconds, far below the pool's 5 s acquire
    /// timeout; a flash sale's burst of reads gets through, a pile-up does not. (Four per
    /// connection shed 300 first requests at once in the identity tests.)
    pub fn max_reads_in_flight(&self) -> usize {
        match self.max_reads_in_flight {
            0 => (self.database.max_connections as usize)
                .saturating_mul(32)
                .max(256),
            n => n,
        }
    }

    /// Refuses an empty, default or short admin token, unless in development mode. Checked
    /// by `main` before anything starts, and by [`crate::Application::build`].
    pub fn check_admin_token(&self) -> Result<(), ConfigError> {
        if self.development_mode {
            return Ok(());
        }
        let token = self.admin_token.expose_secret();
        let reason = if token == DEV_ADMIN_TOKEN {
            "it is unset or the development default"
        } else if token.chars().count() < MIN_ADMIN_TOKEN_CHARS {
            "it is shorter than 32 characters"
        } else {
            return Ok(());
        };
        Err(ConfigError {
            name: "ADMIN_TOKEN".to_owned(),
            // The value is a secret, even a weak one.
            value: "(hidden)".to_owned(),
            reason: format!(
                "{reason}; set a random token of at least 32 characters (e.g. `openssl rand -hex 32`), \
                 or DEVELOPMENT_MODE=true on a development machine"
            ),
        })
    }
}

fn optional_header(name: &str) -> Result<Option<HeaderName>, ConfigError> {
    let raw: String = var(name, String::new())?;
    if raw.is_empty() {
        return Ok(None);
    }
    HeaderName::try_from(raw.to_ascii_lowercase())
        .map(Some)
        .map_err(|e| ConfigError {
            name: name.to_owned(),
            value: raw,
            reason: e.to_string(),
        })
}

fn networks(name: &str) -> Result<Vec<ipnet::IpNet>, ConfigError> {
    let raw: String = var(name, String::new())?;
    crate::http::forwarded::parse_networks(&raw).map_err(|reason| ConfigError {
        name: name.to_owned(),
        value: raw,
        reason,
    })
}
