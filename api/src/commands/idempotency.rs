//! `Idempotency-Key`, with Stripe's semantics, stored in PostgreSQL.
//!
//! Synchronous requests ([`run`]): a key is claimed in a short transaction of its own, so a
//! second request with the same key sees it in flight (409) instead of waiting on a lock.
//! The response is saved in the same transaction as the effect, so a saved response always
//! describes a committed effect. A 4xx is saved too (the same request would fail the same
//! way); a 5xx releases the key so that the client's retry runs again. A claim left behind
//! by a crashed process can be taken over once it is older than [`STALE_CLAIM_SECS`]. The
//! claim's time is its token: a request saves its answer (in its effect's transaction) only
//! while the key still holds its own claim, so a request that was merely slow, and whose
//! claim was taken over meanwhile, rolls its effect back and answers 409 instead of
//! applying it a second time.
//!
//! Asynchronous commands (`crate::commands::accept`, through `crate::commands::intake`) store their key in
//! their request's own row, or with their refusal in `idempotency_keys`, in one statement,
//! so their keys are never half-claimed. A request is accepted for good once it commits, so
//! a key sent again right after its `202` gets that `202`, on any replica, built from the
//! request (its id, type and order). A command refused for backpressure (or from memory)
//! writes nothing, but first reads whether its key already has an answer, which then stands
//! ([`recorded_answer`]). Command keys are read many per statement ([`KeyAnswers`]).
//!
//! A refusal and an acceptance that bring one new key at the same instant each check the
//! other's table in their own snapshot, so both can be stored: a later replay then gets the
//! acceptance (the request stands), which is what took effect.

use std::sync::Arc;

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::Serialize;
use shared::domain::command::RequestKind;
use shared::domain::error::{ErrorBody, ErrorCode};
use sqlx::{PgConnection, PgExecutor, PgPool};
use uuid::Uuid;

use crate::batched::Batched;
use crate::commands::queue_position::QueuePositions;
use crate::commands::request_status::Accepted;
use crate::error::{ApiError, Result};
use crate::http::extract::IdempotencyKey;

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

/// The scope of a key sent to `route` on behalf of `user`, for routes whose user is named in
/// the body rather than the path: the contract keys are "for the same user and route", so
/// two users who happen to send the same key must not meet.
pub fn user_scope(route: &str, user: shared::domain::ids::UserId) -> String {
    format!("{route} by user {user}")
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
    run_saving(
        pool,
        key,
        scope,
        request,
        success,
        |value: &T| serde_json::to_value(value),
        work,
    )
    .await
}

/// [`run`], saving `saved(answer)` as the answer a replay gets rather than the answer
/// itself: for answers that carry a secret shown once (a new token), which is never stored.
pub async fn run_saving<T: Serialize>(
    pool: &PgPool,
    key: &IdempotencyKey,
    scope: &str,
    request: &serde_json::Value,
    success: StatusCode,
    saved: impl Fn(&T) -> serde_json::Result<serde_json::Value>,
    work: impl AsyncFnOnce(&mut PgConnection) -> Result<T>,
) -> Result<Outcome<T>> {
    let Some(key) = key.0.as_deref() else {
        let mut tx = pool.begin().await?;
        let value = work(&mut tx).await?;
        tx.commit().await?;
        return Ok(Outcome::Fresh(value));
    };

    let claimed = match claim(pool, scope, key, request).await? {
        Claim::Held(claimed) => claimed,
        Claim::Answered(replay) => return Ok(Outcome::Replayed(replay)),
    };

    let attempt: Result<T> = async {
        let mut tx = pool.begin().await?;
        let value = work(&mut tx).await?;
        let body = saved(&value).map_err(ApiError::internal)?;
        if !save_response(&mut *tx, scope, key, claimed, success, &body).await? {
            // Taken over while this request was running: the effect is rolled back.
            return Err(in_use());
        }
        tx.commit().await?;
        Ok(value)
    }
    .await;

    match attempt {
        Ok(value) => Ok(Outcome::Fresh(value)),
        Err(ApiError::Client(error)) => {
            let status = StatusCode::from_u16(error.code.http_status()).unwrap_or(StatusCode::BAD_REQUEST);
            let body = serde_json::to_value(&error).map_err(ApiError::internal)?;
            // Saved only under this request's own claim (not over one that took it over).
            save_response(pool, scope, key, claimed, status, &body).await?;
            Err(ApiError::Client(error))
        }
        Err(other) => {
            if let Err(e) = release(pool, scope, key, claimed).await {
                tracing::warn!(error = %e, "cannot release an idempotency key; it frees itself when stale");
            }
            Err(other)
        }
    }
}

