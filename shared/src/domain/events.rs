//! The events the pipeline sends the external data platform, as the contract writes them
//! (`../shared/API.md`, "Events to the data platform"): one type per event, built in Rust
//! and written to the outbox as one value.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The routing key, and the `type` field, of [`OrderPaid`].
pub const ORDER_PAID: &str = "order.paid";

/// `type` of an `order.paid` event: always `"order.paid"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OrderPaidType {
    #[serde(rename = "order.paid")]
    OrderPaid,
}

/// An order was paid: what was bought, at which prices, and what was paid for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderPaid {
    /// Unique per event; consumers deduplicate on it (delivery is at least once), and it is
    /// the message's `message_id`.
    pub event_id: Uuid,
    #[serde(rename = "type")]
    pub kind: OrderPaidType,
    pub occurred_at: DateTime<Utc>,
    pub order_id: Uuid,
    pub user_id: i64,
    pub items: Vec<PaidItem>,
    pub total_amount: i64,
    pub discount_amount: i64,
    pub paid_amount: i64,
    /// The coupon the payment used, if any (absent, not `null`, without one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coupon_id: Option<i64>,
}

/// One line of a paid order, at the price it was sold for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaidItem {
    pub product_id: i64,
    pub name: String,
    pub unit_price: i64,
    pub quantity: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(value: &serde_json::Value) -> Vec<String> {
        let mut keys: Vec<String> = value
            .as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default();
        keys.sort();
        keys
    }

    fn paid(coupon_id: Option<i64>) -> OrderPaid {
        OrderPaid {
            event_id: Uuid::nil(),
            kind: OrderPaidType::OrderPaid,
            occurred_at: DateTime::<Utc>::UNIX_EPOCH,
            order_id: Uuid::max(),
            user_id: 7,
            items: vec![PaidItem {
                product_id: 3,
                name: "Pen".to_owned(),
                unit_price: 1_000,
                quantity: 2,
            }],
            total_amount: 2_000,
            discount_amount: 500,
            paid_amount: 1_500,
            coupon_id,
        }
    }

    /// The contract's body: `{eventId, type: "order.paid", occurredAt, orderId, userId,
    /// items, totalAmount, discountAmount, paidAmount, couponId?}`.
    #[test]
    fn an_order_paid_event_has_the_contracts_shape() {
        let with_coupon = serde_json::to_value(paid(Some(9))).unwrap_or_default();
        assert_eq!(
            keys(&with_coupon),
            [
                "couponId",
                "discountAmount",
                "eventId",
                "items",
                "occurredAt",
                "orderId",
                "paidAmount",
                "totalAmount",
                "type",
                "userId"
            ]
        );
        assert_eq!(with_coupon["type"], ORDER_PAID);
        assert_eq!(with_coupon["couponId"], 9);
        assert_eq!(with_coupon["occurredAt"], "1970-01-01T00:00:00Z");
        assert_eq!(
            keys(&with_coupon["items"][0]),
            ["name", "productId", "quantity", "unitPrice"]
        );
        assert_eq!(with_coupon["items"][0]["unitPrice"], 1_000);

        let without = serde_json::to_value(paid(None)).unwrap_or_default();
        assert!(without.get("couponId").is_none(), "{without}");
        assert_eq!(
            serde_json::from_value::<OrderPaid>(without).ok(),
            Some(paid(None)),
            "read back as written"
        );
        let other_type = serde_json::json!({ "type": "order.cancelled" });
        assert!(serde_json::from_value::<OrderPaidType>(other_type["type"].clone()).is_err());
    }
}
