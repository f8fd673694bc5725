//! A request as clients see it ([`RequestStatus`]), and its reads: one of a user's, or many
//! settled ones at once for their waiters ([`crate::waiting`]).

use chrono::{DateTime, Utc};
use serde::Serialize;
use shared::domain::UserId;
use sqlx::PgPool;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::error::Result;
use crate::openapi::ErrorSchema;

/// The columns of [`RequestStatus`].
pub const REQUEST_COLUMNS: &str = "id AS request_id, kind, status, created_at, completed_at, result, error";

#[derive(Debug, Clone, Serialize, sqlx::FromRow, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RequestStatus {
    pub request_id: Uuid,
    /// `COUPON_ISSUE`, `ORDER_CREATE` or `ORDER_PAY`.
    #[serde(rename = "type")]
    kind: String,
    /// `PENDING`, then `SUCCEEDED` or `FAILED` for good.
    status: String,
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
    #[sqlx(skip)]
    pub order_id: Option<Uuid>,
}

impl RequestStatus {
    pub fn is_pending(&self) -> bool {
        self.status == "PENDING"
    }
}

/// The caller's request `id`, if it exists.
pub async fn fetch_request(db: &PgPool, id: Uuid, user: UserId) -> Result<Option<RequestStatus>> {
    Ok(sqlx::query_as(&format!(
        "SELECT {REQUEST_COLUMNS} FROM requests WHERE id = $1 AND user_id = $2"
    ))
    .bind(id)
    .bind(user.get())
    .fetch_optional(db)
    .await?)
}

/// Those of `ids` that are settled, in one statement. Whose they are is not asked: only a
/// waiter who registered for a request after reading it as its own (or storing it) gets it.
pub async fn fetch_settled(db: &PgPool, ids: &[Uuid]) -> sqlx::Result<Vec<RequestStatus>> {
    sqlx::query_as(&format!(
        "SELECT {REQUEST_COLUMNS} FROM requests WHERE id = ANY($1) AND status <> 'PENDING'"
    ))
    .bind(ids)
    .fetch_all(db)
    .await
}
