//! Orders and payment.
//!
//! Creating and paying are commands, partitioned by user so that one user's commands are
//! settled in order and never race on the balance: the API stores the order as `PENDING`
//! (readable at once) with its request, and a worker reserves the stock or rejects it, and
//! later settles the payment. Cancelling is synchronous: it locks the order row, as payment
//! and expiry do, so exactly one of them wins.

use std::collections::HashMap;

use axum::extract::{Path, State};
use axum::response::Response;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use shared::domain::command::{OrderCreate, OrderLine, OrderPay, RequestKind};
use shared::domain::command_input;
use shared::domain::error::ErrorCode;
use shared::domain::ids::UserId;
use shared::domain::order::{OrderEvent, OrderStatus};
use sqlx::PgConnection;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::commands::accept::{self, Accepted, NewCommand, PreferWait};
use crate::commands::intake::Creation;
use crate::commands::order_checks::{invalid_user, not_the_owner};
use crate::error::{ApiError, Result};
use crate::http::auth::Caller;
use crate::http::extract::{IdempotencyKey, Json, Query};
use crate::http::pagination::{finish_page, PageQuery};
use crate::routes::openapi::{ErrorSchema, IdempotencyKeyHeader, PreferHeader};
use crate::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_order))
        .routes(routes!(pay_order))
        .routes(routes!(cancel_order))
        .routes(routes!(list_orders))
        .routes(routes!(get_order))
}

fn parse_order_id(raw: &str) -> Result<Uuid> {
    command_input::order_id(raw).map_err(ApiError::Client)
}

fn parse_user(raw: &serde_json::Number) -> Result<UserId> {
    command_input::order_user(raw).map_err(ApiError::Client)
}

#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OrderItem {
    product_id: i64,
    name: String,
    /// The price at reservation (a quote while the order is `PENDING`).
    unit_price: i64,
    quantity: i64,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Order {
    order_id: Uuid,
    user_id: i64,
    /// `PENDING`, `RESERVED`, `PAID`, `REJECTED`, `CANCELLED` or `EXPIRED`.
    status: String,
    items: Vec<OrderItem>,
    total_amount: i64,
    discount_amount: i64,
    paid_amount: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    coupon_id: Option<i64>,
    created_at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reserved_until: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    paid_at: Option<DateTime<Utc>>,
}

struct OrderRow {
    id: Uuid,
    user_id: i64,
    status: String,
    total_amount: i64,
    discount_amount: i64,
    paid_amount: i64,
    coupon_id: Option<i64>,
    created_at: DateTime<Utc>,
    reserved_until: Option<DateTime<Utc>>,
    paid_at: Option<DateTime<Utc>>,
}

/// Orders with their lines, in the order of `rows`.
async fn with_items(conn: &mut PgConnection, rows: Vec<OrderRow>) -> Result<Vec<Order>> {
    let ids: Vec<Uuid> = rows.iter().map(|r| r.id).collect();
    let items: Vec<(Uuid, OrderItem)> = sqlx::query!(
        "SELECT order_id, product_id, name, unit_price, quantity FROM order_items
         WHERE order_id = ANY($1) ORDER BY order_id, product_id",
        &ids,
    )
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .map(|row| {
        (
            row.order_id,
            OrderItem {
                product_id: row.product_id,
                name: row.name,
                unit_price: row.unit_price,
                quantity: row.quantity,
            },
        )
    })
    .collect();
    let mut by_order: HashMap<Uuid, Vec<OrderItem>> = HashMap::new();
    for (order, item) in items {
        by_order.entry(order).or_default().push(item);
    }
    Ok(rows
        .into_iter()
        .map(|r| Order {
            order_id: r.id,
            user_id: r.user_id,
            status: r.status,
            items: by_order.remove(&r.id).unwrap_or_default(),
            total_amount: r.total_amount,
            discount_amount: r.discount_amount,
            paid_amount: r.paid_amount,
            coupon_id: r.coupon_id,
            created_at: r.created_at,
            reserved_until: r.reserved_until,
            paid_at: r.paid_at,
        })
        .collect())
}

