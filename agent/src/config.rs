//! The daemon's configuration: one TOML file, every key overridable by an `EDGE_AGENT_*`
//! environment variable, the common ones by flags (highest precedence).
//!
//! Environment names are the key path in upper case with `__` between a table and its key:
//! `mqtt.broker` is `EDGE_AGENT_MQTT__BROKER`, `device_id` is `EDGE_AGENT_DEVICE_ID`.
//! Unknown keys and invalid values fail at start, naming the key and where it came from.
//! `agent/examples/agent.toml` documents every key with its default.

use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroU64, NonZeroUsize};
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

use crate::queue::QueueLimits;

mod env;

/// Prefix of the environment variables that override configuration keys.
pub const ENV_PREFIX: &str = "EDGE_AGENT_";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration file {0} does not exist")]
    Missing(PathBuf),
    #[error("invalid configuration: {0}")]
    Invalid(String),
    #[error("invalid configuration: key `{key}`: {reason}")]
    Value { key: &'static str, reason: String },
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// This device's name in topics and replies; empty means the host name.
    pub device_id: String,
    pub model: ModelConfig,
    pub mqtt: MqttConfig,
    pub embedded_broker: EmbeddedBrokerConfig,
    pub queue: QueueConfig,
    pub workers: WorkersConfig,
    pub limits: LimitsConfig,
    pub http: HttpConfig,
    pub log: LogConfig,
    pub offload: OffloadConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// The edge bundle to serve (written by edge-convert).
    pub bundle: PathBuf,
    /// Labels per reply when the request does not say.
    pub top_k: u32,
    /// Largest `top_k` a request may ask for.
    pub max_top_k: u32,
    /// Replies whose top-1 score is below this carry `"low_confidence": true`.
    pub low_confidence_threshold: f32,
    /// Where rolled-out bundles are kept (`current.bundle`, `previous.bundle`, the staging
    /// file); empty means `models` beside `queue.dir`.
    pub dir: PathBuf,
    /// Largest bundle loaded or downloaded, in bytes.
    pub max_bundle_bytes: u64,
    /// Deadline of a bundle download (connection to last byte), in seconds.
    pub fetch_timeout_secs: u64,
    /// Choose tract's runtime settings (knobs, and on AVX-512 CPUs its instruction set, timed
    /// in child processes of the agent) for each bundle by measuring candidates on this CPU
    /// when a bundle is first loaded; the choice is cached in `dir` (`edge-tuning.json`,
    /// keyed by bundle sha256 and CPU). Off: tract's defaults.
    pub tuning: bool,
    /// Longest time the knob search of one tuning may take, in seconds; the instruction-set
    /// comparison takes at most half of it more (the model is not served meanwhile).
    pub tuning_budget_secs: u64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum MqttProtocol {
    V5,
    V311,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// `mqtt://host:port` (or `tcp://`), `mqtts://host:port` for TLS (default port 8883);
    /// empty starts the embedded broker and connects to it.
    pub broker: String,
    pub protocol: MqttProtocol,
    /// Empty means `edge-agent-<device_id>`. It must be stable: the broker keeps the session
    /// (unacknowledged requests) under this name.
    pub client_id: String,
    pub username: String,
    pub password: String,
    /// `mqtts://` only: PEM file of the CA that signed the broker's certificate (verified,
    /// with the broker's host name).
    pub tls_ca: String,
    /// `mqtts://` only: PEM certificate and key the agent authenticates with (mutual TLS).
    pub tls_cert: String,
    pub tls_key: String,
    /// First segment of every topic.
    pub topic_prefix: String,
    /// When set, also take fleet-wide requests from `$share/<group>/<prefix>/fleet/classify`.
    pub shared_group: String,
    pub keep_alive_secs: u64,
    /// How long the broker keeps the session (and the requests not yet acknowledged) while
    /// the agent is away. MQTT 5 only; 3.1.1 sessions are kept until the broker drops them.
    pub session_expiry_secs: u32,
    /// Largest MQTT packet accepted, in bytes. Requests whose image exceeds
    /// `limits.max_image_bytes` but fit here are answered `too_large`; larger packets are
    /// refused by the broker (MQTT 5) or end the connection (3.1.1).
    pub max_packet_bytes: u32,
    /// Requests the broker may have in flight to this agent (MQTT 5 Receive Maximum).
    /// Bounds memory: at most this many unacknowledged requests are held at once.
    pub receive_maximum: u16,
    pub reconnect_min_ms: u64,
    pub reconnect_max_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EmbeddedBrokerConfig {
    /// Address of the embedded broker started when `mqtt.broker` is empty.
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// Directory of the queue (an SQLite database); created if missing.
    pub dir: PathBuf,
    /// A queue that cannot be opened (damaged, foreign, an earlier version's): "refuse"
    /// (exit with the reason, nothing touched) or "quarantine" (move it aside, start empty).
    pub on_damage: crate::queue::OnDamage,
    pub max_items: usize,
    pub max_bytes: u64,
    pub max_attempts: u32,
    pub visibility_timeout_secs: u64,
    pub max_dead_letters: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WorkersConfig {
    /// Requests classified at once; they share one optimised model. 0: one per CPU core.
    pub count: usize,
    /// Threads an inference running alone uses. 0: every CPU core.
    pub threads: usize,
    /// Adaptive parallelism: an inference running alone uses `threads` threads (lowest
    /// latency); inferences running side by side, or while requests wait in the queue, use
    /// one thread each (highest throughput). false: every inference uses `threads` threads.
    pub adaptive: bool,
}

impl WorkersConfig {
    /// `count` with 0 resolved to the number of CPU cores.
    pub fn count(&self) -> usize {
        if self.count == 0 { cpus() } else { self.count }
    }

    /// `threads` with 0 resolved to the number of CPU cores.
    pub fn threads(&self) -> usize {
        if self.threads == 0 { cpus() } else { self.threads }
    }
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest image accepted, in bytes (after base64 decoding for 3.1.1 envelopes).
    pub max_image_bytes: usize,
    /// Largest decoded image, in pixels; checked from the header before decoding.
    pub max_pixels: u64,
    /// Deadline applied to requests that carry none, in ms; 0 means none.
    pub default_deadline_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address of the device page (`/`, `/api/status`), `/metrics`, `/healthz` and
    /// `/readyz`; empty disables the HTTP server.
    pub listen: String,
    /// Thumbnails of the last requests' images on the device page (at most 20); 0: none,
    /// camera images are private.
    pub recent_images: usize,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OffloadProtocol {
    /// `tensorflow.serving.PredictionService/Predict` (edge-agent serve, TF Serving).
    Tfserving,
    /// `inference.GRPCInferenceService/ModelInfer` (edge-agent serve, Triton, KServe).
    Kserve,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OffloadPayload {
    /// The encoded image as received (small uplink).
    Jpeg,
    /// The preprocessed input tensor (for signatures that take one).
    Tensor,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PoolScores {
    Probabilities,
    Logits,
}

/// The cluster pool (DESIGN.md sections 5 and 6). Offload is off without endpoints and DNS.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OffloadConfig {
    pub protocol: OffloadProtocol,
    /// Static pool endpoints, `host:port`.
    pub endpoints: Vec<String>,
    /// A DNS name with port (a Kubernetes headless Service) re-resolved periodically.
    pub dns: String,
    pub dns_refresh_secs: u64,
    /// Model name on the pool (`model_spec.name` / `model_name`).
    pub model_name: String,
    /// TF Serving signature (`predict_images` for JPEG bytes, `predict_tensor` for tensors).
    pub signature: String,
    /// Input name for tensors.
    pub input_name: String,
    pub send: OffloadPayload,
    /// Deadline of one cluster call, in ms.
    pub timeout_ms: u64,
    /// Offload when the estimated local wait exceeds this, in ms; 0: never for load.
    pub max_local_wait_ms: u64,
    /// Ask the cluster when the local confidence is below this; 0: never.
    pub min_confidence: f32,
    /// How confidence is measured: top-1 probability, top-1 minus top-2, or normalised
    /// entropy.
    pub confidence_measure: crate::routing::ConfidenceMeasure,
    /// What the pool's scores are: `probabilities`, or `logits` (TF Serving's Inception
    /// export returns the top-5 raw logits). A full vector of logits is turned into
    /// probabilities; top-k logits stay logits and replies say so (`offload/answer.rs`).
    pub pool_scores: PoolScores,
    /// Consecutive failed requests that open the circuit breaker.
    pub failure_threshold: u32,
    /// Seconds the breaker stays open before one probe request.
    pub open_secs: u64,
    /// Seconds a failing endpoint is left out.
    pub eject_secs: u64,
    /// PEM files; with `tls_ca` the connection is TLS, with `tls_cert` + `tls_key` mTLS.
    pub tls_ca: String,
    pub tls_cert: String,
    pub tls_key: String,
    /// Name to verify in the pool's certificate when it differs from the endpoint host.
    pub tls_domain: String,
}

impl Default for OffloadConfig {
    fn default() -> Self {
        Self {
            protocol: OffloadProtocol::Tfserving,
            endpoints: Vec::new(),
            dns: String::new(),
            dns_refresh_secs: 10,
            model_name: "inception".into(),
            signature: "predict_images".into(),
            input_name: "input".into(),
            send: OffloadPayload::Jpeg,
            timeout_ms: 2000,
            max_local_wait_ms: 1000,
            min_confidence: 0.0,
            confidence_measure: crate::routing::ConfidenceMeasure::Top1,
            pool_scores: PoolScores::Probabilities,
            failure_threshold: 3,
            open_secs: 10,
            eject_secs: 5,
            tls_ca: String::new(),
            tls_cert: String::new(),
            tls_key: String::new(),
            tls_domain: String::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A tracing filter (`info`, `edge_agent=debug,info`); `RUST_LOG` overrides it.
    pub level: String,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            bundle: PathBuf::from("/var/lib/edge-agent/model.bundle"),
            top_k: 5,
            max_top_k: 100,
            low_confidence_threshold: 0.5,
            dir: PathBuf::new(),
            max_bundle_bytes: 2 << 30,
            fetch_timeout_secs: 300,
            tuning: true,
            tuning_budget_secs: 30,
        }
    }
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            broker: String::new(),
            protocol: MqttProtocol::V5,
            client_id: String::new(),
            username: String::new(),
            password: String::new(),
            tls_ca: String::new(),
            tls_cert: String::new(),
            tls_key: String::new(),
            topic_prefix: "edge".into(),
            shared_group: String::new(),
            keep_alive_secs: 30,
            session_expiry_secs: 7 * 24 * 3600,
            max_packet_bytes: 16 * 1024 * 1024,
            receive_maximum: 16,
            reconnect_min_ms: 100,
            reconnect_max_ms: 10_000,
        }
    }
}

impl Default for EmbeddedBrokerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 1883)),
        }
    }
}

