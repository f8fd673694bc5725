//! The API's error type: every failure of a handler, and the answer it becomes.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use shared::domain::error::{ErrorBody, ErrorCode};

pub type Result<T, E = ApiError> = std::result::Result<T, E>;

/// Seconds a client should wait before retrying after a 503 or a 429.
pub(crate) const RETRY_AFTER_UNAVAILABLE: &str = "1";

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A mistake of the client or a domain rule that says no: a 4xx with the contract's code.
    #[error("{}: {}", .0.code, .0.message)]
    Client(ErrorBody),

    /// This client or user sent too much: 429 `ERR_RATE_LIMITED` with `Retry-After`, the
    /// wait until the limiter lets the next request through.
    #[error("rate limited for {0:?}")]
    RateLimited(std::time::Duration),

    /// PostgreSQL or RabbitMQ cannot be reached: 503 with `Retry-After`.
    #[error("a dependency is unavailable")]
    Unavailable(#[source] anyhow::Error),

    /// A bug or an unexpected failure: logged with its cause chain, answered as a bare 500.
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::Client(ErrorBody::new(code, message))
    }

    pub fn internal(error: impl Into<anyhow::Error>) -> Self {
        Self::Internal(error.into())
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::Client(body) => {
                StatusCode::from_u16(body.code.http_status()).unwrap_or(StatusCode::BAD_REQUEST)
            }
            Self::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(error: sqlx::Error) -> Self {
        if shared::store::db::is_unavailable(&error) {
            Self::Unavailable(anyhow::Error::new(error).context("PostgreSQL"))
        } else {
            Self::Internal(error.into())
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        match self {
            Self::Client(body) => {
                let code = body.code;
                let mut response = (status, Json(body)).into_response();
                match code {
                    ErrorCode::Overloaded => {
                        response.headers_mut().insert(
                            header::RETRY_AFTER,
                            HeaderValue::from_static(RETRY_AFTER_UNAVAILABLE),
                        );
                    }
                    // RFC 6750: a 401 names the scheme the client should use.
                    ErrorCode::Unauthorized => {
                        response
                            .headers_mut()
                            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                    }
                    _ => {}
                }
                response
            }
            Self::RateLimited(wait) => {
                let body = ErrorBody::new(
                    ErrorCode::RateLimited,
                    "too many requests; retry after the time given",
                );
                let mut response = (status, Json(body)).into_response();
                // Whole seconds, rounded up and at least 1, so a client never retries early.
                let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
                response
            }
            Self::Unavailable(cause) => {
                tracing::warn!(error = format!("{cause:#}"), "dependency unavailable");
                let body = ErrorBody::new(
                    ErrorCode::Unavailable,
                    "a service this request needs is unavailable; retry later",
                );
                let mut response = (status, Json(body)).into_response();
                response.headers_mut().insert(
                    header::RETRY_AFTER,
                    HeaderValue::from_static(RETRY_AFTER_UNAVAILABLE),
                );
                response
            }
            Self::Internal(cause) => {
                tracing::error!(error = format!("{cause:#}"), "internal error");
                let body = ErrorBody::new(ErrorCode::Internal, "internal error");
                (status, Json(body)).into_response()
            }
        }
    }
}