async fn fetch_order(conn: &mut PgConnection, order: Uuid) -> Result<Option<Order>> {
    let row = sqlx::query_as!(
        OrderRow,
        "SELECT id, user_id, status, total_amount, discount_amount, paid_amount, coupon_id,
                created_at, reserved_until, paid_at
         FROM orders WHERE id = $1",
        order,
    )
    .fetch_optional(&mut *conn)
    .await?;
    Ok(with_items(conn, row.into_iter().collect()).await?.pop())
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NewOrder {
    #[schema(value_type = i64, minimum = 1)]
    user_id: serde_json::Number,
    /// 1 to 50 lines, each product once.
    items: Vec<NewOrderLine>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NewOrderLine {
    #[schema(value_type = i64, minimum = 1)]
    product_id: serde_json::Number,
    /// 1 to 10,000.
    #[schema(value_type = i64, minimum = 1)]
    quantity: serde_json::Number,
}

/// The shape and ranges of an order, before anything is looked up.
fn validate_lines(lines: &[NewOrderLine]) -> Result<Vec<OrderLine>> {
    command_input::order_lines(lines.iter().map(|line| (&line.product_id, &line.quantity)))
        .map_err(ApiError::Client)
}

/// Places an order; a worker reserves its stock (all lines or none).
#[utoipa::path(
    post, path = "/orders", tag = "orders",
    params(IdempotencyKeyHeader, PreferHeader),
    security(("user_token" = [])),
    request_body = NewOrder,
    responses(
        (status = 202, body = Accepted, description = "accepted with orderId; the order reads PENDING at once"),
        (status = 400, body = ErrorSchema, description = "ERR_ORDER_INVALID_USER, ERR_ORDER_INVALID_ITEMS, ERR_INVALID_REQUEST"),
        (status = 404, body = ErrorSchema, description = "ERR_PRODUCT_NOT_FOUND"),
        (status = 409, body = ErrorSchema, description = "ERR_ORDER_TOO_MANY_RESERVED, ERR_ORDER_LIMIT_EXCEEDED (past a product's maxPerCustomer), ERR_IDEMPOTENCY_KEY_IN_USE; both limits are also settled by the worker, as the request's error"),
        (status = 422, body = ErrorSchema, description = "ERR_IDEMPOTENCY_KEY_REUSED"),
    )
)]
async fn create_order(
    State(state): State<AppState>,
    caller: Caller,
    key: IdempotencyKey,
    wait: PreferWait,
    Json(body): Json<NewOrder>,
) -> Result<Response> {
    let user = parse_user(&body.user_id)?;
    let lines = validate_lines(&body.items)?;
    caller.act_for(user)?;
    state.limits.user_write(user)?;
    let order_id = Uuid::now_v7();
    let command = OrderCreate {
        order_id,
        user_id: user.get(),
        items: lines.clone(),
    };
    let request = serde_json::json!({ "userId": user.get(), "items": lines });
    let payload = serde_json::to_value(&command).map_err(ApiError::internal)?;
    let cap = state.config.max_reserved_orders_per_user;
    let checked = state
        .order_checks
        .quote(&command, cap)
        .await
        .map(|order| NewCommand {
            kind: RequestKind::OrderCreate,
            partition_key: user.get(),
            payload,
            order_id: Some(order.order_id),
            creates: Some(Creation::Order(order)),
        });
    accept::submit(&state, &key, "POST /orders", user, &request, checked, wait).await
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PaymentRequest {
    #[schema(value_type = i64, minimum = 1)]
    user_id: serde_json::Number,
    /// A coupon the user holds, unused, unexpired and applicable to the order.
    #[schema(value_type = Option<i64>, minimum = 1)]
    coupon_id: Option<serde_json::Number>,
}

/// Pays a reserved order with the balance and optionally a coupon; settled asynchronously.
#[utoipa::path(
    post, path = "/orders/{orderId}/payment", tag = "orders",
    params(("orderId" = Uuid, Path), IdempotencyKeyHeader, PreferHeader),
    security(("user_token" = [])),
    request_body = PaymentRequest,
    responses(
        (status = 202, body = Accepted),
        (status = 400, body = ErrorSchema, description = "ERR_PAYMENT_INVALID_ORDER_STATUS, ERR_PAYMENT_INVALID_COUPON, ERR_ORDER_INVALID_USER, ERR_INVALID_REQUEST"),
        (status = 403, body = ErrorSchema, description = "ERR_ORDER_UNAUTHORIZED"),
        (status = 404, body = ErrorSchema, description = "ERR_PAYMENT_ORDER_NOT_FOUND"),
        (status = 409, body = ErrorSchema, description = "ERR_IDEMPOTENCY_KEY_IN_USE"),
        (status = 422, body = ErrorSchema, description = "ERR_IDEMPOTENCY_KEY_REUSED"),
    )
)]
async fn pay_order(
    State(state): State<AppState>,
    caller: Caller,
    Path(order): Path<String>,
    key: IdempotencyKey,
    wait: PreferWait,
    Json(body): Json<PaymentRequest>,
) -> Result<Response> {
    let order = parse_order_id(&order)?;
    let user = parse_user(&body.user_id)?;
    let coupon_id = command_input::payment_coupon(body.coupon_id.as_ref()).map_err(ApiError::Client)?;
    caller.act_for(user)?;
    state.limits.user_write(user)?;
    let command = OrderPay {
        order_id: order,
        user_id: user.get(),
        coupon_id,
    };
    let payload = serde_json::to_value(command).map_err(ApiError::internal)?;
    let route = format!("POST /orders/{order}/payment");
    let checked = state
        .order_checks
        .refuse_unpayable(order, user)
        .await
        .map(|()| NewCommand {
            kind: RequestKind::OrderPay,
            partition_key: user.get(),
            payload: payload.clone(),
            creates: None,
            order_id: Some(order),
        });
    accept::submit(&state, &key, &route, user, &payload, checked, wait).await
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CancelRequest {
    #[schema(value_type = i64, minimum = 1)]
    user_id: serde_json::Number,
}

/// Cancels an unpaid order and releases its reserved stock.
#[utoipa::path(
    post, path = "/orders/{orderId}/cancel", tag = "orders",
    params(("orderId" = Uuid, Path)),
    security(("user_token" = [])),
    request_body = CancelRequest,
    responses(
        (status = 200, body = Order),
        (status = 400, body = ErrorSchema, description = "ERR_ORDER_INVALID_USER, ERR_INVALID_REQUEST"),
        (status = 403, body = ErrorSchema, description = "ERR_ORDER_UNAUTHORIZED"),
        (status = 404, body = ErrorSchema, description = "ERR_ORDER_NOT_FOUND"),
        (status = 409, body = ErrorSchema, description = "ERR_ORDER_INVALID_STATUS: paid, rejected, cancelled or expired"),
    )
)]
async fn cancel_order(
    State(state): State<AppState>,
    caller: Caller,
    Path(order): Path<String>,
    Json(body): Json<CancelRequest>,
) -> Result<axum::Json<Order>> {
    let order = parse_order_id(&order)?;
    let user = parse_user(&body.user_id)?;
    caller.act_for(user)?;
    state.limits.user_write(user)?;
    let mut tx = state.db.begin().await?;
    // The same row lock as payment and expiry: whichever commits first wins.
    let found = sqlx::query!(
        "SELECT user_id, status FROM orders WHERE id = $1 FOR NO KEY UPDATE",
        order
    )
    .fetch_optional(&mut *tx)
    .await?
    .ok_or_else(order_not_found)?;
    let (owner, status) = (found.user_id, found.status);
    if owner != user.get() {
        return Err(not_the_owner());
    }
    let current = OrderStatus::parse(&status);
    let Some(cancelled) = current.and_then(|s| s.after(OrderEvent::Cancel)) else {
        return Err(ApiError::new(
            ErrorCode::OrderInvalidStatus,
            format!("an order that is {status} cannot be cancelled"),
        ));
    };
    // A PENDING order holds nothing yet: its queued creation will find it cancelled and
    // reserve nothing.
    if current.is_some_and(OrderStatus::holds_stock) {
        shared::store::reservations::release_stock(&mut tx, &[order]).await?;
    }
    sqlx::query!(
        "UPDATE orders SET status = $2, closed_at = now() WHERE id = $1",
        order,
        cancelled.as_str(),
    )
    .execute(&mut *tx)
    .await?;
    let cancelled = fetch_order(&mut tx, order).await?.ok_or_else(order_not_found)?;
    tx.commit().await?;
    metrics::counter!("orders_cancelled_total").increment(1);
    Ok(axum::Json(cancelled))
}

