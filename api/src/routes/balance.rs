//! Balances and their ledger.
//!
//! A charge is one UPDATE of the user's balance row plus its ledger row, in one
//! transaction. The row lock of the UPDATE queues concurrent charges of one user, so none
//! is lost and none needs a retry: `ERR_BALANCE_CONCURRENCY_CONFLICT` is never answered.
//! Every route acts for the token's user only.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use shared::domain::error::ErrorCode;
use shared::domain::ids::{whole_number_in, UserId, MAX_BALANCE, MAX_CHARGE};
use shared::domain::money::LedgerKind;
use sqlx::PgConnection;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::error::{ApiError, Result};
use crate::http::auth::Caller;
use crate::http::extract::{IdempotencyKey, Json, Query};
use crate::http::pagination::{finish_page, Page, PageQuery};
use crate::routes::openapi::{ErrorSchema, IdempotencyKeyHeader};
use crate::routes::users::invalid_user;
use crate::{idempotency, AppState};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(get_balance))
        .routes(routes!(charge_balance))
        .routes(routes!(list_transactions))
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Balance {
    user_id: i64,
    balance: i64,
}

/// A user's balance (0 for a user who never charged).
#[utoipa::path(
    get, path = "/users/{userId}/balance", tag = "balance",
    params(("userId" = i64, Path, minimum = 1)),
    security(("user_token" = [])),
    responses(
        (status = 200, body = Balance),
        (status = 400, body = ErrorSchema, description = "ERR_BALANCE_INVALID_USER"),
    )
)]
async fn get_balance(
    State(state): State<AppState>,
    caller: Caller,
    Path(user): Path<String>,
) -> Result<axum::Json<Balance>> {
    let user = caller.own_path_user(&user, invalid_user)?;
    let balance = sqlx::query_scalar!("SELECT amount FROM balances WHERE user_id = $1", user.get())
        .fetch_optional(&state.db)
        .await?;
    let balance = balance.ok_or_else(invalid_user)?;
    Ok(axum::Json(Balance {
        user_id: user.get(),
        balance,
    }))
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ChargeRequest {
    /// Whole won, 1 to 10,000,000.
    #[schema(value_type = i64, minimum = 1, maximum = 10_000_000)]
    amount: serde_json::Number,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Charge {
    user_id: i64,
    balance: i64,
    charged_amount: i64,
    transaction_id: i64,
}

/// Adds to a user's balance, with a `CHARGE` ledger entry in the same transaction.
#[utoipa::path(
    post, path = "/users/{userId}/balance/charge", tag = "balance",
    params(("userId" = i64, Path, minimum = 1), IdempotencyKeyHeader),
    security(("user_token" = [])),
    request_body = ChargeRequest,
    responses(
        (status = 200, body = Charge),
        (status = 400, body = ErrorSchema, description = "ERR_BALANCE_INVALID_USER, ERR_BALANCE_INVALID_AMOUNT, ERR_INVALID_REQUEST"),
        (status = 409, body = ErrorSchema, description = "ERR_IDEMPOTENCY_KEY_IN_USE"),
        (status = 422, body = ErrorSchema, description = "ERR_IDEMPOTENCY_KEY_REUSED"),
    )
)]
async fn charge_balance(
    State(state): State<AppState>,
    caller: Caller,
    Path(user): Path<String>,
    key: IdempotencyKey,
    Json(body): Json<ChargeRequest>,
) -> Result<Response> {
    let user = UserId::parse(&user).ok_or_else(invalid_user)?;
    let amount = whole_number_in(&body.amount, 1, MAX_CHARGE).ok_or_else(|| {
        ApiError::new(
            ErrorCode::BalanceInvalidAmount,
            "amount must be a whole number of won from 1 to 10,000,000",
        )
    })?;
    caller.act_for(user)?;
    state.limits.user_write(user)?;
    let scope = format!("POST /users/{user}/balance/charge");
    let request = serde_json::json!({ "amount": amount });
    let outcome = idempotency::run(&state.db, &key, &scope, &request, StatusCode::OK, async |conn| {
        charge(conn, user, amount).await
    })
    .await?;
    Ok(outcome.into_response(StatusCode::OK))
}

/// Adds `amount` to the balance and writes its ledger row; the caller owns the transaction.
async fn charge(conn: &mut PgConnection, user: UserId, amount: i64) -> Result<Charge> {
    let balance = sqlx::query_scalar!(
        "UPDATE balances SET amount = amount + $2, updated_at = now()
         WHERE user_id = $1 AND amount + $2 <= $3
         RETURNING amount",
        user.get(),
        amount,
        MAX_BALANCE,
    )
    .fetch_optional(&mut *conn)
    .await?;
    // The caller's balance row exists (it is created with the user, whom the token proves
    // registered): no row updated means the limit.
    let Some(balance) = balance else {
        return Err(ApiError::new(
            ErrorCode::BalanceInvalidAmount,
            "the balance would pass 1,000,000,000 won",
        ));
    };
    let transaction_id = sqlx::query_scalar!(
        "INSERT INTO balance_transactions (user_id, kind, amount, balance_after)
         VALUES ($1, $2, $3, $4) RETURNING id",
        user.get(),
        LedgerKind::Charge as _,
        amount,
        balance,
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok(Charge {
        user_id: user.get(),
        balance,
        charged_amount: amount,
        transaction_id,
    })
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BalanceTransaction {
    transaction_id: i64,
    /// `CHARGE`, `PAYMENT` or `REFUND`.
    #[serde(rename = "type")]
    #[schema(value_type = String)]
    kind: LedgerKind,
    /// Always positive; the type says which way it moved the balance.
    amount: i64,
    balance_after: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    order_id: Option<Uuid>,
    created_at: DateTime<Utc>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TransactionPage {
    items: Vec<BalanceTransaction>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_cursor: Option<String>,
}

/// A user's ledger, newest first.
#[utoipa::path(
    get, path = "/users/{userId}/balance/transactions", tag = "balance",
    params(("userId" = i64, Path, minimum = 1), PageQuery),
    security(("user_token" = [])),
    responses(
        (status = 200, body = TransactionPage),
        (status = 400, body = ErrorSchema, description = "ERR_BALANCE_INVALID_USER, ERR_INVALID_REQUEST"),
    )
)]
async fn list_transactions(
    State(state): State<AppState>,
    caller: Caller,
    Path(user): Path<String>,
    Query(query): Query<PageQuery>,
) -> Result<axum::Json<TransactionPage>> {
    let user = UserId::parse(&user).ok_or_else(invalid_user)?;
    let page: Page = query.parse()?;
    caller.act_for(user)?;
    let rows = sqlx::query_as!(
        BalanceTransaction,
        r#"SELECT id AS transaction_id, kind AS "kind: LedgerKind", amount, balance_after, order_id, created_at
         FROM balance_transactions
         WHERE user_id = $1 AND ($2::bigint IS NULL OR id < $2)
         ORDER BY id DESC LIMIT $3"#,
        user.get(),
        page.after,
        page.limit + 1,
    )
    .fetch_all(&state.db)
    .await?;
    let (items, next_cursor) = finish_page(rows, page.limit, |t| t.transaction_id);
    Ok(axum::Json(TransactionPage { items, next_cursor }))
}
