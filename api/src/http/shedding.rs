//! Reads shed under overload: at most `MAX_READS_IN_FLIGHT` reads run at once in a process;
//! one more is answered `503 ERR_UNAVAILABLE` with `Retry-After` at once, instead of
//! queuing for a database connection behind hundreds of others until its deadline, which
//! would hold its connection and memory meanwhile and answer nobody in time.
//!
//! Reads are `GET` and `HEAD`, except what must answer under load (health, whose readiness
//! is cached, `/openapi.json` and `/docs`, which touch no database) and a request waited on
//! (`GET /requests/{id}?wait=`), which holds no database connection while it waits and is
//! bounded per user ([`crate::commands::waiting`]).

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use shared::domain::error::{ErrorBody, ErrorCode};
use tokio::sync::Semaphore;

use crate::error::RETRY_AFTER_UNAVAILABLE;

/// The reads this process may run at once.
pub struct ReadShedding {
    permits: Arc<Semaphore>,
}

impl ReadShedding {
    /// At most `max_in_flight` reads at once.
    pub fn new(max_in_flight: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max_in_flight.max(1))),
        }
    }
}

/// Whether `request` is a read that counts against the bound.
fn is_bounded_read(request: &Request) -> bool {
    if !matches!(*request.method(), Method::GET | Method::HEAD) {
        return false;
    }
    let path = request.uri().path();
    let exempt = path.starts_with("/health/")
        || path == "/openapi.json"
        || path == "/docs"
        || path.starts_with("/docs/");
    let waited_on = path.starts_with("/requests/")
        && request
            .uri()
            .query()
            .is_some_and(|query| query.split('&').any(|pair| pair.starts_with("wait=")));
    !exempt && !waited_on
}

/// Runs a read within the bound, or answers 503 at once.
pub async fn shed_reads(State(reads): State<Arc<ReadShedding>>, request: Request, next: Next) -> Response {
    if !is_bounded_read(&request) {
        return next.run(request).await;
    }
    let Ok(_permit) = Arc::clone(&reads.permits).try_acquire_owned() else {
        metrics::counter!("api_reads_shed_total").increment(1);
        // Not `ApiError::Unavailable`: that logs a warning per answer, and shedding is
        // the api working as meant; the counter says how often.
        let body = ErrorBody::new(
            ErrorCode::Unavailable,
            "too many reads at once; retry after the time given",
        );
        let mut response = (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response();
        response.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from_static(RETRY_AFTER_UNAVAILABLE),
        );
        return response;
    };
    next.run(request).await
}
