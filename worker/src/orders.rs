//! Settling order commands: stock reservation and payment.
//!
//! A batch holds one user partition's commands in broker order, so a user's create and pay
//! are settled in that order. Every row a batch may touch is locked up front in one global
//! order (orders by id, then products by id), the order that cancellation and expiry also
//! follow, so concurrent batches, cancels and expiries never deadlock. Each command then
//! either applies all its effects or, refused, none: a refusal is a decision, not an error,
//! and does not roll the batch back.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::json;
use shared::command::{OrderCreate, OrderPay, RequestKind};
use shared::error::{ErrorBody, ErrorCode};
use shared::money::{order_total, Discount};
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
    sqlx::query("SELECT id FROM orders WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE")
        .bind(&order_ids)
        .execute(&mut *conn)
        .await?;
    sqlx::query(
        "SELECT id FROM products
         WHERE id IN (SELECT product_id FROM order_items WHERE order_id = ANY($1))
         ORDER BY id FOR NO KEY UPDATE",
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

#[derive(sqlx::FromRow)]
struct Line {
    product_id: i64,
    quantity: i64,
    price: i64,
    available: i64,
}

/// Reserves every line of a `PENDING` order or none, snapshotting names and prices.
async fn reserve_stock(
    conn: &mut PgConnection,
    create: &OrderCreate,
    ttl: Duration,
) -> Result<Decision, SettleError> {
    let status: Option<String> = sqlx::query_scalar("SELECT status FROM orders WHERE id = $1")
        .bind(create.order_id)
        .fetch_optional(&mut *conn)
        .await?;
    match status.as_deref() {
        Some("PENDING") => {}
        Some(_) => {
            return Ok(refuse(
                ErrorCode::OrderConcurrencyConflict,
                "the order was cancelled before its stock could be reserved",
            ))
        }
        None => return Ok(refuse(ErrorCode::OrderNotFound, "the order does not exist")),
    }
    let lines: Vec<Line> = sqlx::query_as(
        "SELECT oi.product_id, oi.quantity, p.price, p.stock - p.reserved AS available
         FROM order_items oi JOIN products p ON p.id = oi.product_id
         WHERE oi.order_id = $1 ORDER BY oi.product_id",
    )
    .bind(create.order_id)
    .fetch_all(&mut *conn)
    .await?;
    let short = lines.iter().find(|l| l.available < l.quantity);
    let total = order_total(lines.iter().map(|l| (l.price, l.quantity)));
    let refusal = match (short, total) {
        (Some(line), _) => Some(refuse(
            ErrorCode::OrderOutOfStock,
            format!("product {} has {} left", line.product_id, line.available.max(0)),
        )),
        (None, None) => Some(refuse(
            ErrorCode::OrderInvalidItems,
            "the order total is too large",
        )),
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

    let products: Vec<i64> = lines.iter().map(|l| l.product_id).collect();
    let quantities: Vec<i64> = lines.iter().map(|l| l.quantity).collect();
    sqlx::query(
        "UPDATE products p SET reserved = p.reserved + r.quantity, updated_at = now()
         FROM UNNEST($1::bigint[], $2::bigint[]) AS r(product_id, quantity)
         WHERE p.id = r.product_id",
    )
    .bind(&products)
    .bind(&quantities)
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "UPDATE order_items oi SET name = p.name, unit_price = p.price
         FROM products p WHERE oi.order_id = $1 AND p.id = oi.product_id",
    )
    .bind(create.order_id)
    .execute(&mut *conn)
    .await?;
    let reserved_until: DateTime<Utc> = sqlx::query_scalar(
        "UPDATE orders SET status = 'RESERVED', total_amount = $2, reserved_until = now() + make_interval(secs => $3)
         WHERE id = $1 RETURNING reserved_until",
    )
    .bind(create.order_id)
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

#[derive(sqlx::FromRow)]
struct PaidLine {
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
}

/// Pays a `RESERVED` order: balance debited with its ledger entry, reserved units sold, the
/// coupon used, the payment written, the order `PAID`, and an `order.paid` event in the
/// outbox. Any refusal leaves everything as it was (a failed payment keeps the order
/// `RESERVED`, so the user can charge and pay again).
async fn settle_payment(
    conn: &mut PgConnection,
    pay: &OrderPay,
    request_id: Uuid,
) -> Result<Decision, SettleError> {
    let order: Option<(i64, String, i64)> =
        sqlx::query_as("SELECT user_id, status, total_amount FROM orders WHERE id = $1")
            .bind(pay.order_id)
            .fetch_optional(&mut *conn)
            .await?;
    let Some((owner, status, total)) = order else {
        return Ok(refuse(
            ErrorCode::PaymentOrderNotFound,
            "no order with this orderId",
        ));
    };
    if owner != pay.user_id {
        return Ok(refuse(
            ErrorCode::OrderUnauthorized,
            "this order belongs to another user",
        ));
    }
    if status != "RESERVED" {
        return Ok(refuse(
            ErrorCode::PaymentInvalidOrderStatus,
            format!("an order that is {status} cannot be paid"),
        ));
    }
    let lines: Vec<PaidLine> = sqlx::query_as(
        "SELECT product_id, name, unit_price, quantity FROM order_items WHERE order_id = $1 ORDER BY product_id",
    )
    .bind(pay.order_id)
    .fetch_all(&mut *conn)
    .await?;

    let (discount, user_coupon) = match pay.coupon_id {
        None => (0, None),
        Some(coupon_id) => match coupon_discount(conn, pay, coupon_id, total, &lines).await? {
            Ok(applied) => applied,
            Err(refusal) => return Ok(refusal),
        },
    };
    let amount = total - discount;

    if amount > 0 {
        let balance_after: Option<i64> = sqlx::query_scalar(
            "UPDATE balances SET amount = amount - $2, updated_at = now()
             WHERE user_id = $1 AND amount >= $2 RETURNING amount",
        )
        .bind(pay.user_id)
        .bind(amount)
        .fetch_optional(&mut *conn)
        .await?;
        let Some(balance_after) = balance_after else {
            metrics::counter!("payments_total", "outcome" => "insufficient_balance").increment(1);
            return Ok(refuse(
                ErrorCode::PaymentInsufficientBalance,
                format!("the balance does not cover {amount} won"),
            ));
        };
        sqlx::query(
            "INSERT INTO balance_transactions (user_id, kind, amount, balance_after, order_id)
             VALUES ($1, 'PAYMENT', $2, $3, $4)",
        )
        .bind(pay.user_id)
        .bind(amount)
        .bind(balance_after)
        .bind(pay.order_id)
        .execute(&mut *conn)
        .await?;
    }

    let products: Vec<i64> = lines.iter().map(|l| l.product_id).collect();
    let quantities: Vec<i64> = lines.iter().map(|l| l.quantity).collect();
    sqlx::query(
        "UPDATE products p
         SET reserved = p.reserved - s.quantity, stock = p.stock - s.quantity, sold = p.sold + s.quantity,
             updated_at = now()
         FROM UNNEST($1::bigint[], $2::bigint[]) AS s(product_id, quantity)
         WHERE p.id = s.product_id",
    )
    .bind(&products)
    .bind(&quantities)
    .execute(&mut *conn)
    .await?;
    if let Some(user_coupon) = user_coupon {
        sqlx::query("UPDATE user_coupons SET used_at = now(), order_id = $2 WHERE id = $1")
            .bind(user_coupon)
            .bind(pay.order_id)
            .execute(&mut *conn)
            .await?;
    }
    let payment_id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO payments (id, order_id, user_id, request_id, amount, discount_amount, user_coupon_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(payment_id)
    .bind(pay.order_id)
    .bind(pay.user_id)
    .bind(request_id)
    .bind(amount)
    .bind(discount)
    .bind(user_coupon)
    .execute(&mut *conn)
    .await?;
    let paid_at: DateTime<Utc> = sqlx::query_scalar(
        "UPDATE orders SET status = 'PAID', paid_at = now(), discount_amount = $2, paid_amount = $3, coupon_id = $4
         WHERE id = $1 RETURNING paid_at",
    )
    .bind(pay.order_id)
    .bind(discount)
    .bind(amount)
    .bind(pay.coupon_id.filter(|_| user_coupon.is_some()))
    .fetch_one(&mut *conn)
    .await?;

    let event_id = Uuid::now_v7();
    let items: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| json!({"productId": l.product_id, "name": l.name, "unitPrice": l.unit_price, "quantity": l.quantity}))
        .collect();
    let mut event = json!({
        "eventId": event_id,
        "type": "order.paid",
        "occurredAt": paid_at,
        "orderId": pay.order_id,
        "userId": pay.user_id,
        "items": items,
        "totalAmount": total,
        "discountAmount": discount,
        "paidAmount": amount,
    });
    if let (Some(coupon_id), Some(_)) = (pay.coupon_id, user_coupon) {
        event["couponId"] = json!(coupon_id);
    }
    sqlx::query("INSERT INTO outbox (id, routing_key, payload) VALUES ($1, 'order.paid', $2)")
        .bind(event_id)
        .bind(&event)
        .execute(&mut *conn)
        .await?;
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
    let held: Option<HeldCoupon> = sqlx::query_as(
        "SELECT uc.id, uc.used_at IS NOT NULL AS used, c.discount_type, c.discount_value,
                c.expires_at <= now() AS expired, c.all_products
         FROM user_coupons uc JOIN coupons c ON c.id = uc.coupon_id
         WHERE uc.user_id = $1 AND uc.coupon_id = $2
         FOR NO KEY UPDATE OF uc",
    )
    .bind(pay.user_id)
    .bind(coupon_id)
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
        let products: Vec<i64> = lines.iter().map(|l| l.product_id).collect();
        let applicable: Vec<i64> = sqlx::query_scalar(
            "SELECT product_id FROM coupon_products WHERE coupon_id = $1 AND product_id = ANY($2)",
        )
        .bind(coupon_id)
        .bind(&products)
        .fetch_all(&mut *conn)
        .await?;
        // The coupon discounts the lines it applies to.
        lines
            .iter()
            .filter(|l| applicable.contains(&l.product_id))
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
