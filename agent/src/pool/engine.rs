//! The pool's inference engine: one optimised model shared by every request, a limit on the
//! requests held at once (beyond it: `RESOURCE_EXHAUSTED`), a fixed number of inference
//! slots, and optional dynamic batching.
//!
//! Bundles have batch size 1 (tract ran batch 4 slower per image than batch 1 on these CPUs),
//! so a "batch" here is a group of queued images run back to back on one slot: batching
//! bounds how long an image waits for company (`max_queue_delay`) and how many run in one
//! turn (`max_batch_size`), and it is off by default because it measured slower: 22.8 and
//! 20.6 images/s with batches of 4 against 25.6 and 24.4 without (EfficientNet-Lite0, 2
//! slots, concurrency 4, this 2-core machine; see the README).
//!
//! The model can be replaced while serving ([`Engine::replace`], on SIGHUP): a request takes
//! the model once when it is scored and all its items run on it, so requests in flight finish
//! on the old model and none fails.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, TryAcquireError, mpsc, oneshot};

use edge_runtime::runtime::{Classifier, Tensor};

use super::metrics::PoolMetrics;
use crate::model::Current;

/// What an image or tensor becomes.
#[derive(Debug, Clone)]
pub struct Scored {
    /// Probabilities of every output class (softmax applied for logit models).
    pub probabilities: Vec<f32>,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("the server is at its concurrency limit ({0} requests); retry later")]
    Exhausted(usize),
    #[error("the server is draining")]
    Draining,
    #[error("inference failed: {0}")]
    Internal(String),
}

/// One unit of work: an encoded image or a preprocessed input tensor.
pub enum Item {
    Encoded(Vec<u8>),
    Tensor(Tensor),
}

struct Job {
    item: Item,
    classifier: Arc<Classifier>,
    enqueued: Instant,
    done: oneshot::Sender<Result<Scored, EngineError>>,
}

#[derive(Debug, Clone, Copy)]
pub struct EngineOptions {
    /// Requests held at once (queued or running).
    pub max_concurrent_requests: usize,
    /// Inferences run at once.
    pub slots: usize,
    /// `None`: no batching.
    pub batching: Option<Batching>,
}

#[derive(Debug, Clone, Copy)]
pub struct Batching {
    pub max_batch_size: usize,
    pub max_queue_delay: Duration,
}

pub struct Engine {
    model: Current<Classifier>,
    requests: Arc<Semaphore>,
    max_requests: usize,
    slots: Arc<Semaphore>,
    batcher: Option<mpsc::Sender<Job>>,
    metrics: Arc<PoolMetrics>,
}

