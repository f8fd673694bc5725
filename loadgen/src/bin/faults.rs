//! The `faults` binary: parses the command line and runs the fault suite,
//! [`loadgen::faults::run`].

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    loadgen::faults::run(&loadgen::faults::Cli::parse().args).await
}