fn order_not_found() -> ApiError {
    ApiError::new(ErrorCode::OrderNotFound, "no order with this orderId")
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OrderPage {
    items: Vec<Order>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_cursor: Option<String>,
}

/// A user's orders, newest first.
#[utoipa::path(
    get, path = "/users/{userId}/orders", tag = "orders",
    params(("userId" = i64, Path, minimum = 1), PageQuery),
    security(("user_token" = [])),
    responses(
        (status = 200, body = OrderPage),
        (status = 400, body = ErrorSchema, description = "ERR_ORDER_INVALID_USER, ERR_INVALID_REQUEST"),
    )
)]
async fn list_orders(
    State(state): State<AppState>,
    caller: Caller,
    Path(user): Path<String>,
    Query(query): Query<PageQuery>,
) -> Result<axum::Json<OrderPage>> {
    let (limit, before) = query.parse_with(|raw| Uuid::parse_str(raw).ok())?;
    let user = caller.own_path_user(&user, invalid_user)?;
    let mut conn = state.db.acquire().await?;
    let rows = sqlx::query_as!(
        OrderRow,
        "SELECT id, user_id, status, total_amount, discount_amount, paid_amount, coupon_id,
                created_at, reserved_until, paid_at
         FROM orders
         WHERE user_id = $1 AND ($2::uuid IS NULL OR id < $2)
         ORDER BY id DESC LIMIT $3",
        user.get(),
        before,
        limit + 1,
    )
    .fetch_all(&mut *conn)
    .await?;
    let (rows, next_cursor) = finish_page(rows, limit, |r| r.id);
    let items = with_items(&mut conn, rows).await?;
    Ok(axum::Json(OrderPage { items, next_cursor }))
}

/// One of a user's orders.
#[utoipa::path(
    get, path = "/users/{userId}/orders/{orderId}", tag = "orders",
    params(("userId" = i64, Path, minimum = 1), ("orderId" = Uuid, Path)),
    security(("user_token" = [])),
    responses(
        (status = 200, body = Order),
        (status = 400, body = ErrorSchema, description = "ERR_ORDER_INVALID_USER, ERR_INVALID_REQUEST"),
        (status = 403, body = ErrorSchema, description = "ERR_ORDER_UNAUTHORIZED"),
        (status = 404, body = ErrorSchema, description = "ERR_ORDER_NOT_FOUND"),
    )
)]
async fn get_order(
    State(state): State<AppState>,
    caller: Caller,
    Path((user, order)): Path<(String, String)>,
) -> Result<axum::Json<Order>> {
    let user = UserId::parse(&user).ok_or_else(invalid_user)?;
    let order = parse_order_id(&order)?;
    caller.act_for(user)?;
    let mut conn = state.db.acquire().await?;
    let found = fetch_order(&mut conn, order).await?.ok_or_else(order_not_found)?;
    if found.user_id != user.get() {
        return Err(not_the_owner());
    }
    Ok(axum::Json(found))
}
