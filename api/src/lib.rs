//! The HTTP API of the e-commerce order pipeline.
//!
//! Synchronous reads and writes (users, balances, products, administration) are answered
//! in the request; coupon and order commands are made durable, put on RabbitMQ and answered
//! `202 Accepted` with a status URL.
//!
//! # Layout
//! - [`routes`]: one module per part of the contract, each with its `router()`, merged
//!   here by [`router`]; `/openapi.json` and `/docs` among them.
//! - [`commands`]: the command path: a coupon or order command checked, stored as a
//!   `PENDING` request (the one durable write), answered `202`, published by the relay;
//!   then what a client learns of it until it settles (status, place in queue, waiting).
//! - [`http`]: HTTP plumbing every route relies on: the server and its timeouts, connection
//!   bounds, who is calling, rate limits, load shedding, extractors, pages, metrics.
//! - [`config`]: the api's settings; [`state`]: what every handler can reach.
//! - [`error`]: the API's error type, the contract's error answers.
//! - [`batched`]: reads that concurrent requests share, many per statement.
//!
//! Routes call into the command path and the plumbing; the command path and the plumbing
//! never reach a route's handlers (they share only the OpenAPI schemas of
//! [`routes::openapi`]).

pub mod batched;
pub mod commands;
pub mod config;
pub mod error;
pub mod http;
pub mod routes;
pub mod state;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::extract::DefaultBodyLimit;
use axum::http::{Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use shared::domain::error::{ErrorBody, ErrorCode};
use shared::messaging::broker::Broker;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::TraceLayer;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;

pub use config::ApiConfig;
pub use state::AppState;

use crate::commands::backpressure::Backpressure;
use crate::commands::intake::Intake;
use crate::commands::order_checks::OrderChecks;
use crate::commands::relay::{CommandRelay, RelayTasks};
use crate::commands::{coupon_checks, idempotency, queue_position, waiting};
use crate::error::ApiError;
use crate::http::auth::Authenticator;
use crate::http::limits::RateLimits;
use crate::http::{connections, observability, server, shedding};
use crate::routes::{
    admin, balance, coupons, docs, health, openapi, orders, popular, products, request_stream, requests,
    tokens, users,
};

/// A built API bound to its address, ready to serve.
pub struct Application {
    listener: TcpListener,
    /// Where `/metrics` is served, apart from the public address.
    metrics_listener: TcpListener,
    router: Router,
    state: AppState,
    /// Publishes stored commands and heartbeats; drained at shutdown.
    relaying: RelayTasks,
    /// Samples the command queues for backpressure; stopped at shutdown.
    sampler: (CancellationToken, tokio::task::JoinHandle<()>),
    /// Forgets idle rate-limit keys; stopped at shutdown.
    forgetter: tokio::task::JoinHandle<()>,
    /// Listens for settled requests (it holds a connection); stopped at shutdown.
    listening: tokio::task::JoinHandle<()>,
    /// Writes when tokens were last used, once a minute; stopped (after a last write) at
    /// shutdown.
    recording_uses: tokio::task::JoinHandle<()>,
    /// Admits connections within the per-client and total bounds.
    gate: Arc<connections::ConnectionGate>,
}

impl Application {
    /// Connects to PostgreSQL (migrating it), prepares RabbitMQ and binds the listener.
    /// RabbitMQ may be down at this point: the API starts anyway and reports not ready.
    pub async fn build(config: ApiConfig) -> anyhow::Result<Self> {
        config.check_admin_token()?;
        // Before anything opens a descriptor: the bounds below are chosen from the result.
        let open_files = connections::raise_open_files_limit().map(|(soft, _hard)| soft);
        let max_connections = config.connections.total_for(open_files);
        tracing::info!(
            max_connections,
            max_per_client = config.connections.max_per_client,
            "connection bounds"
        );
        let gate = connections::ConnectionGate::new(max_connections, config.connections.max_per_client);
        let db = shared::store::db::connect_and_migrate(&config.database, "api").await?;
        let broker = Arc::new(Broker::new(&config.broker, "api"));
        let (relay, relaying) = CommandRelay::start(
            Arc::clone(&broker),
            config.topology.clone(),
            db.clone(),
            &instance_name(),
        )
        .await
        .context("cannot register this api in api_instances")?;
        if let Err(e) = relay.declare_topology().await {
            tracing::warn!(
                error = format!("{e:#}"),
                "cannot declare the command topology: RabbitMQ is not reachable yet (commands \
                 are accepted and published once it is), or it holds these queues with other \
                 arguments"
            );
        }
        let listener = server::bind(config.http_addr).await?;
        let metrics_listener = server::bind(config.metrics_addr).await?;
        if config.development_mode {
            tracing::warn!(
                "DEVELOPMENT_MODE is on: a weak admin token is accepted; never run so in production"
            );
        }
        tracing::info!(
            pool = config.database.max_connections,
            "PostgreSQL pool of this process"
        );
        let backpressure = Arc::new(Backpressure::default());
        let sampler_stop = CancellationToken::new();
        let sampler = backpressure.start(
            Arc::clone(&broker),
            config.topology.clone(),
            config.command_queue_limit,
            config.command_queue_sample,
            sampler_stop.clone(),
        );
        observability::set_access_log(config.access_log);
        #[cfg(unix)]
        if let Err(e) = observability::toggle_access_log_on_sigusr1(sampler_stop.clone()) {
            tracing::warn!(error = %e, "cannot listen for SIGUSR1; the access log stays as configured");
        }
        let limits = Arc::new(RateLimits::new(&config.limits));
        let forgetter = limits.start_forgetting(sampler_stop.clone());
        let (waiters, listening) = waiting::Waiters::start(
            db.clone(),
            config.request_wait_poll,
            config.max_waits_per_user,
            sampler_stop.clone(),
        );
        let auth = Arc::new(Authenticator::new(
            db.clone(),
            config.token_cache_ttl,
            Arc::clone(&limits),
            &config.admin_token,
        ));
        let recording_uses = auth.record_uses(config.tokens.record_uses_every, sampler_stop.clone());
        let queue_positions = Arc::new(queue_position::QueuePositions::new(
            db.clone(),
            config.topology.partitions,
        ));
        let (intake, _writing) = Intake::start(
            db.clone(),
            config.intake,
            Arc::clone(&relay),
            Arc::clone(&queue_positions),
        );
        let key_answers = Arc::new(idempotency::KeyAnswers::start(
            db.clone(),
            Arc::clone(&queue_positions),
        ));
        let coupon_checks = Arc::new(coupon_checks::CouponChecks::start(db.clone()));
        let order_checks = Arc::new(OrderChecks::start(db.clone()));
        let readiness = Arc::new(health::Readiness::new(db.clone(), Arc::clone(&broker)));
        let config_reads = config.max_reads_in_flight();
        let state = AppState {
            db,
            broker,
            relay,
            intake,
            sold_out: Arc::default(),
            backpressure,
            config: Arc::new(config),
            auth,
            key_answers,
            coupon_checks,
            order_checks,
            limits,
            waiters,
            queue_positions,
            readiness,
            reads: Arc::new(shedding::ReadShedding::new(config_reads)),
            metrics: shared::telemetry::metrics_recorder()?,
        };
        let router = router(state.clone());
        Ok(Self {
            listener,
            metrics_listener,
            router,
            state,
            relaying,
            sampler: (sampler_stop, sampler),
            forgetter,
            listening,
            recording_uses,
            gate,
        })
    }

    pub fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.listener.local_addr()?)
    }

    /// Where `/metrics` is served.
    pub fn metrics_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.metrics_listener.local_addr()?)
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` fires, then lets in-flight requests finish.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        tracing::info!(addr = %self.local_addr()?, metrics = %self.metrics_addr()?, "api ready");
        let Self {
            listener,
            metrics_listener,
            router,
            state,
            relaying,
            sampler: (sampler_stop, sampler),
            forgetter,
            listening,
            recording_uses,
            gate,
        } = self;
        // Clients waiting for their requests get their answer (202, or PENDING) as soon as
        // shutdown starts, rather than be cut off when the server stops waiting for them.
        let closing = {
            let (waiters, shutdown) = (Arc::clone(&state.waiters), shutdown.clone());
            tokio::spawn(async move {
                shutdown.cancelled().await;
                waiters.close();
            })
        };
        let metrics = tokio::spawn(shared::telemetry::serve_metrics(
            metrics_listener,
            state.metrics.clone(),
            shutdown.clone(),
        ));
        let admittance = server::Admittance {
            gate: Arc::clone(&gate),
            limits: Arc::clone(&state.limits),
            keepalive: state.config.connections.keepalive,
        };
        server::serve(listener, router, state.config.http, admittance, shutdown)
            .await
            .context("the HTTP server failed")?;
        closing.abort();
        sampler_stop.cancel();
        let _ = sampler.await;
        let _ = forgetter.await;
        // Its connection goes back to the pool before the pool closes.
        let _ = listening.await;
        let _ = recording_uses.await;
        let _ = metrics.await;
        // The server has finished every request: nothing is accepted any more. The relay
        // publishes what it still holds, then leaves.
        relaying.stop().await;
        let broker = Arc::clone(&state.broker);
        let db = state.db.clone();
        drop(state);
        broker.close().await;
        db.close().await;
        tracing::info!("api stopped");
        Ok(())
    }
}

/// This process in `api_instances`: `API_NAME`, else the host and the process id (the host
/// tells containers apart, where every process id is 1).
fn instance_name() -> String {
    std::env::var("API_NAME").unwrap_or_else(|_| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_default();
        format!("api-{host}-{}", std::process::id())
    })
}

/// The whole API: every route of the contract, `/openapi.json` and `/docs`, and the layers
/// that give every answer, including errors of routing, the contract's shape.
pub fn router(state: AppState) -> Router {
    let (routes, mut api) = OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .merge(users::router())
        .merge(tokens::router())
        .merge(balance::router())
        .merge(popular::router())
        .merge(products::router())
        .merge(coupons::router())
        .merge(orders::router())
        .merge(requests::router())
        .merge(request_stream::router())
        .merge(admin::router(state.clone()))
        .merge(health::router())
        .split_for_parts();
    openapi::document_shared_errors(&mut api);
    let mut document = serde_json::to_value(&api).unwrap_or_else(|e| {
        tracing::error!(error = %e, "cannot render the OpenAPI document");
        serde_json::Value::Null
    });
    openapi::link_operations(&mut document);
    openapi::document_command_headers(&mut document);
    openapi::document_auth_headers(&mut document);
    openapi::document_replay_header(&mut document);
    let document = Arc::new(document);

    routes
        .route(
            "/openapi.json",
            axum::routing::get(move || {
                let document = Arc::clone(&document);
                async move { Json(document.as_ref().clone()) }
            }),
        )
        // Not in the document, like /openapi.json itself.
        .merge(docs::router())
        .fallback(unknown_route)
        .method_not_allowed_fallback(wrong_method)
        .with_state(state.clone())
        .layer(axum::middleware::from_fn_with_state(
            (state.config.http, state.config.max_body_bytes),
            server::within_deadlines,
        ))
        // Outside the deadlines (a shed read costs no timer) and inside the request metrics,
        // which count its 503.
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state.reads),
            shedding::shed_reads,
        ))
        .layer(axum::middleware::from_fn(observability::track_requests))
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
        .layer(TraceLayer::new_for_http().make_span_with(|request: &Request<_>| {
            let route = request
                .extensions()
                .get::<axum::extract::MatchedPath>()
                .map(|p| p.as_str().to_owned());
            tracing::info_span!("http", method = %request.method(), path = %request.uri().path(), route)
        }))
        .layer(CatchPanicLayer::custom(|_| panic_response()))
}

async fn unknown_route() -> ApiError {
    ApiError::new(ErrorCode::NotFound, "no such route")
}

async fn wrong_method() -> ApiError {
    ApiError::new(
        ErrorCode::MethodNotAllowed,
        "this route does not accept this method",
    )
}

/// A panic is a bug: log it (the layer does) and answer like any other internal error.
fn panic_response() -> Response {
    tracing::error!("a handler panicked");
    let body = ErrorBody::new(ErrorCode::Internal, "internal error");
    (StatusCode::INTERNAL_SERVER_ERROR, Json(body)).into_response()
}
