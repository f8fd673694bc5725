//! Settling order commands: stock reservation and payment.
//!
//! A batch holds one user partition's commands in broker order, so a user's create and pay
//! are settled in that order. Every row a batch may touch is locked up front in one global
//! order (orders by id, then products by id), the order that cancellation and expiry also
//! follow, so concurrent batches, cancels and expiries never deadlock. Each command then
//! either applies all its effects or, refused, none: a refusal is a decision, not an error,
//! and does not roll the batch back.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::json;
use shared::command::{OrderCreate, OrderPay, RequestKind};
use shared::error::{ErrorBody, ErrorCode};
use shared::money::{order_total, Discount};
use shared::order::{OrderEvent, OrderStatus};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::settle::{Decision, PendingRequest, SettleError};

enum OrderCommand {
    Create(OrderCreate),
    Pay(OrderPay),
}

impl OrderCommand {
    fn order_id(&self) -> Uuid {
        match self {
            OrderCommand::Create(c) => c.order_id,
            OrderCommand::Pay(p) => p.order_id,
        }
    }
}

fn refuse(code: ErrorCode, message: impl Into<String>) -> Decision {
    Decision::Failed(ErrorBody::new(code, message))
}

pub async fn settle(
    conn: &mut PgConnection,
    requests: &[PendingRequest],
    reservation_ttl: Duration,
) -> Result<Vec<Decision>, SettleError> {
    let commands: Vec<OrderCommand> = requests
        .iter()
        .map(|r| {
            let parsed = match r.kind {
                RequestKind::OrderCreate => {
                    serde_json::from_value(r.payload.clone()).map(OrderCommand::Create)
                }
                RequestKind::OrderPay => serde_json::from_value(r.payload.clone()).map(OrderCommand::Pay),
                RequestKind::CouponIssue => {
                    return Err(SettleError::Unsettleable {
                        id: r.id,
                        reason: "a coupon command in an order partition".to_owned(),
                    })
                }
            };
            parsed.map_err(|e| SettleError::Unsettleable {
                id: r.id,
                reason: format!("malformed order payload: {e}"),
            })
        })
        .collect::<Result<_, _>>()?;

    let mut order_ids: Vec<Uuid> = commands.iter().map(OrderCommand::order_id).collect();
    order_ids.sort_unstable();
    order_ids.dedup();
    // `NO KEY UPDATE`, here and wherever rows are locked: settlements never change keys, and
    // this lock does not conflict with the key-share locks that foreign-key checks take. With
    // `FOR UPDATE`, the API inserting order lines (locking their products in the client's
    // order) and a reservation locking the same products deadlocked under a burst.
    // One round trip: the orders by id, then the products of their lines by id.
    sqlx::query(
        "WITH locked_orders AS MATERIALIZED (
            SELECT id FROM orders WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE),
         locked_products AS MATERIALIZED (
            SELECT id FROM products
            WHERE id IN (SELECT product_id FROM order_items
                         WHERE order_id IN (SELECT id FROM locked_orders))
            ORDER BY id FOR NO KEY UPDATE)
         SELECT (SELECT count(*) FROM locked_orders), (SELECT count(*) FROM locked_products)",
    )
    .bind(&order_ids)
    .execute(&mut *conn)
    .await?;

    let mut decisions = Vec::with_capacity(commands.len());
    for (request, command) in requests.iter().zip(&commands) {
        let decision = match command {
            OrderCommand::Create(create) => reserve_stock(conn, create, reservation_ttl).await?,
            OrderCommand::Pay(pay) => settle_payment(conn, pay, request.id).await?,
        };
        decisions.push(decision);
    }
    Ok(decisions)
}

/// Locks an order batch's request rows, and with them the `PENDING` creation of every
/// order a `PENDING` payment of the batch pays for: all in one statement, by id, the order
/// in which every settlement locks requests. (`$1`: the batch's request ids.)
///
/// A user's commands share a partition, so a creation is normally settled before any
/// payment of its order. It comes later only when its message does: the api's publish was
/// not confirmed and the sweeper sent it after the payment, or it was dead-lettered and
/// sent back. The payment would then find its order `PENDING` and be refused, although the
/// contract accepts a payment of a `PENDING` order; [`with_creations_first`] settles the
/// stored creation first instead. Only the payer's own orders (so the creation is in this
/// partition, whose lease the transaction holds), and not a creation a worker has given up
/// on or that waits in the dead letters: its failure is not the payment's to repeat.
pub const LOCK_REQUESTS_WITH_CREATIONS: &str = "
    WITH creations AS (
        SELECT o.create_request_id AS id
        FROM requests p
        JOIN orders o ON o.id = CASE WHEN p.payload->>'orderId' ~* '^[0-9a-f]{8}-([0-9a-f]{4}-){3}[0-9a-f]{12}$'
                                     THEN (p.payload->>'orderId')::uuid END
        WHERE p.id = ANY($1) AND p.kind = 'ORDER_PAY' AND p.status = 'PENDING'
          AND o.status = 'PENDING' AND o.user_id::text = p.payload->>'userId'
          AND NOT EXISTS (SELECT 1 FROM settle_failures f WHERE f.request_id = o.create_request_id)
          AND NOT EXISTS (SELECT 1 FROM dead_letters d
                          WHERE d.request_id = o.create_request_id AND d.resolution IS NULL))
    SELECT id, kind, payload, status, created_at FROM requests
    WHERE id = ANY($1) OR (id IN (SELECT id FROM creations) AND status = 'PENDING' AND kind = 'ORDER_CREATE')
    ORDER BY id FOR NO KEY UPDATE";

