//! Liveness and readiness, for orchestrators and load balancers.

use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use shared::domain::error::ErrorCode;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::RETRY_AFTER_UNAVAILABLE;
use crate::AppState;

/// A dependency that takes longer than this to answer counts as down (long enough for the
/// broker connection's own retry).
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(live)).routes(routes!(ready))
}

/// What `/health/ready` answers: ready while PostgreSQL answers, because a command is
/// accepted once stored there; RabbitMQ's state is shown beside it (while it is down,
/// commands wait in PostgreSQL and are published when it is back). While not ready the
/// answer is also the contract's error body (`ERR_UNAVAILABLE`, with `Retry-After`).
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `UP` or `DOWN`.
    status: &'static str,
    postgres: &'static str,
    rabbitmq: &'static str,
    /// `ERR_UNAVAILABLE`, while a dependency is down.
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<&'static str>,
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

/// 200 when PostgreSQL answers, else 503; the body names RabbitMQ's state too.
#[utoipa::path(
    get, path = "/health/ready", tag = "operations",
    responses(
        (status = 200, body = Health),
        (status = 503, body = Health, headers(("Retry-After" = u32, description = "seconds to wait before asking again"))),
    )
)]
async fn ready(State(state): State<AppState>) -> Response {
    let postgres = async {
        // Fetched, not executed (a macro's query that returns rows has no `execute`); the
        // row is not read.
        tokio::time::timeout(
            CHECK_TIMEOUT,
            sqlx::query_scalar!("SELECT 1").fetch_all(&state.db),
        )
        .await
        .is_ok_and(|r| r.is_ok())
    };
    let rabbitmq = async {
        tokio::time::timeout(CHECK_TIMEOUT, state.broker.is_reachable())
            .await
            .unwrap_or(false)
    };
    let (postgres, rabbitmq) = tokio::join!(postgres, rabbitmq);
    let ready = postgres;
    let body = Health {
        status: up(ready),
        postgres: up(postgres),
        rabbitmq: up(rabbitmq),
        code: (!ready).then_some(ErrorCode::Unavailable.as_str()),
        message: (!ready).then_some("PostgreSQL cannot be reached"),
    };
    if ready {
        return (StatusCode::OK, axum::Json(body)).into_response();
    }
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(
            header::RETRY_AFTER,
            HeaderValue::from_static(RETRY_AFTER_UNAVAILABLE),
        )],
        axum::Json(body),
    )
        .into_response()
}
