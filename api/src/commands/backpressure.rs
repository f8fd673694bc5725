//! Backpressure: while a family's partition queues hold more than `COMMAND_QUEUE_LIMIT`
//! ready messages, new commands of that family are answered `429 ERR_OVERLOADED` with
//! `Retry-After` instead of being accepted faster than the workers settle them.
//!
//! The depth is sampled in the background (a passive declare of each partition queue, which
//! reports its ready messages) every `COMMAND_QUEUE_SAMPLE_MS`, so a request reads only a
//! flag. Between samples the queues can overshoot the limit by what arrives in one
//! interval; the limit is a bound on the backlog, not an exact count. A sample that fails
//! (the broker is down) clears the flags: publishing then fails on its own with 503.
//!
//! Each sample is also published as the gauge `api_command_queue_depth{family}`, which
//! operators watch whether or not backpressure is on: with a limit of 0 the queues are still
//! sampled, and nothing is ever refused.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lapin::Channel;
use shared::domain::command::Family;
use shared::messaging::broker::{queue_depth, Broker};
use shared::messaging::topology::Topology;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Which families are over their limit right now.
#[derive(Debug, Default)]
pub struct Backpressure {
    overloaded: [AtomicBool; Family::ALL.len()],
}

fn slot(family: Family) -> usize {
    match family {
        Family::Coupon => 0,
        Family::Order => 1,
    }
}

impl Backpressure {
    pub fn is_overloaded(&self, family: Family) -> bool {
        self.overloaded[slot(family)].load(Ordering::Relaxed)
    }

    fn set(&self, family: Family, overloaded: bool) {
        let was = self.overloaded[slot(family)].swap(overloaded, Ordering::Relaxed);
        if was != overloaded {
            tracing::warn!(
                family = family.as_str(),
                overloaded,
                "command backpressure changed"
            );
        }
    }

    /// Samples the queues until `stop` fires. A `limit` of 0 turns backpressure off: the
    /// depth is still sampled and published, and no family is ever flagged.
    pub fn start(
        self: &Arc<Self>,
        broker: Arc<Broker>,
        topology: Topology,
        limit: u64,
        interval: Duration,
        stop: CancellationToken,
    ) -> JoinHandle<()> {
        let flags = Arc::clone(self);
        tokio::spawn(async move {
            // One channel for every sample; a failed declare closes it, and the next round
            // opens another.
            let mut channel: Option<Channel> = None;
            loop {
                for family in Family::ALL {
                    if !channel.as_ref().is_some_and(|c| c.status().connected()) {
                        channel = broker.channel().await.ok();
                    }
                    let sampled = match &channel {
                        Some(open) => depth(open, &topology, family).await,
                        None => Err(anyhow::anyhow!("RabbitMQ is unreachable")),
                    };
                    match sampled {
                        Ok(depth) => {
                            metrics::gauge!("api_command_queue_depth", "family" => family.as_str())
                                .set(depth as f64);
                            flags.set(family, limit > 0 && depth > limit);
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "cannot sample the command queues");
                            channel = None;
                            flags.set(family, false);
                        }
                    }
                }
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(interval) => {}
                }
            }
            if let Some(open) = channel {
                let _ = open.close(200, "stopped".into()).await;
            }
        })
    }
}

/// Ready messages over the family's partition queues.
async fn depth(channel: &Channel, topology: &Topology, family: Family) -> anyhow::Result<u64> {
    let mut depth = 0_u64;
    for partition in 0..topology.partitions {
        let ready = queue_depth(channel, &topology.queue(family, partition)).await?;
        // Per partition too, for the partitions' view on the dashboard (already sampled).
        metrics::gauge!("api_partition_queue_ready", "family" => family.as_str(), "partition" => partition.to_string())
            .set(f64::from(ready));
        depth += u64::from(ready);
    }
    Ok(depth)
}
