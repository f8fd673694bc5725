//! The command path of the API: a command is stored as a `PENDING` request and answered
//! `202 Accepted` with its status URL as soon as that commit is durable.
//!
//! PostgreSQL is the command log: the commit is the one durable write before the answer.
//! Publishing to RabbitMQ follows it ([`crate::commands::relay`], fed by
//! [`crate::commands::intake`] in commit order), so a broker that is down or slow neither
//! fails nor delays the answer, and a 503 means only that PostgreSQL could not be reached
//! (nothing was stored).

use std::time::Duration;

use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use shared::domain::command::RequestKind;
use shared::domain::error::{ErrorBody, ErrorCode};
use shared::domain::ids::UserId;
use uuid::Uuid;

use crate::commands::idempotency;
use crate::commands::intake::{Creation, KeyClaim, StoreError, StoredCommand};
use crate::commands::polling::{add_polling_headers, set_retry_after};
pub use crate::commands::request_status::Accepted;
use crate::commands::waiting::Registration;
use crate::error::{ApiError, Result};
use crate::http::extract::IdempotencyKey;
use crate::AppState;

/// A command to accept.
pub struct NewCommand {
    pub kind: RequestKind,
    /// What the partition hashes: the coupon for coupon commands, the user for order commands.
    pub partition_key: i64,
    pub payload: serde_json::Value,
    /// What the command creates with its request, readable at once (an order, `PENDING`).
    pub creates: Option<Creation>,
    /// The order the command is about (the one it creates or pays), stored typed beside
    /// its payload.
    pub order_id: Option<Uuid>,
}

/// Accepts a command `user` sent to `route` whose checks already ran: `checked` is the
/// command, or why the API refused it at once. Its key is the user's own
/// ([`idempotency::user_scope`]): every command names its user in the body.
///
/// The hot path of a flash sale, so it costs one statement and one commit: the request,
/// the rows it creates and, with an `Idempotency-Key`, the key with its `202` are written
/// together, and a refusal is saved under its key by a single insert. Only a key seen
/// before costs more (reading what it answered), and so does a key sent while the family
/// is overloaded (reading whether it has an answer, before refusing with 429). The checks
/// read outside any transaction, which is safe because they only filter: a refusal is true
/// of the moment it was read (and sold out, expired, already held or paid never turn back),
/// and whatever they let through is decided for good by the worker under its locks.
pub async fn submit(
    state: &AppState,
    key: &IdempotencyKey,
    route: &str,
    user: UserId,
    request: &serde_json::Value,
    checked: Result<NewCommand>,
    wait: PreferWait,
) -> Result<Response> {
    let scope = &idempotency::user_scope(route, user);
    let command = match checked {
        Ok(command) => command,
        Err(ApiError::Client(refusal)) => {
            if let Some(key) = key.0.as_deref() {
                if !idempotency::save_refusal(&state.db, scope, key, request, &refusal).await? {
                    return idempotency::answer_again(&state.key_answers, scope, key, request).await;
                }
            }
            return Err(ApiError::Client(refusal));
        }
        Err(other) => return Err(other),
    };

    let family = command.kind.family().as_str();
    let backlog_full = state.relay.unpublished() as u64 > state.config.command_queue_limit
        && state.config.command_queue_limit > 0;
    if state.backpressure.is_overloaded(command.kind.family()) || backlog_full {
        // Only a new command is refused: a key that already has an answer (a retry of an
        // accepted request, or a key reused for another body) gets that answer, as it would
        // from a store that found the key taken. The read costs a round trip only here,
        // under overload and with a key; every other path reads only the flag.
        if let Some(key) = key.0.as_deref() {
            if let Some(answer) =
                idempotency::recorded_answer(&state.key_answers, scope, key, request).await?
            {
                return Ok(answer);
            }
        }
        // Not saved under the key: the same request is welcome once the queues drain.
        metrics::counter!("api_commands_overloaded_total", "family" => family).increment(1);
        return Err(ApiError::new(
            ErrorCode::Overloaded,
            "too many commands are waiting to be settled; retry later",
        ));
    }

    // From here the command is stored and handed to the relay, whatever happens to this
    // request meanwhile (its client gone, or its handler's deadline passed): a spawned task
    // is not cancelled with the request.
    let request_id = Uuid::now_v7();
    // A waiter registers before its command is stored, so that the request, known to be
    // pending, is read only once its notice came.
    // Refused (429) here when the user holds too many waits: before anything is stored.
    let registration = match wait.0 {
        Some(within) => Some((state.waiters.register(request_id, user)?, within)),
        None => None,
    };
    let accepting = tokio::spawn(accept(
        state.clone(),
        request_id,
        key.clone(),
        scope.clone(),
        user,
        request.clone(),
        command,
    ));
    let (accepted, partition_key) = match accepting.await.map_err(ApiError::internal)?? {
        Acceptance::Accepted(accepted, partition_key) => (accepted, partition_key),
        Acceptance::Answered(answer) => return Ok(answer),
    };
    let placed = |mut accepted: Accepted| async move {
        let place = state
            .queue_positions
            .place(accepted.kind, partition_key, accepted.request_id)
            .await;
        if let Some(place) = place {
            accepted.set_place(place);
        }
        accepted
    };
    match registration {
        Some((registration, within)) => match answer_when_settled(accepted, registration, within).await {
            Ok(settled) => Ok(settled),
            Err(pending) => Ok(accepted_response(placed(pending).await)),
        },
        None => Ok(accepted_response(placed(accepted).await)),
    }
}

