//! What every handler can reach.

use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusHandle;
use shared::messaging::broker::Broker;
use sqlx::PgPool;

use crate::commands::backpressure::Backpressure;
use crate::commands::coupon_checks::{CouponChecks, SoldOut};
use crate::commands::idempotency::KeyAnswers;
use crate::commands::intake::Intake;
use crate::commands::order_checks::OrderChecks;
use crate::commands::queue_position::QueuePositions;
use crate::commands::relay::CommandRelay;
use crate::commands::waiting::Waiters;
use crate::config::ApiConfig;
use crate::http::auth::Authenticator;
use crate::http::limits::RateLimits;
use crate::http::shedding::ReadShedding;
use crate::routes::health::Readiness;

/// Extractors take the parts they need through `FromRef`, so that the modules defining
/// them need not know this struct (and it can hold their types without a cycle).
#[derive(Clone, axum::extract::FromRef)]
pub struct AppState {
    pub db: PgPool,
    pub broker: Arc<Broker>,
    /// Publishes the stored commands after their commit, in order, with confirms.
    pub relay: Arc<CommandRelay>,
    /// Writes accepted commands together (group commit).
    pub intake: Arc<Intake>,
    /// Coupons this replica has seen sold out: refused from memory from then on.
    pub sold_out: Arc<SoldOut>,
    /// Which command families are over their queue limit.
    pub backpressure: Arc<Backpressure>,
    pub config: Arc<ApiConfig>,
    /// Verifies bearer tokens (customers' and the admin's).
    pub auth: Arc<Authenticator>,
    /// The answers saved under command keys, read many per statement.
    pub key_answers: Arc<KeyAnswers>,
    /// The checks of coupon issues, read many per statement.
    pub coupon_checks: Arc<CouponChecks>,
    /// The checks of orders and payments, read many per statement.
    pub order_checks: Arc<OrderChecks>,
    /// Per-user and per-address rate limits.
    pub limits: Arc<RateLimits>,
    /// Clients waiting for their requests to settle.
    pub waiters: Arc<Waiters>,
    /// Where pending requests stand in their partitions' queues.
    pub queue_positions: Arc<QueuePositions>,
    /// The dependencies' last check, shared by `/health/ready`.
    pub readiness: Arc<Readiness>,
    /// Bounds the reads in flight.
    pub reads: Arc<ReadShedding>,
    /// Renders `/metrics`; the recorder behind it is process-wide.
    pub metrics: PrometheusHandle,
}
