//! The daemon's HTTP endpoints: `/metrics` (Prometheus text format), `/healthz` (the process
//! answers) and `/readyz` (200 when it can take requests, 503 with the reason otherwise).

use std::sync::Arc;

use anyhow::{Context, Result};
use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

type Readiness = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// What the endpoints report, as closures over the daemon's state.
#[derive(Clone)]
pub struct Probe {
    pub metrics: Arc<dyn Fn() -> String + Send + Sync>,
    pub ready: Readiness,
}

/// Binds `addr` and serves until the returned task is aborted.
pub async fn serve(addr: &str, probe: Probe) -> Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for HTTP (key `http.listen`)"))?;
    let metrics = probe.metrics.clone();
    let ready = probe.ready.clone();
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                async move {
                    (
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        metrics(),
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let ready = ready.clone();
                async move {
                    match ready() {
                        Ok(()) => (StatusCode::OK, "ready\n".to_owned()).into_response(),
                        Err(reason) => {
                            (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")).into_response()
                        }
                    }
                }
            }),
        );
    tracing::info!(%addr, "HTTP: /metrics /healthz /readyz");
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("HTTP server stopped: {e}");
        }
    }))
}
