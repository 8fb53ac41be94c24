//! Prometheus metrics of the daemon (DESIGN.md section 9), served on `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::queue::QueueStats;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `ok` or an error code.
    pub outcome: String,
    /// `local`, `cluster`, or `ingress` (refused before queueing).
    pub path: String,
    /// Why that path served it.
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ThreadsLabels {
    /// Threads one inference ran on.
    pub threads: u32,
    /// `waiting` when other requests waited in the queue as it started, else `empty`.
    pub queue: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    pub name: String,
    pub version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// `reload` or `rollback`.
    pub command: String,
    /// `ok` or why it was refused (`ReloadError::kind`).
    pub outcome: String,
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<OutcomeLabels, Counter>,
    pub acknowledged: Counter,
    pub replies_acked: Counter,
    pub replies_refused: Counter,
    pub publish_resyncs: Counter,
    pub mqtt_oversized: Counter,
    pub queue_items: Family<StateLabels, Gauge>,
    pub queue_bytes: Gauge,
    pub backpressure: Gauge,
    pub mqtt_connected: Gauge,
    pub mqtt_connections: Counter,
    pub queue_wait: Histogram,
    pub preprocess: Histogram,
    pub inference: Histogram,
    pub inference_threads: Family<ThreadsLabels, Counter>,
    pub total: Histogram,
    pub confidence: Histogram,
    pub cluster: Histogram,
    pub breaker: Gauge,
    pub cluster_endpoints: Gauge,
    pub model: Family<ModelLabels, Gauge>,
    pub model_reloads: Family<ReloadLabels, Counter>,
    pub queue_quarantined: Counter,
}

