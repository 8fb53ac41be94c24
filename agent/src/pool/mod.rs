//! `edge-agent serve`: the overflow pool's gRPC server, run by the Kubernetes Deployment.
//!
//! One process serves one bundle over three gRPC services on one port:
//! `tensorflow.serving.PredictionService` (`tfserving`), `inference.GRPCInferenceService`
//! (`kserve`) and `grpc.health.v1.Health`, plus `/metrics`, `/healthz`, `/readyz` over HTTP.
//! On SIGTERM it drains: health turns NOT_SERVING at once (readiness probes and client-side
//! balancers stop sending), requests keep being served for `drain_delay` while that
//! propagates, then the server stops accepting connections and finishes what it holds.
//! On SIGHUP it reloads the bundle file: the new model is loaded and smoke-tested beside the
//! one serving, then swapped in (see [`engine`]); if it fails the old model keeps serving.

pub mod engine;
pub mod kserve;
pub mod metrics;
pub mod outputs;
pub mod tfserving;

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tonic::Status;
use tracing::{info, warn};

use edge_proto::inference::grpc_inference_service_server::GrpcInferenceServiceServer;
use edge_proto::tensorflow::serving::prediction_service_server::PredictionServiceServer;
use edge_runtime::preprocess::ImageLimits;
use edge_runtime::runtime::{Classifier, RuntimeOptions, Tensor, Tuning};

use engine::{Batching, Engine, EngineError, EngineOptions, Item, Scored};
use metrics::PoolMetrics;

/// Everything `serve` needs (the binary fills it from flags and environment).
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub bundle: PathBuf,
    pub listen: SocketAddr,
    /// `/metrics`, `/healthz`, `/readyz`; `None` disables.
    pub http_listen: Option<SocketAddr>,
    /// Name clients put in `model_spec.name` / `model_name`; default the bundle's model name.
    pub model_name: Option<String>,
    pub top_k: usize,
    /// Inferences run at once.
    pub workers: usize,
    /// tract threads an inference running alone uses.
    pub threads: usize,
    /// One thread per inference while several run (see `RuntimeOptions::adaptive`).
    pub adaptive: bool,
    /// How the runtime settings are chosen (the device agent tunes them; so does the pool
    /// by default).
    pub tuning: Tuning,
    pub max_concurrent_requests: usize,
    /// Images or tensors per request.
    pub max_batch_items: usize,
    pub batching: Option<Batching>,
    pub max_message_bytes: usize,
    pub max_image_bytes: usize,
    pub drain_delay: Duration,
    pub drain_timeout: Duration,
    /// PEM certificate chain and key: serve gRPC over TLS.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// PEM CA: require client certificates signed by it (mTLS).
    pub tls_client_ca: Option<PathBuf>,
}

fn server_tls(config: &ServeConfig) -> Result<Option<tonic::transport::ServerTlsConfig>> {
    use tonic::transport::{Certificate, Identity, ServerTlsConfig};
    let Some((cert, key)) = &config.tls else {
        if config.tls_client_ca.is_some() {
            anyhow::bail!("--tls-client-ca needs --tls-cert and --tls-key");
        }
        return Ok(None);
    };
    let read = |p: &PathBuf| std::fs::read(p).with_context(|| format!("cannot read {}", p.display()));
    let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(read(cert)?, read(key)?));
    if let Some(ca) = &config.tls_client_ca {
        tls = tls.client_ca_root(Certificate::from_pem(read(ca)?));
    }
    Ok(Some(tls))
}

/// Classes a model's answers can name: its output classes minus a background class (label
/// offset). Comes from the model's output, whether the bundle has labels or not.
pub fn answerable_classes(manifest: &edge_runtime::bundle::Manifest) -> usize {
    manifest
        .output
        .classes
        .saturating_sub(manifest.output.label_offset)
}

/// The state the gRPC services share.
pub struct Pool {
    pub engine: Engine,
    /// The name clients address; kept across reloads.
    pub model_name: String,
    pub top_k: usize,
    pub max_batch_items: usize,
    pub metrics: Arc<PoolMetrics>,
    draining: AtomicBool,
}

impl Pool {
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// The version of the model serving now (it changes on reload).
    pub fn model_version(&self) -> String {
        self.engine.classifier().manifest().model.version.clone()
    }

    /// The model version as TF Serving's numeric version, when it is one.
    pub fn model_version_number(&self) -> Option<i64> {
        self.model_version().parse().ok()
    }

    pub fn admit(&self) -> Result<engine::Admission, Status> {
        self.engine.admit().map_err(to_status)
    }

    /// Labels per image in a `classes`/`scores` answer of `manifest`'s model: `--top-k`, at
    /// most the classes it can name (its output classes after the label offset; a bundle
    /// without labels names them `class_<index>`).
    pub fn answer_k(&self, manifest: &edge_runtime::bundle::Manifest) -> usize {
        self.top_k.min(answerable_classes(manifest))
    }

