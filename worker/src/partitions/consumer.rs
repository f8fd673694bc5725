//! The consumer of one partition queue: strictly serial, a batch at a time.
//!
//! The queue has a single active consumer and this replica holds its lease, so nobody else
//! settles this partition. The consumer takes the first delivery and adds whatever else the
//! broker has already pushed, up to the batch size; when its last batch held more than one
//! command (the partition is busy) it also waits up to `WORKER_BATCH_GATHER_MS` for more,
//! so batches grow with the load instead of staying small. It settles the batch, acks it, and
//! only then takes the next one, in broker order. The prefetch is larger than the batch, so
//! the next batch is already buffered while one settles.
//!
//! A replica settles at most `WORKER_SETTLE_CONCURRENCY` batches of one family at a time
//! ([`SettleSlots`]). Many partitions settling at once on a small machine mostly wait on each
//! other's row locks (orders of different users share products) and on the CPU; a consumer
//! that waits for a slot instead keeps receiving, so under load its batch is larger when its
//! turn comes, and an idle partition finds a slot free at once. When asked to stop it finishes the
//! batch in hand, acks, and closes its channel; undelivered and unacked messages go back to
//! the queue in order for the next owner.
//!
//! A consumer that waits for deliveries while its queue holds ready messages it does not
//! receive (a consumer the broker keeps registered and feeds nothing) subscribes again on a
//! new channel after `STALLED_CONSUMER_AFTER_MS` ([`crate::partitions::stall_watch`]), keeping its lease.

use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Consumer};
use shared::domain::command::Family;
use shared::messaging::broker::queue_depth;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::partitions::leases::Lease;
use crate::partitions::stall_watch::{StallWatch, Verdict};
use crate::settling::settle::{self, Continue};
use crate::Context;

/// Consumes the lease's partition until `stop` fires, the lease is lost or the broker
/// goes away (the coordinator restarts it then).
pub async fn run(ctx: Arc<Context>, lease: Lease, stop: CancellationToken) {
    let queue = ctx.config.topology.queue(lease.family, lease.partition);
    // The series exists from the start, so that its first increase is seen as one.
    metrics::counter!("worker_consumers_resubscribed_total", "family" => lease.family.as_str()).increment(0);
    let mut watch = StallWatch::new(
        ctx.config.stalled_consumer_after,
        lease.family,
        lease.partition,
        Instant::now(),
    );
    match consume(&ctx, &lease, &queue, &mut watch, &stop).await {
        Ok(()) => tracing::debug!(%queue, "partition consumer stopped"),
        Err(e) => tracing::warn!(%queue, error = format!("{e:#}"), "partition consumer failed"),
    }
    watch.release();
}

