//! `POST /orders` and `POST /orders/{orderId}/payment`, synchronously.
//!
//! Lock order, the same in both and in the api's cancellation: the order row, then the
//! user's coupon, then the balance, then products by id. An order is created `RESERVED` in
//! one autocommit statement (lock the products by id, reserve every line or none, write
//! the order and its lines); a payment is one transaction of a locking read and one write
//! whose every effect is gated on the debit (or on there being nothing to debit), as the
//! worker's settlement writes it.

use std::collections::HashMap;

use api::error::{ApiError, Result};
use api::http::extract::Json;
use axum::extract::{Path, State};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::json;
use shared::domain::command::{OrderLine, RequestKind};
use shared::domain::command_input;
use shared::domain::error::ErrorCode;
use shared::domain::ids::UserId;
use shared::domain::money::Discount;
use shared::domain::order::{OrderEvent, OrderStatus};
use uuid::Uuid;

use super::{concurrency_conflict, Peer, Settled};

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NewOrder {
    user_id: serde_json::Number,
    items: Vec<NewOrderLine>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NewOrderLine {
    product_id: serde_json::Number,
    quantity: serde_json::Number,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentRequest {
    user_id: serde_json::Number,
    coupon_id: Option<serde_json::Number>,
}

fn parse_user(raw: &serde_json::Number) -> Result<UserId> {
    command_input::order_user(raw).map_err(ApiError::Client)
}

/// The shape and ranges of an order, before anything is looked up: the api's own rules.
fn validate_lines(lines: &[NewOrderLine]) -> Result<Vec<OrderLine>> {
    command_input::order_lines(lines.iter().map(|line| (&line.product_id, &line.quantity)))
        .map_err(ApiError::Client)
}

/// One row per product found (or one row of NULLs): what the statement locked and did.
#[derive(sqlx::FromRow)]
struct Reservation {
    user_exists: bool,
    product_id: Option<i64>,
    available: Option<i64>,
    total_amount: Option<i64>,
    reserved_until: Option<DateTime<Utc>>,
}

/// Places and reserves an order in one statement: the products are locked in id order
/// (`ORDER BY` under `FOR NO KEY UPDATE` locks rows as they leave the sort, and a row
/// changed meanwhile is read again at its latest version), every line is reserved or none
/// (`go`), and the order is written `RESERVED` with its lines, names and prices taken at
/// reservation, as the worker snapshots them. The final select explains a refusal.
/// (`$1` order, `$2` user, `$3`/`$4` products and quantities, `$5` request, `$6` TTL s.)
const RESERVE: &str = "
    WITH locked AS MATERIALIZED (
        SELECT p.id, p.name, p.price, p.stock - p.reserved AS available, w.quantity
        FROM products p
        JOIN UNNEST($3::bigint[], $4::bigint[]) AS w(product_id, quantity) ON w.product_id = p.id
        WHERE EXISTS (SELECT 1 FROM users WHERE id = $2)
        ORDER BY p.id
        FOR NO KEY UPDATE OF p),
     go AS (
        SELECT 1 WHERE (SELECT count(*) FROM locked WHERE available >= quantity)
                       = cardinality($3::bigint[])),
     reserve AS (
        UPDATE products p SET reserved = p.reserved + l.quantity, updated_at = now()
        FROM locked l WHERE p.id = l.id AND EXISTS (SELECT 1 FROM go)),
     placed AS (
        INSERT INTO orders (id, user_id, status, create_request_id, total_amount, reserved_until)
        SELECT $1, $2, 'RESERVED', $5, (SELECT sum(price * quantity) FROM locked),
               now() + make_interval(secs => $6)
        FROM go
        RETURNING total_amount, reserved_until),
     lines AS (
        INSERT INTO order_items (order_id, product_id, name, unit_price, quantity)
        SELECT $1, l.id, l.name, l.price, l.quantity FROM locked l, placed)
    SELECT EXISTS (SELECT 1 FROM users WHERE id = $2) AS user_exists,
           l.id AS product_id, l.available, p.total_amount, p.reserved_until
    FROM (SELECT 1) AS one LEFT JOIN locked l ON true LEFT JOIN placed p ON true";

pub async fn create_order(State(peer): State<Peer>, Json(body): Json<NewOrder>) -> Result<Settled> {
    let created_at = Utc::now();
    let user = parse_user(&body.user_id)?;
    let lines = validate_lines(&body.items)?;
    let order_id = Uuid::now_v7();
    let request_id = Uuid::now_v7();
    let products: Vec<i64> = lines.iter().map(|l| l.product_id).collect();
    let quantities: Vec<i64> = lines.iter().map(|l| l.quantity).collect();
    let rows: Vec<Reservation> = sqlx::query_as(RESERVE)
        .bind(order_id)
        .bind(user.get())
        .bind(&products)
        .bind(&quantities)
        .bind(request_id)
        .bind(peer.reservation_ttl.as_secs_f64())
        .fetch_all(&peer.db)
        .await
        .map_err(|e| concurrency_conflict(e, ErrorCode::OrderConcurrencyConflict))?;
    let placed = rows
        .first()
        .and_then(|r| Some((r.total_amount?, r.reserved_until?)));
    if let Some((total, reserved_until)) = placed {
        let result = json!({
            "orderId": order_id,
            "status": OrderStatus::Reserved.as_str(),
            "totalAmount": total,
            "reservedUntil": reserved_until,
        });
        let mut settled = Settled::succeeded(request_id, RequestKind::OrderCreate, created_at, result);
        settled.order_id = Some(order_id);
        return Ok(settled);
    }
    Err(refusal(&rows, &lines))
}

/// Why an order was not placed, in the contract's order: the user, the products, the stock.
fn refusal(rows: &[Reservation], lines: &[OrderLine]) -> ApiError {
    if !rows.first().is_some_and(|r| r.user_exists) {
        return ApiError::Client(command_input::invalid_user());
    }
    let available: HashMap<i64, i64> = rows
        .iter()
        .filter_map(|r| Some((r.product_id?, r.available?)))
        .collect();
    if let Some(missing) = lines.iter().find(|l| !available.contains_key(&l.product_id)) {
        return ApiError::new(
            ErrorCode::ProductNotFound,
            format!("no product {}", missing.product_id),
        );
    }
    match lines.iter().find_map(|l| {
        available
            .get(&l.product_id)
            .filter(|a| **a < l.quantity)
            .map(|a| (l.product_id, *a))
    }) {
        Some((product, left)) => ApiError::new(
            ErrorCode::OrderOutOfStock,
            format!("product {product} has {} left", left.max(0)),
        ),
        // Every line had stock and still nothing was written: not a state this statement
        // can reach, so say so rather than guess.
        None => ApiError::internal(anyhow::anyhow!(
            "an order with stock for every line was not placed"
        )),
    }
}

/// An order with one of its lines and, when the payment names one, the user's coupon of
/// that kind: read under the order's row lock (and the coupon's).
#[derive(sqlx::FromRow)]
struct PayingLine {
    user_id: i64,
    status: String,
    total_amount: i64,
    product_id: i64,
    name: String,
    unit_price: i64,
    quantity: i64,
    user_coupon_id: Option<Uuid>,
    coupon_used: Option<bool>,
    discount_type: Option<String>,
    discount_value: Option<i64>,
    coupon_expired: Option<bool>,
    all_products: Option<bool>,
    /// The order's products the coupon applies to (when it is restricted).
    applicable: Option<Vec<i64>>,
}

/// The order row locked, then the payer's coupon (only if the order is theirs), in one
/// round trip. (`$1` order, `$2` user, `$3` coupon or NULL.)
const READ_FOR_PAYMENT: &str = "
    WITH o AS MATERIALIZED (
        SELECT id, user_id, status, total_amount FROM orders WHERE id = $1 FOR NO KEY UPDATE),
     held AS MATERIALIZED (
        SELECT uc.id, uc.used_at IS NOT NULL AS used, c.discount_type, c.discount_value,
               c.expires_at <= now() AS expired, c.all_products,
               ARRAY(SELECT cp.product_id FROM coupon_products cp
                     WHERE cp.coupon_id = c.id
                       AND cp.product_id IN (SELECT product_id FROM order_items WHERE order_id = $1))
                 AS applicable
        FROM user_coupons uc JOIN coupons c ON c.id = uc.coupon_id
        WHERE uc.user_id = $2 AND uc.coupon_id = $3
          AND EXISTS (SELECT 1 FROM o WHERE o.user_id = $2)
        FOR NO KEY UPDATE OF uc)
    SELECT o.user_id, o.status, o.total_amount,
           oi.product_id, oi.name, oi.unit_price, oi.quantity,
           h.id AS user_coupon_id, h.used AS coupon_used, h.discount_type, h.discount_value,
           h.expired AS coupon_expired, h.all_products, h.applicable
    FROM o JOIN order_items oi ON oi.order_id = o.id LEFT JOIN held h ON true
    ORDER BY oi.product_id";

/// The worker's payment write, with the products locked in id order first: every effect is
/// gated on `go`, the debit went through or there was nothing to debit, so a balance that
/// does not cover the amount writes nothing at all.
/// (`$1` order, `$2` user, `$3` amount, `$4`/`$5` products and quantities, `$6` user
/// coupon, `$7` payment, `$8` request, `$9` discount, `$10` coupon, `$11` event, `$12`
/// event body.)
const PAY: &str = "
    WITH debit AS (
        UPDATE balances SET amount = amount - $3, updated_at = now()
        WHERE user_id = $2 AND amount >= $3 AND $3 > 0
        RETURNING amount),
     go AS (SELECT 1 WHERE $3 = 0 OR EXISTS (SELECT 1 FROM debit)),
     ledger AS (
        INSERT INTO balance_transactions (user_id, kind, amount, balance_after, order_id)
        SELECT $2, 'PAYMENT', $3, amount, $1 FROM debit),
     locked AS MATERIALIZED (
        SELECT id FROM products WHERE id = ANY($4) AND EXISTS (SELECT 1 FROM go)
        ORDER BY id FOR NO KEY UPDATE),
     sold AS (
        UPDATE products p
        SET reserved = p.reserved - s.quantity, stock = p.stock - s.quantity,
            sold = p.sold + s.quantity, updated_at = now()
        FROM UNNEST($4::bigint[], $5::bigint[]) AS s(product_id, quantity)
        WHERE p.id = s.product_id AND p.id IN (SELECT id FROM locked)),
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
    SELECT paid_at FROM paid";

pub async fn pay_order(
    State(peer): State<Peer>,
    Path(order): Path<String>,
    Json(body): Json<PaymentRequest>,
) -> Result<Settled> {
    let created_at = Utc::now();
    let order_id = command_input::order_id(&order).map_err(ApiError::Client)?;
    let user = parse_user(&body.user_id)?;
    let coupon_id = command_input::payment_coupon(body.coupon_id.as_ref()).map_err(ApiError::Client)?;
    let conflict = |e| concurrency_conflict(e, ErrorCode::PaymentConcurrencyConflict);
    let mut tx = peer.db.begin().await?;
    let lines: Vec<PayingLine> = sqlx::query_as(READ_FOR_PAYMENT)
        .bind(order_id)
        .bind(user.get())
        .bind(coupon_id)
        .fetch_all(&mut *tx)
        .await
        .map_err(conflict)?;
    let charge = match decide_payment(&lines, user, coupon_id) {
        Ok(charge) => charge,
        Err(refusal) => {
            // Give the order's lock back now rather than when the connection is next used.
            tx.rollback().await?;
            return Err(refusal);
        }
    };
    let request_id = Uuid::now_v7();
    let payment_id = Uuid::now_v7();
    let event_id = Uuid::now_v7();
    let items: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| json!({"productId": l.product_id, "name": l.name, "unitPrice": l.unit_price, "quantity": l.quantity}))
        .collect();
    let mut event = json!({
        "eventId": event_id,
        "type": "order.paid",
        "orderId": order_id,
        "userId": user.get(),
        "items": items,
        "totalAmount": charge.total,
        "discountAmount": charge.discount,
        "paidAmount": charge.amount,
    });
    let coupon_used = coupon_id.filter(|_| charge.user_coupon.is_some());
    if let Some(coupon) = coupon_used {
        event["couponId"] = json!(coupon);
    }
    let products: Vec<i64> = lines.iter().map(|l| l.product_id).collect();
    let quantities: Vec<i64> = lines.iter().map(|l| l.quantity).collect();
    let paid_at: Option<DateTime<Utc>> = sqlx::query_scalar(PAY)
        .bind(order_id)
        .bind(user.get())
        .bind(charge.amount)
        .bind(&products)
        .bind(&quantities)
        .bind(charge.user_coupon)
        .bind(payment_id)
        .bind(request_id)
        .bind(charge.discount)
        .bind(coupon_used)
        .bind(event_id)
        .bind(&event)
        .fetch_optional(&mut *tx)
        .await
        .map_err(conflict)?;
    if paid_at.is_none() {
        tx.rollback().await?;
        return Err(ApiError::new(
            ErrorCode::PaymentInsufficientBalance,
            format!("the balance does not cover {} won", charge.amount),
        ));
    }
    tx.commit().await.map_err(conflict)?;
    let result = json!({
        "orderId": order_id,
        "paymentId": payment_id,
        "paidAmount": charge.amount,
        "discountAmount": charge.discount,
    });
    Ok(Settled::succeeded(
        request_id,
        RequestKind::OrderPay,
        created_at,
        result,
    ))
}

/// What a payment will charge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Charge {
    total: i64,
    discount: i64,
    amount: i64,
    /// The held coupon to mark used.
    user_coupon: Option<Uuid>,
}

