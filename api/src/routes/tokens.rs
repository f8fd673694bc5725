//! A user's bearer tokens after the first: issue another, list them, revoke one, the one
//! sent, or all of them (a lost device).
//!
//! A user holds at most `MAX_TOKENS_PER_USER` live tokens and each lives `TOKEN_TTL_DAYS`
//! ([`crate::http::auth::issue_token`]), so a stolen token cannot mint siblings without end nor
//! outlive its owner's attention forever. A revocation is refused by this replica at once
//! and by every other within `TOKEN_CACHE_TTL_MS` (at most 5 s, checked at start): their
//! caches believe a verification no longer than that.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::Serialize;
use shared::domain::error::ErrorCode;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::{ApiError, Result};
use crate::http::auth::{issue_token, Caller};
use crate::http::extract::IdempotencyKey;
use crate::routes::openapi::{ErrorSchema, IdempotencyKeyHeader};
use crate::routes::users::{invalid_user, not_to_be_stored};
use crate::{idempotency, AppState};

/// Most tokens one listing shows. The cap on live tokens keeps a user far below it; only a
/// user who minted tokens before the cap existed can hold more, and a listing stays bounded.
const MAX_LISTED: i64 = 1_000;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_token, list_tokens, revoke_all_tokens))
        .routes(routes!(revoke_current_token))
        .routes(routes!(revoke_token))
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
        (status = 201, body = NewTokenAnswer, headers(("Cache-Control" = String, description = "`no-store`: the answer carries a token"))),
        (status = 400, body = ErrorSchema, description = "ERR_BALANCE_INVALID_USER"),
        (status = 409, body = ErrorSchema, description = "ERR_TOO_MANY_TOKENS: the user already holds MAX_TOKENS_PER_USER live tokens; or ERR_IDEMPOTENCY_KEY_IN_USE"),
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
    let policy = state.config.tokens;
    let outcome = idempotency::run_saving(
        &state.db,
        &key,
        &scope,
        &serde_json::json!({}),
        StatusCode::CREATED,
        |_| serde_json::to_value(NewTokenAnswer { token: None }),
        async |conn| {
            Ok(NewTokenAnswer {
                token: Some(issue_token(conn, user, Some(caller.token()), policy).await?),
            })
        },
    )
    .await?;
    Ok(not_to_be_stored(outcome.into_response(StatusCode::CREATED)))
}

/// One of a user's live tokens, without its secret or its hash.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TokenInfo {
    /// What `DELETE /users/{userId}/tokens/{tokenId}` names.
    token_id: i64,
    created_at: DateTime<Utc>,
    /// To about a minute (uses are recorded in bulk); absent if never used.
    #[serde(skip_serializing_if = "Option::is_none")]
    last_used_at: Option<DateTime<Utc>>,
    /// Absent if it never expires (`TOKEN_TTL_DAYS=0` when it was issued).
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_at: Option<DateTime<Utc>>,
    /// Whether this is the token the listing was asked with.
    current: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TokenList {
    /// Newest first.
    items: Vec<TokenInfo>,
}

/// The calling user's live tokens (unrevoked, unexpired), newest first.
#[utoipa::path(
    get, path = "/users/{userId}/tokens", tag = "users",
    params(("userId" = i64, Path, minimum = 1)),
    security(("user_token" = [])),
    responses(
        (status = 200, body = TokenList),
        (status = 400, body = ErrorSchema, description = "ERR_BALANCE_INVALID_USER"),
    )
)]
async fn list_tokens(
    State(state): State<AppState>,
    caller: Caller,
    Path(user): Path<String>,
) -> Result<Response> {
    let user = caller.own_path_user(&user, invalid_user)?;
    let rows = sqlx::query!(
        "SELECT id, token_hash, created_at, last_used_at, expires_at FROM user_tokens
          WHERE user_id = $1 AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now())
          ORDER BY id DESC
          LIMIT $2",
        user.get(),
        MAX_LISTED,
    )
    .fetch_all(&state.db)
    .await?;
    let current = caller.token();
    let items = rows
        .into_iter()
        .map(|row| {
            let hash: Option<shared::domain::identity::TokenHash> = row.token_hash.as_slice().try_into().ok();
            // A use seen here and not yet written is newer than the stored one.
            let unrecorded = hash.and_then(|h| state.auth.unrecorded_use(&h));
            TokenInfo {
                token_id: row.id,
                created_at: row.created_at,
                last_used_at: row.last_used_at.max(unrecorded),
                expires_at: row.expires_at,
                current: hash == Some(current),
            }
        })
        .collect();
    Ok(axum::Json(TokenList { items }).into_response())
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

