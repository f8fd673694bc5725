//! The `batch` binary: `batch` runs the schedule, `batch run <job>` runs one job now and
//! exits non-zero when it fails.

use anyhow::Context;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let command = batch::Command::parse(&args)?;
    let config = batch::BatchConfig::from_env().context("invalid configuration")?;
    shared::telemetry::init(config.telemetry);
    match command {
        batch::Command::Serve => batch::run(config, shared::shutdown::on_signal()).await,
        batch::Command::Run(job) => {
            let rows = batch::run_job_now(config, job).await?;
            tracing::info!(job = job.name(), rows, "done");
            Ok(())
        }
    }
}
