//! Control and model rollout: the commands of the control topic (`drain`, `resume`,
//! `reload`, `rollback`), SIGHUP (reload the configured bundle), and the model task that
//! runs reloads and rollbacks one at a time while the current model keeps serving.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use tokio::sync::mpsc;
use tracing::{info, warn};

use super::publisher::PubCmd;
use super::{Served, Shared, lock};
use crate::model::ReloadError;
use crate::model::fetch::Source;
use crate::model::rollout::Command as ModelCommand;
use crate::queue::UnixMillis;

/// A command on the control topic: `drain` (unsubscribe from requests, finish the queue,
/// status `draining` then `drained`) or `resume`, both idempotent; `reload` (with `source`, a
/// path or URL, and `sha256`; without a source the configured bundle) and `rollback`, run
/// in order by the model task, their outcome in the status's `model_reload` (with the
/// command's `id` if it has one). JSON `{"command": ...}` or the bare word.
pub(super) fn control(shared: &Arc<Shared>, payload: &[u8]) {
    let text = String::from_utf8_lossy(payload);
    let doc = serde_json::from_str::<serde_json::Value>(&text).ok();
    let command = doc
        .as_ref()
        .and_then(|v| v["command"].as_str().map(str::to_owned))
        .unwrap_or_else(|| text.trim().to_owned());
    let field = |name: &str| {
        doc.as_ref()
            .and_then(|v| v[name].as_str())
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    };
    match command.as_str() {
        "reload" => {
            let command = ModelCommand::Reload {
                source: field("source").map(|s| Source::parse(&s)),
                sha256: field("sha256"),
            };
            let _ = shared.model_commands.send((command, field("id")));
        }
        "rollback" => {
            let _ = shared.model_commands.send((ModelCommand::Rollback, field("id")));
        }
        "drain" => {
            if !shared.draining.swap(true, Ordering::Relaxed) {
                info!("drain: no new requests; finishing the queue");
                shared.send(PubCmd::Requests(false));
            }
        }
        "resume" => {
            if shared.draining.swap(false, Ordering::Relaxed) {
                info!("resume: taking requests again");
                shared.send(PubCmd::Requests(true));
            }
        }
        other => {
            warn!("unknown control command `{other}` (drain, resume, reload, rollback)");
            *lock(&shared.last_error) =
                Some(("invalid_request", format!("unknown control command `{other}`")));
        }
    }
    shared.status_changed.notify_one();
}

/// SIGHUP: reload the configured bundle from disk.
pub(super) async fn sighup_task(shared: Arc<Shared>, mut hangup: tokio::signal::unix::Signal) {
    while hangup.recv().await.is_some() {
        info!("SIGHUP: reloading {}", shared.config.model.bundle.display());
        let command = ModelCommand::Reload {
            source: None,
            sha256: None,
        };
        let _ = shared.model_commands.send((command, Some("sighup".into())));
    }
}

/// Runs reload and rollback commands one at a time: the candidate is fetched, loaded and
/// smoke-tested on a blocking thread while the current model keeps serving, then swapped in.
/// A failure leaves the current model serving and says why in the status.
pub(super) async fn model_task(
    shared: Arc<Shared>,
    mut commands: mpsc::UnboundedReceiver<(ModelCommand, Option<String>)>,
) {
    while let Some((command, id)) = commands.recv().await {
        let name = command.name();
        let source = command.source_name(shared.rollout.configured());
        let report = |state: &str, extra: serde_json::Value| {
            let mut doc = serde_json::json!({
                "command": name,
                "id": id,
                "state": state,
                "source": source,
                "at_ms": UnixMillis::now().0,
            });
            if let (Some(d), serde_json::Value::Object(extra)) = (doc.as_object_mut(), extra) {
                d.extend(extra);
            }
            *lock(&shared.model_reload) = Some(doc);
            shared.status_epoch.fetch_add(1, Ordering::Relaxed);
            shared.status_changed.notify_one();
        };
        info!(command = name, %source, "model {name}: fetching, loading and checking");
        report("running", serde_json::Value::Null);
        let start = Instant::now();
        let rollout = shared.rollout.clone();
        let c = command.clone();
        let result = tokio::task::spawn_blocking(move || {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| rollout.run(&c)))
                .unwrap_or_else(|_| Err(ReloadError::Internal("the model load panicked".into())))
        })
        .await
        .unwrap_or_else(|e| Err(ReloadError::Internal(format!("the reload task failed: {e}"))));
        match result {
            Ok(classifier) => {
                let served = Arc::new(Served::new(classifier));
                let old = shared.served.replace(served.clone());
                let model = &served.model;
                shared.metrics.set_model(&model.name, &model.version);
                shared.metrics.count_reload(name, "ok");
                info!(
                    command = name, %source,
                    from = %format!("{} {}", old.model.name, old.model.version),
                    to = %format!("{} {}", model.name, model.version),
                    ms = start.elapsed().as_millis() as u64,
                    "model swapped; requests already started finish on the previous one"
                );
                report("ok", serde_json::json!({"model": model}));
            }
            Err(e) => {
                warn!(command = name, %source, kind = e.kind(), "model {name} refused, the current model keeps serving: {e}");
                shared.metrics.count_reload(name, e.kind());
                *lock(&shared.last_error) = Some(("model_reload_failed", e.to_string()));
                report(
                    "failed",
                    serde_json::json!({"kind": e.kind(), "reason": e.to_string()}),
                );
            }
        }
    }
}
