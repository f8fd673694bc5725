//! Users: registration and their bearer tokens. A user's balance row is created with the
//! user, so every later balance change is a single-row UPDATE.
//!
//! A token is shown once, in the answer that creates it, and stored only as its hash; a
//! replay of that answer (the same `Idempotency-Key`) repeats it without the token, since
//! the token was never kept.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use shared::domain::error::ErrorCode;
use shared::domain::ids::{parse_name, UserId};
use sqlx::PgConnection;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::{issue_token, Caller};
use crate::error::{ApiError, Result};
use crate::extract::{ClientAddress, IdempotencyKey, Json};
use crate::openapi::{ErrorSchema, IdempotencyKeyHeader};
use crate::{idempotency, AppState};

const MAX_NAME_CHARS: usize = 100;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_user))
        .routes(routes!(create_token))
        .routes(routes!(revoke_current_token))
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
        (status = 201, body = User),
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
        async |conn| insert_user(conn, &name).await,
    )
    .await?;
    Ok(outcome.into_response(StatusCode::CREATED))
}

/// What a replay of a registration answers: the user, not the token.
fn without_token(user: &User) -> serde_json::Result<serde_json::Value> {
    serde_json::to_value(User {
        user_id: user.user_id,
        name: user.name.clone(),
        token: None,
    })
}

async fn insert_user(conn: &mut PgConnection, name: &str) -> Result<User> {
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
    let token = issue_token(conn, user, None).await?;
    Ok(User {
        user_id,
        name: name.to_owned(),
        token: Some(token),
    })
}

#[derive(Debug, Serialize, ToSchema)]
pub struct NewTokenAnswer {
    /// A new bearer token of the same user, shown only here. Absent when this answer is
    /// replayed for an `Idempotency-Key`.
    #[serde(skip_serializing_if = "Option::is_none")]
    token: Option<String>,
}

/// Issues another bearer token for the calling user (e.g. for a second device).
#[utoipa::path(
    post, path = "/users/{userId}/tokens", tag = "users",
    params(("userId" = i64, Path, minimum = 1), IdempotencyKeyHeader),
    security(("user_token" = [])),
    responses(
        (status = 201, body = NewTokenAnswer),
        (status = 400, body = ErrorSchema, description = "ERR_BALANCE_INVALID_USER"),
    )
)]
async fn create_token(
    State(state): State<AppState>,
    caller: Caller,
    Path(user): Path<String>,
    key: IdempotencyKey,
) -> Result<Response> {
    let user = caller.own_path_user(&user, invalid_user)?;
    state.limits.user_write(user)?;
    let scope = format!("POST /users/{user}/tokens");
    let outcome = idempotency::run_saving(
        &state.db,
        &key,
        &scope,
        &serde_json::json!({}),
        StatusCode::CREATED,
        |_| serde_json::to_value(NewTokenAnswer { token: None }),
        async |conn| {
            Ok(NewTokenAnswer {
                token: Some(issue_token(conn, user, Some(caller.token())).await?),
            })
        },
    )
    .await?;
    Ok(outcome.into_response(StatusCode::CREATED))
}

/// Revokes the token this request is sent with. Every API replica refuses it within 5 s
/// (this one at once).
#[utoipa::path(
    delete, path = "/users/{userId}/tokens/current", tag = "users",
    params(("userId" = i64, Path, minimum = 1)),
    security(("user_token" = [])),
    responses(
        (status = 204, description = "revoked"),
        (status = 400, body = ErrorSchema, description = "ERR_BALANCE_INVALID_USER"),
    )
)]
async fn revoke_current_token(
    State(state): State<AppState>,
    caller: Caller,
    Path(user): Path<String>,
) -> Result<Response> {
    caller.own_path_user(&user, invalid_user)?;
    let token = caller.token();
    sqlx::query!(
        "UPDATE user_tokens SET revoked_at = now() WHERE token_hash = $1 AND revoked_at IS NULL",
        token.as_slice(),
    )
    .execute(&state.db)
    .await?;
    state.auth.forget(token);
    Ok(StatusCode::NO_CONTENT.into_response())
}