/// `pending` (a batch in broker order) with the creation of each order it pays for
/// settled right before the order's first payment, where the creation is later in the
/// batch or one of `creations` (locked beside the batch by
/// [`LOCK_REQUESTS_WITH_CREATIONS`]); a creation's own later place in the batch is dropped.
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

/// An order's status with one of its lines (line fields are NULL for an order without
/// lines, which the API never stores).
#[derive(sqlx::FromRow)]
struct Line {
    status: String,
    product_id: Option<i64>,
    quantity: Option<i64>,
    name: Option<String>,
    price: Option<i64>,
    available: Option<i64>,
}

/// Reserves every line of a `PENDING` order or none, snapshotting names and prices.
///
/// Two statements, a read and a write, because the batch holds its product locks while it
/// runs: every round trip here is time other partitions wait for the same products.
async fn reserve_stock(
    conn: &mut PgConnection,
    create: &OrderCreate,
    ttl: Duration,
) -> Result<Decision, SettleError> {
    let lines: Vec<Line> = sqlx::query_as(
        "SELECT o.status, oi.product_id, oi.quantity, p.name, p.price,
                p.stock - p.reserved AS available
         FROM orders o
         LEFT JOIN order_items oi ON oi.order_id = o.id
         LEFT JOIN products p ON p.id = oi.product_id
         WHERE o.id = $1 ORDER BY oi.product_id",
    )
    .bind(create.order_id)
    .fetch_all(&mut *conn)
    .await?;
    let status = lines.first().map(|l| OrderStatus::parse(&l.status));
    match status {
        Some(Some(s)) if s.after(OrderEvent::Reserve).is_some() => {}
        Some(_) => {
            return Ok(refuse(
                ErrorCode::OrderConcurrencyConflict,
                "the order was cancelled before its stock could be reserved",
            ))
        }
        None => return Ok(refuse(ErrorCode::OrderNotFound, "the order does not exist")),
    }
    let mut products = Vec::with_capacity(lines.len());
    let mut quantities = Vec::with_capacity(lines.len());
    let mut names = Vec::with_capacity(lines.len());
    let mut prices = Vec::with_capacity(lines.len());
    let mut short = None;
    for line in &lines {
        let (Some(product), Some(quantity), Some(name), Some(price), Some(available)) = (
            line.product_id,
            line.quantity,
            line.name.clone(),
            line.price,
            line.available,
        ) else {
            continue;
        };
        if available < quantity && short.is_none() {
            short = Some((product, available));
        }
        products.push(product);
        quantities.push(quantity);
        names.push(name);
        prices.push(price);
    }
    let total = order_total(prices.iter().copied().zip(quantities.iter().copied()));
    let refusal = match (short, total) {
        (Some((product, available)), _) => Some(refuse(
            ErrorCode::OrderOutOfStock,
            format!("product {product} has {} left", available.max(0)),
        )),
        (None, None) => Some(refuse(
            ErrorCode::OrderInvalidItems,
            "the order total is too large",
        )),
        (None, Some(_)) if products.is_empty() => {
            Some(refuse(ErrorCode::OrderInvalidItems, "the order has no lines"))
        }
        (None, Some(_)) => None,
    };
    if let Some(refusal) = refusal {
        sqlx::query("UPDATE orders SET status = 'REJECTED', closed_at = now() WHERE id = $1")
            .bind(create.order_id)
            .execute(&mut *conn)
            .await?;
        metrics::counter!("orders_rejected_total").increment(1);
        return Ok(refusal);
    }
    let total = total.unwrap_or_default();

    let reserved_until: DateTime<Utc> = sqlx::query_scalar(
        "WITH reserve AS (
            UPDATE products p SET reserved = p.reserved + r.quantity, updated_at = now()
            FROM UNNEST($2::bigint[], $3::bigint[]) AS r(product_id, quantity)
            WHERE p.id = r.product_id),
         snapshot AS (
            UPDATE order_items oi SET name = r.name, unit_price = r.price
            FROM UNNEST($2::bigint[], $4::text[], $5::bigint[]) AS r(product_id, name, price)
            WHERE oi.order_id = $1 AND oi.product_id = r.product_id)
         UPDATE orders SET status = 'RESERVED', total_amount = $6,
                reserved_until = now() + make_interval(secs => $7)
         WHERE id = $1 RETURNING reserved_until",
    )
    .bind(create.order_id)
    .bind(&products)
    .bind(&quantities)
    .bind(&names)
    .bind(&prices)
    .bind(total)
    .bind(ttl.as_secs_f64())
    .fetch_one(&mut *conn)
    .await?;
    metrics::counter!("orders_reserved_total").increment(1);
    Ok(Decision::Succeeded(json!({
        "orderId": create.order_id,
        "status": "RESERVED",
        "totalAmount": total,
        "reservedUntil": reserved_until,
    })))
}

