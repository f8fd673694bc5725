//! Publishes the stored commands of api processes that died before publishing them, so
//! that no accepted request is lost.
//!
//! An api publishes what it stores from memory ([`api::commands::relay`] in the api crate) and writes
//! nothing per command to say so; its heartbeat in `api_instances` is what tells it alive.
//! One whose heartbeat is older than `API_DEAD_AFTER_MS` is dead: a sweeper claims its row
//! (`swept_until`, with `FOR UPDATE SKIP LOCKED`, so several replicas never sweep the same
//! api at once and no claim is held across a publish), publishes every `PENDING` request it
//! accepted in acceptance order, and deletes its row once all were confirmed. Some of them
//! may have been published already: a command published twice settles once, because the
//! worker that gets it second finds its request terminal.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use shared::domain::command::RequestKind;
use shared::messaging::broker::PublishError;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::Context;

/// Requests read and published per slice.
const SLICE: i64 = 1_000;

pub async fn run(ctx: Arc<Context>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(ctx.config.sweep_interval) => {}
        }
        match sweep_once(&ctx).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(requests = n, "published the stored commands of a dead api"),
            Err(e) => tracing::warn!(
                error = format!("{e:#}"),
                "sweeping the commands of a dead api failed"
            ),
        }
    }
}

/// One pass over at most one dead api; returns how many of its requests were published.
pub async fn sweep_once(ctx: &Context) -> anyhow::Result<usize> {
    let dead_after = ctx.config.api_dead_after.as_secs_f64();
    let Some(dead) = sqlx::query!(
        "UPDATE api_instances SET swept_until = now() + interval '60 seconds'
         WHERE id = (SELECT id FROM api_instances
                     WHERE heartbeat_at < now() - make_interval(secs => $1)
                       AND (swept_until IS NULL OR swept_until < now())
                     ORDER BY heartbeat_at LIMIT 1
                     FOR UPDATE SKIP LOCKED)
         RETURNING id, name",
        dead_after,
    )
    .fetch_optional(&ctx.db)
    .await?
    else {
        return Ok(0);
    };
    tracing::warn!(api = %dead.name, id = %dead.id, "an api stopped heartbeating; publishing the commands it stored");

    let mut published = 0;
    let mut after: Option<(DateTime<Utc>, Uuid)> = None;
    loop {
        let (after_time, after_id) = after.unzip();
        let slice = sqlx::query!(
            r#"SELECT id, kind, partition_key, created_at FROM requests
               WHERE accepted_by = $1 AND status = 'PENDING'
                 AND ($2::timestamptz IS NULL OR (created_at, id) > ($2, $3))
               ORDER BY created_at, id LIMIT $4"#,
            dead.id,
            after_time,
            after_id as Option<Uuid>,
            SLICE,
        )
        .fetch_all(&ctx.db)
        .await?;
        let Some(last) = slice.last() else {
            break;
        };
        after = Some((last.created_at, last.id));
        let messages: Vec<_> = slice
            .iter()
            .filter_map(|r| {
                let kind = RequestKind::parse(&r.kind)?;
                Some(shared::messaging::commands::message(
                    &ctx.config.topology,
                    r.id,
                    kind,
                    r.partition_key,
                ))
            })
            .collect();
        let results = ctx
            .publisher
            .publish_in_order(&ctx.config.topology.commands_exchange(), &messages)
            .await;
        let confirmed = results.iter().filter(|r| r.is_ok()).count();
        published += confirmed;
        metrics::counter!("worker_requests_republished_total").increment(confirmed as u64);
        if let Some(Err(e)) = results.into_iter().find(Result::is_err) {
            // The claim runs out and a later pass starts this api over: what was confirmed
            // is sent again then, and settles once.
            let e: PublishError = e;
            return Err(anyhow::Error::new(e).context(format!(
                "{published} of api {}'s commands published before the failure",
                dead.name
            )));
        }
    }
    // Gone for good unless it heartbeated meanwhile (it was only cut off from PostgreSQL):
    // then it publishes its own queue, and what was sent here was a duplicate.
    sqlx::query!(
        "DELETE FROM api_instances WHERE id = $1 AND heartbeat_at < now() - make_interval(secs => $2)",
        dead.id,
        dead_after,
    )
    .execute(&ctx.db)
    .await?;
    Ok(published)
}
