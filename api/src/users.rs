//! Users: registration. A user's balance row is created with the user, so every later
//! balance change is a single-row UPDATE.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde::{Deserialize, Serialize};
use shared::domain::parse_name;
use shared::error::ErrorCode;
use sqlx::PgConnection;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::{ApiError, Result};
use crate::extract::{IdempotencyKey, Json};
use crate::openapi::{ErrorSchema, IdempotencyKeyHeader};
use crate::{idempotency, AppState};

const MAX_NAME_CHARS: usize = 100;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(create_user))
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
}

/// Registers a user, with a balance of 0.
#[utoipa::path(
    post, path = "/users", tag = "users",
    params(IdempotencyKeyHeader),
    request_body = NewUser,
    responses(
        (status = 201, body = User),
        (status = 400, body = ErrorSchema, description = "ERR_INVALID_REQUEST"),
        (status = 409, body = ErrorSchema, description = "ERR_IDEMPOTENCY_KEY_IN_USE"),
        (status = 422, body = ErrorSchema, description = "ERR_IDEMPOTENCY_KEY_REUSED"),
    )
)]
async fn create_user(
    State(state): State<AppState>,
    key: IdempotencyKey,
    Json(body): Json<NewUser>,
) -> Result<Response> {
    let name = parse_name(&body.name, MAX_NAME_CHARS).ok_or_else(|| {
        ApiError::new(
            ErrorCode::InvalidRequest,
            "name must be 1 to 100 characters without control characters",
        )
    })?;
    let request = serde_json::json!({ "name": name });
    let outcome = idempotency::run(
        &state.db,
        &key,
        "POST /users",
        &request,
        StatusCode::CREATED,
        async |conn| insert_user(conn, &name).await,
    )
    .await?;
    Ok(outcome.into_response(StatusCode::CREATED))
}

async fn insert_user(conn: &mut PgConnection, name: &str) -> Result<User> {
    let user_id: i64 = sqlx::query_scalar("INSERT INTO users (name) VALUES ($1) RETURNING id")
        .bind(name)
        .fetch_one(&mut *conn)
        .await?;
    sqlx::query("INSERT INTO balances (user_id) VALUES ($1)")
        .bind(user_id)
        .execute(&mut *conn)
        .await?;
    Ok(User {
        user_id,
        name: name.to_owned(),
    })
}
