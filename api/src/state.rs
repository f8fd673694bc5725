//! What every handler can reach.

use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusHandle;
use shared::broker::Broker;
use sqlx::PgPool;

use crate::backpressure::Backpressure;
use crate::commands::Dispatcher;
use crate::config::ApiConfig;

#[derive(Clone)]
pub struct AppState {
    pub db: PgPool,
    pub broker: Arc<Broker>,
    /// Publishes commands with confirms.
    pub commands: Arc<Dispatcher>,
    /// Which command families are over their queue limit.
    pub backpressure: Arc<Backpressure>,
    pub config: Arc<ApiConfig>,
    /// Renders `/metrics`; the recorder behind it is process-wide.
    pub metrics: PrometheusHandle,
}
