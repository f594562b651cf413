//! HTTP endpoints: `/healthz` (200 while the agent is live: no step of a loop that must
//! make progress is stuck, see [`Readiness::liveness`]; else 503 naming each stuck step,
//! one per line) and `/readyz` (200 when ready, else 503 with the reasons, one per line)
//! on the readiness port; `/metrics` (Prometheus text) on the monitoring port.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::metrics::Metrics;
use crate::readiness::Readiness;

/// Serves `/healthz` and `/readyz` on `listener` until the task is dropped. Both answer
/// from shared state only (no I/O), so they answer even while a loop is stuck.
///
/// Errors: the I/O error that stopped the server.
pub async fn serve_readiness(
    listener: tokio::net::TcpListener,
    readiness: Arc<Readiness>,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(readiness);
    axum::serve(listener, app).await
}

async fn healthz(State(r): State<Arc<Readiness>>) -> impl IntoResponse {
    match r.liveness() {
        Ok(()) => (StatusCode::OK, "ok\n".to_owned()),
        Err(stuck) => (StatusCode::SERVICE_UNAVAILABLE, stuck.join("\n") + "\n"),
    }
}

async fn readyz(State(r): State<Arc<Readiness>>) -> impl IntoResponse {
    let notes: String = r.notes().iter().map(|n| format!("{n}\n")).collect();
    match r.status() {
        Ok(()) => (StatusCode::OK, format!("ready\n{notes}")),
        Err(reasons) => (
            StatusCode::SERVICE_UNAVAILABLE,
            reasons.join("\n") + "\n" + &notes,
        ),
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    async fn get(port: u16, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn healthz_names_a_stuck_step() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let readiness = Arc::new(Readiness::default());
        let server = tokio::spawn(serve_readiness(listener, readiness.clone()));
        assert!(get(port, "/healthz").await.starts_with("HTTP/1.0 200"));
        let step = readiness.busy("install", "an install pass", Duration::ZERO);
        tokio::time::sleep(Duration::from_millis(5)).await;
        let answer = get(port, "/healthz").await;
        assert!(answer.starts_with("HTTP/1.0 503"), "{answer}");
        assert!(
            answer.contains("install: an install pass has been running"),
            "{answer}"
        );
        drop(step);
        assert!(get(port, "/healthz").await.starts_with("HTTP/1.0 200"));
        server.abort();
    }
}