/// An order with one of its lines, as a payment reads it.
#[derive(sqlx::FromRow)]
struct PaidLine {
    user_id: i64,
    status: String,
    total_amount: i64,
    product_id: i64,
    name: String,
    unit_price: i64,
    quantity: i64,
}

#[derive(sqlx::FromRow)]
struct HeldCoupon {
    id: Uuid,
    used: bool,
    discount_type: String,
    discount_value: i64,
    expired: bool,
    all_products: bool,
    /// The order's products this coupon applies to (when it is restricted).
    applicable: Vec<i64>,
}

/// Pays a `RESERVED` order: balance debited with its ledger entry, reserved units sold, the
/// coupon used, the payment written, the order `PAID`, and an `order.paid` event in the
/// outbox. Any refusal leaves everything as it was (a failed payment keeps the order
/// `RESERVED`, so the user can charge and pay again).
///
/// A read, the coupon's read when there is one, and one write: the batch holds its product
/// locks meanwhile, so round trips are what the other partitions wait for.
async fn settle_payment(
    conn: &mut PgConnection,
    pay: &OrderPay,
    request_id: Uuid,
) -> Result<Decision, SettleError> {
    let lines: Vec<PaidLine> = sqlx::query_as(
        "SELECT o.user_id, o.status, o.total_amount,
                oi.product_id, oi.name, oi.unit_price, oi.quantity
         FROM orders o JOIN order_items oi ON oi.order_id = o.id
         WHERE o.id = $1 ORDER BY oi.product_id",
    )
    .bind(pay.order_id)
    .fetch_all(&mut *conn)
    .await?;
    let Some(order) = lines.first() else {
        return Ok(refuse(
            ErrorCode::PaymentOrderNotFound,
            "no order with this orderId",
        ));
    };
    if order.user_id != pay.user_id {
        return Ok(refuse(
            ErrorCode::OrderUnauthorized,
            "this order belongs to another user",
        ));
    }
    if OrderStatus::parse(&order.status)
        .and_then(|s| s.after(OrderEvent::Pay))
        .is_none()
    {
        return Ok(refuse(
            ErrorCode::PaymentInvalidOrderStatus,
            format!("an order that is {} cannot be paid", order.status),
        ));
    }
    let total = order.total_amount;

    let (discount, user_coupon) = match pay.coupon_id {
        None => (0, None),
        Some(coupon_id) => match coupon_discount(conn, pay, coupon_id, total, &lines).await? {
            Ok(applied) => applied,
            Err(refusal) => return Ok(refusal),
        },
    };
    let amount = total - discount;

    let payment_id = Uuid::now_v7();
    let event_id = Uuid::now_v7();
    let items: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| json!({"productId": l.product_id, "name": l.name, "unitPrice": l.unit_price, "quantity": l.quantity}))
        .collect();
    let mut event = json!({
        "eventId": event_id,
        "type": "order.paid",
        "orderId": pay.order_id,
        "userId": pay.user_id,
        "items": items,
        "totalAmount": total,
        "discountAmount": discount,
        "paidAmount": amount,
    });
    let coupon_used = pay.coupon_id.filter(|_| user_coupon.is_some());
    if let Some(coupon_id) = coupon_used {
        event["couponId"] = json!(coupon_id);
    }
    let products: Vec<i64> = lines.iter().map(|l| l.product_id).collect();
    let quantities: Vec<i64> = lines.iter().map(|l| l.quantity).collect();
    // Every effect is gated on `go`: the debit went through, or there was nothing to debit.
    // A balance that does not cover the amount leaves `go` empty and the statement writes
    // nothing at all.
    let paid_at: Option<DateTime<Utc>> = sqlx::query_scalar(
        "WITH debit AS (
            UPDATE balances SET amount = amount - $3, updated_at = now()
            WHERE user_id = $2 AND amount >= $3 AND $3 > 0
            RETURNING amount),
         go AS (SELECT 1 WHERE $3 = 0 OR EXISTS (SELECT 1 FROM debit)),
         ledger AS (
            INSERT INTO balance_transactions (user_id, kind, amount, balance_after, order_id)
            SELECT $2, 'PAYMENT', $3, amount, $1 FROM debit),
         sold AS (
            UPDATE products p
            SET reserved = p.reserved - s.quantity, stock = p.stock - s.quantity,
                sold = p.sold + s.quantity, updated_at = now()
            FROM UNNEST($4::bigint[], $5::bigint[]) AS s(product_id, quantity)
            WHERE p.id = s.product_id AND EXISTS (SELECT 1 FROM go)),
         used AS (
            UPDATE user_coupons SET used_at = now(), order_id = $1
            WHERE id = $6 AND EXISTS (SELECT 1 FROM go)),
         payment AS (
            INSERT INTO payments (id, order_id, user_id, request_id, amount, discount_amount, user_coupon_id)
            SELECT $7, $1, $2, $8, $3, $9, $6 FROM go),
         paid AS (
            UPDATE orders SET status = 'PAID', paid_at = now(), discount_amount = $9,
                   paid_amount = $3, coupon_id = $10
            WHERE id = $1 AND EXISTS (SELECT 1 FROM go)
            RETURNING paid_at),
         event AS (
            INSERT INTO outbox (id, routing_key, payload)
            SELECT $11, 'order.paid', $12::jsonb || jsonb_build_object('occurredAt', paid_at)
            FROM paid)
         SELECT paid_at FROM paid",
    )
    .bind(pay.order_id)
    .bind(pay.user_id)
    .bind(amount)
    .bind(&products)
    .bind(&quantities)
    .bind(user_coupon)
    .bind(payment_id)
    .bind(request_id)
    .bind(discount)
    .bind(coupon_used)
    .bind(event_id)
    .bind(&event)
    .fetch_optional(&mut *conn)
    .await?;
    if paid_at.is_none() {
        metrics::counter!("payments_total", "outcome" => "insufficient_balance").increment(1);
        return Ok(refuse(
            ErrorCode::PaymentInsufficientBalance,
            format!("the balance does not cover {amount} won"),
        ));
    }
    metrics::counter!("payments_total", "outcome" => "paid").increment(1);
    Ok(Decision::Succeeded(json!({
        "orderId": pay.order_id,
        "paymentId": payment_id,
        "paidAmount": amount,
        "discountAmount": discount,
    })))
}

