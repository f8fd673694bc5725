//! The `worker` binary: configuration from the environment, then [`worker::run`].
//!
//! `worker` settles commands; `worker data-platform` runs the stand-in consumer of the
//! events sent to the data platform.

use anyhow::Context;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = worker::WorkerConfig::from_env().context("invalid configuration")?;
    shared::telemetry::init(config.telemetry);
    let shutdown = shared::shutdown::on_signal();
    match std::env::args().nth(1).as_deref() {
        None => worker::run(config, shutdown).await,
        Some("data-platform") => worker::dataplatform::run(config, shutdown).await,
        Some(other) => anyhow::bail!("unknown subcommand {other:?}; expected none or data-platform"),
    }
}
