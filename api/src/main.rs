//! The `api` binary: configuration from the environment, then [`api::Application`].

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    // One clear line and a failure status for a configuration that cannot be used (a weak
    // admin token outside development mode among them), before anything starts.
    let config = api::ApiConfig::from_env().and_then(|config| config.check_admin_token().map(|()| config));
    let config = match config {
        Ok(config) => config,
        Err(e) => {
            eprintln!("api: refusing to start: {e}");
            return ExitCode::from(2);
        }
    };
    shared::telemetry::init(config.telemetry);
    let shutdown = shared::shutdown::on_signal();
    let served = async { api::Application::build(config).await?.run(shutdown).await };
    match served.await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "the api failed");
            eprintln!("api: {e:#}");
            ExitCode::FAILURE
        }
    }
}
