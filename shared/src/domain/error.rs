//! The contract's error codes (`ERR_…`) and the `{code, message}` body every error carries.
//!
//! Codes live here rather than in the API because workers also settle commands with them:
//! a request that fails in a worker reads `{"error": {"code": "ERR_COUPON_OUT_OF_STOCK", …}}`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

macro_rules! error_codes {
    ($($variant:ident => ($code:literal, $status:literal)),* $(,)?) => {
        /// A machine-readable error code and the HTTP status the contract gives it.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum ErrorCode {
            $($variant),*
        }

        impl ErrorCode {
            /// Every code, for tests that check the whole table.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant),*];

            /// The wire form, e.g. `ERR_NOT_FOUND`.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(ErrorCode::$variant => $code),*
                }
            }

            /// The HTTP status the contract answers this code with.
            pub fn http_status(self) -> u16 {
                match self {
                    $(ErrorCode::$variant => $status),*
                }
            }
        }

        impl FromStr for ErrorCode {
            type Err = UnknownErrorCode;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($code => Ok(ErrorCode::$variant),)*
                    other => Err(UnknownErrorCode(other.to_owned())),
                }
            }
        }
    };
}

error_codes! {
    // General
    InvalidRequest => ("ERR_INVALID_REQUEST", 400),
    Unauthorized => ("ERR_UNAUTHORIZED", 401),
    Forbidden => ("ERR_FORBIDDEN", 403),
    NotFound => ("ERR_NOT_FOUND", 404),
    MethodNotAllowed => ("ERR_METHOD_NOT_ALLOWED", 405),
    RequestTimeout => ("ERR_REQUEST_TIMEOUT", 408),
    PayloadTooLarge => ("ERR_PAYLOAD_TOO_LARGE", 413),
    UnsupportedMediaType => ("ERR_UNSUPPORTED_MEDIA_TYPE", 415),
    IdempotencyKeyInUse => ("ERR_IDEMPOTENCY_KEY_IN_USE", 409),
    IdempotencyKeyReused => ("ERR_IDEMPOTENCY_KEY_REUSED", 422),
    Overloaded => ("ERR_OVERLOADED", 429),
    RateLimited => ("ERR_RATE_LIMITED", 429),
    Internal => ("ERR_INTERNAL", 500),
    Unavailable => ("ERR_UNAVAILABLE", 503),
    // Identity
    // Added to the contract: a user already holds as many live tokens as allowed.
    TooManyTokens => ("ERR_TOO_MANY_TOKENS", 409),
    // Requests
    RequestNotFound => ("ERR_REQUEST_NOT_FOUND", 404),
    // The error of a request its client cancelled while it was `PENDING` (the status is
    // the one a command of a settled request would get: it never reaches a client alone).
    RequestCancelled => ("ERR_REQUEST_CANCELLED", 409),
    RequestAlreadySettled => ("ERR_REQUEST_ALREADY_SETTLED", 409),
    ProcessingFailed => ("ERR_PROCESSING_FAILED", 500),
    // Balance
    BalanceInvalidUser => ("ERR_BALANCE_INVALID_USER", 400),
    BalanceInvalidAmount => ("ERR_BALANCE_INVALID_AMOUNT", 400),
    BalanceConcurrencyConflict => ("ERR_BALANCE_CONCURRENCY_CONFLICT", 409),
    // Products
    ProductNotFound => ("ERR_PRODUCT_NOT_FOUND", 404),
    PopularInvalidFilter => ("ERR_POPULAR_INVALID_FILTER", 400),
    // Coupons
    CouponNotFound => ("ERR_COUPON_NOT_FOUND", 404),
    CouponExpired => ("ERR_COUPON_EXPIRED", 410),
    CouponOutOfStock => ("ERR_COUPON_OUT_OF_STOCK", 410),
    CouponAlreadyAcquired => ("ERR_COUPON_ALREADY_ACQUIRED", 409),
    // Orders
    OrderInvalidUser => ("ERR_ORDER_INVALID_USER", 400),
    OrderInvalidItems => ("ERR_ORDER_INVALID_ITEMS", 400),
    OrderOutOfStock => ("ERR_ORDER_OUT_OF_STOCK", 409),
    OrderConcurrencyConflict => ("ERR_ORDER_CONCURRENCY_CONFLICT", 409),
    OrderNotFound => ("ERR_ORDER_NOT_FOUND", 404),
    OrderUnauthorized => ("ERR_ORDER_UNAUTHORIZED", 403),
    // Added to the contract: cancelling an order that is no longer pending or reserved.
    OrderInvalidStatus => ("ERR_ORDER_INVALID_STATUS", 409),
    // Added to the contract: a user already holds as many unpaid reservations as allowed.
    OrderTooManyReserved => ("ERR_ORDER_TOO_MANY_RESERVED", 409),
    // The order would take the user's units of a product past its `maxPerCustomer`.
    OrderLimitExceeded => ("ERR_ORDER_LIMIT_EXCEEDED", 409),
    // Payment
    PaymentInsufficientBalance => ("ERR_PAYMENT_INSUFFICIENT_BALANCE", 402),
    PaymentInvalidCoupon => ("ERR_PAYMENT_INVALID_COUPON", 400),
    PaymentInvalidOrderStatus => ("ERR_PAYMENT_INVALID_ORDER_STATUS", 400),
    PaymentOrderNotFound => ("ERR_PAYMENT_ORDER_NOT_FOUND", 404),
    PaymentConcurrencyConflict => ("ERR_PAYMENT_CONCURRENCY_CONFLICT", 409),
}

/// A string that is not one of the contract's codes.
#[derive(Debug, thiserror::Error)]
#[error("unknown error code {0:?}")]
pub struct UnknownErrorCode(String);

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ErrorCode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The body of every error answer, and the `error` of a failed request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong, for programs.
    pub code: ErrorCode,
    /// What went wrong, for people; never internals.
    pub message: String,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_round_trips_through_its_wire_form() {
        for code in ErrorCode::ALL {
            assert!(code.as_str().starts_with("ERR_"), "{code:?}");
            assert_eq!(code.as_str().parse::<ErrorCode>().ok(), Some(*code));
        }
    }

    #[test]
    fn the_error_body_serializes_as_the_contract_says() {
        let body = ErrorBody::new(ErrorCode::CouponOutOfStock, "sold out");
        let json = serde_json::to_value(&body).ok();
        assert_eq!(
            json,
            Some(serde_json::json!({"code": "ERR_COUPON_OUT_OF_STOCK", "message": "sold out"}))
        );
    }

    #[test]
    fn client_codes_are_4xx_and_only_infrastructure_codes_are_5xx() {
        for code in ErrorCode::ALL {
            let status = code.http_status();
            let server_side = matches!(
                code,
                ErrorCode::Internal | ErrorCode::Unavailable | ErrorCode::ProcessingFailed
            );
            assert_eq!(status >= 500, server_side, "{code}");
            assert!((400..600).contains(&status), "{code}");
        }
    }
}
