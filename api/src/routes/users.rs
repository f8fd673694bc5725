//! Users: registration, which also issues the user's first bearer token (the others are
//! [`crate::routes::tokens`]'). A user's balance row is created with the user, so every later
//! balance change is a single-row UPDATE.
//!
//! A token is shown once, in the answer that creates it (with `Cache-Control: no-store`, so
//! no cache keeps it), and stored only as its hash; a replay of that answer (the same
//! `Idempotency-Key`) repeats it without the token, since the token was never kept.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde::{Deserialize, Serialize};
use shared::domain::error::ErrorCode;
use shared::domain::ids::{parse_name, UserId};
use sqlx::PgConnection;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::config::TokenPolicy;
use crate::error::{ApiError, Result};
use crate::http::auth::issue_token;
use crate::http::extract::{ClientAddress, IdempotencyKey, Json};
use crate::routes::openapi::{ErrorSchema, IdempotencyKeyHeader};
use crate::{idempotency, AppState};

const MAX_NAME_CHARS: usize = 100;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(create_user))
}

/// `Cache-Control: no-store` on `response`: it carries a token, which no cache may keep.
pub fn not_to_be_stored(mut response: Response) -> Response {
    response.headers_mut().insert(
        axum::http::header::CACHE_CONTROL,
        axum::http::HeaderValue::from_static("no-store"),
    );
    response
}

/// A malformed `userId` in a path: the balance routes' 400, as before identity existed.
pub fn invalid_user() -> ApiError {
    ApiError::new(ErrorCode::BalanceInvalidUser, "userId is not a registered user")
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct NewUser {
    /// 1 to 100 characters.
    name: String,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct User {
    user_id: i64,
    name: String,
    /// The user's bearer token, shown only here: send it as `Authorization: Bearer <token>`.
    /// Absent when this answer is replayed for an `Idempotency-Key` (it is not kept).
    #[serde(skip_serializing_if = "Option::is_none")]
    token: Option<String>,
}

/// Registers a user, with a balance of 0 and a bearer token.
#[utoipa::path(
    post, path = "/users", tag = "users",
    params(IdempotencyKeyHeader),
    request_body = NewUser,
    responses(
        (status = 201, body = User, headers(("Cache-Control" = String, description = "`no-store`: the answer carries a token"))),
        (status = 400, body = ErrorSchema, description = "ERR_INVALID_REQUEST"),
        (status = 409, body = ErrorSchema, description = "ERR_IDEMPOTENCY_KEY_IN_USE"),
        (status = 422, body = ErrorSchema, description = "ERR_IDEMPOTENCY_KEY_REUSED"),
        (status = 429, body = ErrorSchema, description = "ERR_RATE_LIMITED: too many registrations from this address, with Retry-After"),
    )
)]
async fn create_user(
    State(state): State<AppState>,
    ClientAddress(client): ClientAddress,
    key: IdempotencyKey,
    Json(body): Json<NewUser>,
) -> Result<Response> {
    state.limits.signup(client)?;
    let name = parse_name(&body.name, MAX_NAME_CHARS).ok_or_else(|| {
        ApiError::new(
            ErrorCode::InvalidRequest,
            "name must be 1 to 100 characters without control characters",
        )
    })?;
    let request = serde_json::json!({ "name": name });
    let outcome = idempotency::run_saving(
        &state.db,
        &key,
        "POST /users",
        &request,
        StatusCode::CREATED,
        without_token,
        async |conn| insert_user(conn, &name, state.config.tokens).await,
    )
    .await?;
    Ok(not_to_be_stored(outcome.into_response(StatusCode::CREATED)))
}

/// What a replay of a registration answers: the user, not the token.
fn without_token(user: &User) -> serde_json::Result<serde_json::Value> {
    serde_json::to_value(User {
        user_id: user.user_id,
        name: user.name.clone(),
        token: None,
    })
}

async fn insert_user(conn: &mut PgConnection, name: &str, policy: TokenPolicy) -> Result<User> {
    let user_id: i64 = sqlx::query_scalar!(
        "WITH u AS (INSERT INTO users (name) VALUES ($1) RETURNING id),
              b AS (INSERT INTO balances (user_id) SELECT id FROM u)
         SELECT id FROM u",
        name,
    )
    .fetch_one(&mut *conn)
    .await?;
    let user =
        UserId::new(user_id).ok_or_else(|| ApiError::internal(anyhow::anyhow!("non-positive user id")))?;
    let token = issue_token(conn, user, None, policy).await?;
    Ok(User {
        user_id,
        name: name.to_owned(),
        token: Some(token),
    })
}
