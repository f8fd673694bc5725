//! Deletes what a benchmark declared on RabbitMQ under its own `AMQP_PREFIX`: the partition,
//! dead-letter and parked queues, and the command and event exchanges. Names come from the
//! topology the api and workers use, so they cannot drift apart.

use anyhow::{bail, Context};
use lapin::{Connection, ConnectionProperties};
use shared::topology::Topology;

use crate::cli::CleanupArgs;

pub async fn run(args: &CleanupArgs) -> anyhow::Result<()> {
    // An empty prefix names the production queues.
    if args.prefix.trim().is_empty() {
        bail!("refusing to clean up an empty AMQP_PREFIX");
    }
    let topology = Topology {
        prefix: args.prefix.clone(),
        partitions: args.partitions,
        delivery_limit: 0,
        queue_expires_ms: None,
    };
    let connection = Connection::connect(&args.amqp_url, ConnectionProperties::default())
        .await
        .context("cannot connect to RabbitMQ")?;
    let accepted = topology.delete(&connection, &[]).await?;
    let _ = connection.close(200, "cleaned up".into()).await;
    println!(
        "deleted {accepted} of {} queues and exchanges named with prefix {:?}",
        topology.queues().len() + topology.exchanges().len(),
        args.prefix
    );
    Ok(())
}
