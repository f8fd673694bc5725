//! The asynchronous commands' requests: one by its id (`GET /requests/{requestId}`), a
//! user's, newest first (`GET /users/{userId}/requests`), and cancelling one still pending
//! (`DELETE /requests/{requestId}`). Each reaches only the caller's own.

use std::time::Duration;

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use shared::domain::command::{RequestKind, RequestStatus};
use shared::domain::error::{ErrorBody, ErrorCode};
use shared::domain::ids::UserId;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::commands::request_status::{fetch_request, place_in_queues, RequestRow, RequestView};
use crate::error::{ApiError, Result};
use crate::http::auth::Caller;
use crate::http::extract::Query;
use crate::http::pagination::{finish_page, PageQuery};
use crate::routes::openapi::ErrorSchema;
use crate::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(get_request, cancel_request))
        .routes(routes!(list_requests))
}

/// `?wait=N`: seconds to wait for the request to settle, 1 to 30.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WaitQuery {
    /// Answer as soon as the request is settled, or after this many seconds (1 to 30) with
    /// it still `PENDING`.
    #[param(value_type = Option<i64>, minimum = 1, maximum = 30)]
    wait: Option<String>,
}

/// The status of one of the caller's asynchronous requests (another user's reads as
/// unknown: its existence is not revealed); `Retry-After` says when to poll again while it
/// is pending. With `?wait=N` the answer comes as soon as the request is settled, or after
/// N seconds.
#[utoipa::path(
    get, path = "/requests/{requestId}", tag = "requests",
    params(("requestId" = Uuid, Path), WaitQuery),
    security(("user_token" = [])),
    responses(
        (status = 200, body = RequestView, headers(
            ("Retry-After" = i64, description = "only while the request is PENDING: seconds to wait before polling again"),
        )),
        (status = 400, body = ErrorSchema, description = "ERR_INVALID_REQUEST"),
        (status = 404, body = ErrorSchema, description = "ERR_REQUEST_NOT_FOUND: unknown, or another user's"),
        (status = 429, body = ErrorSchema, description = "ERR_RATE_LIMITED: with ?wait=, the user already holds MAX_WAITS_PER_USER waits"),
    )
)]
async fn get_request(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(query): Query<WaitQuery>,
) -> Result<Response> {
    let id = Uuid::parse_str(&id)
        .map_err(|_| ApiError::new(ErrorCode::InvalidRequest, "requestId must be a UUID"))?;
    let wait = match query.wait.as_deref() {
        None | Some("") => None,
        Some(raw) => Some(
            raw.parse::<u64>()
                .ok()
                .filter(|s| (1..=30).contains(s))
                .map(|s| Duration::from_secs(s).min(state.config.max_wait))
                .ok_or_else(|| ApiError::new(ErrorCode::InvalidRequest, "wait must be 1 to 30 seconds"))?,
        ),
    };
    let user = caller.user();
    // Registered before the read, so that a notice between the read and the wait is kept.
    let registration = match wait {
        Some(within) => Some((state.waiters.register(id, user)?, within)),
        None => None,
    };
    let found = fetch_request(&state.db, id, user)
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::RequestNotFound, "no request with this requestId"))?;
    let mut found = match registration {
        Some((registration, within)) if found.is_pending() => {
            registration.settled(within).await.unwrap_or(found)
        }
        _ => found,
    };
    place_in_queues(&state.queue_positions, std::slice::from_mut(&mut found)).await;
    Ok(request_answer(found))
}

