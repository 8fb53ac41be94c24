//! The HTTP endpoints. The daemon's: the device page `/` and `/api/status` (its JSON),
//! `/metrics` (Prometheus text format), `/healthz` (the process answers) and `/readyz` (200
//! when it can take requests, 503 with the reason otherwise). The fleet dashboard's
//! (`fleet-status --serve`): `/` and `/api/fleet`. Every other path is 404; all read-only.

use std::sync::Arc;

use anyhow::{Context, Result};
use axum::Router;
use axum::extract::Query;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;

use crate::queue::UnixMillis;
use crate::web;

type Readiness = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// What the endpoints report, as closures over the daemon's state.
#[derive(Clone)]
pub struct Probe {
    pub metrics: Arc<dyn Fn() -> String + Send + Sync>,
    pub ready: Readiness,
    /// The device page (the daemon's; the pool server has none).
    pub page: Option<DevicePage>,
}

/// What the device page shows.
#[derive(Clone)]
pub struct DevicePage {
    /// The status document (as published) plus `mqtt_connected`.
    pub status: Arc<dyn Fn() -> serde_json::Value + Send + Sync>,
    pub history: Arc<web::History>,
}

/// Binds `addr` and serves until the returned task is aborted.
pub async fn serve(addr: &str, probe: Probe) -> Result<tokio::task::JoinHandle<()>> {
    if let Some(page) = &probe.page
        && page.history.keeps_images()
        && !is_loopback(addr)
    {
        tracing::warn!(
            %addr,
            "http.recent_images > 0 on an address other hosts can reach: the device page shows \
             thumbnails of the camera's last requests to anyone who can open it"
        );
    }
    let listener = bind(addr, "key `http.listen`").await?;
    let metrics = probe.metrics.clone();
    let ready = probe.ready.clone();
    let mut app = Router::new();
    if let Some(page) = probe.page {
        let json = page.clone();
        app = app
            .route(
                "/",
                get(move || {
                    let page = page.clone();
                    async move {
                        let history = page.history.snapshot(UnixMillis::now().0);
                        html(web::device::render(&(page.status)(), &history))
                    }
                }),
            )
            .route(
                "/api/status",
                get(move || {
                    let page = json.clone();
                    async move {
                        let history = page.history.snapshot(UnixMillis::now().0);
                        axum::Json(web::device::json(&(page.status)(), &history))
                    }
                }),
            );
    }
    let app = app
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
        )
        .fallback(not_found);
    tracing::info!(%addr, "HTTP: / (device page) /api/status /metrics /healthz /readyz");
    Ok(spawn(listener, app))
}

/// The fleet dashboard on `addr` until the returned task is aborted.
pub async fn serve_fleet(addr: &str, fleet: Arc<web::Fleet>) -> Result<tokio::task::JoinHandle<()>> {
    let listener = bind(addr, "--serve").await?;
    let f = fleet.clone();
    let app = Router::new()
        .route(
            "/",
            get(move |Query(q): Query<web::fleet::Query>| {
                let fleet = f.clone();
                async move { html(web::fleet::render(&fleet.view(&q), &q, UnixMillis::now().0)) }
            }),
        )
        .route(
            "/api/fleet",
            get(move |Query(q): Query<web::fleet::Query>| {
                let fleet = fleet.clone();
                async move { axum::Json(fleet.view(&q)) }
            }),
        )
        .fallback(not_found);
    tracing::info!(%addr, "fleet dashboard: / /api/fleet");
    Ok(spawn(listener, app))
}

async fn bind(addr: &str, what: &str) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for HTTP ({what})"))
}

fn spawn(listener: tokio::net::TcpListener, app: Router) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("HTTP server stopped: {e}");
        }
    })
}

/// A page with its Content-Security-Policy (only its own inline style and script).
fn html(body: String) -> Response {
    let mut r = Html(body).into_response();
    let h = r.headers_mut();
    if let Ok(csp) = HeaderValue::from_str(&web::html::content_security_policy()) {
        h.insert(header::CONTENT_SECURITY_POLICY, csp);
    }
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

async fn not_found() -> (StatusCode, &'static str) {
    (StatusCode::NOT_FOUND, "not found\n")
}

fn is_loopback(addr: &str) -> bool {
    addr.parse::<std::net::SocketAddr>()
        .is_ok_and(|a| a.ip().is_loopback())
}

#[cfg(test)]
mod tests {
    use super::is_loopback;

    #[test]
    fn only_loopback_addresses_keep_thumbnails_quiet() {
        assert!(is_loopback("127.0.0.1:9464"));
        assert!(is_loopback("[::1]:9464"));
        assert!(!is_loopback("0.0.0.0:9464"));
        assert!(!is_loopback("192.168.1.20:9464"));
        assert!(!is_loopback("not an address"));
    }
}
