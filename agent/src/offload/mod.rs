//! The agent's way to the cluster pool: gRPC to `edge-agent serve`, TensorFlow Serving or any
//! KServe v2 server (Triton, KServe, MLServer).
//!
//! - Endpoints come from a static list and/or a DNS name re-resolved periodically (a
//!   Kubernetes headless Service: one address per ready pod). Each endpoint has its own
//!   lazily connected channel and requests go round-robin over the healthy ones, because a
//!   ClusterIP Service would pin the one HTTP/2 connection to one pod.
//! - A pool behind an ingress or a Gateway (`endpoints = ["pool.example.com:443"]`, TLS) is a
//!   single endpoint: the proxy balances each call over the pods.
//! - The agent tracks endpoint health itself: a failed call (unavailable, timeout, overload,
//!   connection error) ejects the endpoint for `eject_secs`, unless it is the last one in
//!   rotation; it is re-admitted after that (tonic's balancer alone keeps routing to dead
//!   endpoints).
//! - Every call has the configured deadline, shortened to the time the request has left
//!   before its own deadline (`routing::cluster_call_timeout`), sent along as `grpc-timeout`;
//!   with too little left the request is not sent. A failed call is retried once, if time is
//!   left, on another endpoint, or on the same one when it is the only one in rotation and the
//!   failure was not a timeout (through a proxy that reaches another pod). A call cut short by
//!   the request's deadline says nothing about the endpoint: it is neither ejected nor counted
//!   by the breaker.
//! - A circuit breaker over the whole pool opens after `failure_threshold` consecutive failed
//!   requests: while open nothing is sent; after `open_secs` one request probes (half-open),
//!   and its success closes the breaker.
//!
//! - An answer is read by the shapes of its outputs (`answer.rs`: `classes`/`scores` pairwise,
//!   a full `scores` vector named by the bundle's labels, logits); one that cannot be read is
//!   a failed call, not retried.
//!
//! The rules (rotation, retry, breaker) are the pure core in `health.rs`, and the reading of
//! answers the pure core in `answer.rs`, each tested there.

mod answer;
mod health;

pub use answer::Answer;
use answer::{Output, Values};
pub use health::BreakerState;
use health::{Admission, Breaker, Failure, Rotation, Transition};

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use edge_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use edge_proto::inference::{
    InferParameter, ModelInferRequest, ModelInferResponse, infer_parameter, model_infer_request,
};
use edge_proto::tensorflow::serving::prediction_service_client::PredictionServiceClient;
use edge_proto::tensorflow::serving::{ModelSpec, PredictRequest};
use edge_proto::tensorflow::{DataType, TensorProto};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint as TonicEndpoint, Identity};
use tracing::{debug, info, warn};

use edge_runtime::bundle::Manifest;

use crate::config::{OffloadConfig, OffloadPayload, OffloadProtocol};
use crate::wire;

#[derive(Debug, thiserror::Error)]
pub enum OffloadError {
    #[error("the cluster is unavailable: {0}")]
    Unavailable(String),
    #[error("the cluster failed: {0}")]
    Failed(String),
    #[error("offload configuration: {0}")]
    Config(String),
}

/// What is sent: the encoded image, or the input tensor our preprocessing made.
pub enum Payload<'a> {
    Encoded(&'a [u8]),
    /// Shape (batch 1 first) and values.
    Tensor(&'a [usize], &'a [f32]),
}

