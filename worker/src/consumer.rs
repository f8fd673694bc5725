//! The consumer of one partition queue: strictly serial, a batch at a time.
//!
//! The queue has a single active consumer and this replica holds its lease, so nobody else
//! settles this partition. The consumer takes the first delivery, adds whatever else the
//! broker has already pushed (up to the batch size, never waiting for more), settles the
//! batch, acks it, and only then looks at the next delivery. When asked to stop it finishes
//! the batch in hand, acks, and closes its channel; undelivered and unacked messages go back
//! to the queue in order for the next owner.

use std::sync::Arc;

use futures::{FutureExt, StreamExt};
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
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
        .basic_qos(ctx.config.batch_size, BasicQosOptions::default())
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

    let outcome = loop {
        let first = tokio::select! {
            biased;
            () = stop.cancelled() => break Ok(()),
            next = deliveries.next() => next,
        };
        let first = match first {
            Some(Ok(delivery)) => delivery,
            Some(Err(e)) => break Err(e.into()),
            None => break Ok(()),
        };
        let mut batch = vec![first];
        while batch.len() < usize::from(ctx.config.batch_size) {
            match deliveries.next().now_or_never() {
                Some(Some(Ok(delivery))) => batch.push(delivery),
                _ => break,
            }
        }
        match settle::process_batch(ctx, lease, batch, stop).await {
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