/// Held while a request is admitted.
pub struct Admission {
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Engine {
    pub fn new(classifier: Classifier, options: EngineOptions, metrics: Arc<PoolMetrics>) -> Self {
        let slots = Arc::new(Semaphore::new(options.slots.max(1)));
        let batcher = options.batching.map(|b| {
            let (tx, rx) = mpsc::channel(options.max_concurrent_requests.max(1) * 4);
            tokio::spawn(batcher(rx, b, slots.clone(), metrics.clone()));
            tx
        });
        Self {
            model: Current::new(classifier),
            requests: Arc::new(Semaphore::new(options.max_concurrent_requests.max(1))),
            max_requests: options.max_concurrent_requests.max(1),
            slots,
            batcher,
            metrics,
        }
    }

    /// The model serving now.
    pub fn classifier(&self) -> Arc<Classifier> {
        self.model.get()
    }

    /// Serves `classifier` from now on; requests already being scored finish on the old one.
    pub fn replace(&self, classifier: Classifier) -> Arc<Classifier> {
        self.model.replace(Arc::new(classifier))
    }

    /// Admits a request, or refuses it at the concurrency limit.
    pub fn admit(&self) -> Result<Admission, EngineError> {
        match self.requests.clone().try_acquire_owned() {
            Ok(permit) => Ok(Admission { _permit: permit }),
            Err(TryAcquireError::NoPermits) => Err(EngineError::Exhausted(self.max_requests)),
            Err(TryAcquireError::Closed) => Err(EngineError::Draining),
        }
    }

    /// Stops admitting requests; those admitted finish.
    pub fn close(&self) {
        self.requests.close();
    }

    /// Requests admitted right now.
    pub fn in_flight(&self) -> usize {
        self.max_requests - self.requests.available_permits()
    }

    /// Scores every item (in order) on one model, returned with the scores; fails on the
    /// first item that fails.
    pub async fn score(&self, items: Vec<Item>) -> Result<(Arc<Classifier>, Vec<Scored>), EngineError> {
        let classifier = self.model.get();
        let mut pending = Vec::with_capacity(items.len());
        for item in items {
            let (done, result) = oneshot::channel();
            let job = Job {
                item,
                classifier: classifier.clone(),
                enqueued: Instant::now(),
                done,
            };
            match &self.batcher {
                Some(tx) => tx.send(job).await.map_err(|_| EngineError::Draining)?,
                None => {
                    let (slots, metrics) = (self.slots.clone(), self.metrics.clone());
                    tokio::spawn(async move {
                        let Ok(_slot) = slots.acquire_owned().await else {
                            let _ = job.done.send(Err(EngineError::Draining));
                            return;
                        };
                        metrics.batch_size.observe(1.0);
                        run_jobs(vec![job], metrics).await;
                    });
                }
            }
            pending.push(result);
        }
        let mut out = Vec::with_capacity(pending.len());
        for r in pending {
            out.push(
                r.await
                    .map_err(|_| EngineError::Internal("inference task lost".into()))??,
            );
        }
        Ok((classifier, out))
    }
}

/// Runs jobs one after another on a blocking thread and answers each.
async fn run_jobs(jobs: Vec<Job>, metrics: Arc<PoolMetrics>) {
    let handle = tokio::task::spawn_blocking(move || {
        for job in jobs {
            metrics.queue_wait.observe(job.enqueued.elapsed().as_secs_f64());
            let start = Instant::now();
            let classifier = job.classifier;
            let result =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| score_one(&classifier, job.item)))
                    .unwrap_or_else(|_| {
                        Err(EngineError::Internal("the model panicked on this input".into()))
                    });
            metrics.inference.observe(start.elapsed().as_secs_f64());
            let _ = job.done.send(result);
        }
    });
    if let Err(e) = handle.await {
        tracing::error!("inference thread failed: {e}");
    }
}

fn score_one(classifier: &Classifier, item: Item) -> Result<Scored, EngineError> {
    let tensor = match item {
        Item::Encoded(bytes) => classifier
            .preprocessor()
            .tensor_from_bytes(&bytes)
            .map_err(|e| EngineError::InvalidArgument(format!("{e} ({})", e.code())))?,
        Item::Tensor(t) => t,
    };
    let probabilities = classifier
        .infer(tensor)
        .map_err(|e| EngineError::Internal(e.to_string()))?;
    Ok(Scored { probabilities })
}

async fn batcher(mut rx: mpsc::Receiver<Job>, b: Batching, slots: Arc<Semaphore>, metrics: Arc<PoolMetrics>) {
    while let Some(first) = rx.recv().await {
        let mut jobs = vec![first];
        let deadline = tokio::time::Instant::now() + b.max_queue_delay;
        while jobs.len() < b.max_batch_size {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(job)) => jobs.push(job),
                Ok(None) | Err(_) => break,
            }
        }
        let Ok(slot) = slots.clone().acquire_owned().await else {
            for job in jobs {
                let _ = job.done.send(Err(EngineError::Draining));
            }
            return;
        };
        metrics.batch_size.observe(jobs.len() as f64);
        let metrics = metrics.clone();
        tokio::spawn(async move {
            run_jobs(jobs, metrics).await;
            drop(slot);
        });
    }
}