/// A key claimed by this request (with its claim's time, its token), or the saved answer.
enum Claim {
    Held(DateTime<Utc>),
    Answered(Response),
}

/// Claims the key, or returns the saved answer to replay. Errors with 409 while another
/// request holds the key and 422 when the key was used for a different request.
async fn claim(pool: &PgPool, scope: &str, key: &str, request: &serde_json::Value) -> Result<Claim> {
    // Two rounds: a claim released between our insert and our read is free to take again.
    for _ in 0..2 {
        let claimed = sqlx::query_scalar!(
            "INSERT INTO idempotency_keys (scope, key, request) VALUES ($1, $2, $3)
             ON CONFLICT (scope, key) DO UPDATE SET locked_at = now()
               WHERE idempotency_keys.response_status IS NULL
                 AND idempotency_keys.request = EXCLUDED.request
                 AND idempotency_keys.locked_at < now() - make_interval(secs => $4)
             RETURNING locked_at",
            scope,
            key,
            request,
            STALE_CLAIM_SECS,
        )
        .fetch_optional(pool)
        .await?;
        if let Some(claimed) = claimed {
            return Ok(Claim::Held(claimed));
        }

        match earlier_of(read_key(pool, scope, key, request).await?) {
            Earlier::Gone => continue,
            Earlier::Answer(answer) => return answer.map(Claim::Answered),
        }
    }
    Err(in_use())
}

fn in_use() -> ApiError {
    ApiError::new(
        ErrorCode::IdempotencyKeyInUse,
        "a request with this Idempotency-Key is still being handled; retry later",
    )
}

/// What the first request with a key left behind, as seen by a later one.
enum Earlier {
    /// No row (any more): the key is free.
    Gone,
    /// The answer to give: a replay, 409 (still being handled) or 422 (other request).
    Answer(Result<Response>),
}

/// The answers saved under command keys, read many per statement ([`Batched`]): in a
/// sold-out flash sale every refusal from memory reads its key, and those of the moment
/// share one statement.
pub struct KeyAnswers(Batched<KeyQuery, Option<KeyRow>>, Arc<QueuePositions>);

/// Most keys read by one statement.
const MAX_KEYS_PER_STATEMENT: usize = 256;

/// A key to read, with the request sent with it now.
pub struct KeyQuery {
    scope: String,
    key: String,
    request: serde_json::Value,
}

/// What a key holds: whether it was sent with the same request, its answer (status and
/// body; none while a synchronous request holding it is still being handled), and the
/// command it accepted while that is still pending (its kind, partition key and id).
type KeyRow = (bool, Option<i16>, Option<serde_json::Value>, Option<Queued>);

/// A command still waiting in its partition's queue.
type Queued = (RequestKind, i64, Uuid);

impl KeyAnswers {
    /// Reads keys from `db`; a replayed `202` of a command still pending says where it
    /// stands now, from `queues`.
    pub fn start(db: PgPool, queues: Arc<QueuePositions>) -> Self {
        Self(
            Batched::start(
                MAX_KEYS_PER_STATEMENT,
                "api_key_read_batch_size",
                move |queries| read_keys(db.clone(), queries),
            ),
            queues,
        )
    }

    /// What `key` of `scope` holds, read with the other keys of the moment; the `202` of a
    /// command still pending is placed in its queue, as its first answer was.
    async fn read(&self, scope: &str, key: &str, request: &serde_json::Value) -> Result<Option<KeyRow>> {
        let mut row = self.0.read(KeyQuery::new(scope, key, request)).await?;
        if let Some((_, _, Some(body), Some((kind, partition_key, id)))) = row.as_mut() {
            if let Some(place) = self.1.place(*kind, *partition_key, *id).await {
                body["queuePosition"] = place.position.into();
                if let Some(wait) = place.estimated_wait {
                    body["estimatedWaitMs"] = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).into();
                }
            }
        }
        Ok(row)
    }
}

