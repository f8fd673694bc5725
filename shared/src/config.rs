//! Settings read from environment variables.
//!
//! Every setting has a default that works on a developer machine with PostgreSQL and
//! RabbitMQ on their standard local ports, so `cargo run -p api` needs no setup. Each
//! binary composes the pieces it needs into its own configuration struct.

use std::fmt::Display;
use std::str::FromStr;

/// A variable that is set but cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("environment variable {name}={value:?} is invalid: {reason}")]
pub struct ConfigError {
    pub name: String,
    pub value: String,
    pub reason: String,
}

/// Reads `name`, or `default` when it is unset or empty.
pub fn var<T>(name: &str, default: T) -> Result<T, ConfigError>
where
    T: FromStr,
    T::Err: Display,
{
    match std::env::var(name) {
        Ok(value) if !value.trim().is_empty() => value.trim().parse().map_err(|e: T::Err| ConfigError {
            name: name.to_owned(),
            value,
            reason: e.to_string(),
        }),
        _ => Ok(default),
    }
}

/// Reads a boolean switch: `1`, `true`, `yes`, `on` (any case) turn it on, `0`, `false`,
/// `no`, `off` turn it off; unset means `default`.
pub fn flag(name: &str, default: bool) -> Result<bool, ConfigError> {
    let value = var(name, String::new())?;
    match value.to_ascii_lowercase().as_str() {
        "" => Ok(default),
        "0" | "false" | "no" | "off" => Ok(false),
        "1" | "true" | "yes" | "on" => Ok(true),
        _ => Err(ConfigError {
            name: name.to_owned(),
            value,
            reason: "expected true or false".to_owned(),
        }),
    }
}

/// Where PostgreSQL is and how many connections one process may hold.
///
/// `Debug` shows the URL without its password: configurations are logged and printed.
#[derive(Clone)]
pub struct DatabaseSettings {
    /// `DATABASE_URL`; the database is created at start when it does not exist.
    pub url: String,
    /// `DATABASE_MAX_CONNECTIONS`: the pool size of this process. Keep the sum over all
    /// processes under PostgreSQL's `max_connections`.
    pub max_connections: u32,
    /// `DATABASE_STATEMENT_TIMEOUT_MS`: PostgreSQL cancels a statement running longer, so
    /// a runaway query gives its connection and its locks back (0: no limit).
    pub statement_timeout_ms: u64,
    /// `DATABASE_IDLE_IN_TRANSACTION_TIMEOUT_MS`: PostgreSQL ends a session that holds a
    /// transaction open without using it this long, so a stuck process cannot hold row
    /// locks for ever (0: no limit).
    pub idle_in_transaction_timeout_ms: u64,
    /// `DATABASE_ANSWER_TIMEOUT_MS`: how long a worker waits for PostgreSQL to answer one
    /// unit of its work (a settlement attempt, a lease renewal, a handover) before it takes
    /// the connection for dead, closes it and tries again on another. A connection whose
    /// peer vanished without closing it (a firewall that dropped its state, a host that
    /// died) otherwise waits for ever: PostgreSQL's own timeouts run on the server, which
    /// never hears of it. Above any statement the worker runs; 0: no limit.
    pub answer_timeout_ms: u64,
    /// `MIGRATION_DATABASE_URL`: the owner of the schema, who creates the database when it
    /// is missing and applies the migrations at start over one short-lived connection;
    /// `DATABASE_URL` is then a role that only reads and writes rows (see
    /// deploy/postgres/runtime-grants.sql). Unset: `DATABASE_URL` does both, as on a
    /// developer's machine.
    pub migration_url: Option<String>,
}

impl std::fmt::Debug for DatabaseSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseSettings")
            .field("url", &redact_url(&self.url))
            .field("migration_url", &self.migration_url.as_deref().map(redact_url))
            .field("max_connections", &self.max_connections)
            .field("statement_timeout_ms", &self.statement_timeout_ms)
            .field(
                "idle_in_transaction_timeout_ms",
                &self.idle_in_transaction_timeout_ms,
            )
            .field("answer_timeout_ms", &self.answer_timeout_ms)
            .finish()
    }
}

