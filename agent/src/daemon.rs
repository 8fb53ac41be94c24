//! `edge-agent run`: the device daemon. MQTT in, durable queue, workers, replies out.
//!
//! ```text
//!  connection task ──Message──► ingress ──enqueue+flush──► queue ──lease──► workers
//!   (polls rumqttc)              │ then PUBACK                 ▲              │ classify,
//!        ▲  │ PUBACK of a reply  │ (rejections: reply          │              │ complete
//!        │  └──► acks ──► queue.reply_acked (leaves outbox)    │              ▼ (reply in outbox)
//!        └──────────────────────────── publisher ◄─────────────┴──────────────┘
//! ```
//!
//! Tasks share `Shared`; one publisher task sends every publish so the `PublishTracker` sees
//! them in order (see `mqtt`). Backpressure: when the queue is full, ingress holds the
//! message it has (unacknowledged) and waits for space; the broker stops sending once
//! `receive_maximum` messages are unacknowledged, so memory stays bounded.
//!
//! Shutdown (SIGTERM/SIGINT): ingress stops taking messages (those not acknowledged are
//! redelivered by the broker later), workers finish what they hold, the agent waits a little
//! for the broker to acknowledge the last replies (those not acknowledged stay in the outbox
//! and are published again at the next start), publishes its status as offline and, once the
//! broker has acknowledged it (at most `OFFLINE_ACK_TIMEOUT`), disconnects; without that
//! acknowledgement it closes the connection without DISCONNECT, so that the broker publishes
//! the last will (`offline` too) instead. Then it flushes the queue.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use edge_runtime::preprocess::ImageLimits;
use edge_runtime::runtime::{Classifier, RuntimeOptions, SettingsReport, TuneOptions, Tuning};

use crate::config::{Config, MqttProtocol, broker_address};
use crate::metrics::Metrics;
use crate::model::fetch::{FetchLimits, Source};
use crate::model::rollout::{Command as ModelCommand, Rollout};
use crate::model::store::ModelStore;
use crate::model::{Current, ReloadError};
use crate::mqtt::{self, AckToken, Client, Event, Message, PublishTracker};
use crate::queue::{EnqueueOutcome, Lease, Leased, Queue, QueueError, Seq, StoredReply, UnixMillis};
use crate::request::{ErrorCode, Label, ModelRef, Reply, RequestPolicy, Timings, error_document};

/// What the tracker tags publishes with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tag {
    Reply(Seq),
    Status,
    /// The final `offline` status at shutdown: its PUBACK is waited for.
    Offline,
}

/// The longest a shutdown waits for the broker to acknowledge the final `offline` status.
/// Without that acknowledgement the agent does not disconnect cleanly: it closes the
/// connection, and the broker publishes the last will (`offline` too).
const OFFLINE_ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// Work for the publisher task.
enum PubCmd {
    Publish {
        tag: Tag,
        topic: String,
        payload: Vec<u8>,
        retain: bool,
        correlation_data: Option<Vec<u8>>,
    },
    /// The connection is up: subscribe (again), republish the outbox if needed.
    Connected { session_present: bool, first: bool },
    /// Disconnect cleanly after every command before it; answered once handed to the client.
    Disconnect(tokio::sync::oneshot::Sender<()>),
    /// Drain (`false`: unsubscribe from requests) or resume (`true`: subscribe again).
    Requests(bool),
}

/// The daemon's state, as published on the status topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Online,
    Backpressure,
    /// Drain requested: no new requests; some are still queued or unacknowledged.
    Draining,
    /// Drained: nothing left; resume to take requests again.
    Drained,
    ShuttingDown,
}

impl State {
    fn as_str(self) -> &'static str {
        match self {
            Self::Online => "online",
            Self::Backpressure => "backpressure",
            Self::Draining => "draining",
            Self::Drained => "drained",
            Self::ShuttingDown => "shutting_down",
        }
    }
}

struct Topics {
    /// Subscription filters for requests.
    requests: Vec<String>,
    /// Topics requests arrive on (the shared subscription's without `$share/<group>/`).
    request_topics: Vec<String>,
    /// `<prefix>/<device>/control`: `{"command": "drain" | "resume" | "reload" | "rollback"}`.
    control: String,
    status: String,
}

/// The model serving requests and the name replies give it. A request takes the `Arc` once
/// and keeps it to its reply, so a reload never changes the model under it.
struct Served {
    classifier: Classifier,
    model: ModelRef,
}

impl Served {
    fn new(classifier: Classifier) -> Self {
        let model = ModelRef {
            name: classifier.manifest().model.name.clone(),
            version: classifier.manifest().model.version.clone(),
        };
        Self { classifier, model }
    }
}

