//! The headers that tell a client where and when to ask again about a pending request, set
//! here only: on a `202 Accepted` (also replayed for its `Idempotency-Key`) and on a
//! pending request read at its status URL. `Retry-After` follows the request's estimated
//! wait when it has one ([`set_retry_after`]).

use axum::http::{header, HeaderValue};
use axum::response::Response;

/// Seconds a client should wait before polling a pending request.
pub const POLL_AFTER_SECS: &str = "1";

/// Where to poll (`Location`) and when (`Retry-After`): the answer that accepts a command.
pub fn add_polling_headers(response: &mut Response, status_url: &str) {
    if let Ok(location) = HeaderValue::from_str(status_url) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    add_retry_after(response);
}

/// When to poll again (`Retry-After`): the answer about a request still pending.
pub fn add_retry_after(response: &mut Response) {
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static(POLL_AFTER_SECS));
}

/// Longest `Retry-After` an estimate may ask for: an estimate is a guess, and a client
/// told to come back much later would learn late that its request settled early.
pub const MAX_POLL_AFTER_SECS: u64 = 10;

/// `Retry-After` of a pending request whose estimated wait is `estimated_wait_ms`: the
/// estimate rounded up to whole seconds, from 1 to [`MAX_POLL_AFTER_SECS`]; without an
/// estimate, [`POLL_AFTER_SECS`]. Clients far back in a long queue then poll less often.
pub fn set_retry_after(response: &mut Response, estimated_wait_ms: Option<u64>) {
    let Some(ms) = estimated_wait_ms else {
        return add_retry_after(response);
    };
    let secs = ms.div_ceil(1_000).clamp(1, MAX_POLL_AFTER_SECS);
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs));
}
