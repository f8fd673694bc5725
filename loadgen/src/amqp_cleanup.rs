//! Deletes what a benchmark declared on RabbitMQ under its own `AMQP_PREFIX`: the partition,
//! dead-letter and parked queues, and the command and event exchanges. Names come from the
//! topology the api and workers use, so they cannot drift apart.

use anyhow::{bail, Context};
use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::{Connection, ConnectionProperties};
use shared::topology::{Family, Topology};

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
    let mut queues = Vec::new();
    for family in Family::ALL {
        queues.extend((0..topology.partitions).map(|p| topology.queue(family, p)));
        queues.push(topology.dead_letter_queue(family));
        queues.push(topology.parked_queue(family));
    }
    let exchanges = [
        topology.commands_exchange(),
        topology.dead_letter_exchange(),
        topology.events_exchange(),
    ];
    // RabbitMQ answers a delete of a queue that does not exist with success, so this counts
    // deletes the broker accepted, not queues that were there.
    let mut accepted = 0;
    for queue in &queues {
        // A failed delete closes the channel: one channel per delete.
        let channel = connection.create_channel().await?;
        if channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await
            .is_ok()
        {
            accepted += 1;
        }
    }
    for exchange in &exchanges {
        let channel = connection.create_channel().await?;
        if channel
            .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
            .await
            .is_ok()
        {
            accepted += 1;
        }
    }
    let _ = connection.close(200, "cleaned up".into()).await;
    println!(
        "deleted {accepted} of {} queues and exchanges named with prefix {:?}",
        queues.len() + exchanges.len(),
        args.prefix
    );
    Ok(())
}
