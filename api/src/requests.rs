//! `GET /requests/{requestId}`: the status of an asynchronous command.

use axum::extract::{Path, State};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::Serialize;
use shared::error::ErrorCode;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::auth::Caller;
use crate::commands::POLL_AFTER_SECS;
use crate::error::{ApiError, Result};
use crate::openapi::ErrorSchema;
use crate::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(get_request))
}

#[derive(Debug, Serialize, sqlx::FromRow, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RequestStatus {
    request_id: Uuid,
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
}

/// The status of one of the caller's asynchronous requests (another user's reads as
/// unknown: its existence is not revealed); `Retry-After` says when to poll again while it
/// is pending.
#[utoipa::path(
    get, path = "/requests/{requestId}", tag = "requests",
    params(("requestId" = Uuid, Path)),
    security(("user_token" = [])),
    responses(
        (status = 200, body = RequestStatus, headers(
            ("Retry-After" = i64, description = "only while the request is PENDING: seconds to wait before polling again"),
        )),
        (status = 400, body = ErrorSchema, description = "ERR_INVALID_REQUEST"),
        (status = 404, body = ErrorSchema, description = "ERR_REQUEST_NOT_FOUND: unknown, or another user's"),
    )
)]
async fn get_request(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response> {
    let id = Uuid::parse_str(&id)
        .map_err(|_| ApiError::new(ErrorCode::InvalidRequest, "requestId must be a UUID"))?;
    let found: Option<RequestStatus> = sqlx::query_as(
        "SELECT id AS request_id, kind, status, created_at, completed_at, result, error
         FROM requests WHERE id = $1 AND user_id = $2",
    )
    .bind(id)
    .bind(caller.user().get())
    .fetch_optional(&state.db)
    .await?;
    let found =
        found.ok_or_else(|| ApiError::new(ErrorCode::RequestNotFound, "no request with this requestId"))?;
    let pending = found.status == "PENDING";
    let mut response = axum::Json(found).into_response();
    if pending {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static(POLL_AFTER_SECS));
    }
    Ok(response)
}
