//! The synchronous HTTP peer (the `peer` binary): what users would build instead of the
//! pipeline, built as well as we know how, so that the benchmark compares designs rather
//! than a strawman.
//!
//! It answers the three commands of the contract on the same paths and bodies (coupon
//! issue, order creation, order payment), each in one short PostgreSQL transaction, with
//! the final result in the answer: `200` with the body of a settled request (as our api
//! answers a command that waited and was settled in time), or the contract's own error code
//! and status. It writes the rows our workers write, so the same invariants can be checked
//! on its database.
//!
//! What makes it a fair peer:
//! - the api's pool size and PostgreSQL session settings, built by the same function
//!   ([`shared::store::db::connect_and_migrate`] with [`api::config::DEFAULT_POOL`] and the same
//!   `DATABASE_*` variables);
//! - conditional updates instead of read-then-write, rows locked in id order, one statement
//!   where one statement can do the work (coupon issue and order creation are one
//!   autocommit statement each; a payment is a locking read and one write);
//! - a coupon seen sold out is refused from memory, as our api does.
//!
//! What it leaves out, to its advantage: it verifies no bearer token (it trusts the
//! `userId` of the body), stores no `Idempotency-Key`, applies no rate limit and no cap on
//! unpaid orders. Setup, administration and reads stay with the api, on the same database.
//!
//! # Layout
//! - this module: the command line, the server, its state, health and the routes' fallbacks.
//! - [`coupons`]: `POST /coupons/{couponId}/issue`.
//! - [`orders`]: `POST /orders` and `POST /orders/{orderId}/payment`.

pub mod coupons;
pub mod orders;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context;
use api::error::ApiError;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use clap::Parser;
use serde::Serialize;
use shared::config::{var, DatabaseSettings, TelemetrySettings};
use shared::domain::command::{RequestKind, RequestStatus};
use shared::domain::error::ErrorCode;
use sqlx::PgPool;
use tokio::net::TcpListener;
use uuid::Uuid;

/// The command line of `peer`.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "peer",
    version,
    about = "The synchronous HTTP peer: an axum + sqlx server that settles coupon issues, order \
             creations and payments each in one short transaction and answers the final result \
             (drive it with `loadgen flash-sale`/`checkout --commands-url`)"
)]
pub struct Args {
    /// Where to listen.
    #[arg(long, default_value = "127.0.0.1:8090")]
    pub listen: SocketAddr,
    /// The database, migrated at start as every binary of the project does. The pool size
    /// and session settings are the api's (`DATABASE_MAX_CONNECTIONS`, default 30,
    /// `DATABASE_STATEMENT_TIMEOUT_MS`, `DATABASE_IDLE_IN_TRANSACTION_TIMEOUT_MS`).
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:15432/ecommerce"
    )]
    pub database_url: String,
}

/// The api's default body limit (`MAX_BODY_BYTES`): the peer reads bodies no larger.
const MAX_BODY_BYTES: usize = 64 * 1024;

/// What every handler shares.
#[derive(Clone)]
pub struct Peer {
    db: PgPool,
    /// How long an order's stock stays reserved: the worker's `RESERVATION_TTL_SECS`.
    reservation_ttl: Duration,
    /// Coupons seen sold out: a coupon never becomes available again, so asking PostgreSQL
    /// would only queue one more request behind its hot row.
    sold_out: Arc<Mutex<HashSet<i64>>>,
}

impl Peer {
    pub fn new(db: PgPool, reservation_ttl: Duration) -> Self {
        Self {
            db,
            reservation_ttl,
            sold_out: Arc::default(),
        }
    }

    fn known_sold_out(&self, coupon: i64) -> bool {
        self.sold_out
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&coupon)
    }

    fn note_sold_out(&self, coupon: i64) {
        self.sold_out
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(coupon);
    }
}

/// The peer's routes: the three commands, health, and the contract's answers to unknown
/// routes and wrong methods.
pub fn router(peer: Peer) -> Router {
    Router::new()
        .route("/coupons/{coupon_id}/issue", post(coupons::issue_coupon))
        .route("/orders", post(orders::create_order))
        .route("/orders/{order_id}/payment", post(orders::pay_order))
        .route("/health/live", get(|| async { StatusCode::OK }))
        .route("/health/ready", get(ready))
        .fallback(|| async { ApiError::new(ErrorCode::NotFound, "no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                ErrorCode::MethodNotAllowed,
                "this route does not accept this method",
            )
        })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(peer)
}

