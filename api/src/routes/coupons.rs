//! Coupons: the catalogue of coupon kinds, first-come-first-served issuing, and what a
//! user holds.
//!
//! An issue request is refused at once when the answer is already known (unknown or
//! expired coupon, sold out, already held), so a sold-out flash sale costs the queue
//! nothing; everything else is settled by a worker in the order the broker accepted it.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use shared::domain::command::{CouponIssue, RequestKind};
use shared::domain::command_input;
use shared::domain::error::ErrorCode;
use shared::domain::ids::{parse_name, whole_number_in, CouponId, UserId};
use shared::domain::money::DiscountType;
use sqlx::{PgConnection, PgExecutor};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::commands::accept::{self, Accepted, NewCommand, PreferWait};
use crate::commands::coupon_checks::{refuse_what_is_known, sold_out};
use crate::error::{ApiError, Result};
use crate::http::auth::Caller;
use crate::http::extract::{IdempotencyKey, Json, Query};
use crate::http::pagination::{finish_page, Page, PageQuery};
use crate::routes::openapi::{ErrorSchema, IdempotencyKeyHeader, PreferHeader};
use crate::routes::products::Product;
use crate::{idempotency, AppState};

const MAX_COUPON_NAME_CHARS: usize = 100;
const MAX_TOTAL_QUANTITY: i64 = 100_000_000;
const MAX_APPLICABLE_PRODUCTS: usize = 1_000;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(get_coupon))
        .routes(routes!(issue_coupon))
        .routes(routes!(user_coupons))
        .routes(routes!(applicable_products))
}

/// The admin part, mounted behind the admin token by [`crate::routes::admin`].
pub fn admin_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(create_coupon))
}

fn parse_coupon_id(raw: &str) -> Result<CouponId> {
    command_input::coupon_id(raw).map_err(ApiError::Client)
}

fn coupon_not_found() -> ApiError {
    ApiError::new(ErrorCode::CouponNotFound, "no coupon with this couponId")
}

