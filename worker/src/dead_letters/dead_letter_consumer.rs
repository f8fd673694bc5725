//! Dead letters: every command that could not be settled ends here, whichever way it got
//! here (dead-lettered by a worker after its attempts, or by the broker past the delivery
//! limit). Its request is marked `FAILED` with `ERR_PROCESSING_FAILED` (and the order of a
//! creation `REJECTED`), so no request or order stays `PENDING` forever, and the message
//! moves to the family's parked queue, where it stays for inspection and replay.
//!
//! One kind of death is not taken as poison at once: a command that ran out of deliveries
//! (`delivery_limit`) with no worker having given up on it may only have been returned
//! unread, again and again (a quorum queue counts every return: prefetched messages of a
//! partition handed over, of a replica killed, of a broker restart). While its request is
//! `PENDING`, it is sent back to its partition queue as a fresh message, up to
//! [`REVIVALS`] times; a command that really kills whatever settles it still ends parked.
//!
//! A message that is not a command of its queue's family (a body no worker can decode, or
//! a command of the other family) has no request of this family to fail: it is recorded in
//! `unreadable_letters`, named by the MD5 of its body, and parked under that name for an
//! operator to inspect and discard.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use shared::domain::command::CommandMessage;
use shared::domain::command::Family;
use shared::domain::error::{ErrorBody, ErrorCode};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::Context;

/// How many times a command that ran out of deliveries, with no worker having given up on
/// it, is sent back to its partition before it counts as poison. Each time costs up to
/// `COMMAND_DELIVERY_LIMIT` deliveries, so a command that crashes its worker every time is
/// parked after `(REVIVALS + 1) × COMMAND_DELIVERY_LIMIT` of them.
pub const REVIVALS: i32 = 2;