/// The discount of a coupon on this order and the held coupon to mark used, or the refusal.
async fn coupon_discount(
    conn: &mut PgConnection,
    pay: &OrderPay,
    coupon_id: i64,
    total: i64,
    lines: &[PaidLine],
) -> Result<Result<(i64, Option<Uuid>), Decision>, SettleError> {
    let invalid = |message: &str| Err(refuse(ErrorCode::PaymentInvalidCoupon, message));
    let products: Vec<i64> = lines.iter().map(|l| l.product_id).collect();
    let held: Option<HeldCoupon> = sqlx::query_as(
        "SELECT uc.id, uc.used_at IS NOT NULL AS used, c.discount_type, c.discount_value,
                c.expires_at <= now() AS expired, c.all_products,
                ARRAY(SELECT cp.product_id FROM coupon_products cp
                      WHERE cp.coupon_id = c.id AND cp.product_id = ANY($3)) AS applicable
         FROM user_coupons uc JOIN coupons c ON c.id = uc.coupon_id
         WHERE uc.user_id = $1 AND uc.coupon_id = $2
         FOR NO KEY UPDATE OF uc",
    )
    .bind(pay.user_id)
    .bind(coupon_id)
    .bind(&products)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(held) = held else {
        return Ok(invalid("the user does not hold this coupon"));
    };
    if held.used {
        return Ok(invalid("this coupon has already been used"));
    }
    if held.expired {
        return Ok(invalid("this coupon has expired"));
    }
    let base = if held.all_products {
        total
    } else {
        // The coupon discounts the lines it applies to.
        lines
            .iter()
            .filter(|l| held.applicable.contains(&l.product_id))
            .map(|l| l.unit_price * l.quantity)
            .sum()
    };
    if base == 0 {
        return Ok(invalid("this coupon applies to no product of this order"));
    }
    let Some(discount) = Discount::parse(&held.discount_type, held.discount_value) else {
        return Ok(invalid("this coupon's discount is not valid"));
    };
    Ok(Ok((discount.on(base), Some(held.id))))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

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
}