fn latency_buckets() -> impl Iterator<Item = f64> {
    [
        0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0,
    ]
    .into_iter()
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("edge_agent");
        let requests = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests answered, by outcome (ok or error code), path and reason",
            requests.clone(),
        );
        let acknowledged = Counter::default();
        registry.register(
            "requests_acknowledged",
            "Requests acknowledged to the broker after they were flushed to the queue",
            acknowledged.clone(),
        );
        let replies_acked = Counter::default();
        registry.register(
            "replies_acknowledged",
            "Replies the broker acknowledged (they left the outbox)",
            replies_acked.clone(),
        );
        let replies_refused = Counter::default();
        registry.register(
            "replies_refused",
            "Replies the broker refused (MQTT 5 PUBACK with an error reason, e.g. NotAuthorized): not delivered, not retried",
            replies_refused.clone(),
        );
        let publish_resyncs = Counter::default();
        registry.register(
            "publish_tracker_resyncs",
            "Times the agent lost track of which PUBACK belongs to which reply and published its outbox again (duplicates, never losses)",
            publish_resyncs.clone(),
        );
        let mqtt_oversized = Counter::default();
        registry.register(
            "mqtt_oversized",
            "Connections the broker ended by sending a packet larger than mqtt.max_packet_bytes",
            mqtt_oversized.clone(),
        );
        let queue_items = Family::<StateLabels, Gauge>::default();
        registry.register(
            "queue_items",
            "Items in the durable queue by state (pending, leased, outbox, dead)",
            queue_items.clone(),
        );
        let queue_bytes = Gauge::default();
        registry.register(
            "queue_bytes",
            "Image bytes of pending and leased requests",
            queue_bytes.clone(),
        );
        let backpressure = Gauge::default();
        registry.register(
            "backpressure",
            "1 while the queue is full and requests are not acknowledged",
            backpressure.clone(),
        );
        let mqtt_connected = Gauge::default();
        registry.register(
            "mqtt_connected",
            "1 while connected to the broker",
            mqtt_connected.clone(),
        );
        let mqtt_connections = Counter::default();
        registry.register(
            "mqtt_connections",
            "Successful connections to the broker (reconnects included)",
            mqtt_connections.clone(),
        );
        let hist = |registry: &mut Registry, name: &str, help: &str| {
            let h = Histogram::new(latency_buckets());
            registry.register_with_unit(name, help, prometheus_client::registry::Unit::Seconds, h.clone());
            h
        };
        let queue_wait = hist(
            &mut registry,
            "queue_wait",
            "From arrival to the start of classification",
        );
        let preprocess = hist(&mut registry, "preprocess", "Image decoding and resizing");
        let inference = hist(&mut registry, "inference", "Model inference");
        let inference_threads = Family::<ThreadsLabels, Counter>::default();
        registry.register(
            "inferences_by_threads",
            "Local inferences by the threads each ran on and whether other requests waited in the \
             queue as it started (adaptive parallelism: every thread alone, one while others wait)",
            inference_threads.clone(),
        );
        let total = hist(&mut registry, "request", "From arrival to the reply");
        let confidence = Histogram::new([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99]);
        registry.register(
            "confidence",
            "Top-1 score of local classifications",
            confidence.clone(),
        );
        let cluster = hist(
            &mut registry,
            "cluster",
            "Calls to the cluster pool, retry included",
        );
        let breaker = Gauge::default();
        registry.register(
            "cluster_breaker",
            "Circuit breaker of the cluster pool: 0 closed, 1 open, 2 half-open",
            breaker.clone(),
        );
        let cluster_endpoints = Gauge::default();
        registry.register(
            "cluster_endpoints_healthy",
            "Cluster endpoints not ejected",
            cluster_endpoints.clone(),
        );
        let model = Family::<ModelLabels, Gauge>::default();
        registry.register("model", "The model being served (value 1)", model.clone());
        let model_reloads = Family::<ReloadLabels, Counter>::default();
        registry.register(
            "model_reloads",
            "Reload and rollback commands, by outcome (ok or why the model was kept)",
            model_reloads.clone(),
        );
        let queue_quarantined = Counter::default();
        registry.register(
            "queue_quarantined",
            "Damaged queues moved aside at start (queue.on_damage = \"quarantine\"); their requests were not answered",
            queue_quarantined.clone(),
        );
        Self {
            registry,
            requests,
            acknowledged,
            replies_acked,
            replies_refused,
            publish_resyncs,
            mqtt_oversized,
            queue_items,
            queue_bytes,
            backpressure,
            mqtt_connected,
            mqtt_connections,
            queue_wait,
            preprocess,
            inference,
            inference_threads,
            total,
            confidence,
            cluster,
            breaker,
            cluster_endpoints,
            model,
            model_reloads,
            queue_quarantined,
        }
    }

    /// The model gauge names `name`/`version` only (the one replaced is removed).
    pub fn set_model(&self, name: &str, version: &str) {
        self.model.clear();
        self.model
            .get_or_create(&ModelLabels {
                name: name.to_owned(),
                version: version.to_owned(),
            })
            .set(1);
    }

    pub fn count_reload(&self, command: &str, outcome: &str) {
        self.model_reloads
            .get_or_create(&ReloadLabels {
                command: command.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    pub fn count(&self, outcome: &str, path: &str, reason: &str) {
        self.requests
            .get_or_create(&OutcomeLabels {
                outcome: outcome.to_owned(),
                path: path.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
    }

    pub fn set_queue(&self, s: &QueueStats) {
        for (state, n) in [
            ("pending", s.pending),
            ("leased", s.leased),
            ("outbox", s.outbox),
            ("dead", s.dead),
        ] {
            self.queue_items
                .get_or_create(&StateLabels { state: state.into() })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        self.queue_bytes.set(i64::try_from(s.bytes).unwrap_or(i64::MAX));
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family() {
        let m = Metrics::new();
        m.count("ok", "local", "local_default");
        m.set_queue(&QueueStats {
            pending: 2,
            ..QueueStats::default()
        });
        m.total.observe(0.2);
        let text = m.render();
        for needle in [
            r#"edge_agent_requests_total{outcome="ok",path="local",reason="local_default"} 1"#,
            r#"edge_agent_queue_items{state="pending"} 2"#,
            "edge_agent_request_seconds_bucket",
            "edge_agent_queue_wait_seconds_count",
            "edge_agent_confidence_bucket",
            "# EOF",
        ] {
            assert!(text.contains(needle), "{needle} missing from\n{text}");
        }
    }
}
