//! The `peer` binary: parses the command line and runs [`peer::run`].

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    peer::run(&peer::Args::parse()).await
}
