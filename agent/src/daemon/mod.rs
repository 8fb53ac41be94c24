//! `edge-agent run`: the device daemon. MQTT in, durable queue, workers, replies out. One
//! task per file:
//!
//! ```text
//!  connection.rs ──Message──► ingress.rs ──enqueue+flush──► queue ──lease──► workers.rs
//!   (polls rumqttc)            │ then PUBACK; to an idle       ▲             │ routing::decide:
//!        ▲  │ PUBACK of a reply │ worker: enqueued leased,     │             │ local, cluster or
//!        │  │                   │ handed over directly ───────────────────►  │ both; reply::*,
//!        │  └──► queue.reply_acked (leaves outbox)             │             ▼ complete (outbox)
//!        └──────────────────────────── publisher.rs ◄─────────┴─────────────┘
//!         control messages ──► control.rs: drain, resume; reload, rollback, SIGHUP
//!                              (the model task: one rollout at a time)
//!  housekeeping.rs: expired leases, queue sync, the retained status, systemd's watchdog
//!  status.rs: the status documents (also the last will) and the HTTP side
//!  shutdown.rs: the stop sequence, ending with the acknowledged `offline` status
//! ```
//!
//! Tasks share `Shared` (this file, with `run`, which starts them); one publisher task sends
//! every publish so the `PublishTracker` sees them in order (see `mqtt`). Backpressure: when
//! the queue is full, ingress holds the message it has (unacknowledged) and waits for space;
//! the broker stops sending once `receive_maximum` messages are unacknowledged, so memory
//! stays bounded.
//!
//! Shutdown (SIGTERM/SIGINT): ingress stops taking messages (those not acknowledged are
//! redelivered by the broker later), workers finish what they hold, the agent waits a little
//! for the broker to acknowledge the last replies (those not acknowledged stay in the outbox
//! and are published again at the next start), publishes its status as offline and, once the
//! broker has acknowledged it (at most `OFFLINE_ACK_TIMEOUT`), disconnects; without that
//! acknowledgement it closes the connection without DISCONNECT, so that the broker publishes
//! the last will (`offline` too) instead. Then it flushes the queue.

mod connection;
mod control;
mod housekeeping;
mod ingress;
mod publisher;
mod shutdown;
mod status;
mod workers;

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span};

use edge_runtime::preprocess::ImageLimits;
use edge_runtime::runtime::{Classifier, RuntimeOptions, TuneOptions, Tuning};

use crate::config::{Config, MqttProtocol, broker_address};
use crate::metrics::Metrics;
use crate::model::Current;
use crate::model::fetch::FetchLimits;
use crate::model::rollout::{Command as ModelCommand, Rollout};
use crate::model::store::ModelStore;
use crate::mqtt::{self, Message, PublishTracker};
use crate::queue::{Leased, Queue, Seq, UnixMillis};
use crate::reply::ModelRef;
use crate::request::RequestPolicy;

use publisher::{PubCmd, Tag};

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

impl Topics {
    fn new(prefix: &str, device: &str, shared_group: &str) -> Self {
        let mut requests = vec![format!("{prefix}/{device}/classify")];
        let mut request_topics = requests.clone();
        if !shared_group.is_empty() {
            requests.push(format!("$share/{shared_group}/{prefix}/fleet/classify"));
            request_topics.push(format!("{prefix}/fleet/classify"));
        }
        Self {
            requests,
            request_topics,
            control: format!("{prefix}/{device}/control"),
            status: format!("{prefix}/{device}/status"),
        }
    }
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
    /// When the current connection came up (`None` while there is none): how long the
    /// tracker's entries may wait is measured against it (see `housekeeping`).
    connected_since: Mutex<Option<Instant>>,
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

    let topics = Topics::new(&prefix, &device, &config.mqtt.shared_group);
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
    // The last will names the model served when the connection was made.
    let offline = status::offline_document(&device, &model)?;
    let settings = connection::settings(&config, &device, (host, port), (topics.status.clone(), offline))?;
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
        connected_since: Mutex::new(None),
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
        addr => Some(crate::http::serve(addr, status::shared_http(&shared)).await?),
    };

    let (ingress_tx, ingress_rx) = mpsc::unbounded_channel::<(u64, Message)>();
    let conn_stop = CancellationToken::new();
    let conn_task = tokio::spawn(connection::connection_task(
        connection,
        shared.clone(),
        ingress_tx,
        conn_stop.clone(),
    ));
    let publisher = tokio::spawn(publisher::publisher_task(
        client.clone(),
        shared.clone(),
        publish_rx,
    ));
    let ingress = tokio::spawn(ingress::ingress_task(client.clone(), shared.clone(), ingress_rx));
    let workers: Vec<_> = (0..shared.config.workers.count())
        .map(|i| tokio::spawn(workers::worker_task(shared.clone()).instrument(info_span!("worker", n = i))))
        .collect();
    let housekeeping = tokio::spawn(housekeeping::housekeeping_task(shared.clone()));
    let model_task = tokio::spawn(control::model_task(shared.clone(), model_rx));
    let sighup = tokio::spawn(control::sighup_task(shared.clone(), hangup));

    tokio::select! {
        signal = crate::signal::wait_for_signal() => signal?,
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
    shutdown::shutdown(
        &shared,
        shutdown::Tasks {
            ingress,
            workers,
            housekeeping,
            sighup,
            model_task,
            conn_stop,
            conn_task,
            publisher,
            http,
        },
    )
    .await
}

/// For `--protocol` parsing in the binary.
pub fn parse_protocol(s: &str) -> Result<MqttProtocol, String> {
    match s {
        "v5" | "5" => Ok(MqttProtocol::V5),
        "v311" | "3.1.1" | "4" => Ok(MqttProtocol::V311),
        other => Err(format!("unknown MQTT protocol `{other}` (v5 or v311)")),
    }
}
