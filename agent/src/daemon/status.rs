//! The daemon's state as others see it: the retained status document (`state`, model,
//! queue, answers, pool health, last error), the final `offline` one (also the last will),
//! and the HTTP side (`/metrics`, `/readyz`, the device page's status).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use edge_runtime::runtime::SettingsReport;

use super::{Shared, lock};
use crate::queue::UnixMillis;
use crate::reply::ModelRef;

/// The daemon's state, as published on the status topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum State {
    Online,
    Backpressure,
    /// Drain requested: no new requests; some are still queued or unacknowledged.
    Draining,
    /// Drained: nothing left; resume to take requests again.
    Drained,
    ShuttingDown,
}

impl State {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Self::Online => "online",
            Self::Backpressure => "backpressure",
            Self::Draining => "draining",
            Self::Drained => "drained",
            Self::ShuttingDown => "shutting_down",
        }
    }
}

impl Shared {
    pub(super) fn state(&self) -> State {
        if self.stopping.is_cancelled() {
            State::ShuttingDown
        } else if self.draining.load(Ordering::Relaxed) {
            let s = self.queue.stats();
            if s.pending + s.leased + s.outbox == 0 {
                State::Drained
            } else {
                State::Draining
            }
        } else if self.backpressure.load(Ordering::Relaxed) {
            State::Backpressure
        } else {
            State::Online
        }
    }

    pub(super) fn status_document(&self, state: &str) -> Vec<u8> {
        serde_json::to_vec(&self.status_value(state)).unwrap_or_default()
    }

    fn status_value(&self, state: &str) -> serde_json::Value {
        let s = self.queue.stats();
        let limits = self.queue.limits();
        serde_json::json!({
            "device": self.device,
            "state": state,
            "agent_version": env!("CARGO_PKG_VERSION"),
            "model": self.served.get().model,
            "runtime_settings": runtime_settings_status(self.served.get().classifier.settings()),
            "model_reload": lock(&self.model_reload).clone(),
            "queue": {
                "pending": s.pending,
                "leased": s.leased,
                "outbox": s.outbox,
                "dead": s.dead,
                "bytes": s.bytes,
                "max_items": limits.max_items,
                "max_bytes": limits.max_bytes,
            },
            "started_at_ms": self.started_at.0,
            "uptime_s": UnixMillis::now().0.saturating_sub(self.started_at.0) / 1000,
            "answered": {
                "local": self.answered_local.load(Ordering::Relaxed),
                "cluster": self.answered_cluster.load(Ordering::Relaxed),
                "errors": self.answered_errors.load(Ordering::Relaxed),
            },
            "pool": self.offload.as_ref().map(|o| serde_json::json!({
                "breaker": format!("{:?}", o.breaker_state()).to_lowercase(),
                "healthy_endpoints": o.healthy_endpoints(),
            })),
            "last_error": lock(&self.last_error)
                .as_ref()
                .map(|(code, message)| serde_json::json!({"code": code, "message": message})),
        })
    }
}

/// The status of a stopped agent: its last will, and what it publishes when it stops.
pub(super) fn offline_document(device: &str, model: &ModelRef) -> serde_json::Result<Vec<u8>> {
    serde_json::to_vec(&serde_json::json!({
        "device": device, "state": "offline", "agent_version": env!("CARGO_PKG_VERSION"),
        "model": model,
    }))
}

/// The status's `runtime_settings`: the tract knobs the served model was optimised with,
/// where they came from (`default`, `cached`, `tuned`) and what the tuning measured.
fn runtime_settings_status(s: &SettingsReport) -> serde_json::Value {
    serde_json::json!({
        "knobs": s.settings,
        "origin": s.origin,
        "threads": s.measured.as_ref().map(|m| m.threads),
        "default_ms": s.measured.as_ref().map(|m| m.default_ms),
        "chosen_ms": s.measured.as_ref().map(|m| m.chosen_ms),
        "tuning_ms": s.measured.as_ref().map(|m| m.tuning_ms),
        "instruction_sets": s.isa,
        "note": s.note,
    })
}

/// What the HTTP server serves of the daemon: `/metrics`, `/readyz` and the device page.
pub(super) fn shared_http(shared: &Arc<Shared>) -> crate::http::Probe {
    let s = shared.clone();
    let metrics = Arc::new(move || {
        s.metrics.set_queue(&s.queue.stats());
        if let Some(o) = &s.offload {
            let state = match o.breaker_state() {
                crate::offload::BreakerState::Closed => 0,
                crate::offload::BreakerState::Open => 1,
                crate::offload::BreakerState::HalfOpen => 2,
            };
            s.metrics.breaker.set(state);
            s.metrics.cluster_endpoints.set(o.healthy_endpoints() as i64);
        }
        s.metrics.render()
    });
    let s = shared.clone();
    let ready = Arc::new(move || {
        if s.stopping.is_cancelled() {
            Err("shutting down".to_owned())
        } else if !s.connected.load(Ordering::Relaxed) {
            Err("not connected to the MQTT broker".to_owned())
        } else {
            Ok(())
        }
    });
    let s = shared.clone();
    let status = Arc::new(move || {
        let mut doc = s.status_value(s.state().as_str());
        doc["mqtt_connected"] = s.connected.load(Ordering::Relaxed).into();
        doc
    });
    let history = shared.history.clone();
    crate::http::Probe {
        metrics,
        ready,
        page: Some(crate::http::DevicePage { status, history }),
    }
}