struct Endpoint {
    addr: String,
    channel: Channel,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub struct Offload {
    cfg: OffloadConfig,
    tls: Option<ClientTlsConfig>,
    endpoints: RwLock<Vec<Arc<Endpoint>>>,
    rotation: Mutex<Rotation>,
    next: AtomicUsize,
    breaker: Mutex<Breaker>,
}

impl Offload {
    /// Builds the client; `None` when no endpoint and no DNS name are configured.
    pub fn new(cfg: &OffloadConfig) -> Result<Option<Arc<Self>>, OffloadError> {
        if cfg.endpoints.is_empty() && cfg.dns.is_empty() {
            return Ok(None);
        }
        let tls = tls_config(cfg)?;
        // `http://host:port` and `https://host:port` name the same address as `host:port`
        // (config validation checked the scheme against `offload.tls_ca`).
        let mut cfg = cfg.clone();
        for e in &mut cfg.endpoints {
            *e = crate::config::pool_endpoint(e, tls.is_some())
                .map_err(|reason| OffloadError::Config(format!("key `offload.endpoints`: {reason}")))?
                .to_owned();
        }
        let offload = Arc::new(Self {
            cfg: cfg.clone(),
            tls,
            endpoints: RwLock::new(Vec::new()),
            rotation: Mutex::new(Rotation::default()),
            next: AtomicUsize::new(0),
            breaker: Mutex::new(Breaker::new(
                cfg.failure_threshold,
                Duration::from_secs(cfg.open_secs),
            )),
        });
        let mut list = Vec::new();
        for addr in &cfg.endpoints {
            list.push(offload.endpoint(addr)?);
        }
        *offload
            .endpoints
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = list;
        if !cfg.dns.is_empty() {
            let o = offload.clone();
            tokio::spawn(async move { o.resolve_forever().await });
        }
        Ok(Some(offload))
    }

    fn endpoint(&self, addr: &str) -> Result<Arc<Endpoint>, OffloadError> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut e = TonicEndpoint::from_shared(format!("{scheme}://{addr}"))
            .map_err(|e| OffloadError::Config(format!("invalid endpoint `{addr}`: {e}")))?
            .connect_timeout(Duration::from_millis(self.cfg.timeout_ms))
            .tcp_nodelay(true);
        if let Some(tls) = &self.tls {
            e = e
                .tls_config(tls.clone())
                .map_err(|e| OffloadError::Config(format!("TLS for `{addr}`: {e}")))?;
        }
        Ok(Arc::new(Endpoint {
            addr: addr.to_owned(),
            channel: e.connect_lazy(),
        }))
    }

    /// Re-resolves the DNS name every `dns_refresh_secs`, keeping the static endpoints and
    /// the channels of addresses that stay.
    async fn resolve_forever(self: Arc<Self>) {
        loop {
            match tokio::net::lookup_host(self.cfg.dns.as_str()).await {
                Ok(addrs) => {
                    let mut wanted: Vec<String> = self.cfg.endpoints.clone();
                    for a in addrs {
                        let s = a.to_string();
                        if !wanted.contains(&s) {
                            wanted.push(s);
                        }
                    }
                    let current = self
                        .endpoints
                        .read()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .clone();
                    let mut next = Vec::new();
                    for addr in &wanted {
                        match current.iter().find(|e| &e.addr == addr) {
                            Some(e) => next.push(e.clone()),
                            None => match self.endpoint(addr) {
                                Ok(e) => next.push(e),
                                Err(e) => warn!("{e}"),
                            },
                        }
                    }
                    if next.len() != current.len() || next.iter().zip(&current).any(|(a, b)| a.addr != b.addr)
                    {
                        info!(endpoints = ?wanted, "cluster endpoints changed");
                    }
                    *self
                        .endpoints
                        .write()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = next;
                }
                Err(e) => warn!(dns = %self.cfg.dns, "cannot resolve the cluster's DNS name: {e}"),
            }
            tokio::time::sleep(Duration::from_secs(self.cfg.dns_refresh_secs.max(1))).await;
        }
    }

    pub fn breaker_state(&self) -> BreakerState {
        lock(&self.breaker).state(Instant::now())
    }

    /// Whether a request would be sent now (breaker closed, or half-open with no probe out,
    /// and some endpoint known).
    pub fn available(&self) -> bool {
        lock(&self.breaker).would_admit(Instant::now()) && self.healthy_endpoints() > 0
    }

    /// Endpoints in rotation (not ejected); at least one whenever any is known.
    pub fn healthy_endpoints(&self) -> usize {
        let list = self.endpoints_now();
        let addrs: Vec<&str> = list.iter().map(|e| e.addr.as_str()).collect();
        lock(&self.rotation).in_rotation(&addrs, Instant::now())
    }

