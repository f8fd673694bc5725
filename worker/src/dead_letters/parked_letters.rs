//! Dead letters for operators: `worker dead-letters list | replay <requestId> | discard
//! <requestId>`.
//!
//! Every dead-lettered command has a row in `dead_letters` (why it died, what the worker
//! last saw go wrong, and what was done about it) and its message in the family's parked
//! queue. `list` shows the open ones with their request's status, and how many messages
//! each parked queue holds. A message that is not a command of its queue's family (no
//! worker can decode it) has no request: it is listed apart, by the id the dead-letter
//! consumer gave it (the MD5 of its body), and can only be discarded. `replay` sends a command back to its partition queue, but only while its request
//! is still `PENDING`: a request that is terminal (every dead letter's request is marked
//! `FAILED` when it is parked) has had its answer, so replaying it sends nothing and
//! changes nothing; the letter stays open until it is discarded. `discard` removes the
//! message for good, a command's or an unreadable one's.

use std::fmt::Write as _;
use std::sync::Arc;

use anyhow::{bail, Context as _};
use chrono::{DateTime, Utc};
use lapin::options::{BasicAckOptions, BasicGetOptions};
use shared::domain::command::Family;
use shared::domain::command::{CommandMessage, RequestKind};
use shared::messaging::broker::{queue_depth, Broker, Publisher};
use sqlx::PgPool;
use uuid::Uuid;

use crate::WorkerConfig;

/// Runs one operator command; `args` are what follows `worker dead-letters`. Returns the
/// text to print.
pub async fn run(config: WorkerConfig, args: &[String]) -> anyhow::Result<String> {
    let db = shared::store::db::connect_and_migrate(&config.database, "dead-letters").await?;
    let broker = Arc::new(Broker::new(
        &config.broker,
        format!("{}-dead-letters", config.name),
    ));
    let publisher = Publisher::new(Arc::clone(&broker));
    let outcome = match args {
        [verb] if verb == "list" => list(&config, &db, &broker).await,
        [verb, id] if verb == "replay" => replay(&config, &db, &publisher, parse(id)?).await,
        [verb, id] if verb == "discard" => discard(&config, &db, &publisher, parse(id)?).await,
        _ => {
            bail!("usage: worker dead-letters list | replay <requestId> | discard <requestId | unreadableId>")
        }
    };
    publisher.close().await;
    broker.close().await;
    db.close().await;
    outcome
}

fn parse(id: &str) -> anyhow::Result<Uuid> {
    Uuid::parse_str(id).with_context(|| format!("{id:?} is not a request id"))
}

struct Open {
    request_id: Uuid,
    kind: String,
    reason: String,
    detail: Option<String>,
    dead_at: DateTime<Utc>,
    status: Option<String>,
}

struct Unreadable {
    id: Uuid,
    family: String,
    reason: String,
    bytes: i32,
    preview: String,
    dead_at: DateTime<Utc>,
}

async fn list(config: &WorkerConfig, db: &PgPool, broker: &Broker) -> anyhow::Result<String> {
    let open = sqlx::query_as!(
        Open,
        // `?`: the request may be pruned; sqlx would take the outer-joined column for NOT NULL.
        r#"SELECT d.request_id, d.kind, d.reason, d.detail, d.dead_at, r.status AS "status?"
         FROM dead_letters d LEFT JOIN requests r ON r.id = d.request_id
         WHERE d.resolution IS NULL ORDER BY d.dead_at"#,
    )
    .fetch_all(db)
    .await?;
    let mut out = format!("{} dead letter(s) awaiting a decision\n", open.len());
    for d in &open {
        let _ = writeln!(
            out,
            "{}  {:<13} {:<15} {}  request {}",
            d.request_id,
            d.kind,
            d.reason,
            d.dead_at.to_rfc3339(),
            d.status.as_deref().unwrap_or("(pruned)")
        );
        if let Some(detail) = &d.detail {
            let _ = writeln!(out, "    {detail}");
        }
    }
    let unreadable = sqlx::query_as!(
        Unreadable,
        "SELECT id, family, reason, bytes, preview, dead_at FROM unreadable_letters
         WHERE resolution IS NULL ORDER BY dead_at",
    )
    .fetch_all(db)
    .await?;
    let _ = writeln!(
        out,
        "{} unreadable message(s) awaiting a decision (not a command; discard only)",
        unreadable.len()
    );
    for u in &unreadable {
        let _ = writeln!(
            out,
            "{}  {:<13} {:<15} {}  {} byte(s)",
            u.id,
            u.family,
            u.reason,
            u.dead_at.to_rfc3339(),
            u.bytes
        );
        let _ = writeln!(out, "    {}", u.preview);
    }
    // The database view stands on its own: with RabbitMQ down, list still shows it.
    match parked_depths(config, broker).await {
        Ok(depths) => {
            for (queue, depth) in depths {
                let _ = writeln!(out, "{queue}: {depth} parked message(s)");
            }
        }
        Err(e) => {
            let _ = writeln!(out, "parked queues: depth unknown ({e:#})");
        }
    }
    Ok(out)
}