async fn consume(
    ctx: &Context,
    lease: &Lease,
    queue: &str,
    watch: &mut StallWatch,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let mut subscription = Subscription::open(ctx, queue).await?;
    tracing::info!(%queue, epoch = lease.epoch, "consuming");

    let mut gathering = Gathering {
        limit: usize::from(ctx.config.batch_size),
        window: ctx.config.batch_gather,
        busy: false,
    };
    let slots = ctx.settle_slots.of(lease.family);
    let outcome = loop {
        let (batch, slot) = match gathering.next_batch(&mut subscription, &slots, watch, stop).await {
            Ok(Taken::Batch(batch, slot)) => (batch, slot),
            Ok(Taken::Nothing) => break Ok(()),
            Ok(Taken::Starved(starved)) => {
                // Nothing is in hand (every batch taken was settled and acked), so the
                // channel closes with nothing in flight; the lease stays, and with it the
                // fence every settlement checks.
                tracing::warn!(
                    family = lease.family.as_str(),
                    partition = lease.partition,
                    seconds = starved.as_secs(),
                    "the partition's queue holds ready messages its consumer does not receive; subscribing again"
                );
                metrics::counter!("worker_consumers_resubscribed_total", "family" => lease.family.as_str())
                    .increment(1);
                subscription.close("subscribing again").await;
                subscription = match Subscription::open(ctx, queue).await {
                    Ok(subscription) => subscription,
                    Err(e) => break Err(e),
                };
                watch.resubscribed(Instant::now());
                tracing::info!(%queue, epoch = lease.epoch, "consuming again");
                continue;
            }
            Err(e) => break Err(e.into()),
        };
        gathering.busy = batch.len() > 1;
        let settled = settle::settle_and_ack(ctx, lease, batch, stop).await;
        drop(slot);
        watch.fed(Instant::now());
        match settled {
            Ok(Continue::Yes) => {}
            Ok(Continue::No) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    subscription.close("partition released").await;
    outcome
}

/// A channel consuming one partition queue.
struct Subscription {
    channel: Channel,
    deliveries: Consumer,
    queue: String,
}

impl Subscription {
    /// Opens a channel and registers the partition's consumer on it. The queue has a
    /// single active consumer, so a previous subscription must be closed first, or this one
    /// would wait behind it.
    async fn open(ctx: &Context, queue: &str) -> anyhow::Result<Self> {
        let channel = ctx.broker.channel().await?;
        channel
            .basic_qos(ctx.config.prefetch, BasicQosOptions::default())
            .await?;
        let tag = format!("{}/{}", ctx.config.name, queue);
        let deliveries = match channel
            .basic_consume(
                queue.into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
        {
            Ok(consumer) => consumer,
            Err(e) => {
                // The queue may be gone (a broker that lost its data): declare the topology again
                // before the coordinator's next attempt.
                ctx.declare_topology().await;
                return Err(e.into());
            }
        };
        Ok(Self {
            channel,
            deliveries,
            queue: queue.to_owned(),
        })
    }

    /// Ready messages in the queue, or `None` when the broker does not say within
    /// [`CHECK_TIMEOUT`] (the check is given up, not the consumer).
    async fn ready(&self) -> lapin::Result<Option<u32>> {
        match tokio::time::timeout(CHECK_TIMEOUT, queue_depth(&self.channel, &self.queue)).await {
            Ok(ready) => ready.map(Some),
            Err(_) => Ok(None),
        }
    }

    /// Closes the channel: what was delivered and not acked goes back to the queue, in order.
    async fn close(&self, why: &str) {
        if self.channel.status().connected() {
            let closed = tokio::time::timeout(CHECK_TIMEOUT, self.channel.close(200, why.into())).await;
            if let Ok(Err(e)) = closed {
                tracing::debug!(error = %e, "closing a partition channel");
            }
        }
    }
}

/// How long a check of the queue, or the close of a channel, may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// What a consumer takes next.
enum Taken {
    /// A batch in broker order, with the slot to settle it in.
    Batch(Vec<Delivery>, OwnedSemaphorePermit),
    /// A stop was asked for before the batch had a slot, or the broker ended the consumer.
    Nothing,
    /// The queue holds ready messages that do not reach this consumer ([`StallWatch`]);
    /// nothing was taken. How long the partition has been starved.
    Starved(Duration),
}

/// How a consumer makes up its batches.
struct Gathering {
    /// `WORKER_BATCH_SIZE`.
    limit: usize,
    /// `WORKER_BATCH_GATHER_MS`: how long a busy partition's batch waits for more.
    window: Duration,
    /// Whether the last batch held more than one command. An idle partition's command
    /// settles at once; waiting pays only when more commands are coming.
    busy: bool,
}

impl Gathering {
    /// The next batch in broker order with the slot to settle it in. A stop while gathering
    /// ends the gathering, not the batch: what is in hand is settled. Nothing taken is acked
    /// without being settled, so a batch given up goes back to the queue in order when the
    /// channel closes. While it waits for a first delivery the consumer checks its queue now
    /// and then ([`StallWatch`]).
    async fn next_batch(
        &self,
        subscription: &mut Subscription,
        slots: &Arc<Semaphore>,
        watch: &mut StallWatch,
        stop: &CancellationToken,
    ) -> lapin::Result<Taken> {
        let mut next_check = Instant::now() + watch.check_every();
        let first = loop {
            tokio::select! {
                biased;
                () = stop.cancelled() => return Ok(Taken::Nothing),
                next = subscription.deliveries.next() => break next,
                () = tokio::time::sleep_until(next_check) => {}
            }
            let ready = tokio::select! {
                biased;
                () = stop.cancelled() => return Ok(Taken::Nothing),
                ready = subscription.ready() => ready?,
            };
            next_check = Instant::now() + watch.check_every();
            let Some(ready) = ready else { continue };
            if let Verdict::Starved(starved) = watch.checked(ready, Instant::now()) {
                // A delivery that came in while the queue was asked is no stall.
                match subscription.deliveries.next().now_or_never() {
                    Some(next) => break next,
                    None => return Ok(Taken::Starved(starved)),
                }
            }
        };
        let Some(first) = first.transpose()? else {
            return Ok(Taken::Nothing);
        };
        watch.fed(Instant::now());
        let deliveries = &mut subscription.deliveries;
        // Deliveries keep arriving in the consumer's buffer while it waits for a slot.
        let slot = tokio::select! {
            biased;
            () = stop.cancelled() => return Ok(Taken::Nothing),
            slot = Arc::clone(slots).acquire_owned() => match slot {
                Ok(slot) => slot,
                // The slots are never closed; were they, settle without one.
                Err(_) => return Ok(Taken::Nothing),
            },
        };
        let mut batch = vec![first];
        // What the broker has already pushed costs no wait.
        while batch.len() < self.limit {
            match deliveries.next().now_or_never() {
                Some(Some(delivery)) => batch.push(delivery?),
                Some(None) => return Ok(Taken::Batch(batch, slot)),
                None => break,
            }
        }
        if !self.busy || self.window.is_zero() {
            return Ok(Taken::Batch(batch, slot));
        }
        let deadline = tokio::time::Instant::now() + self.window;
        while batch.len() < self.limit {
            tokio::select! {
                biased;
                () = stop.cancelled() => break,
                next = deliveries.next() => match next {
                    Some(delivery) => batch.push(delivery?),
                    None => break,
                },
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
        Ok(Taken::Batch(batch, slot))
    }
}

/// How many batches of each family this replica may settle at once
/// (`WORKER_SETTLE_CONCURRENCY`).
pub struct SettleSlots(Vec<(Family, Arc<Semaphore>)>);

impl SettleSlots {
    pub fn new(per_family: usize) -> Self {
        let per_family = per_family.max(1);
        Self(
            Family::ALL
                .into_iter()
                .map(|family| (family, Arc::new(Semaphore::new(per_family))))
                .collect(),
        )
    }

    /// The family's slots: families never wait for each other, so a hot coupon does not
    /// hold back orders.
    fn of(&self, family: Family) -> Arc<Semaphore> {
        self.0
            .iter()
            .find(|(f, _)| *f == family)
            .map(|(_, slots)| Arc::clone(slots))
            // Every family has its slots; one without would settle without a limit.
            .unwrap_or_else(|| Arc::new(Semaphore::new(Semaphore::MAX_PERMITS)))
    }
}