impl KeyQuery {
    fn new(scope: &str, key: &str, request: &serde_json::Value) -> Self {
        Self {
            scope: scope.to_owned(),
            key: key.to_owned(),
            request: request.clone(),
        }
    }
}

/// What `key` of `scope` holds, read on its own (a synchronous request's key).
async fn read_key(
    pool: &PgPool,
    scope: &str,
    key: &str,
    request: &serde_json::Value,
) -> Result<Option<KeyRow>> {
    let mut rows = read_keys(pool.clone(), vec![KeyQuery::new(scope, key, request)]).await?;
    Ok(rows.pop().flatten())
}

/// What each key of `queries` holds, in their order, in one statement.
async fn read_keys(db: PgPool, queries: Vec<KeyQuery>) -> sqlx::Result<Vec<Option<KeyRow>>> {
    let mut scopes = Vec::with_capacity(queries.len());
    let mut keys = Vec::with_capacity(queries.len());
    let mut requests = Vec::with_capacity(queries.len());
    for query in queries {
        scopes.push(query.scope);
        keys.push(query.key);
        requests.push(query.request);
    }
    // A command's key is in its request's row (its answer the request's `202`), a refusal's
    // or a synchronous request's in idempotency_keys; `same` is NULL where neither has it.
    let rows = sqlx::query!(
        r#"SELECT COALESCE(r.key_request = q.request, k.request = q.request) AS "same?",
                k.response_status AS "status?", k.response_body AS "body?",
                r.id AS "request_id?", r.kind AS "kind?", r.order_id AS "order_id?",
                r.partition_key AS "partition_key?", r.status = 'PENDING' AS "pending?"
         FROM unnest($1::text[], $2::text[], $3::jsonb[]) WITH ORDINALITY AS q(scope, key, request, n)
         LEFT JOIN requests r ON r.idempotency_scope = q.scope AND r.idempotency_key = q.key
         LEFT JOIN idempotency_keys k ON r.id IS NULL AND k.scope = q.scope AND k.key = q.key
         ORDER BY q.n"#,
        &scopes,
        &keys,
        &requests,
    )
    .fetch_all(&db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|row| {
            let same = row.same?;
            let request = row
                .request_id
                .zip(row.kind.as_deref().and_then(RequestKind::parse));
            let queued = match (request, row.partition_key, row.pending) {
                (Some((id, kind)), Some(partition_key), Some(true)) => Some((kind, partition_key, id)),
                _ => None,
            };
            let accepted = request.map(|(id, kind)| Accepted::new(id, kind, row.order_id));
            Some(match accepted {
                Some(accepted) => (same, Some(202), serde_json::to_value(accepted).ok(), queued),
                None => (same, row.status, row.body, None),
            })
        })
        .collect())
}

/// What a key's row says to a later request.
fn earlier_of(row: Option<KeyRow>) -> Earlier {
    match row {
        None => Earlier::Gone,
        Some((false, _, _, _)) => Earlier::Answer(Err(ApiError::new(
            ErrorCode::IdempotencyKeyReused,
            "this Idempotency-Key was used with a different request",
        ))),
        Some((true, Some(status), Some(body), _)) => Earlier::Answer(Ok(replay(status, body))),
        Some((true, _, _, _)) => Earlier::Answer(Err(in_use())),
    }
}

/// The answer to a key that was used before (asynchronous commands): the replay of the
/// first answer, 409 while that request is still being handled, 422 for another request.
pub async fn answer_again(
    answers: &KeyAnswers,
    scope: &str,
    key: &str,
    request: &serde_json::Value,
) -> Result<Response> {
    match earlier_of(answers.read(scope, key, request).await?) {
        // Freed a moment ago (a synchronous request that failed released it): the client's
        // retry will find it free.
        Earlier::Gone => Err(in_use()),
        Earlier::Answer(answer) => answer,
    }
}

