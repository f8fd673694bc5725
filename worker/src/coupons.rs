//! Settling coupon issues: a whole batch in a handful of statements.
//!
//! The coupon rows are locked in id order (no deadlock with another batch), the decisions
//! are taken in memory by [`shared::coupon::decide_issues`], and the issued coupons and the
//! new counts are written with one statement each. That is what lets one hot coupon go far
//! beyond one transaction per request.

use std::collections::{HashMap, HashSet};

use shared::command::CouponIssue;
use shared::coupon::{decide_issues, refusal_message, CouponStock, IssueDecision};
use shared::error::ErrorBody;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::settle::{Decision, PendingRequest, SettleError};

pub async fn settle(
    conn: &mut PgConnection,
    requests: &[PendingRequest],
) -> Result<Vec<Decision>, SettleError> {
    let issues: Vec<CouponIssue> = requests
        .iter()
        .map(|r| {
            serde_json::from_value(r.payload.clone()).map_err(|e| SettleError::Unsettleable {
                id: r.id,
                reason: format!("malformed coupon issue payload: {e}"),
            })
        })
        .collect::<Result<_, _>>()?;

    let mut coupon_ids: Vec<i64> = issues.iter().map(|i| i.coupon_id).collect();
    coupon_ids.sort_unstable();
    coupon_ids.dedup();
    let user_ids: Vec<i64> = issues.iter().map(|i| i.user_id).collect();

    let coupons: Vec<(i64, i64, bool)> = sqlx::query_as(
        "SELECT id, total_quantity - issued_quantity, expires_at <= now()
         FROM coupons WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE",
    )
    .bind(&coupon_ids)
    .fetch_all(&mut *conn)
    .await?;
    let coupons: HashMap<i64, CouponStock> = coupons
        .into_iter()
        .map(|(id, remaining, expired)| (id, CouponStock { remaining, expired }))
        .collect();
    let users: HashSet<i64> = sqlx::query_scalar::<_, i64>("SELECT id FROM users WHERE id = ANY($1)")
        .bind(&user_ids)
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .collect();
    // Looked up pair by pair on `user_coupon_once`: with `coupon_id = ANY(..)` the planner
    // walked every coupon issued so far for a hot coupon, on every batch.
    let pair_coupons: Vec<i64> = issues.iter().map(|i| i.coupon_id).collect();
    let held: HashSet<(i64, i64)> = sqlx::query_as::<_, (i64, i64)>(
        "SELECT uc.coupon_id, uc.user_id
         FROM UNNEST($1::bigint[], $2::bigint[]) AS k(coupon_id, user_id)
         JOIN user_coupons uc ON uc.user_id = k.user_id AND uc.coupon_id = k.coupon_id",
    )
    .bind(&pair_coupons)
    .bind(&user_ids)
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .collect();

    let decided = decide_issues(&issues, &coupons, &users, &held);

    let mut new_ids = Vec::new();
    let mut new_coupons = Vec::new();
    let mut new_users = Vec::new();
    let mut new_requests = Vec::new();
    let mut issued_per_coupon: HashMap<i64, i64> = HashMap::new();
    let decisions = requests
        .iter()
        .zip(&issues)
        .zip(decided)
        .map(|((request, issue), decision)| match decision {
            IssueDecision::Issue => {
                let user_coupon_id = Uuid::now_v7();
                new_ids.push(user_coupon_id);
                new_coupons.push(issue.coupon_id);
                new_users.push(issue.user_id);
                new_requests.push(request.id);
                *issued_per_coupon.entry(issue.coupon_id).or_default() += 1;
                Decision::Succeeded(serde_json::json!({
                    "userCouponId": user_coupon_id,
                    "couponId": issue.coupon_id,
                }))
            }
            IssueDecision::Refuse(code) => Decision::Failed(ErrorBody::new(code, refusal_message(code))),
        })
        .collect();

    if !new_ids.is_empty() {
        sqlx::query(
            "INSERT INTO user_coupons (id, coupon_id, user_id, request_id)
             SELECT * FROM UNNEST($1::uuid[], $2::bigint[], $3::bigint[], $4::uuid[])",
        )
        .bind(&new_ids)
        .bind(&new_coupons)
        .bind(&new_users)
        .bind(&new_requests)
        .execute(&mut *conn)
        .await?;
        let (ids, counts): (Vec<i64>, Vec<i64>) = issued_per_coupon.into_iter().unzip();
        sqlx::query(
            "UPDATE coupons c SET issued_quantity = c.issued_quantity + d.n
             FROM UNNEST($1::bigint[], $2::bigint[]) AS d(id, n) WHERE c.id = d.id",
        )
        .bind(&ids)
        .bind(&counts)
        .execute(&mut *conn)
        .await?;
    }
    Ok(decisions)
}
