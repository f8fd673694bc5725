//! `POST /admin/batch/consistency-audit/run`: the consistency audit the batch runs on a
//! schedule ([`shared::store::audit`]), run now and answered, for operators and tests.
//!
//! The `consistency_violations` gauge and its alert belong to the batch process: an
//! on-demand run here answers and logs what it found but does not touch them, so the
//! metric always says what the batch's own last run found.

use axum::extract::State;
use chrono::{DateTime, Utc};
use serde::Serialize;
use shared::store::audit::{self, Audit};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::Result;
use crate::routes::openapi::ErrorSchema;
use crate::AppState;

/// The admin part, mounted behind the admin token by [`crate::routes::admin`].
pub fn admin_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(run_consistency_audit))
}

/// What one run of the audit found.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConsistencyAudit {
    /// When the audit started.
    checked_at: DateTime<Utc>,
    /// Empty when every check holds. At most 100 per check, then one saying how many more.
    violations: Vec<AuditViolation>,
}

/// One thing that does not add up.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditViolation {
    /// The check's stable name: `product_reserved_units`, `balance_ledger`,
    /// `coupon_issued_holders`, `order_paid_event`, `request_pending_overdue` or
    /// `order_reserved_overdue`.
    check: &'static str,
    /// What was found: the row's id and the two numbers that disagree.
    detail: String,
}

impl From<Audit> for ConsistencyAudit {
    fn from(audit: Audit) -> Self {
        Self {
            checked_at: audit.checked_at,
            violations: audit
                .violations
                .into_iter()
                .map(|v| AuditViolation {
                    check: v.check.name(),
                    detail: v.detail,
                })
                .collect(),
        }
    }
}

/// Checks the stored data against its invariants now and answers what does not add up:
/// each product's reserved units against its `RESERVED` orders, each balance against its
/// ledger, each coupon's issued count against its holders, one `order.paid` event per paid
/// order, and no request `PENDING` or order `RESERVED` long past its bound.
#[utoipa::path(
    post, path = "/admin/batch/consistency-audit/run", tag = "admin",
    security(("admin_token" = [])),
    responses(
        (status = 200, body = ConsistencyAudit),
        (status = 401, body = ErrorSchema, description = "ERR_UNAUTHORIZED"),
    )
)]
async fn run_consistency_audit(State(state): State<AppState>) -> Result<axum::Json<ConsistencyAudit>> {
    let audit = audit::run(&state.db, &state.config.audit_bounds).await?;
    for violation in &audit.violations {
        tracing::warn!(check = violation.check.name(), detail = %violation.detail, "consistency violation");
    }
    tracing::info!(
        violations = audit.violations.len(),
        "consistency audit run on demand"
    );
    Ok(axum::Json(ConsistencyAudit::from(audit)))
}
