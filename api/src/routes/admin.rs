//! Administration behind the bearer `ADMIN_TOKEN`: the catalogue and coupon kinds (and,
//! merged here, the on-demand batch runs).
//!
//! `stock` here means the same as in every read: units that can still be ordered. Setting
//! it moves the on-hand count to `reserved + stock`, so units held by unpaid orders are
//! never taken away from them.
//!
//! `maxPerCustomer` is a product's per-person limit. Lowering it below what a customer
//! already holds takes nothing away from them: it only refuses their next order of it.

use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::Response;
use serde::{Deserialize, Deserializer, Serialize};
use shared::domain::error::ErrorCode;
use shared::domain::ids::{parse_name, whole_number_in, MAX_PRICE, MAX_STOCK};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::{ApiError, Result};
use crate::http::extract::{IdempotencyKey, Json};
use crate::routes::openapi::{ErrorSchema, IdempotencyKeyHeader};
use crate::routes::products::{parse_product_id, product_not_found, Product};
use crate::{idempotency, AppState};

const MAX_PRODUCT_NAME_CHARS: usize = 200;

/// The admin routes, each behind [`require_admin`].
pub fn router(state: AppState) -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_product))
        .routes(routes!(update_product))
        .merge(crate::routes::coupons::admin_router())
        .merge(crate::routes::popular::admin_router())
        .merge(crate::routes::partitions::admin_router())
        .merge(crate::routes::consistency_audit::admin_router())
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

/// A per-customer limit: no more units than any stock can hold.
fn parse_max_per_customer(raw: &serde_json::Number) -> Result<i64> {
    whole_number_in(raw, 1, MAX_STOCK)
        .ok_or_else(|| invalid("maxPerCustomer must be a whole number from 1 to 1,000,000,000, or null"))
}

/// A field that may be absent, `null` or a value, told apart (`Some(None)` is `null`); with
/// `#[serde(default)]`, absent is `None`.
fn present<'de, D, T>(deserializer: D) -> std::result::Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(deserializer).map(Some)
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NewProduct {
    /// 1 to 200 characters.
    name: String,
    /// Whole won, 1 to 1,000,000,000.
    #[schema(value_type = i64, minimum = 1)]
    price: serde_json::Number,
    /// Units on hand, 0 to 1,000,000,000.
    #[schema(value_type = i64, minimum = 0)]
    stock: serde_json::Number,
    /// At most this many units per customer, in their reserved and paid orders together
    /// (1 to 1,000,000,000); absent or null: no limit.
    #[schema(value_type = Option<i64>, minimum = 1)]
    max_per_customer: Option<serde_json::Number>,
}

/// What an idempotent replay compares: the body as validated.
#[derive(Debug, Serialize)]
struct ValidNewProduct {
    name: String,
    price: i64,
    stock: i64,
    /// Left out when there is none, so that the key of a request made before the field
    /// existed still matches its retry.
    #[serde(rename = "maxPerCustomer", skip_serializing_if = "Option::is_none")]
    max_per_customer: Option<i64>,
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
        max_per_customer: body
            .max_per_customer
            .as_ref()
            .map(parse_max_per_customer)
            .transpose()?,
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
                r#"INSERT INTO products (name, price, stock, max_per_customer) VALUES ($1, $2, $3, $4)
                   RETURNING id AS product_id, name, price, stock - reserved AS "stock!", max_per_customer"#,
                product.name,
                product.price,
                product.stock,
                product.max_per_customer,
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
#[serde(rename_all = "camelCase")]
pub struct ProductChange {
    /// New price in whole won.
    #[schema(value_type = Option<i64>, minimum = 1)]
    price: Option<serde_json::Number>,
    /// Units that can still be ordered from now on; units reserved by unpaid orders stay held.
    #[schema(value_type = Option<i64>, minimum = 0)]
    stock: Option<serde_json::Number>,
    /// A new per-customer limit (1 to 1,000,000,000); `null` removes the limit, absent
    /// leaves it as it is.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<i64>, minimum = 1, nullable)]
    max_per_customer: Option<Option<serde_json::Number>>,
}

/// Changes a product's price, orderable stock or per-customer limit.
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
    // `Some(None)`: remove the limit.
    let max_per_customer = match &body.max_per_customer {
        None => None,
        Some(None) => Some(None),
        Some(Some(raw)) => Some(Some(parse_max_per_customer(raw)?)),
    };
    if price.is_none() && stock.is_none() && max_per_customer.is_none() {
        return Err(invalid("give price, stock, maxPerCustomer or several of them"));
    }
    // `$3::bigint`: PostgreSQL types the parameters of the WHERE clause first, where
    // `COALESCE($3, 0)` alone would make `$3` an `int` like the literal.
    let updated = sqlx::query_as!(
        Product,
        r#"UPDATE products
         SET price = COALESCE($2, price), stock = COALESCE(reserved + $3, stock),
             max_per_customer = CASE WHEN $5 THEN $6 ELSE max_per_customer END,
             updated_at = now()
         WHERE id = $1 AND reserved + COALESCE($3::bigint, 0) <= $4
         RETURNING id AS product_id, name, price, stock - reserved AS "stock!", max_per_customer"#,
        product.get(),
        price,
        stock,
        MAX_STOCK,
        max_per_customer.is_some(),
        max_per_customer.flatten(),
    )
    .fetch_optional(&state.db)
    .await?;
    match updated {
        Some(p) => Ok(axum::Json(p)),
        None => match crate::routes::products::fetch_product(&state.db, product).await? {
            None => Err(product_not_found()),
            Some(_) => Err(invalid(
                "stock plus the units reserved by unpaid orders would pass 1,000,000,000",
            )),
        },
    }
}