/// `url` with any password replaced by `***`: `postgres://app:***@db:5432/shop`, and
/// `postgres://db/shop?user=app&password=***` (libpq and lapin take credentials from the
/// query string too).
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "***".to_owned();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    let path = redact_query(path);
    match authority.rsplit_once('@') {
        Some((credentials, host)) => {
            let user = credentials.split_once(':').map_or(credentials, |(user, _)| user);
            if credentials.contains(':') {
                format!("{scheme}://{user}:***@{host}{path}")
            } else {
                format!("{scheme}://{user}@{host}{path}")
            }
        }
        None => format!("{scheme}://{authority}{path}"),
    }
}

/// `path` (with its query and fragment) with the values of secret-looking query
/// parameters (`password`, `sslpassword`, `token`, `secret`, ...) replaced by `***`.
fn redact_query(path: &str) -> String {
    let Some((before, query_and_fragment)) = path.split_once('?') else {
        return path.to_owned();
    };
    let (query, fragment) = match query_and_fragment.split_once('#') {
        Some((query, fragment)) => (query, Some(fragment)),
        None => (query_and_fragment, None),
    };
    let redacted: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((key, _)) if is_secret_key(key) => format!("{key}=***"),
            _ => pair.to_owned(),
        })
        .collect();
    let mut out = format!("{before}?{}", redacted.join("&"));
    if let Some(fragment) = fragment {
        out.push('#');
        out.push_str(fragment);
    }
    out
}

fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ["pass", "pwd", "secret", "token"]
        .iter()
        .any(|word| key.contains(word))
}

impl DatabaseSettings {
    /// The private cluster that `scripts/services` runs for development.
    pub const DEFAULT_URL: &'static str = "postgres://postgres@127.0.0.1:15432/ecommerce";

    /// Settings for `url` with `max_connections`, and the default timeouts.
    pub fn new(url: impl Into<String>, max_connections: u32) -> Self {
        Self {
            url: url.into(),
            max_connections,
            statement_timeout_ms: 30_000,
            idle_in_transaction_timeout_ms: 60_000,
            answer_timeout_ms: 10_000,
            migration_url: None,
        }
    }

    /// [`Self::answer_timeout_ms`], or `None` for no limit.
    pub fn answer_timeout(&self) -> Option<std::time::Duration> {
        Some(std::time::Duration::from_millis(self.answer_timeout_ms)).filter(|d| !d.is_zero())
    }

    /// The settings with a pool of 10 connections unless `DATABASE_MAX_CONNECTIONS` says.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_env_with_pool(10)
    }

    /// The settings with `pool` connections unless `DATABASE_MAX_CONNECTIONS` says.
    pub fn from_env_with_pool(pool: u32) -> Result<Self, ConfigError> {
        Ok(Self {
            url: var("DATABASE_URL", Self::DEFAULT_URL.to_owned())?,
            max_connections: var("DATABASE_MAX_CONNECTIONS", pool)?,
            statement_timeout_ms: var("DATABASE_STATEMENT_TIMEOUT_MS", 30_000)?,
            idle_in_transaction_timeout_ms: var("DATABASE_IDLE_IN_TRANSACTION_TIMEOUT_MS", 60_000)?,
            answer_timeout_ms: var("DATABASE_ANSWER_TIMEOUT_MS", 10_000)?,
            migration_url: Some(var("MIGRATION_DATABASE_URL", String::new())?).filter(|url| !url.is_empty()),
        })
    }
}

/// Where RabbitMQ is. `Debug` shows the URL without its password.
#[derive(Clone)]
pub struct BrokerSettings {
    /// `AMQP_URL`: one node's URL, or the URLs of several nodes of one cluster separated
    /// by commas (`amqp://app:pw@mq-1:5672/%2f,amqp://app:pw@mq-2:5672/%2f,…`). A process
    /// connects to the first that answers and moves to another when its node goes away.
    pub url: String,
}

impl BrokerSettings {
    /// The private node that `scripts/services` runs for development.
    pub const DEFAULT_URL: &'static str = "amqp://guest:guest@127.0.0.1:15682/%2f";

    /// The nodes' URLs, in the order given (at least one: an empty list is the default).
    pub fn nodes(&self) -> Vec<&str> {
        let nodes: Vec<&str> = self
            .url
            .split(',')
            .map(str::trim)
            .filter(|node| !node.is_empty())
            .collect();
        if nodes.is_empty() {
            vec![Self::DEFAULT_URL]
        } else {
            nodes
        }
    }

    pub fn from_env() -> Result<Self, ConfigError> {
        Ok(Self {
            url: var("AMQP_URL", Self::DEFAULT_URL.to_owned())?,
        })
    }
}

