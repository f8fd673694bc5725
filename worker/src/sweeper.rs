//! Re-publishes requests whose publish was never confirmed (the API crashed or the broker
//! failed between commit and confirm), so that no accepted request is lost.
//!
//! Each pass claims a slice of due requests with `FOR NO KEY UPDATE SKIP LOCKED` and pushes their
//! `publish_after` forward, so several replicas sweep without publishing the same request
//! twice at once; the claim is not held across the publish. A request published twice is
//! harmless: the worker that settles it second finds it terminal.

use std::sync::Arc;

use shared::domain::command::RequestKind;
use shared::messaging::broker::PublishError;
use tokio_util::sync::CancellationToken;

use crate::Context;

/// Requests re-published per pass at most.
const SWEEP_LIMIT: i64 = 500;

pub async fn run(ctx: Arc<Context>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(ctx.config.sweep_interval) => {}
        }
        match sweep_once(&ctx).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(requests = n, "re-published unconfirmed requests"),
            Err(e) => tracing::warn!(error = format!("{e:#}"), "sweeping unpublished requests failed"),
        }
    }
}

/// One pass; returns how many requests were re-published.
pub async fn sweep_once(ctx: &Context) -> anyhow::Result<usize> {
    let due = sqlx::query!(
        "UPDATE requests SET publish_after = now() + interval '30 seconds'
         WHERE id IN (
           SELECT id FROM requests
           WHERE NOT published AND status = 'PENDING' AND publish_after <= now()
           ORDER BY created_at LIMIT $1
           FOR NO KEY UPDATE SKIP LOCKED)
         RETURNING id, kind, partition_key",
        SWEEP_LIMIT,
    )
    .fetch_all(&ctx.db)
    .await?;
    let mut published = Vec::with_capacity(due.len());
    let mut failed = None;
    for request in due {
        let Some(kind) = RequestKind::parse(&request.kind) else {
            continue;
        };
        let (id, key) = (request.id, request.partition_key);
        match shared::messaging::commands::publish(&ctx.publisher, &ctx.config.topology, id, kind, key).await
        {
            Ok(()) => published.push(id),
            // Refused, this message alone: the others may still go.
            Err(e @ (PublishError::Nacked | PublishError::Unroutable(_))) => failed = Some(e),
            // The broker is out of reach: the rest would wait for it one by one.
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    // What was confirmed is marked even when another publish failed: otherwise the next pass
    // would send it again (harmless, but a second message for every settled request).
    sqlx::query!(
        "UPDATE requests SET published = true WHERE id = ANY($1)",
        &published
    )
    .execute(&ctx.db)
    .await?;
    metrics::counter!("worker_requests_republished_total").increment(published.len() as u64);
    match failed {
        Some(e) => {
            Err(anyhow::Error::new(e)
                .context(format!("{} re-published despite the failure", published.len())))
        }
        None => Ok(published.len()),
    }
}
