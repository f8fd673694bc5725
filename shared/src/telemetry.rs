//! Tracing and the Prometheus recorder, shared by the binaries.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::{fmt, EnvFilter};

use crate::config::TelemetrySettings;

/// The filter used when `RUST_LOG` is unset: our crates at `info`, chatty dependencies quieter.
const DEFAULT_FILTER: &str = "info,sqlx=warn,lapin=warn,amq_protocol=warn,tower_http=info";

/// Installs the global subscriber. Call once, first thing in `main`.
pub fn init(settings: TelemetrySettings) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    // Colours only on a terminal, so that log files stay plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let builder = fmt().with_env_filter(filter).with_target(true).with_ansi(ansi);
    // `try_init` so that a second call (several apps in one test process) is harmless.
    let _ = if settings.json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
}

/// Latency buckets in seconds: fine-grained below 100 ms, where a healthy system lives.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Sizes of settled batches.
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0];

/// The process-wide metrics recorder, rendered by each binary's `/metrics`. Installed once:
/// tests start several apps in one process.
pub fn metrics_recorder() -> anyhow::Result<PrometheusHandle> {
    // Initialised at most once, even when several threads ask at the same moment.
    static HANDLE: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), LATENCY_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Suffix("_batch_size".to_owned()), BATCH_BUCKETS)
                })
                .and_then(|b| b.install_recorder())
                // Every process describes every metric: a name it never emits renders nothing.
                .inspect(|_| crate::metric_help::describe_metrics())
                .map_err(|e| e.to_string())
        })
        .clone()
        .map_err(|e| anyhow::anyhow!("cannot install the metrics recorder: {e}"))
}

/// Serves `/metrics` (Prometheus text) and `/health/live` on a process's own port until
/// `shutdown`: the worker's and the batch's operations endpoints (the API has its own router).
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    metrics: PrometheusHandle,
    shutdown: tokio_util::sync::CancellationToken,
) {
    use axum::http::header;
    use axum::routing::get;

    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                async move {
                    (
                        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                        metrics.render(),
                    )
                }
            }),
        )
        .route("/health/live", get(|| async { "OK" }));
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    {
        tracing::error!(error = %e, "the metrics server failed");
    }
}