async fn ready(State(peer): State<Peer>) -> Response {
    match sqlx::query("SELECT 1").execute(&peer.db).await {
        Ok(_) => StatusCode::OK.into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// The answer to a command: the request as our api shows a settled one (`GET
/// /requests/{id}`, or a command that waited), so a client reads both the same way. The
/// `requestId` names this HTTP request in the rows it wrote (`request_id`,
/// `create_request_id`); the peer keeps no request rows.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Settled {
    request_id: Uuid,
    #[serde(rename = "type")]
    kind: RequestKind,
    status: RequestStatus,
    /// Order creation only, as in our api's answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    order_id: Option<Uuid>,
    created_at: DateTime<Utc>,
    completed_at: DateTime<Utc>,
    result: serde_json::Value,
}

impl Settled {
    fn succeeded(
        request_id: Uuid,
        kind: RequestKind,
        created_at: DateTime<Utc>,
        result: serde_json::Value,
    ) -> Self {
        Self {
            request_id,
            kind,
            status: RequestStatus::Succeeded,
            order_id: None,
            created_at,
            completed_at: Utc::now(),
            result,
        }
    }
}

impl IntoResponse for Settled {
    fn into_response(self) -> Response {
        (StatusCode::OK, Json(self)).into_response()
    }
}

/// A deadlock PostgreSQL broke (`40P01`): the contract's concurrency conflict, not a 500.
/// Rows are locked in one order everywhere here, so it is not expected.
fn concurrency_conflict(error: sqlx::Error, code: ErrorCode) -> ApiError {
    match &error {
        sqlx::Error::Database(db) if db.code().as_deref() == Some("40P01") => {
            ApiError::new(code, "a concurrent request changed the same rows; try again")
        }
        _ => ApiError::from(error),
    }
}

/// The database settings of the peer: the api's (`DATABASE_*`, a pool of
/// [`api::config::DEFAULT_POOL`] unless `DATABASE_MAX_CONNECTIONS` says), at `url` if given.
pub fn database_settings(url: Option<&str>) -> anyhow::Result<DatabaseSettings> {
    let mut settings = DatabaseSettings::from_env_with_pool(api::config::DEFAULT_POOL)?;
    if let Some(url) = url {
        url.clone_into(&mut settings.url);
    }
    Ok(settings)
}

/// The reservation time of the worker (`RESERVATION_TTL_SECS`, 10 minutes by default).
pub fn reservation_ttl() -> anyhow::Result<Duration> {
    Ok(Duration::from_secs(var("RESERVATION_TTL_SECS", 600)?))
}

/// A peer bound to its address, ready to serve.
pub struct PeerServer {
    listener: TcpListener,
    peer: Peer,
}

impl PeerServer {
    /// Connects to PostgreSQL (migrating, as every binary of the project does at start)
    /// and binds `listen` (port 0 picks a free port).
    pub async fn build(
        listen: SocketAddr,
        settings: &DatabaseSettings,
        reservation_ttl: Duration,
    ) -> anyhow::Result<Self> {
        let db = shared::store::db::connect_and_migrate(settings, "peer").await?;
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        Ok(Self {
            listener,
            peer: Peer::new(db, reservation_ttl),
        })
    }

    pub fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.listener.local_addr()?)
    }

    pub fn db(&self) -> &PgPool {
        &self.peer.db
    }

    /// Serves until `shutdown` resolves, then lets requests in flight finish.
    pub async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let db = self.peer.db.clone();
        // As the api does: small answers go out at once instead of waiting on Nagle.
        let listener = self.listener.tap_io(|tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "cannot set TCP_NODELAY");
            }
        });
        axum::serve(listener, router(self.peer))
            .with_graceful_shutdown(shutdown)
            .await
            .context("the peer's server failed")?;
        db.close().await;
        Ok(())
    }
}

/// `peer`: serves until SIGTERM or Ctrl-C.
pub async fn run(args: &Args) -> anyhow::Result<()> {
    shared::telemetry::init(TelemetrySettings::from_env()?);
    let settings = database_settings(Some(&args.database_url))?;
    let server = PeerServer::build(args.listen, &settings, reservation_ttl()?).await?;
    tracing::info!(
        addr = %server.local_addr()?,
        pool = settings.max_connections,
        statement_timeout_ms = settings.statement_timeout_ms,
        "synchronous peer listening"
    );
    server.run(shared::shutdown::signal()).await
}
