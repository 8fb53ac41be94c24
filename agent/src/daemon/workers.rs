//! The workers: each takes a request (handed over by ingress, or leased from the queue),
//! executes for it what `routing::decide` says (classify on the device, ask the cluster, or
//! both), stores the reply `reply` builds in the queue's outbox and hands it to the
//! publisher.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use edge_runtime::runtime::Parallelism;
use tracing::{Instrument, debug, error, info, info_span, warn};

use super::{Served, Shared, lock};
use crate::config::PoolScores;
use crate::metrics::ThreadsLabels;
use crate::offload::{Answer, Offload, OffloadError, Payload};
use crate::queue::{Lease, Leased, QueueError, StoredReply, UnixMillis};
use crate::reply::{Answering, ErrorCode, Label, ScoreKind, Timings};
use crate::routing::{self, Confidence, Reason, Route, Situation};

pub(super) async fn worker_task(shared: Arc<Shared>) {
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
    let served = shared.served.get();
    let doc = answering(shared, &served, &lease).error(code, message);
    (doc, Outcome::Error(code, lease))
}

/// Who answers `lease`'s request, with which model.
fn answering<'a>(shared: &'a Shared, served: &'a Served, lease: &'a Lease) -> Answering<'a> {
    Answering {
        id: &lease.request().request_id,
        device: &shared.device,
        model: &served.model,
    }
}

enum Outcome {
    /// Answered, by this path, for this reason.
    Ok(Lease, &'static str, &'static str),
    Error(ErrorCode, Lease),
}

/// A request classified on the device, kept until its reply.
struct LocalAnswer {
    top: Vec<Label>,
    /// Preprocessing and inference time, ms.
    preprocess: f64,
    inference: f64,
    best: f32,
    confidence: f32,
}

/// Answers a request where `routing::decide` says, step by step: the cluster for load, the
/// device, the cluster again when the device's answer is not confident enough.
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
    let mut lease = lease;
    let mut local: Option<LocalAnswer> = None;
    let mut situation = Situation {
        cluster: None,
        local: None,
        failed: None,
    };
    loop {
        situation.cluster = shared
            .offload
            .as_ref()
            .map(|o| shared.cluster_situation(o, &lease));
        match routing::decide(&situation) {
            Route::Cluster(reason) => {
                let Some(o) = shared.offload.as_ref() else {
                    situation.failed = Some(reason);
                    continue;
                };
                if reason == Reason::Load {
                    let wait = situation.cluster.map_or(0.0, |c| c.estimated_wait_ms);
                    debug!(wait_ms = wait, "offloading for load");
                }
                match cluster(shared, &served, o, &lease, k).await {
                    Ok((answer, cluster_ms)) => {
                        return cluster_reply(shared, &served, lease, answer, queued, cluster_ms, reason);
                    }
                    Err(e) => {
                        if reason == Reason::Load {
                            warn!("cluster failed, answering locally: {e}");
                        } else {
                            warn!("cluster failed on a low-confidence request, answering locally: {e}");
                        }
                        situation.failed = Some(reason);
                    }
                }
            }
            Route::ClassifyLocally => {
                let (l, answer) = match classify_locally(shared, &served, lease, k).await {
                    Ok(classified) => classified,
                    Err(reply) => return reply,
                };
                lease = l;
                situation.local = Some(Confidence {
                    confidence: answer.confidence,
                    min_confidence: shared.config.offload.min_confidence,
                });
                local = Some(answer);
            }
            Route::Local(reason) => {
                let Some(answer) = local.take() else {
                    // `decide` answers locally only once the request was classified.
                    let msg = "the request was not classified";
                    return fail(shared, lease, ErrorCode::Internal, msg);
                };
                return local_reply(shared, &served, lease, answer, queued, reason);
            }
        }
    }
}

/// How many threads a local inference may take: one while requests wait in the queue for
/// another worker, which is about to take the other cores. The runtime alone only sees the
/// inferences already running, and would give every thread to an inference that starts while
/// the other workers are between two requests (storing a reply, leasing the next).
/// Also says whether requests were waiting (the metrics' `queue` label).
fn parallelism(shared: &Shared) -> (Parallelism, bool) {
    let waiting = shared.queue.stats().pending > 0;
    if shared.config.workers.count() > 1 && waiting {
        (Parallelism::Single, waiting)
    } else {
        (Parallelism::Auto, waiting)
    }
}