/// How many messages each family's parked queue holds.
async fn parked_depths(config: &WorkerConfig, broker: &Broker) -> anyhow::Result<Vec<(String, u32)>> {
    let channel = broker.channel().await?;
    let mut depths = Vec::new();
    for family in Family::ALL {
        let queue = config.topology.parked_queue(family);
        let depth = queue_depth(&channel, &queue).await?;
        depths.push((queue, depth));
    }
    let _ = channel.close(200, "done".into()).await;
    Ok(depths)
}

struct Letter {
    kind: String,
    status: Option<String>,
    partition_key: Option<i64>,
}

async fn letter(db: &PgPool, id: Uuid) -> anyhow::Result<Option<Letter>> {
    Ok(sqlx::query_as!(
        Letter,
        // `?`: the request may be pruned; sqlx would take the outer-joined columns for NOT NULL.
        r#"SELECT d.kind, r.status AS "status?", r.partition_key AS "partition_key?"
         FROM dead_letters d LEFT JOIN requests r ON r.id = d.request_id
         WHERE d.request_id = $1 AND d.resolution IS NULL"#,
        id,
    )
    .fetch_optional(db)
    .await?)
}

/// Whether `id` names an open unreadable message.
async fn is_unreadable(db: &PgPool, id: Uuid) -> anyhow::Result<bool> {
    Ok(sqlx::query_scalar!(
        r#"SELECT EXISTS (SELECT 1 FROM unreadable_letters WHERE id = $1 AND resolution IS NULL)
             AS "exists!""#,
        id,
    )
    .fetch_one(db)
    .await?)
}

/// The open dead letter `id`, or why there is none to act on.
async fn open_letter(db: &PgPool, id: Uuid) -> anyhow::Result<Letter> {
    if let Some(letter) = letter(db, id).await? {
        return Ok(letter);
    }
    if is_unreadable(db, id).await? {
        bail!("{id} is an unreadable message, not a command: there is nothing to replay; discard it once inspected");
    }
    bail!("no open dead letter for request {id}")
}

async fn resolve(db: &PgPool, id: Uuid, resolution: &str) -> anyhow::Result<()> {
    sqlx::query!(
        "UPDATE dead_letters SET resolution = $2, resolved_at = now() WHERE request_id = $1",
        id,
        resolution,
    )
    .execute(db)
    .await?;
    Ok(())
}

