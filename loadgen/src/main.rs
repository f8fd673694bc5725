//! The `loadgen` binary: parses the command line and runs [`loadgen::run`].

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    loadgen::run(loadgen::cli::Cli::parse()).await
}
