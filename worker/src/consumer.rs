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

use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::Consumer;
use shared::domain::command::Family;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::leases::Lease;
use crate::settle::{self, Continue};
use crate::Context;

/// Consumes the lease's partition until `stop` fires, the lease is lost or the broker
/// goes away (the coordinator restarts it then).
pub async fn run(ctx: Arc<Context>, lease: Lease, stop: CancellationToken) {
    let queue = ctx.config.topology.queue(lease.family, lease.partition);
    match consume(&ctx, &lease, &queue, &stop).await {
        Ok(()) => tracing::debug!(%queue, "partition consumer stopped"),
        Err(e) => tracing::warn!(%queue, error = format!("{e:#}"), "partition consumer failed"),
    }
}

async fn consume(ctx: &Context, lease: &Lease, queue: &str, stop: &CancellationToken) -> anyhow::Result<()> {
    let channel = ctx.broker.channel().await?;
    channel
        .basic_qos(ctx.config.prefetch, BasicQosOptions::default())
        .await?;
    let tag = format!("{}/{}", ctx.config.name, queue);
    let mut deliveries = match channel
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
    tracing::info!(%queue, epoch = lease.epoch, "consuming");

    let mut gathering = Gathering {
        limit: usize::from(ctx.config.batch_size),
        window: ctx.config.batch_gather,
        busy: false,
    };
    let slots = ctx.settle_slots.of(lease.family);
    let outcome = loop {
        let (batch, slot) = match gathering.next_batch(&mut deliveries, &slots, stop).await {
            Ok(Some(taken)) => taken,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e.into()),
        };
        gathering.busy = batch.len() > 1;
        let settled = settle::settle_and_ack(ctx, lease, batch, stop).await;
        drop(slot);
        match settled {
            Ok(Continue::Yes) => {}
            Ok(Continue::No) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    if channel.status().connected() {
        if let Err(e) = channel.close(200, "partition released".into()).await {
            tracing::debug!(error = %e, "closing a partition channel");
        }
    }
    outcome
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
    /// The next batch in broker order with the slot to settle it in, or `None` when a stop
    /// was asked for before the batch had a slot or the broker ended the consumer. A stop
    /// while gathering ends the gathering, not the batch: what is in hand is settled. Nothing
    /// taken is acked without being settled, so a batch given up goes back to the queue in
    /// order when the channel closes.
    async fn next_batch(
        &self,
        deliveries: &mut Consumer,
        slots: &Arc<Semaphore>,
        stop: &CancellationToken,
    ) -> lapin::Result<Option<(Vec<Delivery>, OwnedSemaphorePermit)>> {
        let first = tokio::select! {
            biased;
            () = stop.cancelled() => return Ok(None),
            next = deliveries.next() => next,
        };
        let Some(first) = first.transpose()? else {
            return Ok(None);
        };
        // Deliveries keep arriving in the consumer's buffer while it waits for a slot.
        let slot = tokio::select! {
            biased;
            () = stop.cancelled() => return Ok(None),
            slot = Arc::clone(slots).acquire_owned() => match slot {
                Ok(slot) => slot,
                // The slots are never closed; were they, settle without one.
                Err(_) => return Ok(None),
            },
        };
        let mut batch = vec![first];
        // What the broker has already pushed costs no wait.
        while batch.len() < self.limit {
            match deliveries.next().now_or_never() {
                Some(Some(delivery)) => batch.push(delivery?),
                Some(None) => return Ok(Some((batch, slot))),
                None => break,
            }
        }
        if !self.busy || self.window.is_zero() {
            return Ok(Some((batch, slot)));
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
        Ok(Some((batch, slot)))
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
