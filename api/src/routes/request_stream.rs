//! A stream of a user's requests as they settle (`GET /users/{userId}/requests/stream`): a
//! storefront shows each command's outcome as it comes, without a wait per command.
//!
//! Server-sent events: one `request` event per settled request, its data the request as
//! `GET /requests/{requestId}` answers it, its `id` a [`Position`] that `Last-Event-ID`
//! resumes from (what settled after it is sent first, oldest first, page after page); a
//! comment line whenever the stream was silent for `REQUEST_STREAM_KEEPALIVE_MS` (15 s).
//! Without `Last-Event-ID` the stream starts now, and announces that position at once (an
//! event with an `id` and no data, which `EventSource` keeps without dispatching it), so a
//! client that reconnects before its first event misses nothing either.
//!
//! No polling: the stream sleeps until the workers' notice of a settled batch of its user's
//! wakes it ([`crate::commands::waiting`], which also finds lost notices), then reads what settled
//! after its position in one statement (and the requests themselves in a second, with the
//! function every waiter's answer is read with). Each stream counts as one of its user's
//! waits (`MAX_WAITS_PER_USER`).
//!
//! Order and position: requests are sent in the order of the transactions that settled them
//! (`requests.settled_xid`), and only once every older transaction has ended, so a request
//! whose transaction commits late is never passed over (see the migration
//! `request_stream`). A position is that transaction's id and the request's id.
//!
//! Its token is checked again each time the stream wakes and every second, from the cache
//! every request's token is believed from: a stream ends within a second of its token's
//! revocation on this replica, and within `TOKEN_CACHE_TTL_MS` and a second on another (or of
//! its expiry). It ends too when the api shuts down, and on a database failure; the client
//! resumes from its last event.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use shared::domain::error::ErrorCode;
use shared::domain::identity::TokenHash;
use shared::domain::ids::UserId;
use sqlx::PgPool;
use tokio::time::{Instant, Interval, MissedTickBehavior};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::commands::request_status::fetch_settled;
use crate::commands::waiting::StreamRegistration;
use crate::error::{ApiError, Result};
use crate::http::auth::{Authenticator, Caller};
use crate::routes::openapi::ErrorSchema;
use crate::AppState;

/// Most requests one read takes; a client that missed more gets them page after page.
const PAGE: i64 = 100;

/// How often a quiet stream checks that its token is still valid (from the cache, so this
/// costs a lookup only once per `TOKEN_CACHE_TTL_MS` per token).
const TOKEN_CHECK_EVERY: Duration = Duration::from_secs(1);

/// The first and the longest wait before reading again when a settled request is held back
/// because an older transaction still runs (rare: transactions are short).
const HELD_BACK_RETRY: (Duration, Duration) = (Duration::from_millis(20), Duration::from_secs(1));

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(stream_requests))
}

/// Where a stream stands: after the requests settled by transactions before `xid`, and by
/// `xid` itself up to request `id`. Written as 48 hex digits, opaque to clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    xid: i64,
    id: Uuid,
}

impl Position {
    /// Before every request settled by transaction `xid` or a later one.
    fn before(xid: i64) -> Self {
        Self { xid, id: Uuid::nil() }
    }

    /// A position as written by [`fmt::Display`]; `None` for anything else.
    pub fn parse(raw: &str) -> Option<Self> {
        if raw.len() != 48 || !raw.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let (xid, id) = raw.split_at(16);
        let xid = u64::from_str_radix(xid, 16)
            .ok()
            .and_then(|x| i64::try_from(x).ok())?;
        let id = u128::from_str_radix(id, 16).ok()?;
        Some(Self {
            xid,
            id: Uuid::from_u128(id),
        })
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}{:032x}", self.xid, self.id.as_u128())
    }
}