fn invalid_user() -> ApiError {
    ApiError::Client(command_input::invalid_coupon_user())
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Coupon {
    coupon_id: i64,
    name: String,
    /// `FIXED` (won off) or `PERCENT` (1 to 100, rounded down to a whole won).
    #[schema(value_type = String)]
    discount_type: DiscountType,
    discount_value: i64,
    total_quantity: i64,
    issued_quantity: i64,
    expires_at: DateTime<Utc>,
    /// The products it applies to; absent when it applies to every product.
    #[serde(skip_serializing_if = "Option::is_none")]
    applicable_product_ids: Option<Vec<i64>>,
}

async fn fetch_coupon(executor: impl PgExecutor<'_>, coupon: CouponId) -> Result<Option<Coupon>> {
    Ok(sqlx::query_as!(
        Coupon,
        r#"SELECT c.id AS coupon_id, c.name, c.discount_type AS "discount_type: DiscountType",
                c.discount_value, c.total_quantity, c.issued_quantity, c.expires_at,
                CASE WHEN c.all_products THEN NULL
                     ELSE ARRAY(SELECT product_id FROM coupon_products WHERE coupon_id = c.id
                                ORDER BY product_id) END
                  AS applicable_product_ids
         FROM coupons c WHERE c.id = $1"#,
        coupon.get(),
    )
    .fetch_optional(executor)
    .await?)
}

/// One coupon kind and how many are left.
#[utoipa::path(
    get, path = "/coupons/{couponId}", tag = "coupons",
    params(("couponId" = i64, Path, minimum = 1)),
    responses(
        (status = 200, body = Coupon),
        (status = 400, body = ErrorSchema, description = "ERR_INVALID_REQUEST"),
        (status = 404, body = ErrorSchema, description = "ERR_COUPON_NOT_FOUND"),
    )
)]
async fn get_coupon(State(state): State<AppState>, Path(coupon): Path<String>) -> Result<axum::Json<Coupon>> {
    let coupon = parse_coupon_id(&coupon)?;
    fetch_coupon(&state.db, coupon)
        .await?
        .map(axum::Json)
        .ok_or_else(coupon_not_found)
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct IssueRequest {
    #[schema(value_type = i64, minimum = 1)]
    user_id: serde_json::Number,
}

/// Asks for one coupon, first come first served; settled asynchronously.
#[utoipa::path(
    post, path = "/coupons/{couponId}/issue", tag = "coupons",
    params(("couponId" = i64, Path, minimum = 1), IdempotencyKeyHeader, PreferHeader),
    security(("user_token" = [])),
    request_body = IssueRequest,
    responses(
        (status = 202, body = Accepted, description = "accepted; poll the Location"),
        (status = 400, body = ErrorSchema, description = "ERR_BALANCE_INVALID_USER, ERR_INVALID_REQUEST"),
        (status = 404, body = ErrorSchema, description = "ERR_COUPON_NOT_FOUND"),
        (status = 409, body = ErrorSchema, description = "ERR_COUPON_ALREADY_ACQUIRED, ERR_IDEMPOTENCY_KEY_IN_USE"),
        (status = 410, body = ErrorSchema, description = "ERR_COUPON_EXPIRED, ERR_COUPON_OUT_OF_STOCK"),
        (status = 422, body = ErrorSchema, description = "ERR_IDEMPOTENCY_KEY_REUSED"),
    )
)]
async fn issue_coupon(
    State(state): State<AppState>,
    caller: Caller,
    Path(coupon): Path<String>,
    key: IdempotencyKey,
    wait: PreferWait,
    Json(body): Json<IssueRequest>,
) -> Result<Response> {
    let coupon = parse_coupon_id(&coupon)?;
    let user = command_input::coupon_user(&body.user_id).map_err(ApiError::Client)?;
    caller.act_for(user)?;
    state.limits.user_write(user)?;
    let issue = CouponIssue {
        coupon_id: coupon.get(),
        user_id: user.get(),
    };
    let payload = serde_json::to_value(issue).map_err(ApiError::internal)?;
    let route = format!("POST /coupons/{coupon}/issue");
    if state.sold_out.contains(coupon) {
        return accept::refuse_from_memory(&state, &key, &route, user, &payload, sold_out()).await;
    }
    let checked = refuse_what_is_known(&state.coupon_checks, coupon, user)
        .await
        .inspect_err(|e| {
            if matches!(e, ApiError::Client(refusal) if refusal.code == ErrorCode::CouponOutOfStock) {
                state.sold_out.insert(coupon);
            }
        })
        .map(|()| NewCommand {
            kind: RequestKind::CouponIssue,
            partition_key: coupon.get(),
            payload: payload.clone(),
            creates: None,
            order_id: None,
        });
    accept::submit(&state, &key, &route, user, &payload, checked, wait).await
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HeldCoupon {
    user_coupon_id: Uuid,
    coupon_id: i64,
    name: String,
    /// `FIXED` or `PERCENT`.
    #[schema(value_type = String)]
    discount_type: DiscountType,
    discount_value: i64,
    issued_at: DateTime<Utc>,
    expires_at: DateTime<Utc>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HeldCoupons {
    items: Vec<HeldCoupon>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_cursor: Option<String>,
}

/// The coupons a user holds and can still use (unused, unexpired), newest first.
#[utoipa::path(
    get, path = "/users/{userId}/coupons", tag = "coupons",
    params(("userId" = i64, Path, minimum = 1), PageQuery),
    security(("user_token" = [])),
    responses(
        (status = 200, body = HeldCoupons),
        (status = 400, body = ErrorSchema, description = "ERR_BALANCE_INVALID_USER, ERR_INVALID_REQUEST"),
    )
)]
async fn user_coupons(
    State(state): State<AppState>,
    caller: Caller,
    Path(user): Path<String>,
    Query(query): Query<PageQuery>,
) -> Result<axum::Json<HeldCoupons>> {
    let user = UserId::parse(&user).ok_or_else(invalid_user)?;
    // Newest first by id: user coupon ids are UUIDv7, in the order they were issued.
    let (limit, before) = query.parse_with(|raw| Uuid::parse_str(raw).ok())?;
    caller.act_for(user)?;
    let rows = sqlx::query_as!(
        HeldCoupon,
        r#"SELECT uc.id AS user_coupon_id, c.id AS coupon_id, c.name,
                c.discount_type AS "discount_type: DiscountType", c.discount_value,
                uc.issued_at, c.expires_at
         FROM user_coupons uc JOIN coupons c ON c.id = uc.coupon_id
         WHERE uc.user_id = $1 AND uc.used_at IS NULL AND c.expires_at > now()
           AND ($2::uuid IS NULL OR uc.id < $2)
         ORDER BY uc.id DESC LIMIT $3"#,
        user.get(),
        before,
        limit + 1,
    )
    .fetch_all(&state.db)
    .await?;
    let (items, next_cursor) = finish_page(rows, limit, |c| c.user_coupon_id);
    Ok(axum::Json(HeldCoupons { items, next_cursor }))
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApplicableProducts {
    items: Vec<Product>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_cursor: Option<String>,
}

/// The products a coupon applies to (every product when it names none), by product id.
#[utoipa::path(
    get, path = "/coupons/{couponId}/applicable-products", tag = "coupons",
    params(("couponId" = i64, Path, minimum = 1), PageQuery),
    responses(
        (status = 200, body = ApplicableProducts),
        (status = 400, body = ErrorSchema, description = "ERR_INVALID_REQUEST"),
        (status = 404, body = ErrorSchema, description = "ERR_COUPON_NOT_FOUND"),
        (status = 410, body = ErrorSchema, description = "ERR_COUPON_EXPIRED"),
    )
)]
async fn applicable_products(
    State(state): State<AppState>,
    Path(coupon): Path<String>,
    Query(query): Query<PageQuery>,
) -> Result<axum::Json<ApplicableProducts>> {
    let coupon = parse_coupon_id(&coupon)?;
    let page: Page = query.parse()?;
    let found = sqlx::query!(
        r#"SELECT all_products, expires_at <= now() AS "expired!" FROM coupons WHERE id = $1"#,
        coupon.get(),
    )
    .fetch_optional(&state.db)
    .await?
    .ok_or_else(coupon_not_found)?;
    if found.expired {
        return Err(ApiError::new(ErrorCode::CouponExpired, "this coupon has expired"));
    }
    let rows = sqlx::query_as!(
        Product,
        r#"SELECT id AS product_id, name, price, stock - reserved AS "stock!", max_per_customer FROM products
         WHERE ($1 OR id IN (SELECT product_id FROM coupon_products WHERE coupon_id = $2))
           AND ($3::bigint IS NULL OR id > $3)
         ORDER BY id LIMIT $4"#,
        found.all_products,
        coupon.get(),
        page.after,
        page.limit + 1,
    )
    .fetch_all(&state.db)
    .await?;
    let (items, next_cursor) = finish_page(rows, page.limit, |p| p.product_id);
    Ok(axum::Json(ApplicableProducts { items, next_cursor }))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NewCoupon {
    name: String,
    /// `FIXED` or `PERCENT`.
    discount_type: String,
    /// Won off for `FIXED`; 1 to 100 for `PERCENT`.
    #[schema(value_type = i64, minimum = 1)]
    discount_value: serde_json::Number,
    #[schema(value_type = i64, minimum = 1)]
    total_quantity: serde_json::Number,
    /// RFC 3339; must be in the future.
    expires_at: String,
    /// Omit to apply to every product.
    #[schema(value_type = Option<Vec<i64>>)]
    applicable_product_ids: Option<Vec<serde_json::Number>>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ValidNewCoupon {
    name: String,
    discount_type: DiscountType,
    discount_value: i64,
    total_quantity: i64,
    expires_at: DateTime<Utc>,
    applicable_product_ids: Option<Vec<i64>>,
}

fn invalid(message: &str) -> ApiError {
    ApiError::new(ErrorCode::InvalidRequest, message)
}

impl NewCoupon {
    fn validate(self) -> Result<ValidNewCoupon> {
        let name = parse_name(&self.name, MAX_COUPON_NAME_CHARS)
            .ok_or_else(|| invalid("name must be 1 to 100 characters"))?;
        // Read as text, not as the enum, so an unknown type is answered with this message
        // rather than the body's generic one.
        let discount_type = DiscountType::parse(&self.discount_type)
            .ok_or_else(|| invalid("discountType must be FIXED or PERCENT"))?;
        let discount_value = whole_number_in(&self.discount_value, 1, discount_type.max_value())
            .ok_or_else(|| invalid("discountValue must be a whole number from 1 (PERCENT: up to 100)"))?;
        let total_quantity = whole_number_in(&self.total_quantity, 1, MAX_TOTAL_QUANTITY)
            .ok_or_else(|| invalid("totalQuantity must be a whole number from 1 to 100,000,000"))?;
        let expires_at = DateTime::parse_from_rfc3339(&self.expires_at)
            .map_err(|_| invalid("expiresAt must be an RFC 3339 timestamp"))?
            .with_timezone(&Utc);
        if expires_at <= Utc::now() {
            return Err(invalid("expiresAt must be in the future"));
        }
        let applicable_product_ids = match self.applicable_product_ids {
            None => None,
            Some(ids) => {
                let mut parsed = ids
                    .iter()
                    .map(|id| whole_number_in(id, 1, i64::MAX))
                    .collect::<Option<Vec<i64>>>()
                    .ok_or_else(|| invalid("applicableProductIds must be positive integers"))?;
                parsed.sort_unstable();
                parsed.dedup();
                if parsed.is_empty() || parsed.len() > MAX_APPLICABLE_PRODUCTS {
                    return Err(invalid(
                        "applicableProductIds must name 1 to 1,000 products, or be omitted",
                    ));
                }
                Some(parsed)
            }
        };
        Ok(ValidNewCoupon {
            name,
            discount_type,
            discount_value,
            total_quantity,
            expires_at,
            applicable_product_ids,
        })
    }
}

/// Creates a coupon kind.
#[utoipa::path(
    post, path = "/admin/coupons", tag = "admin",
    params(IdempotencyKeyHeader),
    request_body = NewCoupon,
    security(("admin_token" = [])),
    responses(
        (status = 201, body = Coupon),
        (status = 400, body = ErrorSchema, description = "ERR_INVALID_REQUEST"),
        (status = 401, body = ErrorSchema, description = "ERR_UNAUTHORIZED"),
        (status = 404, body = ErrorSchema, description = "ERR_PRODUCT_NOT_FOUND"),
    )
)]
async fn create_coupon(
    State(state): State<AppState>,
    key: IdempotencyKey,
    Json(body): Json<NewCoupon>,
) -> Result<Response> {
    let coupon = body.validate()?;
    let request = serde_json::to_value(&coupon).map_err(ApiError::internal)?;
    let outcome = idempotency::run(
        &state.db,
        &key,
        "POST /admin/coupons",
        &request,
        StatusCode::CREATED,
        async |conn| insert_coupon(conn, &coupon).await,
    )
    .await?;
    Ok(outcome.into_response(StatusCode::CREATED))
}