impl std::fmt::Debug for BrokerSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let nodes: Vec<String> = self.nodes().into_iter().map(redact_url).collect();
        f.debug_struct("BrokerSettings")
            .field("url", &nodes.join(","))
            .finish()
    }
}

/// How logs are written. The filter itself comes from `RUST_LOG`.
#[derive(Debug, Clone, Copy, Default)]
pub struct TelemetrySettings {
    /// `LOG_JSON`: one JSON object per line, for log shippers, instead of text.
    pub json: bool,
}

impl TelemetrySettings {
    pub fn from_env() -> Result<Self, ConfigError> {
        Ok(Self {
            json: flag("LOG_JSON", false)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Each test uses its own variable name: the environment is shared by the test threads.
    #[test]
    fn an_unset_variable_takes_the_default() {
        assert_eq!(var("CONFIG_TEST_UNSET_NUMBER", 7_u32).ok(), Some(7));
    }

    #[test]
    fn a_variable_that_does_not_parse_names_itself_in_the_error() {
        let name = "CONFIG_TEST_BAD_NUMBER";
        // Safe here: no other test reads or writes this variable.
        temp_env(name, "seven", || {
            let err = var(name, 7_u32).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains(name), "{err}");
        });
    }

    #[test]
    fn passwords_never_show_in_the_debug_form_of_settings() {
        let database = DatabaseSettings {
            url: "postgres://app:s3cret@db:5432/shop".to_owned(),
            max_connections: 10,
            statement_timeout_ms: 0,
            idle_in_transaction_timeout_ms: 0,
            answer_timeout_ms: 0,
            migration_url: Some("postgres://owner:0wn3r@db:5432/shop".to_owned()),
        };
        let broker = BrokerSettings {
            url: "amqp://app:s3cret@mq:5672/%2f".to_owned(),
        };
        let printed = format!("{database:?} {broker:?}");
        assert!(
            !printed.contains("s3cret") && !printed.contains("0wn3r"),
            "{printed}"
        );
        assert!(printed.contains("postgres://app:***@db:5432/shop"), "{printed}");
        assert!(printed.contains("amqp://app:***@mq:5672/%2f"), "{printed}");
        assert_eq!(
            redact_url("postgres://postgres@127.0.0.1/x"),
            "postgres://postgres@127.0.0.1/x"
        );
        assert_eq!(redact_url("not a url"), "***");
    }

    #[test]
    fn passwords_in_the_query_string_are_redacted_too() {
        assert_eq!(
            redact_url("postgres://db:5432/shop?user=app&password=s3cret&sslmode=require"),
            "postgres://db:5432/shop?user=app&password=***&sslmode=require"
        );
        assert_eq!(
            redact_url("postgres://app:s3cret@db/shop?sslpassword=k3y#frag"),
            "postgres://app:***@db/shop?sslpassword=***#frag"
        );
        assert_eq!(
            redact_url("amqp://mq:5672/%2f?auth_token=t0ken&heartbeat=10"),
            "amqp://mq:5672/%2f?auth_token=***&heartbeat=10"
        );
        assert_eq!(
            redact_url("postgres://db/shop?sslmode=require"),
            "postgres://db/shop?sslmode=require"
        );
    }

    #[test]
    fn a_node_list_is_split_on_commas_and_each_node_redacted() {
        let broker = BrokerSettings {
            url: " amqp://app:s3cret@mq-1:5672/%2f, amqp://app:s3cret@mq-2:5672/%2f ,".to_owned(),
        };
        assert_eq!(
            broker.nodes(),
            [
                "amqp://app:s3cret@mq-1:5672/%2f",
                "amqp://app:s3cret@mq-2:5672/%2f"
            ]
        );
        let printed = format!("{broker:?}");
        assert!(!printed.contains("s3cret"), "{printed}");
        assert!(
            printed.contains("amqp://app:***@mq-1:5672/%2f,amqp://app:***@mq-2:5672/%2f"),
            "{printed}"
        );
        let empty = BrokerSettings {
            url: " , ".to_owned(),
        };
        assert_eq!(empty.nodes(), [BrokerSettings::DEFAULT_URL]);
    }

    fn temp_env(name: &str, value: &str, f: impl FnOnce()) {
        // `set_var` is safe in edition 2021; the name is unique to one test.
        std::env::set_var(name, value);
        f();
        std::env::remove_var(name);
    }
}