impl Default for QueueConfig {
    fn default() -> Self {
        let limits = QueueLimits::default();
        Self {
            dir: PathBuf::from("/var/lib/edge-agent/queue"),
            on_damage: crate::queue::OnDamage::Refuse,
            max_items: limits.max_items.get(),
            max_bytes: limits.max_bytes.get(),
            max_attempts: limits.max_attempts.get(),
            visibility_timeout_secs: limits.visibility_timeout.as_secs(),
            max_dead_letters: limits.max_dead_letters.get(),
        }
    }
}

impl Default for WorkersConfig {
    fn default() -> Self {
        Self {
            count: 0,
            threads: 0,
            adaptive: true,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_image_bytes: 8 * 1024 * 1024,
            max_pixels: 50_000_000,
            default_deadline_ms: 0,
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9464".into(),
            recent_images: 0,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Human,
            level: "info".into(),
        }
    }
}

/// Flag values; `None` leaves the file or environment value.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub device_id: Option<String>,
    pub bundle: Option<PathBuf>,
    pub broker: Option<String>,
    pub protocol: Option<MqttProtocol>,
    pub queue_dir: Option<PathBuf>,
    pub workers: Option<usize>,
    pub threads: Option<usize>,
    pub http_listen: Option<String>,
    pub log_format: Option<LogFormat>,
}

