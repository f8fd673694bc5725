//! Asynchronous commands: what a request is, and what travels on the broker.
//!
//! The message carries only the request's id and type; the request row in PostgreSQL is
//! the source of truth for the payload and the status, so a redelivered or re-published
//! message can never apply a different or second effect.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::order::OrderStatus;
use crate::topology::Family;

/// Maps an enum stored in a `TEXT` column to and from that column, through its `as_str`
/// and `parse`, so statuses and kinds are bound and read as types, never as literals.
///
/// Written out rather than `#[derive(sqlx::Type)]` with `type_name = "text"`: sqlx treats
/// such a type as one it must look up by name, which costs a round trip to PostgreSQL on
/// every new connection; this one is plain `TEXT` (and `TEXT[]` for arrays) to sqlx.
#[macro_export]
macro_rules! stored_as_text {
    ($type:ty) => {
        impl sqlx::Type<sqlx::Postgres> for $type {
            fn type_info() -> sqlx::postgres::PgTypeInfo {
                <str as sqlx::Type<sqlx::Postgres>>::type_info()
            }

            fn compatible(ty: &sqlx::postgres::PgTypeInfo) -> bool {
                <str as sqlx::Type<sqlx::Postgres>>::compatible(ty)
            }
        }

        impl sqlx::postgres::PgHasArrayType for $type {
            fn array_type_info() -> sqlx::postgres::PgTypeInfo {
                <&str as sqlx::postgres::PgHasArrayType>::array_type_info()
            }

            fn array_compatible(ty: &sqlx::postgres::PgTypeInfo) -> bool {
                <&str as sqlx::postgres::PgHasArrayType>::array_compatible(ty)
            }
        }

        impl sqlx::Encode<'_, sqlx::Postgres> for $type {
            fn encode_by_ref(
                &self,
                buf: &mut sqlx::postgres::PgArgumentBuffer,
            ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
                <&str as sqlx::Encode<sqlx::Postgres>>::encode(self.as_str(), buf)
            }
        }

        impl<'r> sqlx::Decode<'r, sqlx::Postgres> for $type {
            fn decode(value: sqlx::postgres::PgValueRef<'r>) -> Result<Self, sqlx::error::BoxDynError> {
                let raw = <&str as sqlx::Decode<sqlx::Postgres>>::decode(value)?;
                <$type>::parse(raw).ok_or_else(|| format!("{raw:?} is not a {}", stringify!($type)).into())
            }
        }
    };
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

stored_as_text!(RequestKind);
stored_as_text!(RequestStatus);

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

/// Fails a request that is still `PENDING` with `error`, and rejects the order it was
/// creating, if any (a `PENDING` order holds no stock, so nothing is released). Waits for
/// the row lock of a worker settling the request right now: if that worker commits first,
/// the request is no longer `PENDING` and nothing changes. True when it was failed here.
///
/// Both ways a request fails without being settled go through here: the api withdrawing
/// one it could not publish, and a worker parking a dead letter.
pub async fn fail_pending(
    conn: &mut sqlx::PgConnection,
    request_id: Uuid,
    error: &crate::error::ErrorBody,
) -> Result<bool, sqlx::Error> {
    let failed = sqlx::query!(
        "UPDATE requests SET status = $3, error = $2, completed_at = now()
         WHERE id = $1 AND status = $4",
        request_id,
        serde_json::to_value(error).unwrap_or_default(),
        RequestStatus::Failed as _,
        RequestStatus::Pending as _,
    )
    .execute(&mut *conn)
    .await?;
    if failed.rows_affected() == 0 {
        return Ok(false);
    }
    // `'PENDING'` stays written out: it is what lets the planner use the partial index
    // `orders_pending_by_request`, which a bound status would not under a generic plan.
    sqlx::query!(
        "UPDATE orders SET status = $2, closed_at = now()
         WHERE create_request_id = $1 AND status = 'PENDING'",
        request_id,
        OrderStatus::Rejected as _,
    )
    .execute(&mut *conn)
    .await?;
    Ok(true)
}

/// Publishes the command of a stored request to its partition queue and waits for the
/// broker's confirm. The API calls it after committing the request; the sweeper calls it
/// again for requests whose confirm was never recorded.
pub async fn publish(
    publisher: &crate::broker::Publisher,
    topology: &crate::topology::Topology,
    request_id: Uuid,
    kind: RequestKind,
    partition_key: i64,
) -> Result<(), crate::broker::PublishError> {
    let partition = crate::partition::partition_of(partition_key, topology.partitions);
    let queue = topology.queue(kind.family(), partition);
    let message = CommandMessage { request_id, kind };
    // Serializing two plain fields cannot fail; an empty body would be dead-lettered.
    let body = serde_json::to_vec(&message).unwrap_or_default();
    publisher
        .publish(
            &topology.commands_exchange(),
            &queue,
            &request_id.to_string(),
            &body,
            true,
        )
        .await
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
