//! The headers that tell a client where and when to ask again about a pending request, set
//! here only: on a `202 Accepted` (also replayed for its `Idempotency-Key`) and on a
//! pending request read at its status URL.

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
