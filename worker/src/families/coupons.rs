//! The coupon family: settling coupon issues a whole batch at a time.
//!
//! The coupon rows are locked in id order (no deadlock with another batch) in the batch's
//! lock round trip, the decisions are taken in memory by [`shared::domain::coupon::decide_issues`],
//! and the issued coupons and the new counts are written in the batch's one write
//! statement. That is what lets one hot coupon go far beyond one transaction per request.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use shared::domain::command::{CouponIssue, CouponIssued, RequestResult};
use shared::domain::coupon::{decide_issues, refusal_message, CouponStock, IssueDecision};
use shared::domain::error::ErrorBody;
use sqlx::Arguments;
use uuid::Uuid;

use crate::settling::pipeline::{
    payload_bigint, CommandFamily, Decided, Decision, LockedState, PendingRequest, SettleError, SharedRows,
};

/// Coupon issues, partitioned by coupon.
pub struct CouponIssues;

#[derive(sqlx::FromRow)]
struct CouponRow {
    id: i64,
    remaining: i64,
    expired: bool,
}

impl CommandFamily for CouponIssues {
    /// A coupon's row is locked up front: its partition is its only settler, so no other
    /// partition shares it.
    fn lock_state(&self, ids: &str, _shared: SharedRows) -> Vec<String> {
        let coupon = payload_bigint("couponId");
        let user = payload_bigint("userId");
        // dynamic: sent with `BEGIN` and the fence as one message, which the macros cannot build.
        vec![
            // The coupons, locked in id order.
            format!(
                "SELECT c.id, c.total_quantity - c.issued_quantity AS remaining,
                        c.expires_at <= now() AS expired
                 FROM coupons c
                 WHERE c.id IN (SELECT {coupon} FROM requests r WHERE r.id = ANY({ids}))
                 ORDER BY c.id FOR NO KEY UPDATE"
            ),
            // The registered users among the requesters.
            format!(
                "SELECT u.id FROM users u
                 WHERE u.id IN (SELECT {user} FROM requests r WHERE r.id = ANY({ids}))"
            ),
            // The (coupon, user) pairs already issued, looked up pair by pair on
            // `user_coupon_once`: with `coupon_id = ANY(..)` the planner walked every
            // coupon issued so far for a hot coupon, on every batch.
            format!(
                "SELECT uc.coupon_id, uc.user_id
                 FROM requests r
                 JOIN user_coupons uc ON uc.user_id = {user} AND uc.coupon_id = {coupon}
                 WHERE r.id = ANY({ids})"
            ),
        ]
    }

    fn decide(
        &self,
        requests: &[PendingRequest],
        mut state: LockedState,
        _now: DateTime<Utc>,
        _shared: SharedRows,
    ) -> Result<Decided, SettleError> {
        let issues: Vec<CouponIssue> = requests
            .iter()
            .map(|r| {
                serde_json::from_value(r.payload.clone()).map_err(|e| SettleError::Unsettleable {
                    id: r.id,
                    reason: format!("malformed coupon issue payload: {e}"),
                })
            })
            .collect::<Result<_, _>>()?;
        let coupons: HashMap<i64, CouponStock> = state
            .rows::<CouponRow>()?
            .into_iter()
            .map(|c| {
                (
                    c.id,
                    CouponStock {
                        remaining: c.remaining,
                        expired: c.expired,
                    },
                )
            })
            .collect();
        let users: HashSet<i64> = state.rows::<(i64,)>()?.into_iter().map(|(id,)| id).collect();
        let held: HashSet<(i64, i64)> = state.rows::<(i64, i64)>()?.into_iter().collect();

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
                    Decision::Succeeded(RequestResult::CouponIssued(CouponIssued {
                        user_coupon_id,
                        coupon_id: issue.coupon_id,
                    }))
                }
                IssueDecision::Refuse(code) => Decision::Failed(ErrorBody::new(code, refusal_message(code))),
            })
            .collect();
        let (counted_ids, counts): (Vec<i64>, Vec<i64>) = issued_per_coupon.into_iter().unzip();
        Ok(Decided {
            decisions,
            writes: Box::new(move |args| {
                args.add(new_ids)?;
                args.add(new_coupons)?;
                args.add(new_users)?;
                args.add(new_requests)?;
                args.add(counted_ids)?;
                args.add(counts)?;
                Ok(())
            }),
            wrote_events: false,
            at_commit: Vec::new(),
        })
    }

    fn write_ctes(&self) -> &'static str {
        // dynamic: part of the write statement composed at start (`settle::write_statement`).
        // Parameters from `FIRST_FAMILY_PARAMETER` (5) on.
        "issued AS (
            INSERT INTO user_coupons (id, coupon_id, user_id, request_id)
            SELECT * FROM UNNEST($5::uuid[], $6::bigint[], $7::bigint[], $8::uuid[])),
         counted AS (
            UPDATE coupons c SET issued_quantity = c.issued_quantity + d.n
            FROM UNNEST($9::bigint[], $10::bigint[]) AS d(id, n) WHERE c.id = d.id)"
    }
}