    pub fn check_batch(&self, n: usize) -> Result<(), Status> {
        if n == 0 {
            return Err(Status::invalid_argument("the request holds no image"));
        }
        if n > self.max_batch_items {
            return Err(Status::invalid_argument(format!(
                "the request holds {n} items, the limit is {}",
                self.max_batch_items
            )));
        }
        Ok(())
    }

    /// Scores the items on one model, returned with the scores (for labels and version).
    pub async fn score(&self, items: Vec<Item>) -> Result<(Arc<Classifier>, Vec<Scored>), Status> {
        let n = items.len() as u64;
        self.metrics.in_flight.inc();
        let result = self.engine.score(items).await.map_err(to_status);
        self.metrics.in_flight.dec();
        if result.is_ok() {
            self.metrics.images.inc_by(n);
        }
        result
    }

    /// Splits a `[N, ...]` float tensor into N model inputs of the bundle's shape.
    pub fn split_tensor(&self, dims: &[i64], values: Vec<f32>) -> Result<Vec<Item>, String> {
        let classifier = self.engine.classifier();
        let input = &classifier.manifest().input.shape;
        let per_item: Vec<usize> = input.iter().skip(1).copied().collect();
        let item_len: usize = per_item.iter().product();
        let want: Vec<String> = per_item.iter().map(|d| d.to_string()).collect();
        let shape_ok = dims.len() == input.len()
            && dims.first().is_some_and(|&n| n >= 1)
            && dims.iter().skip(1).zip(&per_item).all(|(&d, &w)| d == w as i64);
        if !shape_ok {
            return Err(format!(
                "input shape {dims:?} does not match [N, {}] (the bundle's input)",
                want.join(", ")
            ));
        }
        let n = dims[0] as usize;
        self.check_batch(n).map_err(|s| s.message().to_owned())?;
        if values.len() != n * item_len {
            return Err(format!(
                "the tensor holds {} values, shape {dims:?} needs {}",
                values.len(),
                n * item_len
            ));
        }
        // A NaN or an infinity propagates through the network: the answer would be NaN
        // probabilities, which no client can use. Preprocessed images are always finite.
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(format!(
                "the tensor holds a value that is not finite ({} at index {i})",
                values[i]
            ));
        }
        let mut shape = input.clone();
        if let Some(b) = shape.first_mut() {
            *b = 1;
        }
        values
            .chunks_exact(item_len)
            .map(|chunk| {
                Tensor::from_shape(&shape, chunk)
                    .map(Item::Tensor)
                    .map_err(|e| format!("cannot build the input tensor: {e}"))
            })
            .collect()
    }

    pub fn record<T>(&self, method: &str, result: &Result<T, Status>, start: Instant) {
        let code = match result {
            Ok(_) => tonic::Code::Ok,
            Err(s) => s.code(),
        };
        self.metrics.call(method, code, start.elapsed().as_secs_f64());
    }
}

fn to_status(e: EngineError) -> Status {
    match e {
        EngineError::InvalidArgument(m) => Status::invalid_argument(m),
        e @ EngineError::Exhausted(_) => Status::resource_exhausted(e.to_string()),
        e @ EngineError::Draining => Status::unavailable(e.to_string()),
        EngineError::Internal(m) => Status::internal(m),
    }
}