/// Cancels one of the caller's requests while it is still `PENDING`: it fails with
/// `ERR_REQUEST_CANCELLED` and its command never takes effect (an order it was creating is
/// `REJECTED`; a `PENDING` order holds no stock). Atomic with the workers: the request's row
/// is updated only while `PENDING`, under the row lock a settling batch takes first, so a
/// request a worker settles meanwhile answers `409 ERR_REQUEST_ALREADY_SETTLED`, and a
/// worker that receives a cancelled command finds it terminal and applies nothing.
#[utoipa::path(
    delete, path = "/requests/{requestId}", tag = "requests",
    params(("requestId" = Uuid, Path)),
    security(("user_token" = [])),
    responses(
        (status = 200, body = RequestView, description = "cancelled: FAILED with ERR_REQUEST_CANCELLED"),
        (status = 400, body = ErrorSchema, description = "ERR_INVALID_REQUEST"),
        (status = 404, body = ErrorSchema, description = "ERR_REQUEST_NOT_FOUND: unknown, or another user's"),
        (status = 409, body = ErrorSchema, description = "ERR_REQUEST_ALREADY_SETTLED: it was SUCCEEDED or FAILED already"),
    )
)]
async fn cancel_request(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response> {
    let id = Uuid::parse_str(&id)
        .map_err(|_| ApiError::new(ErrorCode::InvalidRequest, "requestId must be a UUID"))?;
    let user = caller.user();
    let not_found = || ApiError::new(ErrorCode::RequestNotFound, "no request with this requestId");
    // Whose it is never changes: read before the transaction, which then only fails it.
    fetch_request(&state.db, id, user).await?.ok_or_else(not_found)?;
    state.limits.user_write(user)?;
    let error = ErrorBody::new(
        ErrorCode::RequestCancelled,
        "cancelled by its client before it was settled",
    );
    let mut tx = state.db.begin().await?;
    let cancelled = shared::store::requests::fail_pending(&mut tx, id, &error).await?;
    tx.commit().await?;
    if !cancelled {
        return Err(ApiError::new(
            ErrorCode::RequestAlreadySettled,
            "the request was settled before it could be cancelled",
        ));
    }
    // Whoever waits for it (on any replica) is answered now.
    shared::store::settlements::announce(&state.db, &[id]).await;
    let cancelled = fetch_request(&state.db, id, user).await?.ok_or_else(not_found)?;
    Ok(request_answer(cancelled))
}

/// `200` with the request, and `Retry-After` while it is pending (from its estimated wait,
/// when it has one).
fn request_answer(request: RequestView) -> Response {
    let pending = request.is_pending();
    let estimate = request.estimated_wait_ms();
    let mut response = axum::Json(request).into_response();
    if pending {
        crate::commands::polling::set_retry_after(&mut response, estimate);
    }
    response
}

/// The filters of a user's requests, as sent; parsed so that bad values get the contract's
/// error.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RequestFilter {
    /// `PENDING`, `SUCCEEDED` or `FAILED`.
    status: Option<String>,
    /// `COUPON_ISSUE`, `ORDER_CREATE` or `ORDER_PAY`.
    #[serde(rename = "type")]
    #[param(rename = "type")]
    kind: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RequestPage {
    items: Vec<RequestView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_cursor: Option<String>,
}

/// The caller's requests, newest first, optionally of one status and one type.
#[utoipa::path(
    get, path = "/users/{userId}/requests", tag = "requests",
    params(("userId" = i64, Path, minimum = 1), RequestFilter, PageQuery),
    security(("user_token" = [])),
    responses(
        (status = 200, body = RequestPage),
        (status = 400, body = ErrorSchema, description = "ERR_INVALID_REQUEST: a malformed userId, filter, limit or cursor"),
    )
)]
async fn list_requests(
    State(state): State<AppState>,
    caller: Caller,
    Path(user): Path<String>,
    Query(filter): Query<RequestFilter>,
    Query(page): Query<PageQuery>,
) -> Result<axum::Json<RequestPage>> {
    let invalid = |message: &str| ApiError::new(ErrorCode::InvalidRequest, message);
    let user = UserId::parse(&user).ok_or_else(|| invalid("userId must be a positive integer"))?;
    let status = match filter.status.as_deref() {
        None | Some("") => None,
        Some(raw) => Some(
            RequestStatus::parse(raw)
                .ok_or_else(|| invalid("status must be PENDING, SUCCEEDED or FAILED"))?,
        ),
    };
    let kind = match filter.kind.as_deref() {
        None | Some("") => None,
        Some(raw) => Some(
            RequestKind::parse(raw)
                .ok_or_else(|| invalid("type must be COUPON_ISSUE, ORDER_CREATE or ORDER_PAY"))?,
        ),
    };
    let (limit, before) = page.parse_with(|raw| Uuid::parse_str(raw).ok())?;
    caller.act_for(user)?;
    let rows: Vec<RequestView> = sqlx::query_as!(
        RequestRow,
        r#"SELECT id AS request_id, kind AS "kind: RequestKind", partition_key,
                  status AS "status: RequestStatus", created_at, completed_at, result, error
         FROM requests
         WHERE user_id = $1 AND ($2::text IS NULL OR status = $2) AND ($3::text IS NULL OR kind = $3)
           AND ($4::uuid IS NULL OR id < $4)
         ORDER BY id DESC LIMIT $5"#,
        user.get(),
        status as _,
        kind as _,
        before,
        limit + 1,
    )
    .fetch_all(&state.db)
    .await?
    .into_iter()
    .map(RequestView::from)
    .collect();
    let (mut items, next_cursor) = finish_page(rows, limit, |r| r.request_id);
    // Only the page's pending requests are placed, from memory.
    place_in_queues(&state.queue_positions, &mut items).await;
    Ok(axum::Json(RequestPage { items, next_cursor }))
}
