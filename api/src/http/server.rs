//! The HTTP server: hyper's HTTP/1 connection with timeouts, so that no client holds a
//! connection for longer than it takes to send a request promptly.
//!
//! `axum::serve` has no header-read timeout, which is what a slowloris client exploits
//! (headers sent a byte at a time, never finished). Here every connection has:
//! - hyper's header-read timer, from the connection's start or the end of the previous
//!   answer to the end of the next request's headers: a client that sends its headers too
//!   slowly, or keeps an idle connection open longer, is disconnected;
//! - [`within_deadlines`]: the body must arrive within its own deadline, else `408
//!   ERR_REQUEST_TIMEOUT` and the connection is closed; and the work done for one request
//!   is bounded, past which the answer is `503 ERR_UNAVAILABLE` (a dependency that hangs
//!   must not pile requests up).
//!
//! Before hyper sees a connection, [`crate::http::connections`] admits it within the per-client
//! and total bounds (or closes it at once), turns on TCP keepalive, and bounds how long an
//! answer may make no progress.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use shared::domain::error::ErrorCode;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::config::HttpTimeouts;
use crate::error::ApiError;
use crate::http::connections::{self, ConnectionGate, WriteDeadline};
use crate::http::limits::{per_network, RateLimits};

/// Who may connect: the bounds, and the limits that know the trusted proxies.
pub struct Admittance {
    pub gate: Arc<ConnectionGate>,
    pub limits: Arc<RateLimits>,
    /// TCP keepalive's idle time (zero: off).
    pub keepalive: Duration,
}

/// How long shutdown waits for connections to finish their request in flight.
const DRAIN_PATIENCE: Duration = Duration::from_secs(10);

/// Serves `router` on `listener` until `shutdown`, then lets requests in flight finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    timeouts: HttpTimeouts,
    admittance: Admittance,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(timeouts.header)
        .keep_alive(true);
    let graceful = GracefulShutdown::new();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, or a connection reset before it was
                    // accepted: neither is fatal, and retrying at once would spin.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        // A trusted proxy carries many clients: it counts only in the total.
        let client = (!admittance.limits.is_trusted_proxy(peer.ip())).then(|| per_network(peer.ip()));
        let admission = match admittance.gate.admit(client) {
            Ok(admission) => admission,
            Err(refusal) => {
                // Closed at once: a crowd of sockets from one address costs a descriptor
                // for a moment, never a slot that others need.
                metrics::counter!("api_connections_refused_total", "reason" => refusal.as_str()).increment(1);
                drop(stream);
                continue;
            }
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        connections::keep_alive(&stream, admittance.keepalive);
        let router = router.clone();
        let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
            // What `into_make_service_with_connect_info` would do: the peer address, for
            // the per-client limits.
            request.extensions_mut().insert(ConnectInfo(peer));
            router.clone().oneshot(request.map(Body::new))
        });
        let io = TokioIo::new(WriteDeadline::new(stream, timeouts.write));
        let connection = graceful.watch(http.serve_connection(io, service));
        tokio::spawn(async move {
            // The connection's place is given back when it ends, however it ends.
            let _admission = admission;
            if let Err(e) = connection.await {
                // Timeouts and clients that go away: their business, logged for debugging.
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_PATIENCE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            "some connections were still busy after {DRAIN_PATIENCE:?}; stopping without waiting for them"
        );
    }
    Ok(())
}

/// Binds `addr`, naming it in the error.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))
}

/// The deadlines of one request, as one middleware (one timer each, no extra layer):
/// the whole body (at most `max_body_bytes`) must arrive within the body timeout, before
/// any handler runs, else `408 ERR_REQUEST_TIMEOUT` (`413 ERR_PAYLOAD_TOO_LARGE` when it is
/// too long); then the handler has the handler timeout, else `503 ERR_UNAVAILABLE`. Bodies
/// here are small JSON objects, so holding one in memory costs nothing that the JSON
/// extractor would not spend anyway.
pub async fn within_deadlines(
    State((timeouts, max_body_bytes)): State<(HttpTimeouts, usize)>,
    request: Request,
    next: Next,
) -> Response {
    let (parts, body) = request.into_parts();
    let read = tokio::time::timeout(timeouts.body, axum::body::to_bytes(body, max_body_bytes)).await;
    let bytes = match read {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(e)) => {
            let too_large = std::error::Error::source(&e)
                .is_some_and(|cause| cause.is::<http_body_util::LengthLimitError>());
            return if too_large {
                ApiError::new(ErrorCode::PayloadTooLarge, "the body is too large").into_response()
            } else {
                // The client went away or sent a malformed chunked body.
                ApiError::new(ErrorCode::InvalidRequest, "the body could not be read").into_response()
            };
        }
        Err(_) => {
            let mut response =
                ApiError::new(ErrorCode::RequestTimeout, "the request body was not sent in time")
                    .into_response();
            // The rest of the body may still be on its way: the connection cannot be reused.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return response;
        }
    };
    let request = Request::from_parts(parts, Body::from(bytes));
    match tokio::time::timeout(timeouts.handler, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::Unavailable(anyhow::anyhow!(
            "the request took longer than {:?}",
            timeouts.handler
        ))
        .into_response(),
    }
}