/// Runs the pool server until SIGTERM/SIGINT, then drains.
pub async fn run(config: ServeConfig) -> Result<()> {
    let options = RuntimeOptions {
        threads: NonZeroUsize::new(config.threads).unwrap_or(NonZeroUsize::MIN),
        adaptive: config.adaptive,
        image_limits: ImageLimits {
            max_bytes: config.max_image_bytes,
            ..ImageLimits::default()
        },
        tuning: config.tuning.clone(),
        ..RuntimeOptions::default()
    };
    let bundle = config.bundle.clone();
    let start = Instant::now();
    let opts = options.clone();
    let classifier = tokio::task::spawn_blocking(move || Classifier::load(&bundle, &opts))
        .await?
        .with_context(|| format!("cannot load the bundle {}", config.bundle.display()))?;
    let manifest = classifier.manifest().clone();
    let model_name = config
        .model_name
        .clone()
        .unwrap_or_else(|| manifest.model.name.clone());
    let settings = classifier.settings();
    info!(
        model = %model_name, version = %manifest.model.version,
        load_ms = start.elapsed().as_millis() as u64,
        runtime_settings = %settings.settings, settings_origin = ?settings.origin,
        "model loaded"
    );
    if let Some(note) = &settings.note {
        warn!("runtime settings: {note}");
    }
    let metrics = Arc::new(PoolMetrics::new());
    metrics.set_model(&manifest.model.name, &manifest.model.version);
    // Installed before the server reports SERVING: SIGHUP's default action would end it.
    let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("cannot handle SIGHUP")?;
    let engine = Engine::new(
        classifier,
        EngineOptions {
            max_concurrent_requests: config.max_concurrent_requests,
            slots: config.workers,
            batching: config.batching,
        },
        metrics.clone(),
    );
    let pool = Arc::new(Pool {
        engine,
        model_name,
        top_k: config.top_k,
        max_batch_items: config.max_batch_items,
        metrics: metrics.clone(),
        draining: AtomicBool::new(false),
    });

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<PredictionServiceServer<tfserving::TfServing>>()
        .await;
    health
        .set_serving::<GrpcInferenceServiceServer<kserve::KServe>>()
        .await;
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;

    let http = match config.http_listen {
        Some(addr) => {
            let m = metrics.clone();
            let p = pool.clone();
            let probe = crate::http::Probe {
                metrics: Arc::new(move || m.render()),
                ready: Arc::new(move || {
                    if p.is_draining() {
                        Err("draining".to_owned())
                    } else {
                        Ok(())
                    }
                }),
                page: None,
            };
            Some(crate::http::serve(&addr.to_string(), probe).await?)
        }
        None => None,
    };

    let max = config.max_message_bytes;
    let tf = PredictionServiceServer::new(tfserving::TfServing { pool: pool.clone() })
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    let ks = GrpcInferenceServiceServer::new(kserve::KServe { pool: pool.clone() })
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {} for gRPC", config.listen))?;
    info!(listen = %config.listen, "serving tensorflow.serving.PredictionService, inference.GRPCInferenceService, grpc.health.v1.Health");

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = server_tls(&config)? {
        info!(mtls = config.tls_client_ca.is_some(), "gRPC over TLS");
        builder = builder.tls_config(tls).context("invalid TLS configuration")?;
    }
    let server = tokio::spawn(
        builder
            .add_service(health_service)
            .add_service(tf)
            .add_service(ks)
            .serve_with_incoming_shutdown(tokio_stream_listener(listener), async {
                let _ = stop_rx.await;
            }),
    );

    let reloader = tokio::spawn(reload_on_sighup(
        hangup,
        pool.clone(),
        config.bundle.clone(),
        options,
    ));

    crate::signal::wait_for_signal().await?;
    reloader.abort();
    info!(
        delay_ms = config.drain_delay.as_millis() as u64,
        "draining: health NOT_SERVING, still serving"
    );
    pool.draining.store(true, Ordering::Relaxed);
    health
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    health
        .set_not_serving::<PredictionServiceServer<tfserving::TfServing>>()
        .await;
    health
        .set_not_serving::<GrpcInferenceServiceServer<kserve::KServe>>()
        .await;
    tokio::time::sleep(config.drain_delay).await;
    let _ = stop_tx.send(());
    match tokio::time::timeout(config.drain_timeout, server).await {
        Ok(Ok(Ok(()))) => info!("drained"),
        Ok(Ok(Err(e))) => warn!("gRPC server error while draining: {e}"),
        Ok(Err(e)) => warn!("gRPC server task failed: {e}"),
        Err(_) => warn!(in_flight = pool.engine.in_flight(), "drain timed out; exiting"),
    }
    if let Some(h) = http {
        h.abort();
    }
    Ok(())
}

/// SIGHUP: load the bundle file again, smoke-test it, swap it in; on failure keep serving.
async fn reload_on_sighup(
    mut hangup: tokio::signal::unix::Signal,
    pool: Arc<Pool>,
    bundle: PathBuf,
    options: RuntimeOptions,
) {
    while hangup.recv().await.is_some() {
        info!(bundle = %bundle.display(), "SIGHUP: reloading the bundle");
        let start = Instant::now();
        let (path, opts) = (bundle.clone(), options.clone());
        let loaded = tokio::task::spawn_blocking(move || crate::model::load_checked(&path, &opts))
            .await
            .unwrap_or_else(|e| {
                Err(crate::model::ReloadError::Internal(format!(
                    "the reload task failed: {e}"
                )))
            });
        match loaded {
            Ok(classifier) => {
                let (name, version) = {
                    let m = &classifier.manifest().model;
                    (m.name.clone(), m.version.clone())
                };
                let old = pool.engine.replace(classifier);
                pool.metrics.set_model(&name, &version);
                pool.metrics.count_reload("ok");
                info!(
                    from = %old.manifest().model.version, to = %version, model = %name,
                    ms = start.elapsed().as_millis() as u64,
                    "model swapped; requests in flight finish on the previous one"
                );
            }
            Err(e) => {
                pool.metrics.count_reload(e.kind());
                warn!(
                    kind = e.kind(),
                    "reload refused, the current model keeps serving: {e}"
                );
            }
        }
    }
}

fn tokio_stream_listener(listener: tokio::net::TcpListener) -> tokio_stream::wrappers::TcpListenerStream {
    tokio_stream::wrappers::TcpListenerStream::new(listener)
}