impl Overrides {
    /// Merges each flag that was given at its key path (`mqtt.broker`, ...).
    fn merge_into(&self, mut figment: Figment) -> Figment {
        fn put<T: Serialize>(f: Figment, key: &str, value: &Option<T>) -> Figment {
            match value {
                Some(v) => f.merge(Serialized::default(key, v)),
                None => f,
            }
        }
        figment = put(figment, "device_id", &self.device_id);
        figment = put(figment, "model.bundle", &self.bundle);
        figment = put(figment, "mqtt.broker", &self.broker);
        figment = put(figment, "mqtt.protocol", &self.protocol);
        figment = put(figment, "queue.dir", &self.queue_dir);
        figment = put(figment, "workers.count", &self.workers);
        figment = put(figment, "workers.threads", &self.threads);
        figment = put(figment, "http.listen", &self.http_listen);
        put(figment, "log.format", &self.log_format)
    }
}

impl Config {
    /// Defaults, then the file (if given), then the `EDGE_AGENT_*` environment variables, then
    /// flags; validated.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            if !path.is_file() {
                return Err(ConfigError::Missing(path.to_owned()));
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        // EDGE_AGENT_CONFIG names the file (the `--config` flag), it is not a key.
        // String keys take the variable's text as it is (`EDGE_AGENT_DEVICE_ID=007` is "007").
        let env = Env::prefixed(ENV_PREFIX).ignore(&["config"]).split("__");
        let shape =
            serde_json::to_value(Config::default()).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        figment = figment.merge(env::TypedEnv::new(env, &shape));
        figment = overrides.merge_into(figment);
        Self::extract(figment)
    }

    /// Defaults, then `text` as the configuration file; no environment, no flags. What
    /// `--print-config` prints reads back to the same configuration (the fuzz harness checks
    /// that, `fuzz/`).
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        Self::extract(Figment::from(Serialized::defaults(Config::default())).merge(Toml::string(text)))
    }

    fn extract(figment: Figment) -> Result<Self, ConfigError> {
        let config: Config = figment.extract().map_err(|e| ConfigError::Invalid(describe(e)))?;
        config.validate()?;
        Ok(config)
    }

    /// A warning when `file` holds a secret (`mqtt.password`) and other users may read it.
    pub fn exposed_secrets(file: &Path) -> Option<String> {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(file).ok()?.permissions().mode() & 0o777;
        if mode & 0o007 == 0 {
            return None;
        }
        let text = std::fs::read_to_string(file).ok()?;
        let value: toml::Table = text.parse().ok()?;
        let password = value.get("mqtt")?.get("password")?.as_str()?;
        (!password.is_empty()).then(|| {
            format!(
                "{} holds mqtt.password and other users can read it (mode {mode:o}): \
                 `chmod 600` it (or 640 with the agent's group)",
                file.display()
            )
        })
    }

    /// The configuration as `--print-config` shows it: secrets replaced by `<redacted>`.
    pub fn redacted(&self) -> Self {
        let mut shown = self.clone();
        if !shown.mqtt.password.is_empty() {
            shown.mqtt.password = "<redacted>".into();
        }
        shown
    }

    /// Checks what types alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &'static str, reason: &str| {
            Err(ConfigError::Value {
                key,
                reason: reason.to_owned(),
            })
        };
        let segment_ok = |s: &str| !s.is_empty() && !s.contains(['/', '+', '#', '\0']);
        if !self.device_id.is_empty() && !segment_ok(&self.device_id) {
            return bad("device_id", "must be one topic segment: no '/', '+', '#'");
        }
        if !self.mqtt.topic_prefix.split('/').all(segment_ok) {
            return bad(
                "mqtt.topic_prefix",
                "must be non-empty topic segments without '+' or '#'",
            );
        }
        if self.mqtt.topic_prefix.starts_with('$') {
            return bad(
                "mqtt.topic_prefix",
                "must not start with '$': brokers reserve those topics ($SYS, $share) and \
                 deliver no client's publishes there",
            );
        }
        if !self.mqtt.shared_group.is_empty() && !segment_ok(&self.mqtt.shared_group) {
            return bad("mqtt.shared_group", "must be one topic segment: no '/', '+', '#'");
        }
        if !self.mqtt.broker.is_empty() {
            broker_address(&self.mqtt.broker).map_err(|reason| ConfigError::Value {
                key: "mqtt.broker",
                reason,
            })?;
        }
        let tls = broker_tls(&self.mqtt.broker);
        if tls && self.mqtt.tls_ca.is_empty() {
            return bad(
                "mqtt.tls_ca",
                "an mqtts:// broker needs the CA file that signed its certificate",
            );
        }
        let tls_files = [&self.mqtt.tls_ca, &self.mqtt.tls_cert, &self.mqtt.tls_key];
        if !tls && tls_files.iter().any(|f| !f.is_empty()) {
            return bad(
                "mqtt.tls_ca",
                "TLS files are set but mqtt.broker is not an mqtts:// URL",
            );
        }
        if self.mqtt.tls_cert.is_empty() != self.mqtt.tls_key.is_empty() {
            return bad("mqtt.tls_cert", "mqtt.tls_cert and mqtt.tls_key go together");
        }
        if self.mqtt.keep_alive_secs < 5 {
            return bad("mqtt.keep_alive_secs", "must be at least 5");
        }
        if self.mqtt.receive_maximum == 0 {
            return bad("mqtt.receive_maximum", "must be at least 1");
        }
        if self.mqtt.reconnect_min_ms == 0 || self.mqtt.reconnect_max_ms < self.mqtt.reconnect_min_ms {
            return bad(
                "mqtt.reconnect_max_ms",
                "reconnect_min_ms must be positive and not above reconnect_max_ms",
            );
        }
        if (self.mqtt.max_packet_bytes as usize) < self.limits.max_image_bytes.saturating_add(1024) {
            return bad(
                "mqtt.max_packet_bytes",
                "must exceed limits.max_image_bytes by at least 1 KiB (topic and properties)",
            );
        }
        if self.limits.max_image_bytes == 0 {
            return bad("limits.max_image_bytes", "must be positive");
        }
        if self.limits.max_pixels == 0 {
            return bad("limits.max_pixels", "must be positive");
        }
        if self.model.top_k == 0 || self.model.top_k > self.model.max_top_k {
            return bad("model.top_k", "must be between 1 and model.max_top_k");
        }
        if !(0.0..=1.0).contains(&self.model.low_confidence_threshold) {
            return bad("model.low_confidence_threshold", "must be between 0 and 1");
        }
        if self.model.max_bundle_bytes == 0 {
            return bad("model.max_bundle_bytes", "must be positive");
        }
        if self.model.fetch_timeout_secs == 0 {
            return bad("model.fetch_timeout_secs", "must be positive");
        }
        if self.model.tuning && self.model.tuning_budget_secs == 0 {
            return bad(
                "model.tuning_budget_secs",
                "must be positive (set model.tuning = false to turn tuning off)",
            );
        }
        if self.workers.count > 64 {
            return bad("workers.count", "must be between 0 (one per CPU core) and 64");
        }
        if self.workers.threads > 256 {
            return bad("workers.threads", "must be between 0 (every CPU core) and 256");
        }
        if !self.http.listen.is_empty() && self.http.listen.parse::<SocketAddr>().is_err() {
            return bad("http.listen", "must be an address like 127.0.0.1:9464, or empty");
        }
        if self.http.recent_images > crate::web::history::MAX_RECENT_IMAGES {
            return bad("http.recent_images", "must be between 0 (no thumbnails) and 20");
        }
        let o = &self.offload;
        if o.timeout_ms == 0 {
            return bad("offload.timeout_ms", "must be positive");
        }
        if o.failure_threshold == 0 {
            return bad("offload.failure_threshold", "must be at least 1");
        }
        if !(0.0..=1.0).contains(&o.min_confidence) {
            return bad("offload.min_confidence", "must be between 0 and 1");
        }
        for e in &o.endpoints {
            pool_endpoint(e, !o.tls_ca.is_empty()).map_err(|reason| ConfigError::Value {
                key: "offload.endpoints",
                reason,
            })?;
        }
        if !o.dns.is_empty()
            && o.dns
                .rsplit_once(':')
                .is_none_or(|(_, p)| p.parse::<u16>().is_err())
        {
            return bad(
                "offload.dns",
                "must be name:port, e.g. edge-pool-headless.ml.svc.cluster.local:9000",
            );
        }
        self.queue_limits()?;
        Ok(())
    }

    pub fn queue_limits(&self) -> Result<QueueLimits, ConfigError> {
        let q = &self.queue;
        let positive = |key: &'static str| ConfigError::Value {
            key,
            reason: "must be positive".into(),
        };
        if q.visibility_timeout_secs == 0 {
            return Err(positive("queue.visibility_timeout_secs"));
        }
        Ok(QueueLimits {
            max_items: NonZeroUsize::new(q.max_items).ok_or_else(|| positive("queue.max_items"))?,
            max_bytes: NonZeroU64::new(q.max_bytes).ok_or_else(|| positive("queue.max_bytes"))?,
            max_attempts: NonZeroU32::new(q.max_attempts).ok_or_else(|| positive("queue.max_attempts"))?,
            visibility_timeout: Duration::from_secs(q.visibility_timeout_secs),
            max_dead_letters: NonZeroUsize::new(q.max_dead_letters)
                .ok_or_else(|| positive("queue.max_dead_letters"))?,
        })
    }

    /// The model directory: `model.dir`, or `models` beside the queue directory.
    pub fn model_dir(&self) -> PathBuf {
        if !self.model.dir.as_os_str().is_empty() {
            return self.model.dir.clone();
        }
        match self.queue.dir.parent() {
            Some(parent) => parent.join("models"),
            None => PathBuf::from("models"),
        }
    }

    /// The device id, or the host name when none is configured.
    pub fn device_id(&self) -> String {
        if !self.device_id.is_empty() {
            return self.device_id.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let host: String = host
            .trim()
            .chars()
            .map(|c| if matches!(c, '/' | '+' | '#') { '_' } else { c })
            .collect();
        if host.is_empty() {
            "edge-device".into()
        } else {
            host
        }
    }
}