async fn replay(
    config: &WorkerConfig,
    db: &PgPool,
    publisher: &Publisher,
    id: Uuid,
) -> anyhow::Result<String> {
    let letter = open_letter(db, id).await?;
    let kind =
        RequestKind::parse(&letter.kind).with_context(|| format!("unknown command type {}", letter.kind))?;
    let (Some("PENDING"), Some(partition_key)) = (letter.status.as_deref(), letter.partition_key) else {
        return Ok(format!(
            "request {id} is {}: it already has its answer, so replaying it would change nothing; \
             nothing was sent and the letter stays open (discard it once inspected)\n",
            letter.status.as_deref().unwrap_or("gone")
        ));
    };
    // Published before it leaves the parked queue: a crash in between leaves a copy parked,
    // and the worker settles the request once whatever number of copies arrives.
    shared::messaging::commands::publish(publisher, &config.topology, id, kind, partition_key).await?;
    let taken = take_parked(config, publisher, &[kind.family()], |m| {
        is_command(m, kind.family(), id)
    })
    .await?;
    resolve(db, id, "replayed").await?;
    Ok(if taken > 0 {
        format!("request {id} sent back to its partition queue\n")
    } else {
        // Not parked yet (still on its way through the dead-letter queue, which will park
        // it and open the letter again), or already removed by hand.
        format!("request {id} sent back to its partition queue; no parked copy was found\n")
    })
}

async fn discard(
    config: &WorkerConfig,
    db: &PgPool,
    publisher: &Publisher,
    id: Uuid,
) -> anyhow::Result<String> {
    let found = if let Some(letter) = letter(db, id).await? {
        let family = RequestKind::parse(&letter.kind)
            .with_context(|| format!("unknown command type {}", letter.kind))?
            .family();
        let taken = take_parked(config, publisher, &[family], |m| is_command(m, family, id)).await?;
        resolve(db, id, "discarded").await?;
        taken > 0
    } else if is_unreadable(db, id).await? {
        // Looked for in both parked queues: the same body may have died in either family.
        let name = id.to_string();
        let taken = take_parked(config, publisher, &Family::ALL, |message| {
            message
                .delivery
                .properties
                .message_id()
                .as_ref()
                .map(|m| m.as_str())
                == Some(name.as_str())
        })
        .await?;
        sqlx::query!(
            "UPDATE unreadable_letters SET resolution = 'discarded', resolved_at = now() WHERE id = $1",
            id,
        )
        .execute(db)
        .await?;
        taken > 0
    } else {
        bail!("no open dead letter or unreadable message {id}");
    };
    Ok(if found {
        format!("{id}: its parked message was deleted\n")
    } else {
        format!("{id}: no parked message was found; recorded as discarded\n")
    })
}

/// Whether a parked message is the command of request `id`, of `family`.
fn is_command(message: &lapin::message::BasicGetMessage, family: Family, id: Uuid) -> bool {
    serde_json::from_slice::<CommandMessage>(&message.delivery.data)
        .is_ok_and(|m| m.request_id == id && m.kind.family() == family)
}

/// Removes every message that `ours` picks from the parked queues of `families` (dead
/// letters arrive at least once, so there may be more than one copy); how many it removed.
///
/// Each queue is read once through, as deep as it was when the scan began. A message that
/// is not ours is published again to the tail, confirmed, before the copy read is acked:
/// left unacked and returned instead, it would count as a delivery, and a quorum queue
/// under RabbitMQ 4 (a default delivery limit of 20) drops a message returned that often,
/// so every twentieth operator action would lose the parked copies of all the others. A
/// crash between the publish and the ack leaves two copies, which `discard` removes alike.
async fn take_parked(
    config: &WorkerConfig,
    publisher: &Publisher,
    families: &[Family],
    ours: impl Fn(&lapin::message::BasicGetMessage) -> bool,
) -> anyhow::Result<usize> {
    let mut taken = 0;
    for &family in families {
        let channel = publisher.broker().channel().await?;
        let queue = config.topology.parked_queue(family);
        let depth = queue_depth(&channel, &queue).await?;
        for _ in 0..depth {
            let Some(message) = channel
                .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false })
                .await?
            else {
                break;
            };
            if ours(&message) {
                taken += 1;
            } else {
                let id = message
                    .delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|id| id.to_string())
                    .unwrap_or_default();
                publisher
                    .publish("", &queue, &id, &message.delivery.data, true)
                    .await?;
            }
            message.delivery.acker.ack(BasicAckOptions::default()).await?;
        }
        let _ = channel.close(200, "done".into()).await;
    }
    Ok(taken)
}
