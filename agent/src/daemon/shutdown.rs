//! The stop sequence after SIGTERM/SIGINT (see the module doc of `daemon`): no new requests,
//! workers finish (their requests are released after 30 s), the last replies get a moment to
//! be acknowledged, the final `offline` status is published and, once the broker has
//! acknowledged it, the agent disconnects; then the queue is flushed.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::publisher::{PubCmd, Tag};
use super::{Shared, lock, status};
use crate::queue::Seq;

/// The longest a shutdown waits for the broker to acknowledge the final `offline` status.
/// Without that acknowledgement the agent does not disconnect cleanly: it closes the
/// connection, and the broker publishes the last will (`offline` too).
const OFFLINE_ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// The daemon's tasks, stopped in order.
pub(super) struct Tasks {
    pub(super) ingress: JoinHandle<()>,
    pub(super) workers: Vec<JoinHandle<()>>,
    pub(super) housekeeping: JoinHandle<()>,
    pub(super) sighup: JoinHandle<()>,
    pub(super) model_task: JoinHandle<()>,
    /// Stops the connection task.
    pub(super) conn_stop: CancellationToken,
    pub(super) conn_task: JoinHandle<()>,
    pub(super) publisher: JoinHandle<()>,
    pub(super) http: Option<JoinHandle<()>>,
}

/// Stops the daemon gracefully.
pub(super) async fn shutdown(shared: &Arc<Shared>, tasks: Tasks) -> Result<()> {
    info!("shutting down: no new requests; finishing the ones being classified");
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    shared.stopping.cancel();
    shared.status_changed.notify_one();
    shared.work.notify_waiters();
    shared.space.notify_waiters();
    tasks.ingress.abort();
    let workers_done = futures_join(tasks.workers);
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
    // `abort` only asks: a task running on another thread goes on to its next `.await`, and
    // housekeeping could queue one more full status after the offline one (a stopped agent
    // then stays `shutting_down` in its retained status). So wait until they have stopped;
    // the publisher also refuses any status after the offline one.
    for task in [tasks.housekeeping, tasks.sighup, tasks.model_task] {
        task.abort();
        let _ = task.await;
    }
    // A clean disconnect suppresses the last will: it is sent only once the broker has
    // acknowledged the final status. Otherwise the connection is just closed and the broker
    // publishes the will, so a stopped agent never stays `online` in its retained status.
    let offline = status::offline_document(&shared.device, &shared.served.get().model)?;
    if final_status(shared, offline).await {
        let (handed_over, disconnect) = tokio::sync::oneshot::channel();
        shared.send(PubCmd::Disconnect(handed_over));
        let _ = tokio::time::timeout(Duration::from_secs(1), disconnect).await;
        let deadline = Instant::now() + Duration::from_secs(1);
        while Instant::now() < deadline && shared.connected.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    tasks.conn_stop.cancel();
    let _ = tasks.conn_task.await;
    tasks.publisher.abort();
    if let Some(h) = tasks.http {
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