/// Refuses a command for what this replica already knows without asking PostgreSQL (a
/// coupon seen sold out). It writes nothing: the refusal never changes, so a retry gets it
/// again. Only a key is looked up, so that a key whose first request was accepted (or
/// refused for another reason) still gets that first answer.
pub async fn refuse_from_memory(
    state: &AppState,
    key: &IdempotencyKey,
    route: &str,
    user: UserId,
    request: &serde_json::Value,
    refusal: ErrorBody,
) -> Result<Response> {
    if let Some(key) = key.0.as_deref() {
        let scope = idempotency::user_scope(route, user);
        if let Some(answer) = idempotency::recorded_answer(&state.key_answers, &scope, key, request).await? {
            return Ok(answer);
        }
    }
    metrics::counter!("api_commands_refused_from_memory_total", "code" => refusal.code.as_str()).increment(1);
    Err(ApiError::Client(refusal))
}

/// What accepting a stored command came to: accepted (its `202`, and the key its partition
/// hashes), or the answer a key already had.
enum Acceptance {
    Accepted(Accepted, i64),
    Answered(Response),
}

/// Stores the command with its key (the intake hands it to the relay, which publishes it
/// after the commit); run to its end as a task of its own.
async fn accept(
    state: AppState,
    request_id: Uuid,
    key: IdempotencyKey,
    scope: String,
    user: UserId,
    request: serde_json::Value,
    command: NewCommand,
) -> Result<Acceptance> {
    let family = command.kind.family().as_str();
    let accepted = Accepted::new(
        request_id,
        command.kind,
        command.creates.as_ref().map(Creation::id),
    );
    let started = std::time::Instant::now();
    let partition_key = command.partition_key;
    let stored = state
        .intake
        .store(StoredCommand {
            request_id,
            kind: command.kind,
            partition_key: command.partition_key,
            payload: command.payload,
            user_id: user.get(),
            key: key.0.clone().map(|key| KeyClaim {
                scope: scope.clone(),
                key,
                request: request.clone(),
            }),
            creates: command.creates,
            order_id: command.order_id,
        })
        .await
        .map_err(|e| match e {
            StoreError::Unavailable(_) => ApiError::Unavailable(anyhow::Error::new(e)),
            StoreError::Failed(_) => ApiError::internal(e),
        })?;
    metrics::histogram!("api_command_store_seconds", "family" => family)
        .record(started.elapsed().as_secs_f64());
    if !stored {
        // Only a key can stop the insert: it was used before, and its first answer (or
        // 409/422) stands.
        return match key.0.as_deref() {
            Some(key) => idempotency::answer_again(&state.key_answers, &scope, key, &request)
                .await
                .map(Acceptance::Answered),
            None => Err(ApiError::internal(anyhow::anyhow!(
                "request {request_id} was not stored"
            ))),
        };
    }
    Ok(Acceptance::Accepted(accepted, partition_key))
}

/// The answer to an accepted command whose client asked to wait (`Prefer: respond-async,
/// wait=N`): `200` with the settled request (and `Preference-Applied`) when a worker settles
/// it within `within`, else (`Err`) the command still pending, for the usual `202`. The
/// command is accepted either way.
async fn answer_when_settled(
    accepted: Accepted,
    registration: Registration<'_>,
    within: Duration,
) -> Result<Response, Accepted> {
    match registration.settled(within).await {
        Some(mut request) => {
            request.order_id = accepted.order_id;
            let mut response = (StatusCode::OK, axum::Json(request)).into_response();
            if let Ok(applied) = HeaderValue::from_str(&format!("wait={}", within.as_secs())) {
                response.headers_mut().insert(PREFERENCE_APPLIED, applied);
            }
            Ok(response)
        }
        // Not settled in time (or the api is shutting down): the command is accepted.
        None => Err(accepted),
    }
}

/// RFC 7240's answer header: which preference was honoured.
const PREFERENCE_APPLIED: HeaderName = HeaderName::from_static("preference-applied");

/// The `wait=N` of the request's `Prefer` header, capped at `MAX_WAIT_SECS`; `None` without
/// one (the client gets its `202` at once).
#[derive(Debug, Clone, Copy, Default)]
pub struct PreferWait(pub Option<Duration>);

impl axum::extract::FromRequestParts<AppState> for PreferWait {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let prefer = parts
            .headers
            .get_all(header::HeaderName::from_static("prefer"))
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(|v| crate::commands::waiting::preferred_wait(v, state.config.max_wait));
        Ok(Self(prefer))
    }
}

/// `202` with `Location` and `Retry-After` (from the estimated wait, when there is one).
fn accepted_response(accepted: Accepted) -> Response {
    let location = accepted.status_url.clone();
    let estimate = accepted.estimated_wait_ms;
    let mut response = (StatusCode::ACCEPTED, axum::Json(accepted)).into_response();
    add_polling_headers(&mut response, &location);
    set_retry_after(&mut response, estimate);
    response
}
