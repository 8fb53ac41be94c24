//! The ingress task: stores each request in the queue and acknowledges it (PUBACK) once it
//! is on disk, several to one flush when they arrive together (group commit); refuses
//! malformed ones with an error reply; hands a request already leased to a worker waiting
//! for work; holds requests unacknowledged while the queue is full (backpressure); and
//! passes control messages to `control`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use super::control::control;
use super::{Shared, lock};
use crate::mqtt::{AckToken, Client, Message};
use crate::queue::{EnqueueOutcome, Leased, QueueError, Seq, StoredReply, UnixMillis};
use crate::reply::{ErrorCode, error_document};

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
pub(super) async fn ingress_task(
    client: Client,
    shared: Arc<Shared>,
    mut rx: mpsc::UnboundedReceiver<(u64, Message)>,
) {
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
    fn topics_match(&self, topic: &str) -> bool {
        self.topics.request_topics.iter().any(|t| t == topic)
    }

    pub(super) fn set_backpressure(&self, on: bool) {
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
