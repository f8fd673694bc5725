//! Products as clients see them: `stock` is what can still be ordered (on hand minus
//! reserved), never the raw on-hand count.

use axum::extract::{Path, State};
use serde::Serialize;
use shared::domain::error::ErrorCode;
use shared::domain::ids::ProductId;
use sqlx::PgExecutor;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::{ApiError, Result};
use crate::http::extract::Query;
use crate::http::pagination::{finish_page, PageQuery};
use crate::routes::openapi::ErrorSchema;
use crate::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_products))
        .routes(routes!(get_product))
}

// Every query that returns one selects `id AS product_id, name, price, stock - reserved AS
// "stock!", max_per_customer` (the difference of two NOT NULL columns is never NULL),
// written out in each because the query macros take a literal. Not a doc comment: it would
// enter the schema.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Product {
    pub product_id: i64,
    pub name: String,
    pub price: i64,
    /// Units that can still be ordered: on hand minus reserved.
    pub stock: i64,
    /// At most this many units per customer, in their reserved and paid orders together
    /// (a flash sale's per-person limit); absent: no limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1)]
    pub max_per_customer: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProductPage {
    items: Vec<Product>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_cursor: Option<String>,
}

/// Products in id order.
#[utoipa::path(
    get, path = "/products", tag = "products",
    params(PageQuery),
    responses(
        (status = 200, body = ProductPage),
        (status = 400, body = ErrorSchema, description = "ERR_INVALID_REQUEST"),
    )
)]
async fn list_products(
    State(state): State<AppState>,
    Query(query): Query<PageQuery>,
) -> Result<axum::Json<ProductPage>> {
    let page = query.parse()?;
    let rows = sqlx::query_as!(
        Product,
        r#"SELECT id AS product_id, name, price, stock - reserved AS "stock!", max_per_customer FROM products
         WHERE ($1::bigint IS NULL OR id > $1) ORDER BY id LIMIT $2"#,
        page.after,
        page.limit + 1,
    )
    .fetch_all(&state.db)
    .await?;
    let (items, next_cursor) = finish_page(rows, page.limit, |p| p.product_id);
    Ok(axum::Json(ProductPage { items, next_cursor }))
}

/// One product.
#[utoipa::path(
    get, path = "/products/{productId}", tag = "products",
    params(("productId" = i64, Path, minimum = 1)),
    responses(
        (status = 200, body = Product),
        (status = 400, body = ErrorSchema, description = "ERR_INVALID_REQUEST"),
        (status = 404, body = ErrorSchema, description = "ERR_PRODUCT_NOT_FOUND"),
    )
)]
async fn get_product(
    State(state): State<AppState>,
    Path(product): Path<String>,
) -> Result<axum::Json<Product>> {
    let product = parse_product_id(&product)?;
    let found = fetch_product(&state.db, product).await?;
    found.map(axum::Json).ok_or_else(product_not_found)
}

pub fn parse_product_id(raw: &str) -> Result<ProductId> {
    ProductId::parse(raw)
        .ok_or_else(|| ApiError::new(ErrorCode::InvalidRequest, "productId must be a positive integer"))
}

pub fn product_not_found() -> ApiError {
    ApiError::new(ErrorCode::ProductNotFound, "no product with this productId")
}

pub async fn fetch_product(executor: impl PgExecutor<'_>, product: ProductId) -> Result<Option<Product>> {
    Ok(sqlx::query_as!(
        Product,
        r#"SELECT id AS product_id, name, price, stock - reserved AS "stock!", max_per_customer FROM products WHERE id = $1"#,
        product.get(),
    )
    .fetch_optional(executor)
    .await?)
}
