//! Request metrics and the access log. `/metrics` itself is served on the API's metrics
//! address (`API_METRICS_ADDR`, by `shared::telemetry::serve_metrics`), never on the public
//! one.
//!
//! The access log (one `info` line per request, target `access`) is off unless
//! `ACCESS_LOG=true`, and SIGUSR1 switches it on or off while the api runs: an operator
//! chasing a problem turns it on for a minute without a restart, and a flash sale does not
//! pay for a line per request otherwise.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;

/// Whether each request is logged (process-wide, as the signal that switches it is).
static ACCESS_LOG: AtomicBool = AtomicBool::new(false);

/// Switches the access log on or off.
pub fn set_access_log(on: bool) {
    ACCESS_LOG.store(on, Ordering::Relaxed);
}

/// Switches the access log on and off at each SIGUSR1, until `stop`.
#[cfg(unix)]
pub fn toggle_access_log_on_sigusr1(stop: tokio_util::sync::CancellationToken) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut signals = signal(SignalKind::user_defined1())?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                received = signals.recv() => if received.is_none() { return },
                () = stop.cancelled() => return,
            }
            let on = !ACCESS_LOG.fetch_xor(true, Ordering::Relaxed);
            tracing::info!(on, "access log switched by SIGUSR1");
        }
    });
    Ok(())
}

/// Counts every request and records its latency, labelled by method, matched route and
/// status; logs it when the access log is on.
pub async fn track_requests(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = method_label(request.method());
    let logged = ACCESS_LOG
        .load(Ordering::Relaxed)
        .then(|| request.uri().path().to_owned());
    // The route template, not the raw path, so that ids do not explode the label space.
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    let labels = [
        ("method", method.to_owned()),
        ("route", route),
        ("status", status),
    ];
    metrics::counter!("http_requests_total", &labels).increment(1);
    let elapsed = started.elapsed();
    metrics::histogram!("http_request_duration_seconds", &labels).record(elapsed.as_secs_f64());
    if let Some(path) = logged {
        // The path only: queries and headers (tokens) stay out of logs.
        let [(_, method), (_, route), (_, status)] = labels;
        let ms = format!("{:.1}", elapsed.as_secs_f64() * 1e3);
        tracing::info!(target: "access", %method, %path, %route, %status, %ms, "request");
    }
    response
}

/// The `method` label: the standard methods, and `OTHER` for any other, so that no client
/// can grow the metric set by inventing methods.
fn method_label(method: &Method) -> &'static str {
    const STANDARD: [Method; 9] = [
        Method::GET,
        Method::HEAD,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::CONNECT,
        Method::OPTIONS,
        Method::TRACE,
        Method::PATCH,
    ];
    STANDARD
        .iter()
        .find(|m| *m == method)
        .map_or("OTHER", Method::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invented_methods_share_one_label() {
        assert_eq!(method_label(&Method::POST), "POST");
        assert_eq!(method_label(&Method::PATCH), "PATCH");
        let invented = Method::from_bytes(b"BREW").ok();
        assert_eq!(invented.as_ref().map(method_label), Some("OTHER"));
    }
}
