//! Every partition at a glance (`GET /admin/partitions`), for operators who scale worker
//! replicas: who owns it, what waits in its queue, how fast it settles.
//!
//! Each source answers for what it knows:
//! - the owner: the partition's lease (`partition_leases`) while it is unexpired, named by
//!   the replica's heartbeat row;
//! - `pending`, `oldestPendingAt`: the `PENDING` requests, read from the partial index
//!   `requests_pending_in_order` (acceptance order);
//! - `settledPerSec`, `lastSettledAt`: the rate the partition's worker keeps with each batch
//!   (`partition_settlements`);
//! - `ready`, `unacked`: RabbitMQ. With `RABBITMQ_MANAGEMENT_URL` set, both are the
//!   management API's own counts (`source: "management"`). Otherwise `ready` comes from a
//!   passive declare over AMQP, which tells nothing of unacked messages, and `unacked` is
//!   what PostgreSQL says of the rest: the partition's pending commands that are not ready
//!   in its queue (delivered to a worker and not settled yet, or not yet published),
//!   `source: "amqp"`. When RabbitMQ answers neither way, both are `null` and the rest
//!   is still answered (`source: "database"`).

use std::collections::HashMap;
use std::time::Duration;

use axum::extract::State;
use chrono::{DateTime, Utc};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use shared::domain::command::Family;
use shared::messaging::broker::queue_depth;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::error::Result;
use crate::routes::openapi::ErrorSchema;
use crate::AppState;

/// How long RabbitMQ may take to answer before the view is given without its counts.
const BROKER_TIMEOUT: Duration = Duration::from_secs(3);

pub fn admin_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list_partitions))
}

/// Where RabbitMQ's counts came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum CountSource {
    /// The management API: `ready` and `unacked` are RabbitMQ's own.
    Management,
    /// AMQP only: `ready` is RabbitMQ's; `unacked` is pending minus ready (see `unacked`).
    Amqp,
    /// RabbitMQ did not answer: `ready` and `unacked` are `null`.
    Database,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PartitionsView {
    /// Where `ready` and `unacked` came from.
    pub source: CountSource,
    /// Both families' partitions, coupon first, each in partition order.
    pub items: Vec<PartitionView>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PartitionView {
    /// `coupon` or `order`.
    pub family: String,
    pub partition: u16,
    /// The name of the worker replica holding the partition's lease; absent while no live
    /// replica holds it (between owners, or with no worker running).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub owner: Option<String>,
    /// That replica's id.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub owner_id: Option<Uuid>,
    /// Messages ready in the partition's queue, not yet delivered; `null` when RabbitMQ did
    /// not answer.
    pub ready: Option<u64>,
    /// Messages delivered to a worker and not acked yet (`source: management`); with
    /// `source: amqp`, the partition's pending commands that are not ready in its queue
    /// (delivered and not settled, or not yet published); `null` when RabbitMQ did not
    /// answer.
    pub unacked: Option<u64>,
    /// Commands accepted in the partition and not settled yet (`PENDING` requests).
    pub pending: u64,
    /// When the oldest of those was accepted.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub oldest_pending_at: Option<DateTime<Utc>>,
    /// Commands settled per second lately (decaying over about ten seconds; 0 when nothing
    /// settled for a while).
    pub settled_per_sec: f64,
    /// When the partition last settled a batch.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub last_settled_at: Option<DateTime<Utc>>,
}

/// Every partition of both families: owner, queue, backlog and settle rate.
#[utoipa::path(
    get, path = "/admin/partitions", tag = "admin",
    security(("admin_token" = [])),
    responses(
        (status = 200, body = PartitionsView),
        (status = 401, body = ErrorSchema, description = "ERR_UNAUTHORIZED: no or wrong admin token"),
    )
)]
async fn list_partitions(State(state): State<AppState>) -> Result<axum::Json<PartitionsView>> {
    let topology = &state.config.topology;
    let owners = lease_owners(&state).await?;
    let broker = broker_counts(&state).await;
    let source = match &broker {
        Some((source, _)) => *source,
        None => CountSource::Database,
    };
    let mut items = Vec::with_capacity(usize::from(topology.partitions) * Family::ALL.len());
    for family in Family::ALL {
        let pending = crate::commands::queue_position::read_pending(&state.db, family).await?;
        let mut backlog: HashMap<u16, (u64, Uuid)> = HashMap::new();
        for (id, partition_key) in pending {
            let partition = shared::domain::partition::partition_of(partition_key, topology.partitions);
            let entry = backlog.entry(partition).or_insert((0, id));
            entry.0 += 1;
            entry.1 = entry.1.min(id);
        }
        let (rates, now) = shared::store::settle_rates::of_family(&state.db, family).await?;
        for partition in 0..topology.partitions {
            let (pending, oldest) = backlog
                .get(&partition)
                .map_or((0, None), |(n, oldest)| (*n, Some(*oldest)));
            let owner = owners.get(&(family.as_str().to_owned(), partition));
            let queue = topology.queue(family, partition);
            let counts = broker
                .as_ref()
                .and_then(|(_, counts)| counts.get(&queue))
                .copied();
            let (ready, unacked) = match (source, counts) {
                (CountSource::Management, Some(c)) => (Some(c.ready), c.unacked),
                (CountSource::Amqp, Some(c)) => (Some(c.ready), Some(pending.saturating_sub(c.ready))),
                _ => (None, None),
            };
            let rate = rates.get(&partition);
            items.push(PartitionView {
                family: family.as_str().to_owned(),
                partition,
                owner: owner.map(|(_, name)| name.clone()),
                owner_id: owner.map(|(id, _)| *id),
                ready,
                unacked,
                pending,
                oldest_pending_at: oldest.and_then(accepted_at),
                settled_per_sec: rate.map_or(0.0, |r| round(r.rate.per_sec(now))),
                last_settled_at: rate.map(|r| r.rate.last_settled_at),
            });
        }
    }
    Ok(axum::Json(PartitionsView { source, items }))
}