async fn insert_coupon(conn: &mut PgConnection, coupon: &ValidNewCoupon) -> Result<Coupon> {
    if let Some(ids) = &coupon.applicable_product_ids {
        let known = sqlx::query_scalar!(
            r#"SELECT count(*) AS "count!" FROM products WHERE id = ANY($1)"#,
            ids
        )
        .fetch_one(&mut *conn)
        .await?;
        if usize::try_from(known).ok() != Some(ids.len()) {
            return Err(ApiError::new(
                ErrorCode::ProductNotFound,
                "applicableProductIds names a product that does not exist",
            ));
        }
    }
    let id = sqlx::query_scalar!(
        "INSERT INTO coupons (name, discount_type, discount_value, total_quantity, expires_at, all_products)
         VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
        coupon.name,
        coupon.discount_type as _,
        coupon.discount_value,
        coupon.total_quantity,
        coupon.expires_at,
        coupon.applicable_product_ids.is_none(),
    )
    .fetch_one(&mut *conn)
    .await?;
    if let Some(ids) = &coupon.applicable_product_ids {
        sqlx::query!(
            "INSERT INTO coupon_products (coupon_id, product_id) SELECT $1, UNNEST($2::bigint[])",
            id,
            ids,
        )
        .execute(&mut *conn)
        .await?;
    }
    let created = fetch_coupon(
        &mut *conn,
        CouponId::new(id).ok_or_else(|| ApiError::internal(anyhow::anyhow!("non-positive coupon id")))?,
    )
    .await?;
    created.ok_or_else(|| ApiError::internal(anyhow::anyhow!("a coupon vanished inside its own transaction")))
}
