//! Extractors whose rejections are the contract's errors, so a malformed body, query or
//! header answers `{code, message}` instead of axum's plain-text rejections.

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use serde::de::DeserializeOwned;
use shared::domain::error::ErrorCode;

use crate::error::ApiError;

/// A JSON object body, rejecting with the contract's 400, 413 or 415.
///
/// The body must be an object: serde would otherwise also accept a struct written as an
/// array (`["Ann"]` for `{"name": "Ann"}`), which no client means to send.
#[derive(Debug)]
pub struct Json<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let axum::Json(value) = axum::Json::<serde_json::Value>::from_request(request, state).await?;
        if !value.is_object() {
            return Err(ApiError::new(
                ErrorCode::InvalidRequest,
                "the body must be a JSON object",
            ));
        }
        serde_json::from_value(value)
            .map(Json)
            .map_err(|e| ApiError::new(ErrorCode::InvalidRequest, format!("invalid body: {e}")))
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        let code = match rejection.status() {
            StatusCode::PAYLOAD_TOO_LARGE => ErrorCode::PayloadTooLarge,
            StatusCode::UNSUPPORTED_MEDIA_TYPE => ErrorCode::UnsupportedMediaType,
            _ => ErrorCode::InvalidRequest,
        };
        ApiError::new(code, rejection.body_text())
    }
}

/// `axum::extract::Query`, rejecting with the contract's 400.
#[derive(Debug, FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct Query<T>(pub T);

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        ApiError::new(ErrorCode::InvalidRequest, rejection.body_text())
    }
}

/// The address of the client: the connection's peer, or behind trusted proxies
/// (`TRUSTED_PROXIES`) the client they forwarded ([`crate::http::forwarded`]).
#[derive(Debug, Clone, Copy)]
pub struct ClientAddress(pub std::net::IpAddr);

impl<S> FromRequestParts<S> for ClientAddress
where
    S: Send + Sync,
    std::sync::Arc<crate::http::limits::RateLimits>: axum::extract::FromRef<S>,
{
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let limits: std::sync::Arc<crate::http::limits::RateLimits> = axum::extract::FromRef::from_ref(state);
        Ok(Self(limits.client_address(parts)))
    }
}

/// The optional `Idempotency-Key` header: 1 to 255 printable ASCII characters.
#[derive(Debug, Clone, Default)]
pub struct IdempotencyKey(pub Option<String>);

impl IdempotencyKey {
    pub const HEADER: &'static str = "idempotency-key";
    const MAX_LEN: usize = 255;

    fn parse(raw: &[u8]) -> Option<String> {
        let printable = raw.iter().all(|b| (0x20..=0x7e).contains(b));
        let valid = !raw.is_empty() && raw.len() <= Self::MAX_LEN && printable;
        valid.then(|| String::from_utf8_lossy(raw).into_owned())
    }
}

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        match parts.headers.get(Self::HEADER) {
            None => Ok(Self(None)),
            Some(value) => Self::parse(value.as_bytes())
                .map(|key| Self(Some(key)))
                .ok_or_else(|| {
                    ApiError::new(
                        ErrorCode::InvalidRequest,
                        "Idempotency-Key must be 1 to 255 printable ASCII characters",
                    )
                }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotency_keys_are_short_printable_ascii() {
        assert_eq!(
            IdempotencyKey::parse(b"order-1 retry").as_deref(),
            Some("order-1 retry")
        );
        assert!(IdempotencyKey::parse(&[b'k'; 255]).is_some());
        assert!(IdempotencyKey::parse(&[b'k'; 256]).is_none());
        assert!(IdempotencyKey::parse(b"").is_none());
        assert!(IdempotencyKey::parse(b"tab\there").is_none());
        assert!(IdempotencyKey::parse("caf\u{e9}".as_bytes()).is_none());
    }
}
