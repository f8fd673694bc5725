//! `POST /coupons/{couponId}/issue`, synchronously: one autocommit statement takes a
//! coupon with a conditional update of the coupon row and writes the user's coupon, so the
//! hot row is locked only from that update to the statement's own commit.

use api::error::{ApiError, Result};
use api::http::extract::Json;
use axum::extract::{Path, State};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use shared::domain::command::RequestKind;
use shared::domain::command_input;
use shared::domain::coupon::refusal_message;
use shared::domain::error::ErrorCode;
use uuid::Uuid;

use super::{Peer, Settled};

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IssueRequest {
    user_id: serde_json::Number,
}

/// What the statement did, and what explains a refusal.
#[derive(sqlx::FromRow)]
struct Outcome {
    user_exists: bool,
    coupon_exists: bool,
    expired: bool,
    held: bool,
    issued_at: Option<DateTime<Utc>>,
}

/// One statement, one transaction. The update is conditional (stock left, not expired, a
/// registered user who does not hold it yet); the final select explains a refusal from
/// the same snapshot. Two requests of one user at the same moment both pass the `held`
/// check of their snapshots: the second's insert then violates `user_coupon_once`, and the
/// whole statement, its increment included, rolls back.
const ISSUE: &str = "
    WITH known AS MATERIALIZED (
        SELECT EXISTS (SELECT 1 FROM users WHERE id = $2) AS user_exists,
               EXISTS (SELECT 1 FROM user_coupons WHERE user_id = $2 AND coupon_id = $1) AS held),
     taken AS (
        UPDATE coupons SET issued_quantity = issued_quantity + 1
        WHERE id = $1 AND issued_quantity < total_quantity AND expires_at > now()
          AND (SELECT user_exists AND NOT held FROM known)
        RETURNING id),
     issued AS (
        INSERT INTO user_coupons (id, coupon_id, user_id, request_id)
        SELECT $3, id, $2, $4 FROM taken
        RETURNING issued_at)
    SELECT k.user_exists, k.held, c.id IS NOT NULL AS coupon_exists,
           COALESCE(c.expires_at <= now(), false) AS expired,
           (SELECT issued_at FROM issued) AS issued_at
    FROM known k LEFT JOIN coupons c ON c.id = $1";

pub async fn issue_coupon(
    State(peer): State<Peer>,
    Path(coupon): Path<String>,
    Json(body): Json<IssueRequest>,
) -> Result<Settled> {
    let created_at = Utc::now();
    let coupon = command_input::coupon_id(&coupon).map_err(ApiError::Client)?;
    let user = command_input::coupon_user(&body.user_id).map_err(ApiError::Client)?;
    if peer.known_sold_out(coupon.get()) {
        return Err(refused(ErrorCode::CouponOutOfStock));
    }
    let request_id = Uuid::now_v7();
    let user_coupon_id = Uuid::now_v7();
    let outcome: Outcome = sqlx::query_as(ISSUE)
        .bind(coupon.get())
        .bind(user.get())
        .bind(user_coupon_id)
        .bind(request_id)
        .fetch_one(&peer.db)
        .await
        .map_err(|e| match shared::store::db::violated_constraint(&e) {
            Some("user_coupon_once") => refused(ErrorCode::CouponAlreadyAcquired),
            _ => ApiError::from(e),
        })?;
    if outcome.issued_at.is_some() {
        let result = serde_json::json!({ "userCouponId": user_coupon_id, "couponId": coupon.get() });
        return Ok(Settled::succeeded(
            request_id,
            RequestKind::CouponIssue,
            created_at,
            result,
        ));
    }
    // The contract's order: the user, the coupon, then its state.
    let code = if !outcome.user_exists {
        ErrorCode::BalanceInvalidUser
    } else if !outcome.coupon_exists {
        ErrorCode::CouponNotFound
    } else if outcome.expired {
        ErrorCode::CouponExpired
    } else if outcome.held {
        ErrorCode::CouponAlreadyAcquired
    } else {
        // Sold out in this snapshot, or by the request that held the row while we waited.
        peer.note_sold_out(coupon.get());
        ErrorCode::CouponOutOfStock
    };
    Err(refused(code))
}

fn refused(code: ErrorCode) -> ApiError {
    ApiError::new(code, refusal_message(code))
}
