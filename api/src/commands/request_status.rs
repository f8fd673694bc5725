//! A request as clients see it ([`RequestView`]), and its reads: one of a user's, or many
//! settled ones at once for their waiters ([`crate::commands::waiting`]). A pending one is placed in
//! its partition's queue ([`place_in_queues`]) before it is answered.

use chrono::{DateTime, Utc};
use serde::Serialize;
use shared::domain::command::{RequestKind, RequestStatus};
use shared::domain::ids::UserId;
use sqlx::PgPool;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::commands::queue_position::{Place, QueuePositions};
use crate::error::Result;
use crate::routes::openapi::ErrorSchema;

/// The body of a `202 Accepted`, and of its replays: built from the request alone (its id,
/// type and the order it creates), so a replay needs no saved copy of it.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Accepted {
    pub request_id: Uuid,
    /// `COUPON_ISSUE`, `ORDER_CREATE` or `ORDER_PAY`.
    #[serde(rename = "type")]
    #[schema(value_type = String)]
    pub kind: RequestKind,
    /// Always `PENDING` here.
    #[schema(value_type = String)]
    pub status: RequestStatus,
    /// Where to poll: `/requests/{requestId}`.
    pub status_url: String,
    /// The order an `ORDER_CREATE` creates.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub order_id: Option<Uuid>,
    /// Commands accepted before this one in its partition and not yet settled (0: it is
    /// next); in the replay of a `202` for its `Idempotency-Key`, where it stands now, and
    /// absent once it is settled.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub queue_position: Option<u64>,
    /// Milliseconds until it is likely settled, at its partition's recent settle rate;
    /// absent when nothing settled in its partition within the last minute.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub estimated_wait_ms: Option<u64>,
}

impl Accepted {
    /// The `202` of a stored request; `creates` is the order an `ORDER_CREATE` creates.
    pub fn new(request_id: Uuid, kind: RequestKind, creates: Option<Uuid>) -> Self {
        Self {
            request_id,
            kind,
            status: RequestStatus::Pending,
            status_url: format!("/requests/{request_id}"),
            order_id: creates.filter(|_| kind == RequestKind::OrderCreate),
            queue_position: None,
            estimated_wait_ms: None,
        }
    }

    /// Says where the command stands in its partition's queue.
    pub fn set_place(&mut self, place: Place) {
        self.queue_position = Some(place.position);
        self.estimated_wait_ms = place.estimated_wait.map(millis);
    }
}

fn millis(wait: std::time::Duration) -> u64 {
    u64::try_from(wait.as_millis()).unwrap_or(u64::MAX)
}

/// A request as `GET /requests/{requestId}` answers it; the contract's (and the OpenAPI
/// document's) `RequestStatus`, named apart from the domain's status of a request.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = RequestStatus)]
pub struct RequestView {
    pub request_id: Uuid,
    /// `COUPON_ISSUE`, `ORDER_CREATE` or `ORDER_PAY`.
    #[serde(rename = "type")]
    #[schema(value_type = String)]
    kind: RequestKind,
    /// `PENDING`, then `SUCCEEDED` or `FAILED` for good.
    #[schema(value_type = String)]
    status: RequestStatus,
    created_at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    completed_at: Option<DateTime<Utc>>,
    /// On success: what the command produced.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    result: Option<serde_json::Value>,
    /// On failure: `{code, message}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<ErrorSchema>)]
    error: Option<serde_json::Value>,
    /// The order an `ORDER_CREATE` creates, in the answer to a command that waited for it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub order_id: Option<Uuid>,
    /// Only while `PENDING`: commands accepted before this one in its partition and not yet
    /// settled (0: it is next), as of at most a second or so ago.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    queue_position: Option<u64>,
    /// Only while `PENDING`: milliseconds until it is likely settled, at its partition's
    /// recent settle rate; absent when nothing settled in its partition within the last
    /// minute (no worker is settling it: no estimate is honest).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    estimated_wait_ms: Option<u64>,
    /// What its partition hashes, to place it in its queue; not part of the resource.
    #[serde(skip)]
    partition_key: i64,
}

/// A request's row as the reads select it: [`RequestView`] without `order_id` (a column
/// of `requests`, but part of a request only in the answer to a command that waited for
/// it, which sets it) and the place in the queue, which is not a column (`query_as!` fills
/// every field of its struct from the row).
pub struct RequestRow {
    pub request_id: Uuid,
    pub kind: RequestKind,
    pub partition_key: i64,
    pub status: RequestStatus,
    pub created_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
    pub result: Option<serde_json::Value>,
    pub error: Option<serde_json::Value>,
}

impl From<RequestRow> for RequestView {
    fn from(row: RequestRow) -> Self {
        Self {
            request_id: row.request_id,
            kind: row.kind,
            status: row.status,
            created_at: row.created_at,
            completed_at: row.completed_at,
            result: row.result,
            error: row.error,
            order_id: None,
            queue_position: None,
            estimated_wait_ms: None,
            partition_key: row.partition_key,
        }
    }
}

impl RequestView {
    pub fn is_pending(&self) -> bool {
        self.status == RequestStatus::Pending
    }

    /// Its kind and partition key while it waits in a queue; `None` once settled.
    pub fn queued(&self) -> Option<(RequestKind, i64)> {
        self.is_pending().then_some((self.kind, self.partition_key))
    }

    /// Says where it stands in its partition's queue (only a pending request is placed).
    pub fn set_place(&mut self, place: Place) {
        if self.is_pending() {
            self.queue_position = Some(place.position);
            self.estimated_wait_ms = place.estimated_wait.map(millis);
        }
    }

    /// Its estimated wait, for `Retry-After`.
    pub fn estimated_wait_ms(&self) -> Option<u64> {
        self.estimated_wait_ms
    }
}

/// Places every pending request of `requests` (a page, a single request) in its
/// partition's queue, from `queues`' snapshot; the settled ones are left as they are.
pub async fn place_in_queues(queues: &QueuePositions, requests: &mut [RequestView]) {
    for request in requests.iter_mut() {
        let Some((kind, partition_key)) = request.queued() else {
            continue;
        };
        if let Some(place) = queues.place(kind, partition_key, request.request_id).await {
            request.set_place(place);
        }
    }
}

/// The caller's request `id`, if it exists.
pub async fn fetch_request(db: &PgPool, id: Uuid, user: UserId) -> Result<Option<RequestView>> {
    let row = sqlx::query_as!(
        RequestRow,
        r#"SELECT id AS request_id, kind AS "kind: RequestKind", partition_key,
                  status AS "status: RequestStatus", created_at, completed_at, result, error
         FROM requests WHERE id = $1 AND user_id = $2"#,
        id,
        user.get(),
    )
    .fetch_optional(db)
    .await?;
    Ok(row.map(RequestView::from))
}

/// Those of `ids` that are settled, in one statement. Whose they are is not asked: only a
/// waiter who registered for a request after reading it as its own (or storing it) gets it.
pub async fn fetch_settled(db: &PgPool, ids: &[Uuid]) -> sqlx::Result<Vec<RequestView>> {
    let rows = sqlx::query_as!(
        RequestRow,
        r#"SELECT id AS request_id, kind AS "kind: RequestKind", partition_key,
                  status AS "status: RequestStatus", created_at, completed_at, result, error
         FROM requests WHERE id = ANY($1) AND status <> 'PENDING'"#,
        ids,
    )
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().map(RequestView::from).collect())
}
