//! Deletes what a benchmark declared on RabbitMQ under its own `AMQP_PREFIX`: the partition,
//! dead-letter and parked queues, and the command and event exchanges. Names come from the
//! topology the api and workers use, so they cannot drift apart.

use anyhow::{bail, Context};
use shared::config::BrokerSettings;
use shared::messaging::broker::Broker;
use shared::messaging::topology::Topology;

use crate::cli::CleanupArgs;

pub async fn run(args: &CleanupArgs) -> anyhow::Result<()> {
    let topology = topology(&args.prefix, args.partitions);
    let accepted = delete(&args.amqp_url, &topology, &[]).await?;
    println!(
        "deleted {accepted} of {} queues and exchanges named with prefix {:?}",
        topology.queues().len() + topology.exchanges().len(),
        args.prefix
    );
    Ok(())
}

/// The names of what runs under `prefix`.
pub fn topology(prefix: &str, partitions: u16) -> Topology {
    Topology {
        prefix: prefix.to_owned(),
        partitions,
        delivery_limit: 0,
        queue_expires_ms: None,
        replicas: 1,
    }
}

/// Deletes the topology's queues and exchanges and `extra_queues`; how many deletes the
/// broker accepted.
pub async fn delete(amqp_url: &str, topology: &Topology, extra_queues: &[String]) -> anyhow::Result<usize> {
    // An empty prefix names the production queues.
    if topology.prefix.trim().is_empty() {
        bail!("refusing to clean up an empty AMQP_PREFIX");
    }
    // Any node of the list will do: queues are the cluster's.
    let settings = BrokerSettings {
        url: amqp_url.to_owned(),
    };
    let broker = Broker::new(&settings, format!("{}cleanup", topology.prefix));
    let connection = broker.connection().await.context("cannot connect to RabbitMQ")?;
    let accepted = topology.delete(&connection, extra_queues).await?;
    broker.close().await;
    Ok(accepted)
}