    fn endpoints_now(&self) -> Vec<Arc<Endpoint>> {
        self.endpoints
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn settle(&self, ok: bool, admission: Admission) {
        match lock(&self.breaker).settle(ok, admission, Instant::now()) {
            Some(Transition::Closed) => info!("cluster answered: circuit breaker closed"),
            Some(Transition::Opened { failures }) => warn!(
                failures,
                "circuit breaker open: local only for {} s", self.cfg.open_secs
            ),
            None => {}
        }
    }

    /// The endpoint for the next try (`avoid`: the one that just failed).
    fn pick(&self, list: &[Arc<Endpoint>], avoid: Option<&str>) -> Option<Arc<Endpoint>> {
        let addrs: Vec<&str> = list.iter().map(|e| e.addr.as_str()).collect();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let i = lock(&self.rotation).pick(&addrs, start, avoid, Instant::now())?;
        list.get(i).cloned()
    }

    /// Leaves a failing endpoint out for `eject_secs`, unless it is the last one in rotation.
    fn eject(&self, list: &[Arc<Endpoint>], ep: &Endpoint, why: &str) {
        let addrs: Vec<&str> = list.iter().map(|e| e.addr.as_str()).collect();
        let eject_for = Duration::from_secs(self.cfg.eject_secs);
        if lock(&self.rotation).eject(&addrs, &ep.addr, Instant::now(), eject_for) {
            warn!(endpoint = %ep.addr, "endpoint ejected for {} s: {why}", self.cfg.eject_secs);
        } else {
            warn!(endpoint = %ep.addr, "call failed, endpoint kept: the last one in rotation: {why}");
        }
    }

    /// Classifies on the cluster: one try, and one retry (`health.rs` says where), all within
    /// the request's `deadline` (none: each call gets `offload.timeout_ms`). The answer is
    /// read for `manifest`'s model (its labels name the scores of a full score vector); an
    /// answer that cannot be read is a failure of the pool.
    pub async fn classify(
        &self,
        payload: Payload<'_>,
        top_k: usize,
        deadline: Option<Instant>,
        manifest: &Manifest,
    ) -> Result<(Answer, String), OffloadError> {
        let configured = Duration::from_millis(self.cfg.timeout_ms);
        let call_timeout = || {
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            crate::routing::cluster_call_timeout(configured, left)
        };
        if call_timeout().is_none() {
            return Err(OffloadError::Unavailable(
                "too little time left before the request's deadline".into(),
            ));
        }
        let admission = lock(&self.breaker)
            .admit(Instant::now())
            .ok_or_else(|| OffloadError::Unavailable("circuit breaker open".into()))?;
        let list = self.endpoints_now();
        let mut last_err = OffloadError::Unavailable("no cluster endpoint known yet".into());
        let mut failed: Option<(String, Failure)> = None;
        for _ in 0..2 {
            let Some(timeout) = call_timeout() else {
                break;
            };
            let Some(ep) = self.pick(&list, failed.as_ref().map(|(a, _)| a.as_str())) else {
                break;
            };
            if let Some((addr, failure)) = &failed
                && !failure.worth_retrying(*addr == ep.addr)
            {
                break;
            }
            let started = Instant::now();
            match self.call(&ep, &payload, top_k, timeout, manifest).await {
                Ok(answer) => {
                    self.settle(true, admission);
                    return Ok((answer, ep.addr.clone()));
                }
                Err(_) if timeout < configured && started.elapsed() >= timeout => {
                    // Cut short by the request's deadline, not by the endpoint.
                    lock(&self.breaker).release(admission);
                    return Err(OffloadError::Failed(format!(
                        "{}: no answer within the {} ms the request had left",
                        ep.addr,
                        timeout.as_millis()
                    )));
                }
                Err((failure, e)) => {
                    let failure = failure.given_time(started.elapsed(), timeout);
                    debug!(endpoint = %ep.addr, ?failure, "cluster call failed: {e}");
                    if failure.ejects() {
                        self.eject(&list, &ep, &e);
                    }
                    last_err = OffloadError::Failed(format!("{}: {e}", ep.addr));
                    if failure == Failure::Permanent {
                        break;
                    }
                    failed = Some((ep.addr.clone(), failure));
                }
            }
        }
        self.settle(false, admission);
        Err(last_err)
    }

    /// One call; the error says whether another endpoint might do better.
    async fn call(
        &self,
        ep: &Endpoint,
        payload: &Payload<'_>,
        top_k: usize,
        timeout: Duration,
        manifest: &Manifest,
    ) -> Result<Answer, (Failure, String)> {
        // A status the transport made (a connection or HTTP/2 stream error under it: a proxy
        // resetting the stream of a pod that died gives INTERNAL) is transient; one the pool
        // sent is judged by its code.
        let kind = |s: &tonic::Status| match s.code() {
            tonic::Code::DeadlineExceeded => Failure::Deadline,
            tonic::Code::Unavailable
            | tonic::Code::ResourceExhausted
            | tonic::Code::Unknown
            | tonic::Code::Cancelled => Failure::Transient,
            _ if std::error::Error::source(s).is_some() => Failure::Transient,
            _ => Failure::Permanent,
        };
        let fail = |s: tonic::Status| (kind(&s), describe(&s));
        let deadline = || (Failure::Deadline, "deadline exceeded".to_owned());
        let outputs = match self.cfg.protocol {
            OffloadProtocol::Tfserving => {
                let mut req = tonic::Request::new(self.predict_request(payload));
                req.set_timeout(timeout);
                let mut client = PredictionServiceClient::new(ep.channel.clone())
                    .max_decoding_message_size(64 * 1024 * 1024)
                    .max_encoding_message_size(64 * 1024 * 1024);
                let call = tokio::time::timeout(timeout, client.predict(req)).await;
                let resp = call.map_err(|_| deadline())?.map_err(fail)?.into_inner();
                predict_outputs(&resp.outputs)
            }
            OffloadProtocol::Kserve => {
                let mut req = tonic::Request::new(self.infer_request(payload, top_k));
                req.set_timeout(timeout);
                let mut client = GrpcInferenceServiceClient::new(ep.channel.clone())
                    .max_decoding_message_size(64 * 1024 * 1024)
                    .max_encoding_message_size(64 * 1024 * 1024);
                let call = tokio::time::timeout(timeout, client.model_infer(req)).await;
                let resp = call.map_err(|_| deadline())?.map_err(fail)?.into_inner();
                infer_outputs(&resp)
            }
        };
        outputs
            .and_then(|o| answer::read(&o, manifest, top_k, self.cfg.pool_scores))
            .map_err(|e| (Failure::Permanent, format!("unusable answer: {e}")))
    }

    fn predict_request(&self, payload: &Payload<'_>) -> PredictRequest {
        let (key, tensor) = match payload {
            Payload::Encoded(bytes) => (
                "images".to_owned(),
                wire::string_tensor(&[1], vec![bytes.to_vec()]),
            ),
            Payload::Tensor(dims, values) => (
                self.cfg.input_name.clone(),
                wire::float_tensor(
                    &dims.iter().map(|&d| d as i64).collect::<Vec<_>>(),
                    values.to_vec(),
                    true,
                ),
            ),
        };
        PredictRequest {
            model_spec: Some(ModelSpec {
                name: self.cfg.model_name.clone(),
                signature_name: self.cfg.signature.clone(),
                version_choice: None,
            }),
            inputs: [(key, tensor)].into(),
            ..PredictRequest::default()
        }
    }

    fn infer_request(&self, payload: &Payload<'_>, top_k: usize) -> ModelInferRequest {
        let (input, raw) = match payload {
            Payload::Encoded(bytes) => {
                let raw = wire::join_raw_bytes(&[bytes.to_vec()]);
                (
                    model_infer_request::InferInputTensor {
                        name: "images".into(),
                        datatype: "BYTES".into(),
                        shape: vec![1],
                        ..Default::default()
                    },
                    raw,
                )
            }
            Payload::Tensor(dims, values) => (
                model_infer_request::InferInputTensor {
                    name: self.cfg.input_name.clone(),
                    datatype: "FP32".into(),
                    shape: dims.iter().map(|&d| d as i64).collect(),
                    ..Default::default()
                },
                wire::f32s_le(values),
            ),
        };
        ModelInferRequest {
            model_name: self.cfg.model_name.clone(),
            parameters: [(
                "top_k".to_owned(),
                InferParameter {
                    parameter_choice: Some(infer_parameter::ParameterChoice::Int64Param(top_k as i64)),
                },
            )]
            .into(),
            inputs: vec![input],
            raw_input_contents: vec![raw],
            ..Default::default()
        }
    }
}

/// A status with the errors under it (a refused certificate is a transport error's source),
/// so that the log says why a call failed, not only "transport error".
fn describe(s: &tonic::Status) -> String {
    let mut text = format!("{}: {}", s.code(), s.message());
    let mut source = std::error::Error::source(s);
    while let Some(e) = source {
        let part = e.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = e.source();
    }
    text
}

/// The outputs of a TF Serving `PredictResponse`, by name.
fn predict_outputs(outputs: &HashMap<String, TensorProto>) -> Result<HashMap<String, Output>, String> {
    outputs
        .iter()
        .map(|(name, t)| {
            let values = if t.dtype == DataType::DtFloat as i32 {
                Values::Floats(wire::float_values(t).map_err(|e| format!("output `{name}`: {e}"))?)
            } else if t.dtype == DataType::DtString as i32 {
                Values::Strings(t.string_val.clone())
            } else {
                Values::Other(format!("dtype {}", t.dtype))
            };
            Ok((
                name.clone(),
                Output {
                    shape: wire::dims(t),
                    values,
                },
            ))
        })
        .collect()
}

/// The outputs of a KServe v2 `ModelInferResponse`, by name (raw or typed contents).
fn infer_outputs(resp: &ModelInferResponse) -> Result<HashMap<String, Output>, String> {
    let raw = !resp.raw_output_contents.is_empty();
    if raw && resp.raw_output_contents.len() != resp.outputs.len() {
        return Err(format!(
            "the reply has {} raw contents for {} outputs",
            resp.raw_output_contents.len(),
            resp.outputs.len()
        ));
    }
    resp.outputs
        .iter()
        .enumerate()
        .map(|(i, o)| {
            let typed = o.contents.clone().unwrap_or_default();
            let bytes = resp.raw_output_contents.get(i).map(Vec::as_slice);
            let context = |e: String| format!("output `{}`: {e}", o.name);
            let values = match (o.datatype.as_str(), bytes) {
                ("FP32", Some(b)) => Values::Floats(wire::le_f32s(b).map_err(context)?),
                ("FP32", None) => Values::Floats(typed.fp32_contents),
                ("FP64", Some(b)) => Values::Floats(wire::le_f64s_as_f32(b).map_err(context)?),
                ("FP64", None) => Values::Floats(typed.fp64_contents.iter().map(|&v| v as f32).collect()),
                ("BYTES", Some(b)) => Values::Strings(wire::split_raw_bytes(b).map_err(context)?),
                ("BYTES", None) => Values::Strings(typed.bytes_contents),
                (other, _) => Values::Other(format!("datatype {other}")),
            };
            Ok((
                o.name.clone(),
                Output {
                    shape: o.shape.clone(),
                    values,
                },
            ))
        })
        .collect()
}

fn tls_config(cfg: &OffloadConfig) -> Result<Option<ClientTlsConfig>, OffloadError> {
    if cfg.tls_ca.is_empty() {
        if !cfg.tls_cert.is_empty() || !cfg.tls_key.is_empty() {
            return Err(OffloadError::Config(
                "key `offload.tls_ca`: client certificates need TLS, which needs the CA that signed the pool's certificate".into(),
            ));
        }
        return Ok(None);
    }
    let read = |key: &str, path: &str| {
        std::fs::read(path)
            .map_err(|e| OffloadError::Config(format!("key `offload.{key}`: cannot read {path}: {e}")))
    };
    let mut tls = ClientTlsConfig::new();
    tls = tls.ca_certificate(Certificate::from_pem(read("tls_ca", &cfg.tls_ca)?));
    if !cfg.tls_domain.is_empty() {
        tls = tls.domain_name(cfg.tls_domain.clone());
    }
    match (cfg.tls_cert.is_empty(), cfg.tls_key.is_empty()) {
        (true, true) => {}
        (false, false) => {
            tls = tls.identity(Identity::from_pem(
                read("tls_cert", &cfg.tls_cert)?,
                read("tls_key", &cfg.tls_key)?,
            ));
        }
        _ => {
            return Err(OffloadError::Config(
                "offload.tls_cert and offload.tls_key go together (mTLS)".into(),
            ));
        }
    }
    Ok(Some(tls))
}

/// What the local payload should be for this configuration.
pub fn wants_tensor(cfg: &OffloadConfig) -> bool {
    cfg.send == OffloadPayload::Tensor
}
