//! Asynchronous commands: what a request is, and what travels on the broker.
//!
//! The message carries only the request's id and type; the request row in PostgreSQL is
//! the source of truth for the payload and the status, so a redelivered or re-published
//! message can never apply a different or second effect.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::topology::Family;

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
    let failed = sqlx::query(
        "UPDATE requests SET status = 'FAILED', error = $2, completed_at = now()
         WHERE id = $1 AND status = 'PENDING'",
    )
    .bind(request_id)
    .bind(serde_json::to_value(error).unwrap_or_default())
    .execute(&mut *conn)
    .await?;
    if failed.rows_affected() == 0 {
        return Ok(false);
    }
    sqlx::query(
        "UPDATE orders SET status = 'REJECTED', closed_at = now()
         WHERE create_request_id = $1 AND status = 'PENDING'",
    )
    .bind(request_id)
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
    fn kinds_round_trip_and_map_to_their_family() {
        for kind in [
            RequestKind::CouponIssue,
            RequestKind::OrderCreate,
            RequestKind::OrderPay,
        ] {
            assert_eq!(RequestKind::parse(kind.as_str()), Some(kind));
        }
        assert_eq!(RequestKind::CouponIssue.family(), Family::Coupon);
        assert_eq!(RequestKind::OrderPay.family(), Family::Order);
    }
}
