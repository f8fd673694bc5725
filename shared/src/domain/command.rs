//! Asynchronous commands: what a request is, and what travels on the broker.
//!
//! The message carries only the request's id and type; the request row in PostgreSQL is
//! the source of truth for the payload and the status, so a redelivered or re-published
//! message can never apply a different or second effect.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::domain::order::OrderStatus;

/// A family of commands; each has its own partition queues and dead-letter queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// Coupon issues, partitioned by `couponId`.
    Coupon,
    /// Order creation and payment, partitioned by `userId`.
    Order,
}

impl Family {
    pub const ALL: [Family; 2] = [Family::Coupon, Family::Order];

    pub fn as_str(self) -> &'static str {
        match self {
            Family::Coupon => "coupon",
            Family::Order => "order",
        }
    }

    /// The request kinds whose commands travel in this family's queues.
    pub fn kinds(self) -> &'static [RequestKind] {
        match self {
            Family::Coupon => &[RequestKind::CouponIssue],
            Family::Order => &[RequestKind::OrderCreate, RequestKind::OrderPay],
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Family::ALL.into_iter().find(|f| f.as_str() == raw)
    }
}

/// The type of an asynchronous request, as the contract names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RequestKind {
    CouponIssue,
    OrderCreate,
    OrderPay,
}

impl RequestKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RequestKind::CouponIssue => "COUPON_ISSUE",
            RequestKind::OrderCreate => "ORDER_CREATE",
            RequestKind::OrderPay => "ORDER_PAY",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "COUPON_ISSUE" => Some(RequestKind::CouponIssue),
            "ORDER_CREATE" => Some(RequestKind::OrderCreate),
            "ORDER_PAY" => Some(RequestKind::OrderPay),
            _ => None,
        }
    }

    /// The queue family: coupon commands by coupon, order commands by user.
    pub fn family(self) -> Family {
        match self {
            RequestKind::CouponIssue => Family::Coupon,
            RequestKind::OrderCreate | RequestKind::OrderPay => Family::Order,
        }
    }
}

/// Status of a request: `PENDING` until a worker settles it, then terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RequestStatus {
    Pending,
    Succeeded,
    Failed,
}

impl RequestStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RequestStatus::Pending => "PENDING",
            RequestStatus::Succeeded => "SUCCEEDED",
            RequestStatus::Failed => "FAILED",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        [
            RequestStatus::Pending,
            RequestStatus::Succeeded,
            RequestStatus::Failed,
        ]
        .into_iter()
        .find(|s| s.as_str() == raw)
    }

    /// True once the request is settled for good.
    pub fn is_terminal(self) -> bool {
        self != RequestStatus::Pending
    }
}

/// What a settled request produced, as the contract's `result` names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RequestResult {
    CouponIssued(CouponIssued),
    OrderReserved(OrderReserved),
    OrderPaid(OrderPaid),
}

/// The result of a `COUPON_ISSUE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CouponIssued {
    pub user_coupon_id: Uuid,
    pub coupon_id: i64,
}

/// The result of an `ORDER_CREATE`: the order's stock is held until `reserved_until`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderReserved {
    pub order_id: Uuid,
    pub status: OrderStatus,
    pub total_amount: i64,
    pub reserved_until: DateTime<Utc>,
}

/// The result of an `ORDER_PAY`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderPaid {
    pub order_id: Uuid,
    pub payment_id: Uuid,
    pub paid_amount: i64,
    pub discount_amount: i64,
}

/// The body of a command message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CommandMessage {
    pub request_id: Uuid,
    #[serde(rename = "type")]
    pub kind: RequestKind,
}

/// The payload of a `COUPON_ISSUE` request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CouponIssue {
    pub coupon_id: i64,
    pub user_id: i64,
}

/// One line of an order as the client asked for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderLine {
    pub product_id: i64,
    pub quantity: i64,
}

/// The payload of an `ORDER_CREATE` request; the order row itself is stored as `PENDING`
/// by the API in the same transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderCreate {
    pub order_id: Uuid,
    pub user_id: i64,
    pub items: Vec<OrderLine>,
}

/// The payload of an `ORDER_PAY` request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderPay {
    pub order_id: Uuid,
    pub user_id: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coupon_id: Option<i64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_message_is_small_and_named_as_the_contract_names_types() {
        let id = Uuid::now_v7();
        let message = CommandMessage {
            request_id: id,
            kind: RequestKind::CouponIssue,
        };
        let json = serde_json::to_value(&message).ok();
        assert_eq!(
            json,
            Some(serde_json::json!({"requestId": id, "type": "COUPON_ISSUE"}))
        );
    }

    #[test]
    fn results_are_named_as_the_contract_names_them() {
        let id = Uuid::now_v7();
        let paid = RequestResult::OrderPaid(OrderPaid {
            order_id: id,
            payment_id: id,
            paid_amount: 9_000,
            discount_amount: 1_000,
        });
        assert_eq!(
            serde_json::to_value(&paid).ok(),
            Some(serde_json::json!({
                "orderId": id, "paymentId": id, "paidAmount": 9_000, "discountAmount": 1_000
            }))
        );
        let issued = serde_json::json!({ "userCouponId": id, "couponId": 7 });
        assert_eq!(
            serde_json::from_value::<RequestResult>(issued).ok(),
            Some(RequestResult::CouponIssued(CouponIssued {
                user_coupon_id: id,
                coupon_id: 7
            }))
        );
    }

    #[test]
    fn kinds_round_trip_and_map_to_their_family() {
        for kind in [
            RequestKind::CouponIssue,
            RequestKind::OrderCreate,
            RequestKind::OrderPay,
        ] {
            assert_eq!(RequestKind::parse(kind.as_str()), Some(kind));
            assert_eq!(
                serde_json::to_value(kind).ok(),
                Some(serde_json::json!(kind.as_str()))
            );
        }
        for status in [
            RequestStatus::Pending,
            RequestStatus::Succeeded,
            RequestStatus::Failed,
        ] {
            assert_eq!(RequestStatus::parse(status.as_str()), Some(status));
        }
        assert_eq!(RequestKind::CouponIssue.family(), Family::Coupon);
        assert_eq!(RequestKind::OrderPay.family(), Family::Order);
    }
}
