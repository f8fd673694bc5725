//! The API's configuration, from environment variables.

use std::net::SocketAddr;
use std::time::Duration;

use shared::config::{var, BrokerSettings, ConfigError, DatabaseSettings, TelemetrySettings};
use shared::topology::Topology;

/// The token used when `ADMIN_TOKEN` is unset; fine on a laptop, refused nowhere, and
/// announced with a warning at start so nobody ships it by accident.
pub const DEV_ADMIN_TOKEN: &str = "dev-admin-token";

/// The API's default pool. Every request holds a connection only for a statement or two,
/// and with fewer connections than about a tenth of the concurrent clients, requests wait
/// for a connection rather than for PostgreSQL: in the flash-sale benchmark (200 clients)
/// 30 connections settled 1.4x the coupons per second that 10 did.
pub const DEFAULT_POOL: u32 = 30;

#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// `HTTP_ADDR`: where the API listens. Port 0 picks a free port (tests do).
    pub http_addr: SocketAddr,
    /// `ADMIN_TOKEN`: the bearer token of the `/admin` routes.
    pub admin_token: String,
    /// `MAX_BODY_BYTES`: larger request bodies are answered 413.
    pub max_body_bytes: usize,
    /// `COMMAND_QUEUE_LIMIT`: ready messages a family's queues may hold before new commands
    /// of that family are answered 429 (0: no limit).
    pub command_queue_limit: u64,
    /// `COMMAND_QUEUE_SAMPLE_MS`: how often the queue depth is sampled.
    pub command_queue_sample: Duration,
    pub database: DatabaseSettings,
    pub broker: BrokerSettings,
    pub topology: Topology,
    pub telemetry: TelemetrySettings,
}

impl ApiConfig {
    pub fn from_env() -> Result<Self, ConfigError> {
        Ok(Self {
            http_addr: var("HTTP_ADDR", SocketAddr::from(([127, 0, 0, 1], 8080)))?,
            admin_token: var("ADMIN_TOKEN", DEV_ADMIN_TOKEN.to_owned())?,
            max_body_bytes: var("MAX_BODY_BYTES", 64 * 1024)?,
            command_queue_limit: var("COMMAND_QUEUE_LIMIT", 100_000)?,
            command_queue_sample: Duration::from_millis(var("COMMAND_QUEUE_SAMPLE_MS", 500)?),
            database: DatabaseSettings::from_env_with_pool(DEFAULT_POOL)?,
            broker: BrokerSettings::from_env()?,
            topology: Topology::from_env()?,
            telemetry: TelemetrySettings::from_env()?,
        })
    }
}