/// Two decimals: a rate is an estimate, and more digits would only pretend otherwise.
fn round(rate: f64) -> f64 {
    (rate * 100.0).round() / 100.0
}

/// When a request was accepted: its id is a UUIDv7 made then.
fn accepted_at(id: Uuid) -> Option<DateTime<Utc>> {
    let (secs, nanos) = id.get_timestamp()?.to_unix();
    DateTime::from_timestamp(i64::try_from(secs).ok()?, nanos)
}

/// The live owner (id and name) of each partition whose lease is unexpired.
async fn lease_owners(state: &AppState) -> Result<HashMap<(String, u16), (Uuid, String)>> {
    let rows = sqlx::query!(
        r#"SELECT l.family, l.partition, l.owner AS "owner!", coalesce(w.name, '') AS "name!"
           FROM partition_leases l LEFT JOIN worker_replicas w ON w.id = l.owner
           WHERE l.owner IS NOT NULL AND l.expires_at > now()"#
    )
    .fetch_all(&state.db)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|r| {
            let partition = u16::try_from(r.partition).ok()?;
            let name = if r.name.is_empty() {
                r.owner.to_string()
            } else {
                r.name
            };
            Some(((r.family, partition), (r.owner, name)))
        })
        .collect())
}

/// One queue's counts.
#[derive(Debug, Clone, Copy)]
struct QueueCounts {
    ready: u64,
    /// Only the management API knows it.
    unacked: Option<u64>,
}

/// RabbitMQ's counts of every partition queue, by queue name: from the management API
/// when one is configured and answers, else from passive declares over AMQP; `None` when
/// RabbitMQ answers neither way within [`BROKER_TIMEOUT`].
async fn broker_counts(state: &AppState) -> Option<(CountSource, HashMap<String, QueueCounts>)> {
    if let Some(url) = &state.config.rabbitmq_management_url {
        match tokio::time::timeout(BROKER_TIMEOUT, management_counts(url.expose_secret())).await {
            Ok(Ok(counts)) => return Some((CountSource::Management, counts)),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "the RabbitMQ management API did not answer; trying AMQP")
            }
            Err(_) => tracing::debug!("the RabbitMQ management API timed out; trying AMQP"),
        }
    }
    match tokio::time::timeout(BROKER_TIMEOUT, amqp_counts(state)).await {
        Ok(Ok(counts)) => Some((CountSource::Amqp, counts)),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "cannot count the partition queues over AMQP");
            None
        }
        Err(_) => None,
    }
}

/// A passive declare of each partition queue (its ready messages), on one channel.
async fn amqp_counts(state: &AppState) -> anyhow::Result<HashMap<String, QueueCounts>> {
    let channel = state.broker.channel().await?;
    let topology = &state.config.topology;
    let mut counts = HashMap::new();
    for family in Family::ALL {
        for partition in 0..topology.partitions {
            let queue = topology.queue(family, partition);
            let ready = u64::from(queue_depth(&channel, &queue).await?);
            counts.insert(queue, QueueCounts { ready, unacked: None });
        }
    }
    let _ = channel.close(200, "counted".into()).await;
    Ok(counts)
}

/// One queue as the management API lists it (`GET /api/queues`).
#[derive(Debug, Deserialize)]
struct ManagedQueue {
    name: String,
    #[serde(default)]
    messages_ready: u64,
    #[serde(default)]
    messages_unacknowledged: u64,
}

/// Every queue's ready and unacked messages, in one call to the management API at `url`
/// (`http://user:password@host:15672`).
async fn management_counts(url: &str) -> anyhow::Result<HashMap<String, QueueCounts>> {
    let base = reqwest::Url::parse(url)?;
    let (user, password) = (base.username().to_owned(), base.password().map(str::to_owned));
    let mut endpoint = base.join("api/queues")?;
    let _ = endpoint.set_username("");
    let _ = endpoint.set_password(None);
    endpoint.set_query(Some("columns=name,messages_ready,messages_unacknowledged"));
    let queues: Vec<ManagedQueue> = reqwest::Client::new()
        .get(endpoint)
        .basic_auth(user, password)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    Ok(queues
        .into_iter()
        .map(|q| {
            let counts = QueueCounts {
                ready: q.messages_ready,
                unacked: Some(q.messages_unacknowledged),
            };
            (q.name, counts)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_was_accepted_when_its_uuid_v7_was_made() {
        let before = Utc::now() - chrono::TimeDelta::milliseconds(1);
        let at = accepted_at(Uuid::now_v7()).unwrap_or_default();
        assert!(
            at >= before && at <= Utc::now() + chrono::TimeDelta::milliseconds(1),
            "{at}"
        );
        assert_eq!(accepted_at(Uuid::new_v4()), None);
    }
}