/// The calling user's requests as they settle, as server-sent events: `event: request`,
/// `id:` a position to resume from (`Last-Event-ID`), `data:` the request as `GET
/// /requests/{requestId}` answers it. Starts now, or after `Last-Event-ID` (what settled
/// since is sent first, oldest first). A comment line at least every 15 s. Ends when the
/// token is revoked or expires, and when the api shuts down (resume with `Last-Event-ID`).
/// Counts as one of the user's waits.
#[utoipa::path(
    get, path = "/users/{userId}/requests/stream", tag = "requests",
    params(
        ("userId" = i64, Path, minimum = 1),
        ("Last-Event-ID" = Option<String>, Header, description = "the `id` of the last event received: the stream sends what settled after it first"),
    ),
    security(("user_token" = [])),
    responses(
        (status = 200, content_type = "text/event-stream", body = String, description = "server-sent events: `event: request` with `id:` (a position) and `data:` (the request resource) per settled request; comment lines to keep the connection alive"),
        (status = 400, body = ErrorSchema, description = "ERR_INVALID_REQUEST: a malformed userId or Last-Event-ID"),
        (status = 429, body = ErrorSchema, description = "ERR_RATE_LIMITED: the user already holds MAX_WAITS_PER_USER waits and streams"),
    )
)]
async fn stream_requests(
    State(state): State<AppState>,
    caller: Caller,
    Path(user): Path<String>,
    headers: HeaderMap,
) -> Result<Response> {
    let invalid = |message: &str| ApiError::new(ErrorCode::InvalidRequest, message);
    let user = UserId::parse(&user).ok_or_else(|| invalid("userId must be a positive integer"))?;
    let resume = match headers.get("last-event-id").map(HeaderValue::to_str) {
        None => None,
        Some(Ok(raw)) if raw.trim().is_empty() => None,
        Some(raw) => Some(
            raw.ok()
                .and_then(|raw| Position::parse(raw.trim()))
                .ok_or_else(|| invalid("Last-Event-ID must be the id of an event of this stream"))?,
        ),
    };
    caller.act_for(user)?;
    // Registered before the starting position is read: what settles from then on wakes it.
    let registration = state.waiters.open_stream(user)?;
    let (position, announce) = match resume {
        Some(position) => (position, false),
        None => (Position::before(oldest_running(&state.db).await?), true),
    };
    let mut ready = VecDeque::new();
    if announce {
        ready.push_back(Event::default().id(position.to_string()));
    }
    let mut token_checks = tokio::time::interval_at(Instant::now() + TOKEN_CHECK_EVERY, TOKEN_CHECK_EVERY);
    token_checks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let follow = Follow {
        db: state.db.clone(),
        auth: Arc::clone(&state.auth),
        token: caller.token(),
        user,
        position,
        ready,
        caught_up: false,
        held_back: None,
        token_checks,
        registration,
    };
    metrics::counter!("api_request_streams_opened_total").increment(1);
    let events = futures::stream::unfold(follow, Follow::next).map(Ok::<_, Infallible>);
    let mut response = Sse::new(events)
        .keep_alive(KeepAlive::new().interval(state.config.request_stream_keepalive))
        .into_response();
    // A proxy that buffers answers (nginx does by default) would hold the events back.
    response
        .headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

/// The oldest transaction running now (`pg_snapshot_xmin`): every request settled from now
/// on is settled by it or a later one.
async fn oldest_running(db: &PgPool) -> sqlx::Result<i64> {
    sqlx::query_scalar!(r#"SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint AS "xmin!""#)
        .fetch_one(db)
        .await
}

/// One stream's state between its events.
struct Follow {
    db: PgPool,
    auth: Arc<Authenticator>,
    /// The token the stream was opened with: it ends when that is no longer valid.
    token: TokenHash,
    user: UserId,
    /// After the last request read.
    position: Position,
    /// Events read and not yet sent.
    ready: VecDeque<Event>,
    /// Nothing more to read until the stream is woken.
    caught_up: bool,
    /// A settled request waits for an older transaction to end: how long until the next read.
    held_back: Option<Duration>,
    token_checks: Interval,
    /// The stream's wake-up and its place among the user's waits, given back with it.
    registration: StreamRegistration,
}

impl Follow {
    /// The next event, or `None` when the stream ends.
    async fn next(mut self) -> Option<(Event, Self)> {
        loop {
            if let Some(event) = self.ready.pop_front() {
                return Some((event, self));
            }
            if self.caught_up {
                let retry = self.held_back;
                tokio::select! {
                    () = self.registration.woken() => {}
                    () = sleep_or_never(retry) => {}
                    _ = self.token_checks.tick() => {
                        if !self.token_still_valid().await {
                            return None;
                        }
                        continue;
                    }
                    () = self.registration.closing() => return None,
                }
            }
            if !self.token_still_valid().await {
                return None;
            }
            if let Err(e) = self.read().await {
                tracing::warn!(error = %e, "cannot read a request stream's settled requests; it ends, its client resumes");
                return None;
            }
        }
    }

    async fn token_still_valid(&self) -> bool {
        match self.auth.still_valid(self.token).await {
            Ok(valid) => valid,
            Err(e) => {
                tracing::debug!(error = %e, "cannot check a request stream's token; it ends");
                false
            }
        }
    }

    /// Reads the requests settled after the position (a page), queues their events and
    /// moves the position past them.
    async fn read(&mut self) -> sqlx::Result<()> {
        let rows = sqlx::query!(
            r#"SELECT id, settled_xid AS "settled_xid!",
                      pg_snapshot_xmin(pg_current_snapshot())::text::bigint AS "oldest_running!"
                 FROM requests
                WHERE user_id = $1 AND settled_xid IS NOT NULL AND (settled_xid, id) > ($2, $3)
                ORDER BY settled_xid, id
                LIMIT $4"#,
            self.user.get(),
            self.position.xid,
            self.position.id,
            PAGE,
        )
        .fetch_all(&self.db)
        .await?;
        let full_page = rows.len() as i64 == PAGE;
        // A request settled by a transaction that an older, still running one may yet
        // precede (in the order of the stream) waits until that one has ended.
        let ended: Vec<Position> = rows
            .iter()
            .take_while(|row| row.settled_xid < row.oldest_running)
            .map(|row| Position {
                xid: row.settled_xid,
                id: row.id,
            })
            .collect();
        let held_back = ended.len() < rows.len();
        self.held_back = held_back.then(|| match self.held_back {
            None => HELD_BACK_RETRY.0,
            Some(previous) => (previous * 2).min(HELD_BACK_RETRY.1),
        });
        self.caught_up = held_back || !full_page;
        if ended.is_empty() {
            return Ok(());
        }
        let ids: Vec<Uuid> = ended.iter().map(|position| position.id).collect();
        let mut settled: HashMap<Uuid, _> = fetch_settled(&self.db, &ids)
            .await?
            .into_iter()
            .map(|request| (request.request_id, request))
            .collect();
        for position in ended {
            let Some(request) = settled.remove(&position.id) else {
                continue;
            };
            match Event::default()
                .event("request")
                .id(position.to_string())
                .json_data(&request)
            {
                Ok(event) => self.ready.push_back(event),
                Err(e) => tracing::error!(error = %e, "cannot write a request as an event"),
            }
            self.position = position;
        }
        metrics::counter!("api_request_stream_events_total").increment(self.ready.len() as u64);
        Ok(())
    }
}

/// Sleeps for `duration`, or forever without one.
async fn sleep_or_never(duration: Option<Duration>) {
    match duration {
        Some(duration) => tokio::time::sleep(duration).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_position_reads_back_as_written_and_nothing_else_reads() {
        let position = Position {
            xid: 7_412_993,
            id: Uuid::now_v7(),
        };
        let written = position.to_string();
        assert_eq!(written.len(), 48);
        assert_eq!(Position::parse(&written), Some(position));
        assert_eq!(Position::parse(&written.to_uppercase()), Some(position));
        for bad in [
            "",
            "0",
            &written[1..],
            &format!("{written}0"),
            &format!("x{}", &written[1..]),
            // An xid past i64: no transaction has one.
            &format!("f{}", &written[1..]),
            "0193a3c8-1b2c-7d4e-8f00-123456789abc",
        ] {
            assert_eq!(Position::parse(bad), None, "{bad}");
        }
    }
}