struct Shared {
    device: String,
    config: Config,
    queue: Queue,
    served: Current<Served>,
    rollout: Arc<Rollout>,
    /// Reload and rollback commands with the id the operator gave them, run one at a time
    /// by the model task.
    model_commands: mpsc::UnboundedSender<(ModelCommand, Option<String>)>,
    /// The last reload or rollback: command, state, source, and why it failed.
    model_reload: Mutex<Option<serde_json::Value>>,
    /// Bumped when the status changes in a way the queue and counters do not show.
    status_epoch: AtomicU64,
    metrics: Metrics,
    policy: RequestPolicy,
    topics: Topics,
    publish: mpsc::UnboundedSender<PubCmd>,
    tracker: Mutex<PublishTracker<Tag>>,
    /// Told the broker's answer to the final `offline` status (`Err`: its refusal).
    offline_acked: Mutex<Option<tokio::sync::oneshot::Sender<Result<(), String>>>>,
    /// New work was queued.
    work: Notify,
    /// Queue space was freed (a reply left the outbox or a request was completed).
    space: Notify,
    /// Something in the status changed.
    status_changed: Notify,
    connected: AtomicBool,
    /// Counts connections; a message is acknowledged only on the connection it came on.
    epoch: AtomicU64,
    backpressure: AtomicBool,
    /// Drained by a control command: not subscribed to requests.
    draining: AtomicBool,
    /// Stop taking requests and leasing work.
    stopping: CancellationToken,
    /// Cancelled when the agent cannot go on (its queue storage failed): it stops as on
    /// SIGTERM and exits with an error, for the service manager to restart it.
    fatal: CancellationToken,
    fatal_reason: Mutex<Option<String>>,
    /// Sequence numbers workers hold, released if shutdown times out.
    in_flight: Mutex<HashSet<Seq>>,
    /// Workers waiting for work; while one is, ingress stores a request already leased and
    /// hands it over here (`Queue::enqueue_leased_async`), saving the worker a lease.
    idle_workers: AtomicUsize,
    handoff: Mutex<VecDeque<Leased>>,
    started_at: UnixMillis,
    offload: Option<Arc<crate::offload::Offload>>,
    /// Requests answered since start, by path (for the status).
    answered_local: AtomicU64,
    answered_cluster: AtomicU64,
    answered_errors: AtomicU64,
    /// The last error reply's code and message (for the status).
    last_error: Mutex<Option<(&'static str, String)>>,
    /// Recent local preprocessing + inference time per request, ms (f64 bits; EWMA).
    local_latency_ms: AtomicU64,
    /// The device page's last 15 minutes and last requests.
    history: Arc<crate::web::History>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Shared {
    fn state(&self) -> State {
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

    fn status_document(&self, state: &str) -> Vec<u8> {
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

    fn publish_reply(&self, seq: Seq, reply: StoredReply) {
        self.send(PubCmd::Publish {
            tag: Tag::Reply(seq),
            topic: reply.topic,
            payload: reply.payload,
            retain: false,
            correlation_data: reply.correlation_data,
        });
    }

    fn send(&self, cmd: PubCmd) {
        // The publisher lives as long as the daemon; after it is gone nothing is sent, and
        // the outbox keeps the replies for the next start.
        let _ = self.publish.send(cmd);
    }

    fn set_backpressure(&self, on: bool) {
        if self.backpressure.swap(on, Ordering::Relaxed) != on {
            self.metrics.backpressure.set(i64::from(on));
            if on {
                warn!("queue full: not acknowledging requests until space frees");
            } else {
                info!("queue has space again");
            }
            self.status_changed.notify_one();
        }
    }
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
        "note": s.note,
    })
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(config: Config) -> Result<()> {
    let device = config.device_id();
    let prefix = config.mqtt.topic_prefix.clone();
    let (host, port) = if config.mqtt.broker.is_empty() {
        let listen = config.embedded_broker.listen;
        crate::broker::start(listen, config.mqtt.protocol, config.mqtt.max_packet_bytes)?;
        info!(%listen, "no broker configured: started the embedded broker");
        (listen.ip().to_string(), listen.port())
    } else {
        broker_address(&config.mqtt.broker)
            .map_err(|reason| anyhow::anyhow!("invalid configuration: key `mqtt.broker`: {reason}"))?
    };

    let queue_limits = config.queue_limits()?;
    let (queue, quarantined) =
        Queue::open_or_quarantine(&config.queue.dir, queue_limits, config.queue.on_damage)?;
    let stats = queue.stats();
    info!(
        dir = %config.queue.dir.display(),
        pending = stats.pending, outbox = stats.outbox, dead = stats.dead,
        "queue opened"
    );

    let options = RuntimeOptions {
        threads: std::num::NonZeroUsize::new(config.workers.threads()).unwrap_or(std::num::NonZeroUsize::MIN),
        adaptive: config.workers.adaptive,
        image_limits: ImageLimits {
            max_bytes: config.limits.max_image_bytes,
            max_pixels: config.limits.max_pixels,
            ..ImageLimits::default()
        },
        max_bundle_bytes: config.model.max_bundle_bytes,
        tuning: if config.model.tuning {
            Tuning::Auto(TuneOptions {
                budget: Duration::from_secs(config.model.tuning_budget_secs),
                // The agent's own state directory: writable whatever directory the
                // configured bundle is in, and where rolled-out bundles live.
                cache_dir: Some(config.model_dir()),
            })
        } else {
            Tuning::Off
        },
        ..RuntimeOptions::default()
    };
    let store = ModelStore::open(&config.model_dir())?;
    let rollout = Arc::new(Rollout::new(
        store,
        config.model.bundle.clone(),
        options,
        FetchLimits {
            max_bytes: config.model.max_bundle_bytes,
            timeout: Duration::from_secs(config.model.fetch_timeout_secs),
        },
    ));
    let start = Instant::now();
    let r = rollout.clone();
    let classifier = tokio::task::spawn_blocking(move || r.load_initial())
        .await?
        .with_context(|| format!("cannot load the bundle {}", config.model.bundle.display()))?;
    let served = Served::new(classifier);
    let model = served.model.clone();
    info!(
        model = %model.name, version = %model.version, bundle = %rollout.serving().display(),
        load_ms = start.elapsed().as_millis() as u64,
        runtime_settings = %served.classifier.settings().settings,
        settings_origin = ?served.classifier.settings().origin, "model loaded"
    );
    // Installed before the agent reports ready: SIGHUP's default action would end it.
    let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("cannot handle SIGHUP")?;
    let (model_tx, model_rx) = mpsc::unbounded_channel();

    let mut requests = vec![format!("{prefix}/{device}/classify")];
    let mut request_topics = requests.clone();
    if !config.mqtt.shared_group.is_empty() {
        requests.push(format!(
            "$share/{}/{prefix}/fleet/classify",
            config.mqtt.shared_group
        ));
        request_topics.push(format!("{prefix}/fleet/classify"));
    }
    let topics = Topics {
        requests,
        request_topics,
        control: format!("{prefix}/{device}/control"),
        status: format!("{prefix}/{device}/status"),
    };
    let policy = RequestPolicy {
        device_id: device.clone(),
        default_reply_topic: format!("{prefix}/{device}/result"),
        max_image_bytes: config.limits.max_image_bytes,
        max_top_k: config.model.max_top_k,
        default_deadline: (config.limits.default_deadline_ms > 0)
            .then(|| Duration::from_millis(config.limits.default_deadline_ms)),
    };
    let metrics = Metrics::new();
    metrics.set_model(&model.name, &model.version);
    let quarantine_error = quarantined.map(|q| {
        metrics.queue_quarantined.inc();
        let message = format!(
            "the request queue was damaged ({}); moved aside to {} and started empty: its requests \
             were not answered",
            q.reason,
            q.moved_to.display()
        );
        ("queue_quarantined", message)
    });
    let offline_document = |device: &str, model: &ModelRef| {
        serde_json::to_vec(&serde_json::json!({
            "device": device, "state": "offline", "agent_version": env!("CARGO_PKG_VERSION"),
            "model": model,
        }))
    };
    // The last will names the model served when the connection was made.
    let offline = offline_document(&device, &model)?;
    let client_id = if config.mqtt.client_id.is_empty() {
        format!("edge-agent-{device}")
    } else {
        config.mqtt.client_id.clone()
    };
    let settings = mqtt::Settings {
        host,
        port,
        client_id,
        protocol: config.mqtt.protocol,
        username: config.mqtt.username.clone(),
        password: config.mqtt.password.clone(),
        keep_alive: Duration::from_secs(config.mqtt.keep_alive_secs),
        session_expiry_secs: config.mqtt.session_expiry_secs,
        max_packet_bytes: config.mqtt.max_packet_bytes,
        receive_maximum: config.mqtt.receive_maximum,
        will: (topics.status.clone(), offline.clone()),
        tls: mqtt_tls(&config.mqtt)?,
    };
    let offload = crate::offload::Offload::new(&config.offload)?;
    if let Some(o) = &offload {
        info!(endpoints = ?config.offload.endpoints, dns = %config.offload.dns, protocol = ?config.offload.protocol, healthy = o.healthy_endpoints(), "cluster offload on");
    }
    let (client, connection) = mqtt::connect(&settings);
    let (publish_tx, publish_rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        device,
        queue,
        served: Current::new(served),
        rollout,
        model_commands: model_tx,
        model_reload: Mutex::new(None),
        status_epoch: AtomicU64::new(0),
        metrics,
        policy,
        topics,
        publish: publish_tx,
        tracker: Mutex::new(PublishTracker::default()),
        offline_acked: Mutex::new(None),
        work: Notify::new(),
        space: Notify::new(),
        status_changed: Notify::new(),
        connected: AtomicBool::new(false),
        epoch: AtomicU64::new(0),
        backpressure: AtomicBool::new(false),
        draining: AtomicBool::new(false),
        stopping: CancellationToken::new(),
        fatal: CancellationToken::new(),
        fatal_reason: Mutex::new(None),
        in_flight: Mutex::new(HashSet::new()),
        idle_workers: AtomicUsize::new(0),
        handoff: Mutex::new(VecDeque::new()),
        started_at: UnixMillis::now(),
        offload,
        answered_local: AtomicU64::new(0),
        answered_cluster: AtomicU64::new(0),
        answered_errors: AtomicU64::new(0),
        last_error: Mutex::new(quarantine_error),
        local_latency_ms: AtomicU64::new(0f64.to_bits()),
        history: Arc::new(crate::web::History::new(
            config.http.recent_images,
            config.offload.min_confidence,
        )),
        config,
    });

    let http = match shared.config.http.listen.as_str() {
        "" => None,
        addr => Some(crate::http::serve(addr, shared_http(&shared)).await?),
    };

    let (ingress_tx, ingress_rx) = mpsc::unbounded_channel::<(u64, Message)>();
    let conn_stop = CancellationToken::new();
    let conn_task = tokio::spawn(connection_task(
        connection,
        shared.clone(),
        ingress_tx,
        conn_stop.clone(),
    ));
    let publisher = tokio::spawn(publisher_task(client.clone(), shared.clone(), publish_rx));
    let ingress = tokio::spawn(ingress_task(client.clone(), shared.clone(), ingress_rx));
    let workers: Vec<_> = (0..shared.config.workers.count())
        .map(|i| tokio::spawn(worker_task(shared.clone()).instrument(info_span!("worker", n = i))))
        .collect();
    let housekeeping = tokio::spawn(housekeeping_task(shared.clone()));
    let model_task = tokio::spawn(model_task(shared.clone(), model_rx));
    let sighup = tokio::spawn(sighup_task(shared.clone(), hangup));

    tokio::select! {
        signal = wait_for_signal() => signal?,
        _ = shared.fatal.cancelled() => {
            // The queue's storage failed (full, I/O errors, or a write stalled past its
            // timeout): no graceful release or flush can be relied on. Exit for a restart;
            // what was acknowledged is on disk, the rest stays with the broker.
            let reason = lock(&shared.fatal_reason).take().unwrap_or_default();
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
            conn_stop.cancel();
            anyhow::bail!("{reason}");
        }
    }
    info!("shutting down: no new requests; finishing the ones being classified");
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    shared.stopping.cancel();
    shared.status_changed.notify_one();
    shared.work.notify_waiters();
    shared.space.notify_waiters();
    ingress.abort();
    let workers_done = futures_join(workers);
    if tokio::time::timeout(Duration::from_secs(30), workers_done)
        .await
        .is_err()
    {
        warn!("workers did not finish within 30 s; releasing their requests");
    }
    let held: Vec<Seq> = lock(&shared.in_flight).drain().collect();
    for seq in held {
        if let Err(e) = shared.queue.release(seq) {
            warn!(seq = seq.get(), "cannot release: {e}");
        }
    }
    // Give the broker a moment to acknowledge the last replies.
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline && shared.connected.load(Ordering::Relaxed) {
        if shared.queue.stats().outbox == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    housekeeping.abort();
    sighup.abort();
    model_task.abort();
    // A clean disconnect suppresses the last will: it is sent only once the broker has
    // acknowledged the final status. Otherwise the connection is just closed and the broker
    // publishes the will, so a stopped agent never stays `online` in its retained status.
    let offline = offline_document(&shared.device, &shared.served.get().model)?;
    if final_status(&shared, offline).await {
        let (handed_over, disconnect) = tokio::sync::oneshot::channel();
        shared.send(PubCmd::Disconnect(handed_over));
        let _ = tokio::time::timeout(Duration::from_secs(1), disconnect).await;
        let deadline = Instant::now() + Duration::from_secs(1);
        while Instant::now() < deadline && shared.connected.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    conn_stop.cancel();
    let _ = conn_task.await;
    publisher.abort();
    if let Some(h) = http {
        h.abort();
    }
    shared
        .queue
        .flush()
        .context("cannot flush the queue at shutdown")?;
    let s = shared.queue.stats();
    info!(
        pending = s.pending,
        leased = s.leased,
        outbox = s.outbox,
        "stopped"
    );
    Ok(())
}

/// Publishes the final `offline` status and waits (at most `OFFLINE_ACK_TIMEOUT`) for the
/// broker to acknowledge it; returns whether it did.
async fn final_status(shared: &Shared, offline: Vec<u8>) -> bool {
    let (acked_tx, acked) = tokio::sync::oneshot::channel();
    *lock(&shared.offline_acked) = Some(acked_tx);
    shared.send(PubCmd::Publish {
        tag: Tag::Offline,
        topic: shared.topics.status.clone(),
        payload: offline,
        retain: true,
        correlation_data: None,
    });
    match tokio::time::timeout(OFFLINE_ACK_TIMEOUT, acked).await {
        Ok(Ok(Ok(()))) => {
            info!("the broker acknowledged the offline status; disconnecting");
            true
        }
        Ok(Ok(Err(reason))) => {
            warn!(
                "the broker refused the offline status ({reason}); closing without DISCONNECT so that it publishes the last will"
            );
            false
        }
        Ok(Err(_)) | Err(_) => {
            warn!(
                timeout_s = OFFLINE_ACK_TIMEOUT.as_secs(),
                "the broker did not acknowledge the offline status in time; closing without DISCONNECT so that it publishes the last will"
            );
            false
        }
    }
}

async fn futures_join(handles: Vec<tokio::task::JoinHandle<()>>) {
    for h in handles {
        let _ = h.await;
    }
}

/// Waits for SIGTERM or SIGINT.
pub async fn wait_for_signal() -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM"),
        _ = int.recv() => info!("SIGINT"),
    }
    Ok(())
}

fn shared_http(shared: &Arc<Shared>) -> crate::http::Probe {
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

async fn connection_task(
    mut connection: mqtt::Connection,
    shared: Arc<Shared>,
    ingress: mpsc::UnboundedSender<(u64, Message)>,
    stop: CancellationToken,
) {
    let min = Duration::from_millis(shared.config.mqtt.reconnect_min_ms);
    let max = Duration::from_millis(shared.config.mqtt.reconnect_max_ms);
    let mut backoff = crate::reconnect::Backoff::new(min, max);
    let max_packet = shared.config.mqtt.max_packet_bytes;
    // The connection was allowed one packet over the limit (see `mqtt`).
    let mut oversize_allowed = false;
    let mut first = true;
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => return,
            e = connection.poll() => e,
        };
        match event {
            Ok(Event::Connected { session_present }) => {
                info!(session_present, "connected to the broker");
                backoff.connected(Instant::now());
                if oversize_allowed {
                    // This connection reads the oversized message; the next ones need not.
                    connection.restore_limit();
                    oversize_allowed = false;
                }
                shared.connected.store(true, Ordering::Relaxed);
                shared.metrics.mqtt_connected.set(1);
                shared.metrics.mqtt_connections.inc();
                if !session_present {
                    lock(&shared.tracker).reset();
                }
                shared.send(PubCmd::Connected {
                    session_present,
                    first,
                });
                first = false;
                shared.epoch.fetch_add(1, Ordering::SeqCst);
            }
            Ok(Event::Message(m)) => {
                if ingress.send((shared.epoch.load(Ordering::SeqCst), *m)).is_err() {
                    debug!("ingress stopped; message left unacknowledged");
                }
            }
            Ok(Event::Published(pkid)) => lock(&shared.tracker).published(pkid),
            Ok(Event::PubAck {
                pkid,
                refused: Some(reason),
            }) => {
                let tag = lock(&shared.tracker).acked(pkid);
                if let Some(Tag::Reply(seq)) = tag {
                    // Not delivered, and publishing it again would be refused again: counted,
                    // logged, and dropped from the outbox (it is not retried).
                    let message = format!(
                        "the broker refused a reply (PUBACK {reason}): check its ACL for this \
                         agent's identity and the reply topics clients give"
                    );
                    warn!(seq = seq.get(), "{message}");
                    shared.metrics.replies_refused.inc();
                    *lock(&shared.last_error) = Some(("reply_refused", message));
                    shared.status_changed.notify_one();
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        if let Err(e) = shared.queue.reply_acked_async(seq).await {
                            warn!(seq = seq.get(), "cannot remove a refused reply: {e}");
                        }
                        shared.space.notify_waiters();
                    });
                } else if let Some(Tag::Status) = tag {
                    warn!("the broker refused the status (PUBACK {reason}): check its ACL");
                } else if let Some(Tag::Offline) = tag
                    && let Some(tx) = lock(&shared.offline_acked).take()
                {
                    let _ = tx.send(Err(reason));
                }
            }
            Ok(Event::PubAck { pkid, refused: None }) => {
                let tag = lock(&shared.tracker).acked(pkid);
                if let Some(Tag::Offline) = tag
                    && let Some(tx) = lock(&shared.offline_acked).take()
                {
                    let _ = tx.send(Ok(()));
                }
                if let Some(Tag::Reply(seq)) = tag {
                    // On a blocking thread: the database may be busy with another fsync.
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        match shared.queue.reply_acked_async(seq).await {
                            Ok(true) => {
                                shared.metrics.replies_acked.inc();
                                shared.space.notify_waiters();
                            }
                            Ok(false) => {}
                            Err(e) => warn!(seq = seq.get(), "cannot remove an acknowledged reply: {e}"),
                        }
                    });
                }
            }
            Ok(Event::Subscribed) => lock(&shared.tracker).subscribed(),
            Ok(Event::SubscriptionRefused(codes)) => {
                let message = format!(
                    "the broker refused a subscription ({codes}): check its ACL for this agent's \
                     identity and the topics {:?}",
                    shared.topics.request_topics
                );
                error!("{message}");
                *lock(&shared.last_error) = Some(("internal", message));
                shared.status_changed.notify_one();
            }
            Ok(Event::Other) => {}
            Err(e) => {
                let delay = backoff.failed(
                    Instant::now(),
                    u64::from(
                        SystemTime::now()
                            .duration_since(UNIX_EPOCH)
                            .map(|d| d.subsec_millis())
                            .unwrap_or(0),
                    ),
                );
                if let mqtt::MqttError::Oversized { bytes, .. } = &e {
                    shared.metrics.mqtt_oversized.inc();
                    let ceiling = mqtt::oversize_ceiling(max_packet);
                    if *bytes <= ceiling {
                        warn!(
                            bytes,
                            max_packet_bytes = max_packet,
                            "the broker sent a message larger than mqtt.max_packet_bytes; the next \
                             connection reads it once to answer it too_large and acknowledge it"
                        );
                        // MQTT 5 counts the fixed header in its limit too.
                        connection.read_once_up_to(bytes.saturating_add(8));
                        oversize_allowed = true;
                    } else {
                        let message = format!(
                            "the broker keeps sending a message of {bytes} bytes, more than the agent \
                             reads ({ceiling}, 4 x mqtt.max_packet_bytes): each connection ends at it. \
                             Make the broker refuse such messages (Mosquitto: message_size_limit \
                             {max_packet}), or remove the message from this agent's session"
                        );
                        error!("{message}");
                        *lock(&shared.last_error) = Some(("message_too_large", message));
                    }
                }
                if shared.stopping.is_cancelled() {
                    shared.connected.store(false, Ordering::Relaxed);
                    debug!("connection closed: {e}");
                } else if shared.connected.swap(false, Ordering::Relaxed) {
                    warn!("lost the broker: {e}");
                    shared.metrics.mqtt_connected.set(0);
                } else if let Some(why) = refusal(&e.to_string()) {
                    warn!("{why}; retrying in {} ms", delay.as_millis());
                } else {
                    warn!(
                        "cannot reach the broker: {e}; retrying in {} ms",
                        delay.as_millis()
                    );
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// What a connection error means when the broker answered the CONNECT with a refusal
/// (rumqttc's "Connection refused, return code: `BadUserNamePassword`"), said for an
/// operator; `None` for other errors (the broker was not reached).
fn refusal(error: &str) -> Option<String> {
    let (_, rest) = error.split_once("Connection refused, return code: `")?;
    let code = rest.split('`').next().unwrap_or(rest);
    let advice = match code {
        "BadUserNamePassword" => "bad username or password: check mqtt.username and mqtt.password",
        // Mosquitto answers a wrong password with this code too, not BadUserNamePassword.
        "NotAuthorized" => {
            "not authorized: check mqtt.username and mqtt.password (the broker refuses this login, \
             or requires one) and whether the broker lets this identity connect"
        }
        "BadClientId" | "ClientIdentifierNotValid" => "client id not accepted: check the device id",
        "Banned" => "this client is banned",
        _ => "",
    };
    Some(if advice.is_empty() {
        format!("the broker refused the connection (CONNACK {code})")
    } else {
        format!("the broker refused the connection (CONNACK {code}): {advice}")
    })
}

async fn publisher_task(client: Client, shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<PubCmd>) {
    while let Some(cmd) = rx.recv().await {
        match cmd {
            PubCmd::Publish {
                tag,
                topic,
                payload,
                retain,
                correlation_data,
            } => {
                lock(&shared.tracker).queued(tag);
                if let Err(e) = client.publish(&topic, payload, retain, correlation_data).await {
                    error!("cannot publish to {topic}: {e}");
                }
            }
            PubCmd::Disconnect(done) => {
                if let Err(e) = client.disconnect().await {
                    debug!("cannot disconnect: {e}");
                }
                let _ = done.send(());
            }
            PubCmd::Requests(take) => {
                let result = if take {
                    client.subscribe(&shared.topics.requests).await
                } else {
                    client.unsubscribe(&shared.topics.requests).await
                };
                if let Err(e) = result {
                    error!("cannot change the request subscriptions: {e}");
                }
            }
            PubCmd::Connected {
                session_present,
                first,
            } => {
                // The subscription also marks the end of a tracker reset (see `mqtt`).
                let mut filters = vec![shared.topics.control.clone()];
                if !shared.draining.load(Ordering::Relaxed) {
                    filters.extend(shared.topics.requests.iter().cloned());
                }
                if let Err(e) = client.subscribe(&filters).await {
                    error!("cannot subscribe: {e}");
                }
                let state = shared.state();
                lock(&shared.tracker).queued(Tag::Status);
                if let Err(e) = client
                    .publish(
                        &shared.topics.status,
                        shared.status_document(state.as_str()),
                        true,
                        None,
                    )
                    .await
                {
                    error!("cannot publish the status: {e}");
                }
                if first || !session_present {
                    match shared.queue.outbox_async().await {
                        Ok(replies) => {
                            if !replies.is_empty() {
                                info!(replies = replies.len(), "publishing replies not yet acknowledged");
                            }
                            for (seq, reply) in replies {
                                lock(&shared.tracker).queued(Tag::Reply(seq));
                                if let Err(e) = client
                                    .publish(&reply.topic, reply.payload, false, reply.correlation_data)
                                    .await
                                {
                                    error!("cannot publish to {}: {e}", reply.topic);
                                }
                            }
                        }
                        Err(e) => error!("cannot read the outbox: {e}"),
                    }
                }
            }
        }
    }
}

/// The PEM files of `mqtt.tls_*`, read at start (`None` for a plain `mqtt://` broker).
fn mqtt_tls(c: &crate::config::MqttConfig) -> Result<Option<mqtt::Tls>> {
    if !crate::config::broker_tls(&c.broker) {
        return Ok(None);
    }
    let read = |key: &str, path: &str| {
        std::fs::read(path).with_context(|| format!("cannot read mqtt.{key} `{path}`"))
    };
    let client = if c.tls_cert.is_empty() {
        None
    } else {
        Some((read("tls_cert", &c.tls_cert)?, read("tls_key", &c.tls_key)?))
    };
    Ok(Some(mqtt::Tls {
        ca: read("tls_ca", &c.tls_ca)?,
        client,
    }))
}

/// Longest wait for a request to reach the disk before it counts as a storage failure.
const STORE_TIMEOUT: Duration = Duration::from_secs(5);

/// Consecutive storage failures (one a second) at ingress before the agent stops to reopen
/// its queue through a restart.
const STORAGE_FAILURES_BEFORE_EXIT: u32 = 3;

/// Requests written together before one flush (group commit), at most.
const MAX_GROUP: usize = 32;

/// A request stored without a flush yet: acknowledged once a flush covers it.
struct Held {
    ack: Option<AckToken>,
    epoch: u64,
    seq: Seq,
    id: String,
}

/// Acknowledges the held requests, in arrival order, once they are on disk: `flushed` says
/// a flush since their writes already covered them, else one is done here. On a failed
/// flush they stay held (and unacknowledged) for the next one.
async fn settle(client: &Client, shared: &Shared, held: &mut Vec<Held>, flushed: bool) {
    let Some(last) = held.last().map(|h| h.seq) else {
        return;
    };
    if !flushed && let Err(e) = shared.queue.flush_through(last).await {
        error!(
            "cannot flush the queue: {e}; {} requests not acknowledged yet",
            held.len()
        );
        return;
    }
    for h in held.drain(..) {
        if let Some(ack) = &h.ack
            && shared.epoch.load(Ordering::SeqCst) == h.epoch
            && let Err(e) = client.ack(ack).await
        {
            warn!("cannot acknowledge: {e} (the broker will redeliver)");
        }
        shared.metrics.acknowledged.inc();
        debug!(id = %h.id, seq = h.seq.get(), "queued");
        shared.work.notify_one();
    }
}

/// Stores each request and acknowledges it once it is on disk. Requests that arrive
/// together share one flush (group commit): while more messages are already waiting, a
/// request is written without a flush and its acknowledgement held until the flush of the
/// last one (at most `MAX_GROUP` at a time). Acknowledgements keep the arrival order.
async fn ingress_task(client: Client, shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<(u64, Message)>) {
    let mut held: Vec<Held> = Vec::new();
    let mut storage_failures = 0u32;
    while let Some((epoch, message)) = rx.recv().await {
        if shared.stopping.is_cancelled() {
            return;
        }
        // A message from a connection that has since dropped cannot be acknowledged (its
        // packet id now means nothing, or another message); the broker redelivers it if it
        // kept the session. Taking it anyway would only make a duplicate.
        let current = || shared.epoch.load(Ordering::SeqCst) == epoch;
        let request_topic = message.topic != shared.topics.control && shared.topics_match(&message.topic);
        if !request_topic || !current() {
            settle(&client, &shared, &mut held, false).await;
        }
        if !current() {
            debug!("message from a previous connection left to the broker's redelivery");
            continue;
        }
        if message.topic == shared.topics.control {
            control(&shared, &message.payload);
            if let Some(ack) = &message.ack {
                let _ = client.ack(ack).await;
            }
            continue;
        }
        if !shared.topics_match(&message.topic) {
            debug!(topic = %message.topic, "message on an unexpected topic ignored");
            if let Some(ack) = &message.ack {
                let _ = client.ack(ack).await;
            }
            continue;
        }
        let mut parsed = shared.policy.parse(&message.inbound(), UnixMillis::now());
        loop {
            let group = !rx.is_empty() && held.len() < MAX_GROUP;
            let mut handed: Option<Leased> = None;
            let store = async {
                match &parsed {
                    Ok(request) if group => shared.queue.enqueue_unflushed(request).await,
                    Ok(request) if shared.idle_workers.load(Ordering::SeqCst) > 0 => {
                        let (outcome, leased) = shared
                            .queue
                            .enqueue_leased_async(request, UnixMillis::now())
                            .await?;
                        handed = leased;
                        Ok(outcome)
                    }
                    Ok(request) => shared.queue.enqueue_async(request).await,
                    Err(rejected) => shared.queue.reply_directly(&rejected.reply).await,
                }
            };
            // A disk that stops answering (a failing card) must not hold requests forever: a
            // write that takes this long counts as a storage failure.
            let outcome = match tokio::time::timeout(STORE_TIMEOUT, store).await {
                Ok(outcome) => outcome,
                Err(_) => Err(QueueError::Io {
                    path: shared.queue.path().to_owned(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!(
                            "the queue did not reach the disk within {} s",
                            STORE_TIMEOUT.as_secs()
                        ),
                    ),
                }),
            };
            match outcome {
                Ok(EnqueueOutcome::Enqueued(seq)) if group && parsed.is_ok() => {
                    storage_failures = 0;
                    shared.set_backpressure(false);
                    held.push(Held {
                        ack: message.ack.clone(),
                        epoch,
                        seq,
                        id: parsed.as_ref().map(|r| r.request_id.clone()).unwrap_or_default(),
                    });
                    break;
                }
                Ok(EnqueueOutcome::Enqueued(seq)) => {
                    storage_failures = 0;
                    shared.set_backpressure(false);
                    // This flush covered the held writes too; they go first.
                    settle(&client, &shared, &mut held, true).await;
                    if let Some(ack) = &message.ack
                        && current()
                        && let Err(e) = client.ack(ack).await
                    {
                        warn!("cannot acknowledge: {e} (the broker will redeliver)");
                    }
                    shared.metrics.acknowledged.inc();
                    match parsed {
                        Ok(request) => {
                            debug!(id = %request.request_id, seq = seq.get(), "queued");
                            if let Some(leased) = handed {
                                // Held from now on: released at shutdown if no worker takes it.
                                lock(&shared.in_flight).insert(leased.seq());
                                lock(&shared.handoff).push_back(leased);
                            }
                            shared.work.notify_one();
                        }
                        Err(rejected) => {
                            info!(id = %rejected.reply.request_id, code = rejected.code.as_str(), "refused: {}", rejected.message);
                            shared.metrics.count(rejected.code.as_str(), "ingress", "refused");
                            shared.answered_errors.fetch_add(1, Ordering::Relaxed);
                            *lock(&shared.last_error) =
                                Some((rejected.code.as_str(), rejected.message.clone()));
                            shared.publish_reply(seq, rejected.reply);
                        }
                    }
                    break;
                }
                Ok(EnqueueOutcome::Full { .. }) => {
                    settle(&client, &shared, &mut held, false).await;
                    shared.set_backpressure(true);
                    tokio::select! {
                        _ = shared.stopping.cancelled() => return,
                        _ = shared.space.notified() => {}
                        _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                    }
                }
                Ok(EnqueueOutcome::TooLarge {
                    payload_bytes,
                    max_bytes,
                }) => {
                    let Ok(request) = &parsed else { break };
                    let message =
                        format!("the image is {payload_bytes} bytes, the queue holds at most {max_bytes}");
                    let reply = StoredReply {
                        request_id: request.request_id.clone(),
                        topic: request.reply_topic.clone(),
                        correlation_data: request.correlation_data.clone(),
                        protocol: request.protocol,
                        payload: error_document(
                            &request.request_id,
                            &shared.device,
                            None,
                            ErrorCode::TooLarge,
                            &message,
                        ),
                    };
                    parsed = Err(Box::new(crate::request::Rejected {
                        code: ErrorCode::TooLarge,
                        message,
                        reply,
                    }));
                }
                Err(e) => {
                    error!("cannot store a request: {e}; not acknowledged, retrying");
                    shared.set_backpressure(true);
                    *lock(&shared.last_error) = Some(("internal", format!("cannot store a request: {e}")));
                    storage_failures += 1;
                    // A disk that fails (full, I/O errors, stalled) is not fixed by waiting in
                    // here: after a few tries, stop and let the service manager restart the
                    // agent, which reopens the queue once there is room. Nothing
                    // unacknowledged is lost: the broker keeps it. An I/O error stops it at
                    // once; other storage errors get a few more tries.
                    let storage = matches!(e, QueueError::Storage(_) | QueueError::Io { .. });
                    if storage && (e.is_io() || storage_failures >= STORAGE_FAILURES_BEFORE_EXIT) {
                        *lock(&shared.fatal_reason) = Some(format!(
                            "the request queue's storage failed ({e}); stopping so that the service \
                             manager restarts the agent and reopens the queue once the disk has room \
                             (requests not yet acknowledged stay with the broker)"
                        ));
                        shared.fatal.cancel();
                        return;
                    }
                    tokio::select! {
                        _ = shared.stopping.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
    }
    settle(&client, &shared, &mut held, false).await;
}

impl Shared {
    /// Expected wait for local inference of a new request: queue depth x recent latency /
    /// workers.
    fn estimated_wait_ms(&self) -> f64 {
        let latency = f64::from_bits(self.local_latency_ms.load(Ordering::Relaxed));
        let pending = self.queue.stats().pending as f64;
        pending * latency / self.config.workers.count() as f64
    }

    fn observe_local_latency(&self, ms: f64) {
        let old = f64::from_bits(self.local_latency_ms.load(Ordering::Relaxed));
        let new = if old == 0.0 { ms } else { 0.8 * old + 0.2 * ms };
        self.local_latency_ms.store(new.to_bits(), Ordering::Relaxed);
    }

    /// Whether the request has time left for a cluster call (`routing::MIN_CLUSTER_CALL`).
    fn time_for_cluster(&self, lease: &Lease) -> bool {
        let configured = Duration::from_millis(self.config.offload.timeout_ms);
        let left =
            deadline_instant(lease.request().deadline).map(|d| d.saturating_duration_since(Instant::now()));
        crate::routing::cluster_call_timeout(configured, left).is_some()
    }

    fn topics_match(&self, topic: &str) -> bool {
        self.topics.request_topics.iter().any(|t| t == topic)
    }
}

async fn worker_task(shared: Arc<Shared>) {
    loop {
        if shared.stopping.is_cancelled() {
            return;
        }
        let handed = lock(&shared.handoff).pop_front();
        let leased = match handed {
            Some(leased) => Ok(Ok(Some(leased))),
            None => {
                let queue = shared.queue.clone();
                tokio::task::spawn_blocking(move || queue.lease(UnixMillis::now())).await
            }
        };
        match leased {
            Ok(Ok(Some(leased))) => {
                let seq = leased.seq();
                lock(&shared.in_flight).insert(seq);
                let id = leased.lease().request().request_id.clone();
                handle(&shared, leased)
                    .instrument(info_span!("request", id = %id, seq = seq.get()))
                    .await;
                lock(&shared.in_flight).remove(&seq);
            }
            Ok(Ok(None)) => {
                shared.idle_workers.fetch_add(1, Ordering::SeqCst);
                tokio::select! {
                    _ = shared.stopping.cancelled() => {}
                    _ = shared.work.notified() => {}
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
                shared.idle_workers.fetch_sub(1, Ordering::SeqCst);
            }
            Ok(Err(e)) => {
                error!("cannot lease from the queue: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => {
                error!("lease task failed: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// A command on the control topic: `drain` (unsubscribe from requests, finish the queue,
/// status `draining` then `drained`) or `resume`, both idempotent; `reload` (with `source`, a
/// path or URL, and `sha256`; without a source the configured bundle) and `rollback`, run
/// in order by the model task, their outcome in the status's `model_reload` (with the
/// command's `id` if it has one). JSON `{"command": ...}` or the bare word.
fn control(shared: &Arc<Shared>, payload: &[u8]) {
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
async fn sighup_task(shared: Arc<Shared>, mut hangup: tokio::signal::unix::Signal) {
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
async fn model_task(
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

/// The `error.message` of an error reply document.
fn error_message(doc: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(doc)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// A blocking task that catches its own panics can only fail to join if the runtime is
/// shutting down, which ends the process anyway.
fn unreachable_join(e: tokio::task::JoinError) -> ! {
    error!("classification task lost: {e}");
    std::process::exit(1)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// A request's deadline (wall clock) on the monotonic clock.
fn deadline_instant(deadline: Option<UnixMillis>) -> Option<Instant> {
    let left = deadline?.0.saturating_sub(UnixMillis::now().0);
    Some(Instant::now() + Duration::from_millis(left))
}

fn since_ms(t: UnixMillis) -> f64 {
    UnixMillis::now().0.saturating_sub(t.0) as f64
}

async fn handle(shared: &Arc<Shared>, leased: Leased) {
    let seq = leased.seq();
    let (payload, outcome) = match leased {
        Leased::Ready(lease) => classify(shared, lease).await,
        Leased::Expired(lease) => {
            let r = lease.request();
            let msg = format!(
                "the deadline passed {} ms after arrival, before classification",
                r.deadline
                    .map(|d| d.0.saturating_sub(r.received_at.0))
                    .unwrap_or(0)
            );
            fail(shared, lease, ErrorCode::DeadlineExceeded, &msg)
        }
        Leased::DeadLettered(lease) => {
            let msg = format!(
                "the request failed {} times and was dead-lettered",
                lease.attempt()
            );
            error!("{msg}");
            fail(shared, lease, ErrorCode::Internal, &msg)
        }
    };
    let (code, path, reason, lease) = match outcome {
        Outcome::Ok(lease, path, reason) => ("ok", path, reason, lease),
        Outcome::Error(code, lease) => (code.as_str(), "local", "error", lease),
    };
    let request = lease.into_request();
    let reply = StoredReply {
        request_id: request.request_id,
        topic: request.reply_topic,
        correlation_data: request.correlation_data,
        protocol: request.protocol,
        payload,
    };
    match shared.queue.complete_async(seq, &reply).await {
        Ok(()) => {
            shared.metrics.count(code, path, reason);
            let counter = match (code, path) {
                ("ok", "cluster") => &shared.answered_cluster,
                ("ok", _) => &shared.answered_local,
                _ => {
                    *lock(&shared.last_error) = Some((code, error_message(&reply.payload)));
                    &shared.answered_errors
                }
            };
            counter.fetch_add(1, Ordering::Relaxed);
            shared.metrics.total.observe(since_ms(request.received_at) / 1e3);
            let n = shared.history.answered(UnixMillis::now().0, &reply.payload);
            if let Some(ticket) = shared.history.thumbnail_ticket() {
                let (served, image) = (shared.served.get(), request.payload);
                tokio::task::spawn_blocking(move || {
                    ticket.attach(n, served.classifier.preprocessor(), &image)
                });
            }
            shared.space.notify_waiters();
            shared.publish_reply(seq, reply);
        }
        Err(QueueError::NotLeased { .. }) => {
            warn!("the lease expired before the reply was stored; another worker will answer");
        }
        Err(e) => error!("cannot store the reply: {e}; the request will be retried"),
    }
}

/// An error reply for a leased request, naming the model.
fn fail(shared: &Shared, lease: Lease, code: ErrorCode, message: &str) -> (Vec<u8>, Outcome) {
    let r = lease.request();
    let served = shared.served.get();
    let doc = error_document(&r.request_id, &shared.device, Some(&served.model), code, message);
    (doc, Outcome::Error(code, lease))
}

enum Outcome {
    /// Answered, by this path, for this reason.
    Ok(Lease, &'static str, &'static str),
    Error(ErrorCode, Lease),
}

/// Which path served a request and why (`source` and `reason` of the reply).
struct Route {
    source: &'static str,
    reason: &'static str,
}

async fn classify(shared: &Arc<Shared>, lease: Lease) -> (Vec<u8>, Outcome) {
    // This request's model, to its reply, whatever reloads happen meanwhile.
    let served = shared.served.get();
    let r = lease.request();
    let queued = since_ms(r.received_at);
    shared.metrics.queue_wait.observe(queued / 1e3);
    let k = r.top_k.unwrap_or(shared.config.model.top_k) as usize;
    let deadline_passed = r.deadline.is_some_and(|d| UnixMillis::now() >= d);
    if deadline_passed {
        let msg = format!("the deadline passed after {queued:.0} ms in the queue, before classification");
        return fail(shared, lease, ErrorCode::DeadlineExceeded, &msg);
    }
    let offload = shared.offload.as_ref();
    let mut local_reason = if offload.is_some() { "local" } else { "local_only" };

    // Load: offload when the local wait would exceed the target and the cluster is up.
    if let Some(o) = offload {
        let target = shared.config.offload.max_local_wait_ms as f64;
        let wait = shared.estimated_wait_ms();
        if target > 0.0 && wait > target && o.available() && shared.time_for_cluster(&lease) {
            debug!(wait_ms = wait, "offloading for load");
            match cluster(shared, &served, o, &lease, k).await {
                Ok((answer, cluster_ms)) => {
                    return cluster_reply(
                        shared,
                        &served.model,
                        lease,
                        answer,
                        queued,
                        cluster_ms,
                        Route {
                            source: "cluster",
                            reason: "load",
                        },
                    );
                }
                Err(e) => {
                    warn!("cluster failed, answering locally: {e}");
                    local_reason = "cluster_failed";
                }
            }
        }
    }

    let s = served.clone();
    let (lease, result) = match tokio::task::spawn_blocking(move || {
        let image = &lease.request().payload;
        let result =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| s.classifier.classify(image, k)));
        (lease, result)
    })
    .await
    {
        Ok((lease, Ok(result))) => (lease, result),
        Ok((lease, Err(_panic))) => {
            error!("classification panicked");
            let msg = "the classifier failed on this request";
            return fail(shared, lease, ErrorCode::Internal, msg);
        }
        Err(e) => unreachable_join(e),
    };
    match result {
        Ok(c) => {
            shared.metrics.preprocess.observe(c.preprocess.as_secs_f64());
            shared.metrics.inference.observe(c.inference.as_secs_f64());
            shared.observe_local_latency(ms(c.preprocess) + ms(c.inference));
            let best = c.top.first().map(|p| p.score).unwrap_or(0.0);
            shared.metrics.confidence.observe(f64::from(best));
            let threshold = shared.config.offload.min_confidence;
            let measure = shared.config.offload.confidence_measure;
            // The classes replies can name: a background class (label offset) is not an answer.
            let offset = served.classifier.manifest().output.label_offset;
            let labelled = c.probabilities.get(offset..).unwrap_or_default();
            let confidence = crate::routing::confidence(measure, labelled);
            shared.history.confidence(best, confidence < threshold);
            if let Some(o) = offload
                && confidence < threshold
            {
                if !shared.time_for_cluster(&lease) {
                    // Asking now could only make the reply later than the client wants it.
                    local_reason = "low_confidence_deadline";
                } else if o.available() {
                    match cluster(shared, &served, o, &lease, k).await {
                        Ok((answer, cluster_ms)) => {
                            let route = Route {
                                source: "cluster",
                                reason: "low_confidence",
                            };
                            return cluster_reply(
                                shared,
                                &served.model,
                                lease,
                                answer,
                                queued,
                                cluster_ms,
                                route,
                            );
                        }
                        Err(e) => {
                            warn!("cluster failed on a low-confidence request, answering locally: {e}");
                            local_reason = "low_confidence_cluster_failed";
                        }
                    }
                } else {
                    local_reason = "low_confidence_cluster_unavailable";
                }
            }
            let r = lease.request();
            let reply = Reply {
                id: &r.request_id,
                device: &shared.device,
                model: &served.model,
                source: "local",
                reason: local_reason,
                top: c
                    .top
                    .into_iter()
                    .map(|p| Label {
                        label: p.label,
                        index: Some(p.index),
                        score: p.score,
                    })
                    .collect(),
                score_kind: "probability",
                low_confidence: best < shared.config.model.low_confidence_threshold || confidence < threshold,
                timings_ms: Timings {
                    queued,
                    preprocess: ms(c.preprocess),
                    inference: ms(c.inference),
                    total: since_ms(r.received_at),
                },
            };
            info!(
                top1 = best,
                inference_ms = ms(c.inference),
                reason = local_reason,
                "classified"
            );
            let doc = reply.to_json();
            (doc, Outcome::Ok(lease, "local", local_reason))
        }
        Err(e) => {
            let code = ErrorCode::from_runtime(e.code());
            info!(code = code.as_str(), "cannot classify: {e}");
            fail(shared, lease, code, &e.to_string())
        }
    }
}

/// Asks the cluster; returns its answer and how long the call took (ms).
async fn cluster(
    shared: &Arc<Shared>,
    served: &Arc<Served>,
    offload: &Arc<crate::offload::Offload>,
    lease: &Lease,
    k: usize,
) -> Result<(crate::offload::Answer, f64), crate::offload::OffloadError> {
    use crate::offload::{OffloadError, Payload};
    let image = &lease.request().payload;
    let start = Instant::now();
    let deadline = deadline_instant(lease.request().deadline);
    let manifest = served.classifier.manifest();
    let answer = if crate::offload::wants_tensor(&shared.config.offload) {
        let s = served.clone();
        let bytes = image.clone();
        let tensor =
            tokio::task::spawn_blocking(move || s.classifier.preprocessor().tensor_from_bytes(&bytes))
                .await
                .map_err(|e| OffloadError::Failed(format!("preprocessing task: {e}")))?
                .map_err(|e| OffloadError::Failed(format!("preprocessing: {e}")))?;
        let shape = tensor.shape().to_vec();
        let values = tensor
            .try_as_plain_ram()
            .and_then(|v| v.as_slice::<f32>())
            .map_err(|e| OffloadError::Failed(format!("tensor: {e}")))?
            .to_vec();
        offload
            .classify(Payload::Tensor(&shape, &values), k, deadline, manifest)
            .await
    } else {
        offload
            .classify(Payload::Encoded(image), k, deadline, manifest)
            .await
    };
    let cluster_ms = ms(start.elapsed());
    shared.metrics.cluster.observe(cluster_ms / 1e3);
    let (answer, endpoint) = answer?;
    debug!(%endpoint, cluster_ms, "answered by the cluster");
    Ok((answer, cluster_ms))
}

fn cluster_reply(
    shared: &Arc<Shared>,
    model: &ModelRef,
    lease: Lease,
    answer: crate::offload::Answer,
    queued: f64,
    cluster_ms: f64,
    route: Route,
) -> (Vec<u8>, Outcome) {
    let r = lease.request();
    let labels = answer.top;
    let best = labels.first().map(|l| l.score).unwrap_or(0.0);
    let logits = answer.scores == crate::config::PoolScores::Logits;
    let reply = Reply {
        id: &r.request_id,
        device: &shared.device,
        model,
        source: route.source,
        reason: route.reason,
        top: labels,
        score_kind: if logits { "logit" } else { "probability" },
        // Logits say nothing against a probability threshold.
        low_confidence: !logits && best < shared.config.model.low_confidence_threshold,
        timings_ms: Timings {
            queued,
            preprocess: 0.0,
            inference: cluster_ms,
            total: since_ms(r.received_at),
        },
    };
    info!(
        top1 = best,
        cluster_ms,
        reason = route.reason,
        "classified by the cluster"
    );
    let doc = reply.to_json();
    (doc, Outcome::Ok(lease, route.source, route.reason))
}

async fn housekeeping_task(shared: Arc<Shared>) {
    let mut last: Option<(State, crate::queue::QueueStats, u64, u64)> = None;
    // systemd's watchdog is fed from here, at least twice per period: if this loop stalls
    // (a wedged runtime or queue), systemd restarts the agent.
    let watchdog = sd_notify::watchdog_enabled();
    let mut fed = Instant::now();
    loop {
        if let Some(period) = watchdog
            && fed.elapsed() >= period / 3
        {
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
            fed = Instant::now();
        }
        tokio::select! {
            _ = shared.status_changed.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let queue = shared.queue.clone();
        // Also syncs what was committed without a sync (leases, completions): a power cut then
        // repeats at most about a second of work.
        let requeue = move || {
            let n = queue.requeue_expired(UnixMillis::now())?;
            queue.sync_if_needed()?;
            Ok::<_, crate::queue::QueueError>(n)
        };
        match tokio::task::spawn_blocking(requeue).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => {
                warn!(n, "leases expired; requests handed out again");
                shared.work.notify_waiters();
            }
            Ok(Err(e)) => error!("cannot requeue expired leases or sync the queue: {e}"),
            Err(e) => error!("requeue task failed: {e}"),
        }
        let stats = shared.queue.stats();
        shared.metrics.set_queue(&stats);
        let state = shared.state();
        let answered = shared.answered_local.load(Ordering::Relaxed)
            + shared.answered_cluster.load(Ordering::Relaxed)
            + shared.answered_errors.load(Ordering::Relaxed);
        let epoch = shared.status_epoch.load(Ordering::Relaxed);
        if shared.connected.load(Ordering::Relaxed) && last != Some((state, stats, answered, epoch)) {
            shared.send(PubCmd::Publish {
                tag: Tag::Status,
                topic: shared.topics.status.clone(),
                payload: shared.status_document(state.as_str()),
                retain: true,
                correlation_data: None,
            });
            last = Some((state, stats, answered, epoch));
        }
    }
}

/// For `--protocol` parsing in the binary.
pub fn parse_protocol(s: &str) -> Result<MqttProtocol, String> {
    match s {
        "v5" | "5" => Ok(MqttProtocol::V5),
        "v311" | "3.1.1" | "4" => Ok(MqttProtocol::V311),
        other => Err(format!("unknown MQTT protocol `{other}` (v5 or v311)")),
    }
}

#[cfg(test)]
mod refusal_tests {
    use super::refusal;

    #[test]
    fn a_refused_connack_is_named_and_other_errors_are_not() {
        let e = "MQTT connection: Connection refused, return code: `BadUserNamePassword`";
        let said = refusal(e).unwrap_or_default();
        assert!(
            said.contains("refused the connection") && said.contains("mqtt.password"),
            "{said}"
        );
        let said =
            refusal("MQTT connection: Connection refused, return code: `NotAuthorized`").unwrap_or_default();
        assert!(said.contains("not authorized"), "{said}");
        assert_eq!(
            refusal("MQTT connection: I/O: Connection refused (os error 111)"),
            None
        );
    }
}