/// Figment's error with the key path and the source (file or environment variable).
fn describe(e: figment::Error) -> String {
    e.into_iter()
        .map(|e| {
            let mut s = String::new();
            if !e.path.is_empty() {
                s.push_str(&format!("key `{}`: ", e.path.join(".")));
            }
            s.push_str(&e.kind.to_string());
            if let Some(md) = &e.metadata {
                match &md.source {
                    Some(source) => s.push_str(&format!(" (from {source})")),
                    None => s.push_str(&format!(" (from {})", md.name)),
                }
            }
            s
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The `host:port` of an `offload.endpoints` entry: `host:port`, `http://host:port` (plain)
/// or `https://host:port` (TLS, which needs `offload.tls_ca`). `tls` says whether the pool is
/// reached over TLS (`offload.tls_ca` is set); a scheme that says otherwise is refused.
pub fn pool_endpoint(endpoint: &str, tls: bool) -> Result<&str, String> {
    let address = match endpoint.split_once("://") {
        None => endpoint,
        Some(("http", rest)) if !tls => rest,
        Some(("https", rest)) if tls => rest,
        Some(("http", _)) => {
            return Err(format!(
                "`{endpoint}` is http:// but offload.tls_ca is set: the pool is reached over TLS, \
                 write https:// or host:port"
            ));
        }
        Some(("https", _)) => {
            return Err(format!(
                "`{endpoint}` is https:// but offload.tls_ca is not set: TLS to the pool needs \
                 the CA that signed its certificate"
            ));
        }
        Some((scheme, _)) => {
            return Err(format!(
                "`{endpoint}`: unsupported scheme `{scheme}` (host:port, http:// or https://)"
            ));
        }
    };
    let address = address.strip_suffix('/').unwrap_or(address);
    match address.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && !host.contains('/') && port.parse::<u16>().is_ok() => {
            Ok(address)
        }
        _ => Err(format!(
            "`{endpoint}` must be host:port (or http://host:port, https://host:port), without a path"
        )),
    }
}

/// `(host, port)` of a broker URL: `mqtt://host:port`, `tcp://host:port` or `host:port`.
/// Whether a broker URL asks for TLS (`mqtts://` or `ssl://`).
pub fn broker_tls(url: &str) -> bool {
    matches!(url.split_once("://"), Some(("mqtts" | "ssl", _)))
}

pub fn broker_address(url: &str) -> Result<(String, u16), String> {
    let (rest, default_port) = match url.split_once("://") {
        Some(("mqtt" | "tcp", rest)) => (rest, 1883),
        Some(("mqtts" | "ssl", rest)) => (rest, 8883),
        Some((scheme, _)) => {
            return Err(format!(
                "unsupported scheme `{scheme}` (use mqtt:// or tcp://, mqtts:// for TLS)"
            ));
        }
        None => (url, 1883),
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>()
                .map_err(|_| format!("invalid port `{p}` in `{url}`"))?,
        ),
        None => (rest, default_port),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("no host in `{url}`"));
    }
    Ok((host.to_owned(), port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use figment::Jail;

    /// Loads `toml` with the environment `vars`, inside a jail (own cwd and environment).
    #[allow(clippy::result_large_err)] // figment's Jail API returns its large error type
    fn load_str(toml: &str, vars: &[(&str, &str)], flags: &Overrides) -> Result<Config, String> {
        let mut out = None;
        Jail::expect_with(|jail| {
            jail.create_file("agent.toml", toml)?;
            for (k, v) in vars {
                jail.set_env(k, v);
            }
            out = Some(Config::load(Some(Path::new("agent.toml")), flags).map_err(|e| e.to_string()));
            Ok(())
        });
        out.unwrap()
    }

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn example_config_documents_the_defaults() {
        let example = include_str!("../examples/agent.toml");
        let loaded = load_str(example, &[], &Overrides::default()).unwrap();
        assert_eq!(
            loaded,
            Config::default(),
            "the example must document the defaults"
        );
        // Every key of the configuration appears in the example.
        let doc = serde_json::to_value(Config::default()).unwrap();
        for (table, value) in doc.as_object().unwrap() {
            match value.as_object() {
                Some(keys) => {
                    assert!(example.contains(&format!("[{table}]")), "[{table}] missing");
                    for key in keys.keys() {
                        assert!(example.contains(&format!("\n{key} = ")), "{table}.{key} missing");
                    }
                }
                None => assert!(example.contains(&format!("\n{table} = ")), "{table} missing"),
            }
        }
    }

    #[test]
    fn unknown_key_is_named() {
        let err = load_str("[mqtt]\nbrokr = \"x\"\n", &[], &Overrides::default()).unwrap_err();
        assert!(err.contains("brokr"), "{err}");
        let err = load_str("colour = 1\n", &[], &Overrides::default()).unwrap_err();
        assert!(err.contains("colour"), "{err}");
    }

    #[test]
    fn invalid_value_is_named() {
        let none = Overrides::default();
        for (toml, key) in [
            ("[workers]\ncount = \"many\"\n", "workers.count"),
            ("[workers]\ncount = 65\n", "workers.count"),
            ("[mqtt]\nprotocol = \"v4\"\n", "mqtt.protocol"),
            ("[mqtt]\nbroker = \"ws://x\"\n", "mqtt.broker"),
            ("[queue]\nmax_items = 0\n", "queue.max_items"),
            ("[limits]\nmax_image_bytes = 99999999\n", "mqtt.max_packet_bytes"),
            ("[http]\nlisten = \"nowhere\"\n", "http.listen"),
            ("[http]\nrecent_images = 21\n", "http.recent_images"),
        ] {
            let err = load_str(toml, &[], &none).unwrap_err();
            assert!(err.contains(key), "{toml:?}: {err}");
        }
    }

    #[test]
    fn missing_file_is_an_error() {
        let err =
            Config::load(Some(Path::new("/nonexistent/agent.toml")), &Overrides::default()).unwrap_err();
        assert!(matches!(err, ConfigError::Missing(_)));
    }

    #[test]
    fn environment_overrides_file_and_flags_override_both() {
        let vars = [
            ("EDGE_AGENT_MQTT__BROKER", "mqtt://env:1884"),
            ("EDGE_AGENT_WORKERS__COUNT", "3"),
            ("EDGE_AGENT_DEVICE_ID", "cam-env"),
        ];
        let file = "device_id = \"cam-file\"\n[mqtt]\nbroker = \"mqtt://file:1883\"\n";
        let c = load_str(file, &vars, &Overrides::default()).unwrap();
        assert_eq!(c.mqtt.broker, "mqtt://env:1884");
        assert_eq!(c.workers.count, 3);
        assert_eq!(c.device_id, "cam-env");

        let flags = Overrides {
            workers: Some(4),
            device_id: Some("cam-flag".into()),
            ..Overrides::default()
        };
        let c = load_str(file, &vars, &flags).unwrap();
        assert_eq!(c.workers.count, 4);
        assert_eq!(c.device_id, "cam-flag");
        assert_eq!(c.mqtt.broker, "mqtt://env:1884");
    }

    #[test]
    fn unknown_environment_key_is_named() {
        let err = load_str("", &[("EDGE_AGENT_MQTT__BROKR", "x")], &Overrides::default()).unwrap_err();
        assert!(err.contains("brokr") && err.contains("EDGE_AGENT_"), "{err}");
    }

    #[test]
    fn string_keys_take_any_string_from_the_environment() {
        let vars = [
            ("EDGE_AGENT_DEVICE_ID", "007"),
            ("EDGE_AGENT_MQTT__PASSWORD", "123456"),
            ("EDGE_AGENT_MQTT__USERNAME", "true"),
            ("EDGE_AGENT_MQTT__CLIENT_ID", "1.5"),
            ("EDGE_AGENT_MQTT__TOPIC_PREFIX", "2024"),
            ("EDGE_AGENT_OFFLOAD__MODEL_NAME", "[x]"),
            ("EDGE_AGENT_WORKERS__COUNT", "3"),
            ("EDGE_AGENT_WORKERS__ADAPTIVE", "false"),
            ("EDGE_AGENT_OFFLOAD__ENDPOINTS", "[\"10.0.0.5:9000\"]"),
        ];
        let c = load_str("", &vars, &Overrides::default()).unwrap();
        assert_eq!(c.device_id, "007");
        assert_eq!(c.mqtt.password, "123456");
        assert_eq!(c.mqtt.username, "true");
        assert_eq!(c.mqtt.client_id, "1.5");
        assert_eq!(c.mqtt.topic_prefix, "2024");
        assert_eq!(c.offload.model_name, "[x]");
        assert_eq!(c.workers.count, 3, "numbers stay numbers");
        assert!(!c.workers.adaptive, "booleans stay booleans");
        assert_eq!(c.offload.endpoints, ["10.0.0.5:9000"], "lists stay lists");
        let err = load_str("", &[("EDGE_AGENT_WORKERS__COUNT", "x")], &Overrides::default()).unwrap_err();
        assert!(
            err.contains("workers.count") && err.contains("EDGE_AGENT_"),
            "{err}"
        );
    }

    #[test]
    fn a_dollar_topic_prefix_is_refused() {
        for prefix in ["$SYS", "$share/g"] {
            let err = load_str(
                &format!("[mqtt]\ntopic_prefix = \"{prefix}\"\n"),
                &[],
                &Overrides::default(),
            )
            .unwrap_err();
            assert!(err.contains("mqtt.topic_prefix") && err.contains('$'), "{err}");
        }
    }

    #[test]
    fn pool_endpoints_take_urls_whose_scheme_matches_the_tls_setting() {
        assert_eq!(pool_endpoint("10.0.0.5:9000", false), Ok("10.0.0.5:9000"));
        assert_eq!(
            pool_endpoint("http://127.0.0.1:51287", false),
            Ok("127.0.0.1:51287")
        );
        assert_eq!(pool_endpoint("http://pool:9000/", false), Ok("pool:9000"));
        assert_eq!(pool_endpoint("https://pool:9000", true), Ok("pool:9000"));
        assert_eq!(pool_endpoint("pool:9000", true), Ok("pool:9000"));
        for (e, tls) in [
            ("https://pool:9000", false),
            ("http://pool:9000", true),
            ("grpc://pool:9000", false),
            ("http://pool:9000/v1", false),
            ("http://pool", false),
            ("pool", false),
            (":9000", false),
        ] {
            assert!(pool_endpoint(e, tls).is_err(), "{e} tls={tls}");
        }
        let err = load_str(
            "[offload]\nendpoints = [\"https://127.0.0.1:9000\"]\n",
            &[],
            &Overrides::default(),
        )
        .unwrap_err();
        assert!(
            err.contains("offload.endpoints") && err.contains("tls_ca"),
            "{err}"
        );
    }

    #[test]
    fn broker_addresses() {
        assert_eq!(broker_address("mqtt://h:1884").unwrap(), ("h".into(), 1884));
        assert_eq!(broker_address("tcp://h").unwrap(), ("h".into(), 1883));
        assert_eq!(broker_address("10.0.0.1:1").unwrap(), ("10.0.0.1".into(), 1));
        assert!(broker_address("mqtt://:1").is_err());
        assert!(broker_address("mqtt://h:x").is_err());
        assert_eq!(broker_address("mqtts://h").unwrap(), ("h".into(), 8883));
        assert!(broker_tls("mqtts://h:1") && broker_tls("ssl://h") && !broker_tls("mqtt://h"));
        assert!(broker_address("ws://h").is_err());
    }

    #[test]
    fn a_password_file_readable_by_others_is_reported_and_never_printed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agent.toml");
        std::fs::write(&file, "[mqtt]\nusername = \"edge\"\npassword = \"hunter2-Q\"\n").unwrap();
        let chmod = |mode| std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
        chmod(0o644);
        let warning = Config::exposed_secrets(&file).expect("a warning for mode 644");
        assert!(
            warning.contains("644") && !warning.contains("hunter2"),
            "{warning}"
        );
        chmod(0o640);
        assert_eq!(
            Config::exposed_secrets(&file),
            None,
            "group-readable is the packaged setup"
        );
        chmod(0o600);
        assert_eq!(Config::exposed_secrets(&file), None);
        std::fs::write(&file, "[mqtt]\nusername = \"edge\"\n").unwrap();
        chmod(0o644);
        assert_eq!(Config::exposed_secrets(&file), None, "no secret, nothing to hide");

        let c = Config::load(Some(&file), &Overrides::default()).unwrap();
        let mut with = c.clone();
        with.mqtt.password = "hunter2-Q".into();
        let shown = toml::to_string(&with.redacted()).unwrap();
        assert!(
            shown.contains("<redacted>") && !shown.contains("hunter2"),
            "{shown}"
        );
        assert_eq!(
            c.redacted(),
            c,
            "nothing to redact leaves the configuration as it is"
        );
    }
}
