//! Administration behind the bearer `ADMIN_TOKEN`: the catalogue and coupon kinds.
//!
//! `stock` here means the same as in every read: units that can still be ordered. Setting
//! it moves the on-hand count to `reserved + stock`, so units held by unpaid orders are
//! never taken away from them.

use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::Response;
use serde::{Deserialize, Serialize};
use shared::domain::error::ErrorCode;
use shared::domain::ids::{parse_name, whole_number_in, MAX_PRICE, MAX_STOCK};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::{ApiError, Result};
use crate::extract::{IdempotencyKey, Json};
use crate::openapi::{ErrorSchema, IdempotencyKeyHeader};
use crate::products::{parse_product_id, product_not_found, Product};
use crate::{idempotency, AppState};

const MAX_PRODUCT_NAME_CHARS: usize = 200;

/// The admin routes, each behind [`require_admin`].
pub fn router(state: AppState) -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_product))
        .routes(routes!(update_product))
        .merge(crate::coupons::admin_router())
        .merge(crate::popular::admin_router())
        .route_layer(axum::middleware::from_fn_with_state(state, require_admin))
}

/// Lets the request through only with `Authorization: Bearer $ADMIN_TOKEN`; wrong tokens
/// count against the client address's invalid-token allowance.
pub async fn require_admin(State(state): State<AppState>, request: Request, next: Next) -> Result<Response> {
    let (parts, body) = request.into_parts();
    let client = state.limits.client_address(&parts);
    state.auth.check_admin(&parts.headers, client)?;
    Ok(next.run(Request::from_parts(parts, body)).await)
}

fn invalid(message: &str) -> ApiError {
    ApiError::new(ErrorCode::InvalidRequest, message)
}

fn parse_price(raw: &serde_json::Number) -> Result<i64> {
    whole_number_in(raw, 1, MAX_PRICE)
        .ok_or_else(|| invalid("price must be a whole number of won from 1 to 1,000,000,000"))
}

fn parse_stock(raw: &serde_json::Number) -> Result<i64> {
    whole_number_in(raw, 0, MAX_STOCK)
        .ok_or_else(|| invalid("stock must be a whole number from 0 to 1,000,000,000"))
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct NewProduct {
    /// 1 to 200 characters.
    name: String,
    /// Whole won, 1 to 1,000,000,000.
    #[schema(value_type = i64, minimum = 1)]
    price: serde_json::Number,
    /// Units on hand, 0 to 1,000,000,000.
    #[schema(value_type = i64, minimum = 0)]
    stock: serde_json::Number,
}

#[derive(Debug, Serialize)]
struct ValidNewProduct {
    name: String,
    price: i64,
    stock: i64,
}

/// Adds a product to the catalogue.
#[utoipa::path(
    post, path = "/admin/products", tag = "admin",
    params(IdempotencyKeyHeader),
    request_body = NewProduct,
    security(("admin_token" = [])),
    responses(
        (status = 201, body = Product),
        (status = 400, body = ErrorSchema, description = "ERR_INVALID_REQUEST"),
        (status = 401, body = ErrorSchema, description = "ERR_UNAUTHORIZED"),
    )
)]
async fn create_product(
    State(state): State<AppState>,
    key: IdempotencyKey,
    Json(body): Json<NewProduct>,
) -> Result<Response> {
    let product = ValidNewProduct {
        name: parse_name(&body.name, MAX_PRODUCT_NAME_CHARS)
            .ok_or_else(|| invalid("name must be 1 to 200 characters"))?,
        price: parse_price(&body.price)?,
        stock: parse_stock(&body.stock)?,
    };
    let request = serde_json::to_value(&product).map_err(ApiError::internal)?;
    let outcome = idempotency::run(
        &state.db,
        &key,
        "POST /admin/products",
        &request,
        StatusCode::CREATED,
        async |conn| {
            let created = sqlx::query_as!(
                Product,
                r#"INSERT INTO products (name, price, stock) VALUES ($1, $2, $3)
                   RETURNING id AS product_id, name, price, stock - reserved AS "stock!""#,
                product.name,
                product.price,
                product.stock,
            )
            .fetch_one(&mut *conn)
            .await?;
            Ok(created)
        },
    )
    .await?;
    Ok(outcome.into_response(StatusCode::CREATED))
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct ProductChange {
    /// New price in whole won.
    #[schema(value_type = Option<i64>, minimum = 1)]
    price: Option<serde_json::Number>,
    /// Units that can still be ordered from now on; units reserved by unpaid orders stay held.
    #[schema(value_type = Option<i64>, minimum = 0)]
    stock: Option<serde_json::Number>,
}

/// Changes a product's price or orderable stock.
#[utoipa::path(
    patch, path = "/admin/products/{productId}", tag = "admin",
    params(("productId" = i64, Path, minimum = 1)),
    request_body = ProductChange,
    security(("admin_token" = [])),
    responses(
        (status = 200, body = Product),
        (status = 400, body = ErrorSchema, description = "ERR_INVALID_REQUEST"),
        (status = 401, body = ErrorSchema, description = "ERR_UNAUTHORIZED"),
        (status = 404, body = ErrorSchema, description = "ERR_PRODUCT_NOT_FOUND"),
    )
)]
async fn update_product(
    State(state): State<AppState>,
    Path(product): Path<String>,
    Json(body): Json<ProductChange>,
) -> Result<axum::Json<Product>> {
    let product = parse_product_id(&product)?;
    let price = body.price.as_ref().map(parse_price).transpose()?;
    let stock = body.stock.as_ref().map(parse_stock).transpose()?;
    if price.is_none() && stock.is_none() {
        return Err(invalid("give price, stock or both"));
    }
    // `$3::bigint`: PostgreSQL types the parameters of the WHERE clause first, where
    // `COALESCE($3, 0)` alone would make `$3` an `int` like the literal.
    let updated = sqlx::query_as!(
        Product,
        r#"UPDATE products
         SET price = COALESCE($2, price), stock = COALESCE(reserved + $3, stock), updated_at = now()
         WHERE id = $1 AND reserved + COALESCE($3::bigint, 0) <= $4
         RETURNING id AS product_id, name, price, stock - reserved AS "stock!""#,
        product.get(),
        price,
        stock,
        MAX_STOCK,
    )
    .fetch_optional(&state.db)
    .await?;
    match updated {
        Some(p) => Ok(axum::Json(p)),
        None => match crate::products::fetch_product(&state.db, product).await? {
            None => Err(product_not_found()),
            Some(_) => Err(invalid(
                "stock plus the units reserved by unpaid orders would pass 1,000,000,000",
            )),
        },
    }
}
