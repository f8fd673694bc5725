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
#[derive(Debug, Clone)]
pub struct DatabaseSettings {
    /// `DATABASE_URL`; the database is created at start when it does not exist.
    pub url: String,
    /// `DATABASE_MAX_CONNECTIONS`: the pool size of this process. Keep the sum over all
    /// processes under PostgreSQL's `max_connections`.
    pub max_connections: u32,
}

impl DatabaseSettings {
    pub const DEFAULT_URL: &'static str = "postgres://postgres@127.0.0.1:5432/ecommerce";

    /// The settings with a pool of 10 connections unless `DATABASE_MAX_CONNECTIONS` says.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_env_with_pool(10)
    }

    /// The settings with `pool` connections unless `DATABASE_MAX_CONNECTIONS` says.
    pub fn from_env_with_pool(pool: u32) -> Result<Self, ConfigError> {
        Ok(Self {
            url: var("DATABASE_URL", Self::DEFAULT_URL.to_owned())?,
            max_connections: var("DATABASE_MAX_CONNECTIONS", pool)?,
        })
    }
}

/// Where RabbitMQ is.
#[derive(Debug, Clone)]
pub struct BrokerSettings {
    /// `AMQP_URL`.
    pub url: String,
}

impl BrokerSettings {
    pub const DEFAULT_URL: &'static str = "amqp://guest:guest@127.0.0.1:5672/%2f";

    pub fn from_env() -> Result<Self, ConfigError> {
        Ok(Self {
            url: var("AMQP_URL", Self::DEFAULT_URL.to_owned())?,
        })
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

    fn temp_env(name: &str, value: &str, f: impl FnOnce()) {
        // `set_var` is safe in edition 2021; the name is unique to one test.
        std::env::set_var(name, value);
        f();
        std::env::remove_var(name);
    }
}
