//! Each command of an order batch decided on the batch's book: the order they are settled
//! in (an order's creation before its first payment), then a reservation or a payment,
//! counted.
use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use shared::domain::command::{OrderCreate, OrderPay, RequestKind, RequestResult};
use shared::domain::error::ErrorCode;
use shared::domain::order_book::{rejects_order, OrderBook, PaymentContext};
use uuid::Uuid;

use crate::settling::pipeline::{Decision, PendingRequest};

/// `pending` (a batch in broker order) with the creation of each order it pays for
/// settled right before the order's first payment, where the creation is later in the
/// batch or one of `creations` (locked beside the batch by
/// [`OrderCommands::lock_requests`](super::OrderCommands::lock_requests)); a creation's own
/// later place in the batch is dropped.
pub fn with_creations_first(
    pending: Vec<PendingRequest>,
    creations: Vec<PendingRequest>,
) -> Vec<PendingRequest> {
    if !pending.iter().any(|r| r.kind == RequestKind::OrderPay) {
        return pending;
    }
    let mut creation_of: HashMap<Uuid, PendingRequest> = pending
        .iter()
        .filter(|r| r.kind == RequestKind::OrderCreate)
        .cloned()
        .chain(creations)
        .filter_map(|c| {
            let create = serde_json::from_value::<OrderCreate>(c.payload.clone()).ok()?;
            Some((create.order_id, c))
        })
        .collect();
    let mut emitted = HashSet::new();
    let mut ordered = Vec::with_capacity(pending.len() + creation_of.len());
    for request in pending {
        if emitted.contains(&request.id) {
            // A creation's own message, later in this batch than its payment.
            continue;
        }
        if request.kind == RequestKind::OrderPay {
            let creation = serde_json::from_value::<OrderPay>(request.payload.clone())
                .ok()
                .and_then(|pay| creation_of.remove(&pay.order_id));
            // Not when the creation came earlier in the batch: it is settled first anyway.
            if let Some(creation) = creation.filter(|c| emitted.insert(c.id)) {
                tracing::info!(
                    request_id = %creation.id,
                    payment_request_id = %request.id,
                    "settling an order's creation before its payment, whose message came first"
                );
                ordered.push(creation);
            }
        }
        emitted.insert(request.id);
        ordered.push(request);
    }
    ordered
}

/// Reserves an order's stock, counted.
pub(super) fn reserve(book: &mut OrderBook, create: &OrderCreate, reserved_until: DateTime<Utc>) -> Decision {
    match book.reserve(create.order_id, reserved_until) {
        Ok(reserved) => {
            metrics::counter!("orders_reserved_total").increment(1);
            Decision::Succeeded(RequestResult::OrderReserved(reserved))
        }
        Err(refusal) => {
            if rejects_order(refusal.code) {
                metrics::counter!("orders_rejected_total").increment(1);
            }
            Decision::Failed(refusal)
        }
    }
}

/// Pays an order, counted; the payment and its event get their ids here.
pub(super) fn settle_payment(
    book: &mut OrderBook,
    pay: &OrderPay,
    request_id: Uuid,
    now: DateTime<Utc>,
) -> Decision {
    let context = PaymentContext {
        request_id,
        now,
        payment_id: Uuid::now_v7(),
        event_id: Uuid::now_v7(),
    };
    match book.pay(pay, context) {
        Ok(paid) => {
            metrics::counter!("payments_total", "outcome" => "paid").increment(1);
            Decision::Succeeded(RequestResult::OrderPaid(paid))
        }
        Err(refusal) => {
            if refusal.code == ErrorCode::PaymentInsufficientBalance {
                metrics::counter!("payments_total", "outcome" => "insufficient_balance").increment(1);
            }
            Decision::Failed(refusal)
        }
    }
}
