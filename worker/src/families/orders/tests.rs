#![allow(clippy::unwrap_used)]

use chrono::Utc;
use serde_json::json;
use shared::domain::command::RequestKind;
use uuid::Uuid;

use super::with_creations_first;
use crate::settling::pipeline::PendingRequest;

fn create(order: Uuid) -> PendingRequest {
    request(
        RequestKind::OrderCreate,
        json!({ "orderId": order, "userId": 1, "items": [{ "productId": 1, "quantity": 1 }] }),
    )
}

fn pay(order: Uuid) -> PendingRequest {
    request(RequestKind::OrderPay, json!({ "orderId": order, "userId": 1 }))
}

fn request(kind: RequestKind, payload: serde_json::Value) -> PendingRequest {
    PendingRequest {
        id: Uuid::now_v7(),
        kind,
        payload,
        created_at: Utc::now(),
    }
}

fn ids(requests: &[PendingRequest]) -> Vec<Uuid> {
    requests.iter().map(|r| r.id).collect()
}

#[test]
fn a_batch_in_order_is_left_as_it_is() {
    let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
    let batch = vec![create(a), pay(a), create(b), pay(b)];
    let expected = ids(&batch);
    let stored = vec![create(Uuid::now_v7())]; // of an order nobody pays here
    assert_eq!(ids(&with_creations_first(batch, stored)), expected);
}

#[test]
fn a_creation_later_in_the_batch_moves_before_its_payment_once() {
    let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
    let (pay_a, other, create_a) = (pay(a), create(b), create(a));
    let expected = vec![create_a.id, pay_a.id, other.id];
    let ordered = with_creations_first(vec![pay_a, other, create_a], Vec::new());
    assert_eq!(ids(&ordered), expected);
}

#[test]
fn a_stored_creation_goes_before_the_first_payment_of_its_order_only() {
    let a = Uuid::now_v7();
    let (first, second, stored) = (pay(a), pay(a), create(a));
    let expected = vec![stored.id, first.id, second.id];
    assert_eq!(
        ids(&with_creations_first(vec![first, second], vec![stored])),
        expected
    );
}
