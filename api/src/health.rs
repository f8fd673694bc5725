//! Liveness and readiness, for orchestrators and load balancers.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::AppState;

/// A dependency that takes longer than this to answer counts as down (long enough for the
/// broker connection's own retry).
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(live)).routes(routes!(ready))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `UP` or `DOWN`.
    status: &'static str,
    postgres: &'static str,
    rabbitmq: &'static str,
}

fn up(ok: bool) -> &'static str {
    if ok {
        "UP"
    } else {
        "DOWN"
    }
}

/// 200 while the process runs.
#[utoipa::path(get, path = "/health/live", tag = "operations", responses((status = 200)))]
async fn live() -> StatusCode {
    StatusCode::OK
}

/// 200 when PostgreSQL and RabbitMQ answer, else 503.
#[utoipa::path(
    get, path = "/health/ready", tag = "operations",
    responses((status = 200, body = Health), (status = 503, body = Health))
)]
async fn ready(State(state): State<AppState>) -> (StatusCode, axum::Json<Health>) {
    let postgres = async {
        tokio::time::timeout(CHECK_TIMEOUT, sqlx::query("SELECT 1").execute(&state.db))
            .await
            .is_ok_and(|r| r.is_ok())
    };
    let rabbitmq = async {
        tokio::time::timeout(CHECK_TIMEOUT, state.broker.is_reachable())
            .await
            .unwrap_or(false)
    };
    let (postgres, rabbitmq) = tokio::join!(postgres, rabbitmq);
    let status = if postgres && rabbitmq {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = Health {
        status: up(postgres && rabbitmq),
        postgres: up(postgres),
        rabbitmq: up(rabbitmq),
    };
    (status, axum::Json(body))
}