/// The worker's rules, in the contract's order: the order exists (404), is the payer's
/// (403), is `RESERVED` (400), then the coupon (400); the balance is the write's to check.
fn decide_payment(lines: &[PayingLine], user: UserId, coupon: Option<i64>) -> Result<Charge> {
    let Some(order) = lines.first() else {
        return Err(ApiError::new(
            ErrorCode::PaymentOrderNotFound,
            "no order with this orderId",
        ));
    };
    if order.user_id != user.get() {
        return Err(ApiError::new(
            ErrorCode::OrderUnauthorized,
            "this order belongs to another user",
        ));
    }
    if OrderStatus::parse(&order.status)
        .and_then(|s| s.after(OrderEvent::Pay))
        .is_none()
    {
        return Err(ApiError::new(
            ErrorCode::PaymentInvalidOrderStatus,
            format!("an order that is {} cannot be paid", order.status),
        ));
    }
    let total = order.total_amount;
    let (discount, user_coupon) = match coupon {
        None => (0, None),
        Some(_) => coupon_discount(lines, total)?,
    };
    Ok(Charge {
        total,
        discount,
        amount: total - discount,
        user_coupon,
    })
}

fn coupon_discount(lines: &[PayingLine], total: i64) -> Result<(i64, Option<Uuid>)> {
    let invalid = |message: &str| Err(ApiError::new(ErrorCode::PaymentInvalidCoupon, message));
    let Some(held) = lines.first().filter(|l| l.user_coupon_id.is_some()) else {
        return invalid("the user does not hold this coupon");
    };
    if held.coupon_used.unwrap_or(true) {
        return invalid("this coupon has already been used");
    }
    if held.coupon_expired.unwrap_or(true) {
        return invalid("this coupon has expired");
    }
    let base = if held.all_products.unwrap_or(false) {
        total
    } else {
        // The coupon discounts the lines it applies to.
        let applicable = held.applicable.clone().unwrap_or_default();
        lines
            .iter()
            .filter(|l| applicable.contains(&l.product_id))
            .map(|l| l.unit_price * l.quantity)
            .sum()
    };
    if base == 0 {
        return invalid("this coupon applies to no product of this order");
    }
    let discount = held
        .discount_type
        .as_deref()
        .zip(held.discount_value)
        .and_then(|(kind, value)| Discount::parse(kind, value));
    let Some(discount) = discount else {
        return invalid("this coupon's discount is not valid");
    };
    Ok((discount.on(base), held.user_coupon_id))
}