/// Revokes one of the calling user's tokens. Revoking one already revoked or expired is
/// answered 204 again (a retried `DELETE` succeeds); every API replica refuses it within 5 s.
#[utoipa::path(
    delete, path = "/users/{userId}/tokens/{tokenId}", tag = "users",
    params(("userId" = i64, Path, minimum = 1), ("tokenId" = i64, Path, minimum = 1)),
    security(("user_token" = [])),
    responses(
        (status = 204, description = "revoked"),
        (status = 400, body = ErrorSchema, description = "ERR_BALANCE_INVALID_USER, or ERR_INVALID_REQUEST for a malformed tokenId"),
        (status = 404, body = ErrorSchema, description = "ERR_NOT_FOUND: no token of this user has this tokenId"),
    )
)]
async fn revoke_token(
    State(state): State<AppState>,
    caller: Caller,
    Path((user, token_id)): Path<(String, String)>,
) -> Result<Response> {
    let token_id = token_id
        .parse::<i64>()
        .ok()
        .filter(|id| *id > 0)
        .ok_or_else(|| ApiError::new(ErrorCode::InvalidRequest, "tokenId must be a positive integer"))?;
    let user = caller.own_path_user(&user, invalid_user)?;
    // The first revocation's time is kept: a retry changes nothing.
    let revoked = sqlx::query_scalar!(
        "UPDATE user_tokens SET revoked_at = COALESCE(revoked_at, now())
          WHERE id = $1 AND user_id = $2
          RETURNING token_hash",
        token_id,
        user.get(),
    )
    .fetch_optional(&state.db)
    .await?
    .ok_or_else(|| ApiError::new(ErrorCode::NotFound, "this user has no token with this tokenId"))?;
    forget(&state, &revoked);
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Revokes every token of the calling user, the one it is sent with included: what a user
/// does when a device is lost. Every API replica refuses them within 5 s.
#[utoipa::path(
    delete, path = "/users/{userId}/tokens", tag = "users",
    params(("userId" = i64, Path, minimum = 1)),
    security(("user_token" = [])),
    responses(
        (status = 204, description = "all revoked"),
        (status = 400, body = ErrorSchema, description = "ERR_BALANCE_INVALID_USER"),
    )
)]
async fn revoke_all_tokens(
    State(state): State<AppState>,
    caller: Caller,
    Path(user): Path<String>,
) -> Result<Response> {
    let user = caller.own_path_user(&user, invalid_user)?;
    let revoked = sqlx::query_scalar!(
        "UPDATE user_tokens SET revoked_at = now()
          WHERE user_id = $1 AND revoked_at IS NULL
          RETURNING token_hash",
        user.get(),
    )
    .fetch_all(&state.db)
    .await?;
    for hash in &revoked {
        forget(&state, hash);
    }
    // The caller's own, even if it was not found live (expired a moment ago).
    state.auth.forget(caller.token());
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Makes this replica refuse the token stored as `hash` from now on.
fn forget(state: &AppState, hash: &[u8]) {
    if let Ok(hash) = hash.try_into() {
        state.auth.forget(hash);
    }
}
