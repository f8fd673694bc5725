//! Liveness and readiness, for orchestrators and load balancers.
//!
//! Readiness is answered from a result at most [`READINESS_FRESH_FOR`] old: load balancers
//! and a crowd can ask as often as they like, and PostgreSQL and RabbitMQ are still asked
//! at most once a second per process (one check at a time; callers meanwhile share it).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{FromRef, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use shared::domain::error::ErrorCode;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use shared::messaging::broker::Broker;
use sqlx::PgPool;

use crate::error::RETRY_AFTER_UNAVAILABLE;

/// A dependency that takes longer than this to answer counts as down (long enough for the
/// broker connection's own retry).
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// How old a readiness answer may be.
pub const READINESS_FRESH_FOR: Duration = Duration::from_secs(1);

pub fn router<S>() -> OpenApiRouter<S>
where
    S: Clone + Send + Sync + 'static,
    Arc<Readiness>: FromRef<S>,
{
    OpenApiRouter::new().routes(routes!(live)).routes(routes!(ready))
}

/// The last check of the dependencies, and how to check them again.
pub struct Readiness {
    db: PgPool,
    broker: Arc<Broker>,
    /// `(when, postgres, rabbitmq)` of the last check. An async lock: whoever finds it
    /// stale checks while the others wait for that answer rather than check too.
    last: tokio::sync::Mutex<Option<(Instant, bool, bool)>>,
}

impl Readiness {
    pub fn new(db: PgPool, broker: Arc<Broker>) -> Self {
        Self {
            db,
            broker,
            last: tokio::sync::Mutex::new(None),
        }
    }

    /// Whether PostgreSQL and RabbitMQ answer, as checked at most a second ago.
    async fn check(&self) -> (bool, bool) {
        let mut last = self.last.lock().await;
        if let Some((at, postgres, rabbitmq)) = *last {
            if at.elapsed() < READINESS_FRESH_FOR {
                return (postgres, rabbitmq);
            }
        }
        let postgres = async {
            // Fetched, not executed (a macro's query that returns rows has no `execute`);
            // the row is not read.
            tokio::time::timeout(CHECK_TIMEOUT, sqlx::query_scalar!("SELECT 1").fetch_all(&self.db))
                .await
                .is_ok_and(|r| r.is_ok())
        };
        let rabbitmq = async {
            tokio::time::timeout(CHECK_TIMEOUT, self.broker.is_reachable())
                .await
                .unwrap_or(false)
        };
        let (postgres, rabbitmq) = tokio::join!(postgres, rabbitmq);
        metrics::counter!("api_readiness_checks_total").increment(1);
        // Fresh from when the answers came: a slow check is not outdated at once.
        *last = Some((Instant::now(), postgres, rabbitmq));
        (postgres, rabbitmq)
    }
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

/// 200 when PostgreSQL answers, else 503, as checked at most a second ago; the body names
/// RabbitMQ's state too.
#[utoipa::path(
    get, path = "/health/ready", tag = "operations",
    responses(
        (status = 200, body = Health),
        (status = 503, body = Health, headers(("Retry-After" = u32, description = "seconds to wait before asking again"))),
    )
)]
async fn ready(State(readiness): State<Arc<Readiness>>) -> Response {
    let (postgres, rabbitmq) = readiness.check().await;
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
