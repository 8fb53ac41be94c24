//! Prometheus metrics of `edge-agent serve`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    /// `tfserving.Predict`, `kserve.ModelInfer`, ...
    pub method: String,
    /// gRPC status code name (`OK`, `INVALID_ARGUMENT`, ...).
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// `ok` or why the model was kept (`ReloadError::kind`).
    pub outcome: String,
}

pub struct PoolMetrics {
    registry: Registry,
    pub requests: Family<CallLabels, Counter>,
    pub images: Counter,
    pub latency: Histogram,
    pub queue_wait: Histogram,
    pub inference: Histogram,
    pub batch_size: Histogram,
    pub in_flight: Gauge,
    pub model: Family<crate::metrics::ModelLabels, Gauge>,
    pub reloads: Family<ReloadLabels, Counter>,
}

impl Default for PoolMetrics {
    fn default() -> Self {
        Self::new()
    }
}

fn seconds() -> [f64; 14] {
    [
        0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0,
    ]
}

impl PoolMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("edge_pool");
        let requests = Family::<CallLabels, Counter>::default();
        registry.register(
            "requests",
            "gRPC requests by method and status code",
            requests.clone(),
        );
        let images = Counter::default();
        registry.register("images", "Images or input tensors scored", images.clone());
        let latency = Histogram::new(seconds());
        registry.register_with_unit("request", "Request latency", Unit::Seconds, latency.clone());
        let queue_wait = Histogram::new(seconds());
        registry.register_with_unit(
            "queue_wait",
            "Wait for an inference slot (and for a batch to fill)",
            Unit::Seconds,
            queue_wait.clone(),
        );
        let inference = Histogram::new(seconds());
        registry.register_with_unit(
            "inference",
            "Preprocessing and inference of one item",
            Unit::Seconds,
            inference.clone(),
        );
        let batch_size = Histogram::new([1.0, 2.0, 4.0, 8.0, 16.0, 32.0]);
        registry.register(
            "batch_size",
            "Items run in one turn of an inference slot",
            batch_size.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "in_flight",
            "Requests admitted and not yet answered",
            in_flight.clone(),
        );
        let model = Family::<crate::metrics::ModelLabels, Gauge>::default();
        registry.register("model", "The model being served (value 1)", model.clone());
        let reloads = Family::<ReloadLabels, Counter>::default();
        registry.register(
            "model_reloads",
            "Bundle reloads (SIGHUP) by outcome: ok or why the model was kept",
            reloads.clone(),
        );
        Self {
            registry,
            model,
            reloads,
            requests,
            images,
            latency,
            queue_wait,
            inference,
            batch_size,
            in_flight,
        }
    }

    pub fn call(&self, method: &str, code: tonic::Code, seconds: f64) {
        self.requests
            .get_or_create(&CallLabels {
                method: method.to_owned(),
                code: format!("{code:?}"),
            })
            .inc();
        self.latency.observe(seconds);
    }

    /// The model gauge names `name`/`version` only.
    pub fn set_model(&self, name: &str, version: &str) {
        self.model.clear();
        self.model
            .get_or_create(&crate::metrics::ModelLabels {
                name: name.to_owned(),
                version: version.to_owned(),
            })
            .set(1);
    }

    pub fn count_reload(&self, outcome: &str) {
        self.reloads
            .get_or_create(&ReloadLabels {
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }
}
