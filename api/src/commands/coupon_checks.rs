//! The checks of a coupon issue that need no queue: who and what exists, read for many
//! requests per statement, and the coupons this replica has seen sold out.

use shared::domain::coupon::{IssueFacts, IssueState};
use shared::domain::error::{ErrorBody, ErrorCode};
use shared::domain::ids::{CouponId, UserId};
use sqlx::PgPool;

use crate::batched::Batched;
use crate::error::{ApiError, Result};

/// Coupons seen sold out by this replica. A coupon's quantity never grows and its issued
/// coupons are never taken back, so once sold out it stays so: this replica then refuses
/// it without asking PostgreSQL.
#[derive(Debug, Default)]
pub struct SoldOut(std::sync::RwLock<std::collections::HashSet<i64>>);

impl SoldOut {
    pub fn contains(&self, coupon: CouponId) -> bool {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(&coupon.get())
    }

    pub fn insert(&self, coupon: CouponId) {
        self.0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(coupon.get());
    }
}

pub fn sold_out() -> ErrorBody {
    ErrorBody::new(
        ErrorCode::CouponOutOfStock,
        shared::domain::coupon::refusal_message(ErrorCode::CouponOutOfStock),
    )
}

/// The facts of a coupon issue that need no queue, read for many requests at once (one
/// statement for the requests of the moment, in a flash sale hundreds).
pub struct CouponChecks(Batched<(i64, i64), FactRow>);

/// Most issue checks read by one statement.
const MAX_CHECKS_PER_STATEMENT: usize = 256;

/// Whether the coupon exists, is expired, is sold out, and is held by the user.
type FactRow = (bool, bool, bool, bool);

impl CouponChecks {
    pub fn start(db: PgPool) -> Self {
        Self(Batched::start(
            MAX_CHECKS_PER_STATEMENT,
            "api_coupon_check_batch_size",
            move |pairs| read_issue_facts(db.clone(), pairs),
        ))
    }
}

/// The facts of each (coupon, user) pair, in their order, in one statement.
async fn read_issue_facts(db: PgPool, pairs: Vec<(i64, i64)>) -> sqlx::Result<Vec<FactRow>> {
    let (coupons, users): (Vec<i64>, Vec<i64>) = pairs.into_iter().unzip();
    let rows = sqlx::query!(
        r#"SELECT c.id IS NOT NULL AS "coupon_exists!",
                COALESCE(c.expires_at <= now(), false) AS "expired!",
                COALESCE(c.issued_quantity >= c.total_quantity, false) AS "sold_out!",
                EXISTS (SELECT 1 FROM user_coupons WHERE coupon_id = q.coupon_id AND user_id = q.user_id)
                  AS "held!"
         FROM unnest($1::bigint[], $2::bigint[]) WITH ORDINALITY AS q(coupon_id, user_id, n)
         LEFT JOIN coupons c ON c.id = q.coupon_id
         ORDER BY q.n"#,
        &coupons,
        &users,
    )
    .fetch_all(&db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| (r.coupon_exists, r.expired, r.sold_out, r.held))
        .collect())
}

/// The checks that need no queue ([`shared::domain::coupon::refusal`], the worker's rule, on what
/// PostgreSQL says now): the coupon (404), then its state (409, 410). The user is the
/// caller, whose token proves them registered ([`crate::http::auth`]).
pub async fn refuse_what_is_known(checks: &CouponChecks, coupon: CouponId, user: UserId) -> Result<()> {
    let (coupon_exists, expired, sold_out, held) = checks.0.read((coupon.get(), user.get())).await?;
    let facts = IssueFacts {
        user_registered: true,
        coupon: coupon_exists.then_some(IssueState { expired, sold_out }),
        held,
    };
    match shared::domain::coupon::refusal(facts) {
        Some(code) => {
            metrics::counter!("api_commands_refused_total", "type" => "COUPON_ISSUE", "code" => code.as_str()).increment(1);
            Err(ApiError::new(code, shared::domain::coupon::refusal_message(code)))
        }
        None => Ok(()),
    }
}
