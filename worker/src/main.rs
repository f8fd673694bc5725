//! The `worker` binary: configuration from the environment, then [`worker::run`].
//!
//! `worker` settles commands; `worker data-platform` runs the stand-in consumer of the
//! events sent to the data platform; `worker dead-letters list | replay <id> | discard <id>`
//! is for operators.

use anyhow::Context;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = worker::WorkerConfig::from_env().context("invalid configuration")?;
    shared::telemetry::init(config.telemetry);
    let shutdown = shared::shutdown::on_signal();
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        None => worker::run(config, shutdown).await,
        Some("data-platform") => worker::dataplatform::run(config, shutdown).await,
        Some("dead-letters") => {
            print!(
                "{}",
                worker::dead_letters::parked_letters::run(config, &args[1..]).await?
            );
            Ok(())
        }
        Some(other) => {
            anyhow::bail!("unknown subcommand {other:?}; expected none, data-platform or dead-letters")
        }
    }
}
