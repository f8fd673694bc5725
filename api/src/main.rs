//! The `api` binary: configuration from the environment, then [`api::Application`].

use anyhow::Context;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = api::ApiConfig::from_env().context("invalid configuration")?;
    shared::telemetry::init(config.telemetry);
    let shutdown = shared::shutdown::on_signal();
    api::Application::build(config).await?.run(shutdown).await
}