/// Drains both families' dead-letter queues until `shutdown`, reconnecting as needed.
pub async fn run(ctx: Arc<Context>, shutdown: CancellationToken) {
    let drains = Family::ALL.map(|family| {
        let ctx = Arc::clone(&ctx);
        let shutdown = shutdown.clone();
        async move {
            while !shutdown.is_cancelled() {
                if let Err(e) = drain(&ctx, family, &shutdown).await {
                    tracing::warn!(
                        family = family.as_str(),
                        error = format!("{e:#}"),
                        "dead-letter consumer failed; restarting"
                    );
                }
                tokio::select! {
                    () = shutdown.cancelled() => {}
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    });
    futures::future::join_all(drains).await;
}

async fn drain(ctx: &Context, family: Family, shutdown: &CancellationToken) -> anyhow::Result<()> {
    let topology = &ctx.config.topology;
    let channel = ctx.broker.channel().await?;
    channel.basic_qos(10, BasicQosOptions::default()).await?;
    let queue = topology.dead_letter_queue(family);
    let tag = format!("{}/{}", ctx.config.name, queue);
    let mut deliveries = channel
        .basic_consume(
            queue.as_str().into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    loop {
        let delivery = tokio::select! {
            () = shutdown.cancelled() => break,
            next = deliveries.next() => match next {
                Some(delivery) => delivery?,
                None => break,
            },
        };
        let reason = death_reason(&delivery.properties);
        match record_patiently(ctx, family, &delivery.data, &reason, shutdown).await? {
            Fate::SentBack(message, partition_key) => {
                shared::messaging::commands::publish(
                    &ctx.publisher,
                    topology,
                    message.request_id,
                    message.kind,
                    partition_key,
                )
                .await?;
            }
            // What is parked carries, as its message id, the name `worker dead-letters`
            // knows it by.
            Fate::Parked(id) => {
                ctx.publisher
                    .publish(
                        "",
                        &topology.parked_queue(family),
                        &id.to_string(),
                        &delivery.data,
                        true,
                    )
                    .await?;
            }
        }
        delivery.acker.ack(BasicAckOptions::default()).await?;
    }
    let _ = channel.close(200, "shutdown".into()).await;
    Ok(())
}

/// Records a dead letter, waiting out an unavailable PostgreSQL with the message in hand.
/// Given up on, the message would go back to its queue with the channel, and a quorum
/// queue counts that return as a delivery: under RabbitMQ 4 (a default delivery limit of
/// 20, and no dead-letter route out of this queue) an outage of half a minute would drop
/// the dead letter, and with it the only thing left that could fail its request.
async fn record_patiently(
    ctx: &Context,
    family: Family,
    body: &[u8],
    reason: &str,
    shutdown: &CancellationToken,
) -> anyhow::Result<Fate> {
    loop {
        match record(ctx, family, body, reason).await {
            Err(e) if shared::store::db::is_unavailable(&e) && !shutdown.is_cancelled() => {
                tracing::warn!(family = family.as_str(), error = %e, "cannot record a dead letter yet; waiting for PostgreSQL");
                tokio::select! {
                    () = shutdown.cancelled() => {}
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
            recorded => return Ok(recorded?),
        }
    }
}

async fn record(ctx: &Context, family: Family, body: &[u8], reason: &str) -> Result<Fate, sqlx::Error> {
    let command = serde_json::from_slice::<CommandMessage>(body)
        .ok()
        .filter(|m| m.kind.family() == family);
    match command {
        Some(message) => decide(ctx, &message, reason).await,
        None => record_unreadable(ctx, family, body, reason)
            .await
            .map(Fate::Parked),
    }
}

/// Records a dead letter that is not a command of `family`; its id, the MD5 of its body.
/// Idempotent, like [`decide`]: another copy of the same message finds its row (and
/// opens it again if it had been discarded, since that copy is parked again).
async fn record_unreadable(
    ctx: &Context,
    family: Family,
    body: &[u8],
    reason: &str,
) -> Result<Uuid, sqlx::Error> {
    let preview = preview(body);
    tracing::error!(
        family = family.as_str(),
        bytes = body.len(),
        %preview,
        "a dead letter that is not a command of its family; parked as unreadable"
    );
    metrics::counter!("worker_unreadable_letters_total", "family" => family.as_str()).increment(1);
    // `$1::bytea`: the body need not be UTF-8, so the digest is of its bytes (`md5(text)`
    // is what the parameter would otherwise be taken for).
    sqlx::query_scalar!(
        "INSERT INTO unreadable_letters (id, family, reason, bytes, preview)
         VALUES (md5($1::bytea)::uuid, $2, $3, $4, $5)
         ON CONFLICT (id) DO UPDATE
           SET family = EXCLUDED.family, reason = EXCLUDED.reason, dead_at = now(),
               resolution = NULL, resolved_at = NULL
         RETURNING id",
        body,
        family.as_str(),
        reason,
        i32::try_from(body.len()).unwrap_or(i32::MAX),
        preview,
    )
    .fetch_one(&ctx.db)
    .await
}

/// How many bytes of an unreadable body an operator is shown.
const PREVIEW_BYTES: usize = 160;

/// The start of a body as printable text: invalid UTF-8 replaced, control characters
/// (NUL among them, which a PostgreSQL text cannot hold) escaped.
fn preview(body: &[u8]) -> String {
    let head = &body[..body.len().min(PREVIEW_BYTES)];
    let mut text = String::from_utf8_lossy(head).escape_debug().to_string();
    if body.len() > PREVIEW_BYTES {
        text.push('…');
    }
    text
}

/// Why the broker dead-lettered a message, from the newest entry of its `x-death` header:
/// `delivery_limit`, `rejected` (a worker gave up on it), `expired` or `maxlen`.
fn death_reason(properties: &lapin::BasicProperties) -> String {
    let newest = properties
        .headers()
        .as_ref()
        .and_then(|headers| headers.inner().get("x-death"))
        .and_then(|deaths| match deaths {
            AMQPValue::FieldArray(deaths) => deaths.as_slice().first(),
            _ => None,
        });
    let reason = match newest {
        Some(AMQPValue::FieldTable(death)) => death.inner().get("reason").and_then(|r| match r {
            AMQPValue::LongString(r) => Some(r.to_string()),
            AMQPValue::ShortString(r) => Some(r.as_str().to_owned()),
            _ => None,
        }),
        _ => None,
    };
    reason.unwrap_or_else(|| "unknown".to_owned())
}

/// What becomes of a dead letter.
enum Fate {
    /// A command sent back to its partition (see [`REVIVALS`]), by the key it is
    /// partitioned on.
    SentBack(CommandMessage, i64),
    /// Recorded for operators (a command's request failed): its message goes to the parked
    /// queue, under this name.
    Parked(Uuid),
}

/// Decides what becomes of a dead command and records it, in one transaction committed
/// before the caller publishes anything: a crash leaves the message unacked, it comes back
/// and all of it runs again (a command sent back is then counted once more, so the bound
/// only comes sooner).
async fn decide(ctx: &Context, message: &CommandMessage, reason: &str) -> Result<Fate, sqlx::Error> {
    let family = message.kind.family().as_str();
    let mut tx = ctx.db.begin().await?;
    if let Some(partition_key) = revivable(&mut tx, message, reason).await? {
        sqlx::query!(
            "INSERT INTO dead_letters (request_id, family, kind, reason, revivals, resolution, resolved_at)
             VALUES ($1, $2, $3, $4, 1, 'revived', now())
             ON CONFLICT (request_id) DO UPDATE
               SET revivals = dead_letters.revivals + 1, reason = EXCLUDED.reason, dead_at = now(),
                   resolution = 'revived', resolved_at = now()",
            message.request_id,
            family,
            message.kind.as_str(),
            reason,
        )
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        tracing::warn!(request_id = %message.request_id, "a command ran out of deliveries without failing; sent back to its partition");
        metrics::counter!("worker_commands_revived_total", "family" => family).increment(1);
        return Ok(Fate::SentBack(message.clone(), partition_key));
    }

    // Recorded for operators with the worker's note of why it gave up, if it rejected the
    // message; then its request is failed and, for an order's creation, its order
    // rejected (it would otherwise stay `PENDING` for ever). A second copy of the same
    // death (dead-lettering is at least once) finds no note and keeps the detail the first
    // one brought; a detail from a death already dealt with belongs to that one, not this.
    sqlx::query!(
        "WITH note AS (DELETE FROM settle_failures WHERE request_id = $1 RETURNING detail)
         INSERT INTO dead_letters (request_id, family, kind, reason, detail)
         VALUES ($1, $2, $3, $4, (SELECT detail FROM note))
         ON CONFLICT (request_id) DO UPDATE
           SET reason = EXCLUDED.reason, dead_at = now(), resolution = NULL, resolved_at = NULL,
               detail = COALESCE(EXCLUDED.detail,
                                 CASE WHEN dead_letters.resolution IS NULL THEN dead_letters.detail END)",
        message.request_id,
        family,
        message.kind.as_str(),
        reason,
    )
    .execute(&mut *tx)
    .await?;
    let error = ErrorBody::new(
        ErrorCode::ProcessingFailed,
        "the command could not be settled; it is kept for operators to inspect",
    );
    let marked = shared::store::requests::fail_pending(&mut tx, message.request_id, &error).await?;
    tx.commit().await?;
    if marked {
        shared::store::settlements::announce(&ctx.db, &[message.request_id]).await;
        tracing::error!(request_id = %message.request_id, "request failed: its command was dead-lettered");
        metrics::counter!("worker_requests_failed_by_dead_letter_total", "family" => family).increment(1);
    }
    Ok(Fate::Parked(message.request_id))
}

/// The partition key of a dead command that goes back to its partition rather than to the
/// parked queue, its request row locked; `None` to park it. Only a command that ran out of
/// deliveries, whose request is still `PENDING`, that no worker gave up on (no note), and
/// that was sent back fewer than [`REVIVALS`] times.
async fn revivable(
    tx: &mut sqlx::PgConnection,
    message: &CommandMessage,
    reason: &str,
) -> Result<Option<i64>, sqlx::Error> {
    if reason != "delivery_limit" {
        return Ok(None);
    }
    sqlx::query_scalar!(
        "SELECT r.partition_key FROM requests r
         WHERE r.id = $1 AND r.status = 'PENDING'
           AND NOT EXISTS (SELECT 1 FROM settle_failures f WHERE f.request_id = r.id)
           AND COALESCE((SELECT d.revivals FROM dead_letters d WHERE d.request_id = r.id), 0) < $2
         FOR NO KEY UPDATE OF r",
        message.request_id,
        REVIVALS,
    )
    .fetch_optional(tx)
    .await
}
