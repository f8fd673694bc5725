//! `Idempotency-Key`, with Stripe's semantics, stored in PostgreSQL.
//!
//! A key is claimed in a short transaction of its own, so a second request with the same
//! key sees it in flight (409) instead of waiting on a lock. The response is saved in the
//! same transaction as the effect, so a saved response always describes a committed effect.
//! A 4xx is saved too (the same request would fail the same way); a 5xx releases the key so
//! that the client's retry runs again. A claim left behind by a crashed process can be taken
//! over once it is older than [`STALE_CLAIM`].

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use shared::error::ErrorCode;
use sqlx::{PgConnection, PgExecutor, PgPool};

use crate::error::{ApiError, Result};
use crate::extract::IdempotencyKey;

/// After this long an unfinished claim is presumed abandoned by a crashed process.
const STALE_CLAIM_SECS: f64 = 60.0;

/// The header set on a replayed answer.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";

/// What running an idempotent request produced.
pub enum Outcome<T> {
    /// The work ran now and committed; the value is what it returned.
    Fresh(T),
    /// The key was used before with the same request: the first answer, to send again.
    Replayed(Response),
}

impl<T: Serialize> Outcome<T> {
    /// The answer: `status` with the value as JSON, or the replayed first answer.
    pub fn into_response(self, status: StatusCode) -> Response {
        match self {
            Outcome::Fresh(value) => (status, Json(value)).into_response(),
            Outcome::Replayed(response) => response,
        }
    }
}

/// Runs `work` in a transaction, at most once per `(scope, key)`.
///
/// `scope` names the route and the user (e.g. `POST /users/7/balance/charge`), so that keys
/// of different users or routes never collide; `request` is the parsed body, compared as
/// JSON so that formatting differences do not count as a different request. Without a key,
/// `work` simply runs in a transaction.
pub async fn run<T: Serialize>(
    pool: &PgPool,
    key: &IdempotencyKey,
    scope: &str,
    request: &serde_json::Value,
    success: StatusCode,
    work: impl AsyncFnOnce(&mut PgConnection) -> Result<T>,
) -> Result<Outcome<T>> {
    let Some(key) = key.0.as_deref() else {
        let mut tx = pool.begin().await?;
        let value = work(&mut tx).await?;
        tx.commit().await?;
        return Ok(Outcome::Fresh(value));
    };

    if let Some(replay) = claim(pool, scope, key, request).await? {
        return Ok(Outcome::Replayed(replay));
    }

    let attempt: Result<T> = async {
        let mut tx = pool.begin().await?;
        let value = work(&mut tx).await?;
        let body = serde_json::to_value(&value).map_err(ApiError::internal)?;
        save_response(&mut *tx, scope, key, success, &body).await?;
        tx.commit().await?;
        Ok(value)
    }
    .await;

    match attempt {
        Ok(value) => Ok(Outcome::Fresh(value)),
        Err(ApiError::Client(error)) => {
            let status = StatusCode::from_u16(error.code.http_status()).unwrap_or(StatusCode::BAD_REQUEST);
            let body = serde_json::to_value(&error).map_err(ApiError::internal)?;
            save_response(pool, scope, key, status, &body).await?;
            Err(ApiError::Client(error))
        }
        Err(other) => {
            if let Err(e) = release(pool, scope, key).await {
                tracing::warn!(error = %e, "cannot release an idempotency key; it frees itself when stale");
            }
            Err(other)
        }
    }
}

/// Claims the key, or returns the saved answer to replay. Errors with 409 while another
/// request holds the key and 422 when the key was used for a different request.
async fn claim(
    pool: &PgPool,
    scope: &str,
    key: &str,
    request: &serde_json::Value,
) -> Result<Option<Response>> {
    // Two rounds: a claim released between our insert and our read is free to take again.
    for _ in 0..2 {
        let claimed: Option<bool> = sqlx::query_scalar(
            "INSERT INTO idempotency_keys (scope, key, request) VALUES ($1, $2, $3)
             ON CONFLICT (scope, key) DO UPDATE SET locked_at = now()
               WHERE idempotency_keys.response_status IS NULL
                 AND idempotency_keys.request = EXCLUDED.request
                 AND idempotency_keys.locked_at < now() - make_interval(secs => $4)
             RETURNING true",
        )
        .bind(scope)
        .bind(key)
        .bind(request)
        .bind(STALE_CLAIM_SECS)
        .fetch_optional(pool)
        .await?;
        if claimed.is_some() {
            return Ok(None);
        }

        let existing: Option<(bool, Option<i16>, Option<serde_json::Value>)> = sqlx::query_as(
            "SELECT request = $3, response_status, response_body
             FROM idempotency_keys WHERE scope = $1 AND key = $2",
        )
        .bind(scope)
        .bind(key)
        .bind(request)
        .fetch_optional(pool)
        .await?;

        match existing {
            None => continue,
            Some((false, _, _)) => {
                return Err(ApiError::new(
                    ErrorCode::IdempotencyKeyReused,
                    "this Idempotency-Key was used with a different request",
                ))
            }
            Some((true, Some(status), Some(body))) => return Ok(Some(replay(status, body))),
            Some((true, _, _)) => break,
        }
    }
    Err(ApiError::new(
        ErrorCode::IdempotencyKeyInUse,
        "a request with this Idempotency-Key is still being handled; retry later",
    ))
}

fn replay(status: i16, body: serde_json::Value) -> Response {
    let status = u16::try_from(status)
        .ok()
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::OK);
    let status_url = body.get("statusUrl").and_then(|u| u.as_str()).map(str::to_owned);
    let mut response = (status, Json(body)).into_response();
    response
        .headers_mut()
        .insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
    // A replayed 202 points at its request like the first answer did.
    if let (StatusCode::ACCEPTED, Some(url)) = (status, status_url) {
        crate::commands::add_polling_headers(&mut response, &url);
    }
    response
}

async fn save_response(
    executor: impl PgExecutor<'_>,
    scope: &str,
    key: &str,
    status: StatusCode,
    body: &serde_json::Value,
) -> Result<()> {
    sqlx::query(
        "UPDATE idempotency_keys SET response_status = $3, response_body = $4
         WHERE scope = $1 AND key = $2",
    )
    .bind(scope)
    .bind(key)
    .bind(i16::try_from(status.as_u16()).unwrap_or(i16::MAX))
    .bind(body)
    .execute(executor)
    .await?;
    Ok(())
}

async fn release(pool: &PgPool, scope: &str, key: &str) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM idempotency_keys WHERE scope = $1 AND key = $2 AND response_status IS NULL")
        .bind(scope)
        .bind(key)
        .execute(pool)
        .await?;
    Ok(())
}