/// The answer already recorded under a key (asynchronous commands), without claiming it:
/// its replay, 409 while its request is still being handled, 422 for another request;
/// `None` when the key is free. For a command that is refused before it is stored (the
/// queues are too deep), so that a key which already has an answer still gets it.
pub async fn recorded_answer(
    answers: &KeyAnswers,
    scope: &str,
    key: &str,
    request: &serde_json::Value,
) -> Result<Option<Response>> {
    match earlier_of(answers.read(scope, key, request).await?) {
        Earlier::Gone => Ok(None),
        Earlier::Answer(answer) => answer.map(Some),
    }
}

/// Saves a refusal under a key that was not used before, in one statement. False when the
/// key already existed: then its earlier answer stands and nothing was written.
pub async fn save_refusal(
    pool: &PgPool,
    scope: &str,
    key: &str,
    request: &serde_json::Value,
    refusal: &ErrorBody,
) -> Result<bool> {
    let status = i16::try_from(refusal.code.http_status()).unwrap_or(400);
    let body = serde_json::to_value(refusal).map_err(ApiError::internal)?;
    // Committed without waiting for the WAL flush (`synchronous_commit` off for this one
    // statement's transaction): in a sold-out flash sale these records are most of the
    // writes, and losing the last few to a PostgreSQL crash costs nothing that matters.
    // A refusal has no effect to protect, and its causes (sold out, expired, already held,
    // not payable) do not go away, so a retry after such a loss gets the same answer,
    // computed again.
    let saved = sqlx::query_scalar!(
        r#"WITH relaxed AS (SELECT set_config('synchronous_commit', 'off', true))
         INSERT INTO idempotency_keys (scope, key, request, response_status, response_body)
         SELECT $1, $2, $3, $4, $5 FROM relaxed
         WHERE NOT EXISTS (SELECT 1 FROM requests r
                           WHERE r.idempotency_scope = $1 AND r.idempotency_key = $2)
         ON CONFLICT (scope, key) DO NOTHING
         RETURNING true AS "saved!""#,
        scope,
        key,
        request,
        status,
        body,
    )
    .fetch_optional(pool)
    .await?;
    Ok(saved.is_some())
}
fn replay(status: i16, body: serde_json::Value) -> Response {
    let status = u16::try_from(status)
        .ok()
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::OK);
    let status_url = body.get("statusUrl").and_then(|u| u.as_str()).map(str::to_owned);
    let estimate = body.get("estimatedWaitMs").and_then(serde_json::Value::as_u64);
    let mut response = (status, Json(body)).into_response();
    response
        .headers_mut()
        .insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
    // A replayed 202 points at its request like the first answer did.
    if let (StatusCode::ACCEPTED, Some(url)) = (status, status_url) {
        crate::commands::polling::add_polling_headers(&mut response, &url);
        crate::commands::polling::set_retry_after(&mut response, estimate);
    }
    response
}

/// Saves the answer under the key while it still holds the claim made at `claimed`; false
/// when another request has taken the claim over (or answered) since.
async fn save_response(
    executor: impl PgExecutor<'_>,
    scope: &str,
    key: &str,
    claimed: DateTime<Utc>,
    status: StatusCode,
    body: &serde_json::Value,
) -> Result<bool> {
    let saved = sqlx::query!(
        "UPDATE idempotency_keys SET response_status = $3, response_body = $4
         WHERE scope = $1 AND key = $2 AND locked_at = $5 AND response_status IS NULL",
        scope,
        key,
        i16::try_from(status.as_u16()).unwrap_or(i16::MAX),
        body,
        claimed,
    )
    .execute(executor)
    .await?;
    Ok(saved.rows_affected() == 1)
}

/// Frees the key, if it still holds this request's claim.
async fn release(pool: &PgPool, scope: &str, key: &str, claimed: DateTime<Utc>) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "DELETE FROM idempotency_keys
         WHERE scope = $1 AND key = $2 AND locked_at = $3 AND response_status IS NULL",
        scope,
        key,
        claimed,
    )
    .execute(pool)
    .await?;
    Ok(())
}
