//! HTTP endpoints: `/healthz` (200 while the process runs) and `/readyz` (200 when ready,
//! else 503 with the reasons, one per line) on the readiness port; `/metrics` (Prometheus
//! text) on the monitoring port.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::metrics::Metrics;
use crate::readiness::Readiness;

/// Serves `/healthz` and `/readyz` on `listener` until the task is dropped.
///
/// Errors: the I/O error that stopped the server.
pub async fn serve_readiness(
    listener: tokio::net::TcpListener,
    readiness: Arc<Readiness>,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(readiness);
    axum::serve(listener, app).await
}

async fn readyz(State(r): State<Arc<Readiness>>) -> impl IntoResponse {
    match r.status() {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err(reasons) => (StatusCode::SERVICE_UNAVAILABLE, reasons.join("\n") + "\n"),
    }
}

/// Serves `/metrics` on `listener` until the task is dropped.
///
/// Errors: the I/O error that stopped the server.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
) -> std::io::Result<()> {
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let (metrics, readiness) = (metrics.clone(), readiness.clone());
            async move {
                let ready = i64::from(readiness.status().is_ok());
                metrics.ready.set(ready);
                metrics.install_ready.set(ready);
                (
                    [(
                        header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    metrics.encode(),
                )
            }
        }),
    );
    axum::serve(listener, app).await
}