/// Classifies on the device, on a blocking thread; `Err` is the error reply.
async fn classify_locally(
    shared: &Arc<Shared>,
    served: &Arc<Served>,
    lease: Lease,
    k: usize,
) -> Result<(Lease, LocalAnswer), (Vec<u8>, Outcome)> {
    let s = served.clone();
    let (parallelism, waiting) = parallelism(shared);
    let (lease, result) = match tokio::task::spawn_blocking(move || {
        let image = &lease.request().payload;
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            s.classifier.classify_with(image, k, parallelism)
        }));
        (lease, result)
    })
    .await
    {
        Ok((lease, Ok(result))) => (lease, result),
        Ok((lease, Err(_panic))) => {
            error!("classification panicked");
            let msg = "the classifier failed on this request";
            return Err(fail(shared, lease, ErrorCode::Internal, msg));
        }
        Err(e) => unreachable_join(e),
    };
    match result {
        Ok(c) => {
            shared.metrics.preprocess.observe(c.preprocess.as_secs_f64());
            shared.metrics.inference.observe(c.inference.as_secs_f64());
            let threads = u32::try_from(c.threads).unwrap_or(u32::MAX);
            shared
                .metrics
                .inference_threads
                .get_or_create(&ThreadsLabels {
                    threads,
                    queue: if waiting { "waiting" } else { "empty" },
                })
                .inc();
            shared.observe_local_latency(ms(c.preprocess) + ms(c.inference));
            let best = c.top.first().map(|p| p.score).unwrap_or(0.0);
            shared.metrics.confidence.observe(f64::from(best));
            let threshold = shared.config.offload.min_confidence;
            let measure = shared.config.offload.confidence_measure;
            // The classes replies can name: a background class (label offset) is not an answer.
            let offset = served.classifier.manifest().output.label_offset;
            let labelled = c.probabilities.get(offset..).unwrap_or_default();
            let confidence = routing::confidence(measure, labelled);
            shared.history.confidence(best, confidence < threshold);
            let top = c.top.into_iter().map(Label::from).collect();
            let answer = LocalAnswer {
                top,
                preprocess: ms(c.preprocess),
                inference: ms(c.inference),
                best,
                confidence,
            };
            Ok((lease, answer))
        }
        Err(e) => {
            let code = ErrorCode::from_runtime(e.code());
            info!(code = code.as_str(), "cannot classify: {e}");
            Err(fail(shared, lease, code, &e.to_string()))
        }
    }
}

/// The reply of a request classified on the device, for `reason`.
fn local_reply(
    shared: &Shared,
    served: &Served,
    lease: Lease,
    answer: LocalAnswer,
    queued: f64,
    reason: Reason,
) -> (Vec<u8>, Outcome) {
    let LocalAnswer {
        top,
        preprocess,
        inference,
        best,
        confidence,
    } = answer;
    let low_confidence = best < shared.config.model.low_confidence_threshold
        || confidence < shared.config.offload.min_confidence;
    let timings = Timings {
        queued,
        preprocess,
        inference,
        total: since_ms(lease.request().received_at),
    };
    info!(
        top1 = best,
        inference_ms = inference,
        reason = reason.as_str(),
        "classified"
    );
    let doc = answering(shared, served, &lease).local(reason.as_str(), top, low_confidence, timings);
    (doc, Outcome::Ok(lease, "local", reason.as_str()))
}

/// Asks the cluster; returns its answer and how long the call took (ms).
async fn cluster(
    shared: &Arc<Shared>,
    served: &Arc<Served>,
    offload: &Arc<Offload>,
    lease: &Lease,
    k: usize,
) -> Result<(Answer, f64), OffloadError> {
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

/// The reply of a request the cluster answered, for `reason`.
fn cluster_reply(
    shared: &Shared,
    served: &Served,
    lease: Lease,
    answer: Answer,
    queued: f64,
    cluster_ms: f64,
    reason: Reason,
) -> (Vec<u8>, Outcome) {
    let best = answer.top.first().map(|l| l.score).unwrap_or(0.0);
    let scores = if answer.scores == PoolScores::Logits {
        ScoreKind::Logit
    } else {
        ScoreKind::Probability
    };
    let timings = Timings {
        queued,
        preprocess: 0.0,
        inference: cluster_ms,
        total: since_ms(lease.request().received_at),
    };
    info!(
        top1 = best,
        cluster_ms,
        reason = reason.as_str(),
        "classified by the cluster"
    );
    let threshold = shared.config.model.low_confidence_threshold;
    let doc =
        answering(shared, served, &lease).cluster(reason.as_str(), answer.top, scores, threshold, timings);
    (doc, Outcome::Ok(lease, "cluster", reason.as_str()))
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

    /// The cluster's side of the routing decision for `lease`'s request, now.
    fn cluster_situation(&self, offload: &Offload, lease: &Lease) -> routing::Cluster {
        let left =
            deadline_instant(lease.request().deadline).map(|d| d.saturating_duration_since(Instant::now()));
        routing::Cluster {
            estimated_wait_ms: self.estimated_wait_ms(),
            max_local_wait_ms: self.config.offload.max_local_wait_ms as f64,
            available: offload.available(),
            time_left: left,
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

pub(super) fn ms(d: Duration) -> f64 {
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
