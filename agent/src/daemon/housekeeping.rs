//! The housekeeping task, once a second or when the status changes: hands out again the
//! requests whose lease expired, syncs the queue, publishes the retained status when it
//! changed, and feeds systemd's watchdog.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tracing::{error, warn};

use super::Shared;
use super::publisher::{PubCmd, Tag};
use super::status::State;
use crate::queue::UnixMillis;

pub(super) async fn housekeeping_task(shared: Arc<Shared>) {
    let mut last: Option<(State, crate::queue::QueueStats, u64, u64)> = None;
    // systemd's watchdog is fed from here, at least twice per period: if this loop stalls
    // (a wedged runtime or queue), systemd restarts the agent.
    let watchdog = sd_notify::watchdog_enabled();
    let mut fed = Instant::now();
    loop {
        if let Some(period) = watchdog
            && fed.elapsed() >= period / 3
        {
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
            fed = Instant::now();
        }
        tokio::select! {
            _ = shared.status_changed.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let queue = shared.queue.clone();
        // Also syncs what was committed without a sync (leases, completions): a power cut then
        // repeats at most about a second of work.
        let requeue = move || {
            let n = queue.requeue_expired(UnixMillis::now())?;
            queue.sync_if_needed()?;
            Ok::<_, crate::queue::QueueError>(n)
        };
        match tokio::task::spawn_blocking(requeue).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => {
                warn!(n, "leases expired; requests handed out again");
                shared.work.notify_waiters();
            }
            Ok(Err(e)) => error!("cannot requeue expired leases or sync the queue: {e}"),
            Err(e) => error!("requeue task failed: {e}"),
        }
        let stats = shared.queue.stats();
        shared.metrics.set_queue(&stats);
        let state = shared.state();
        let answered = shared.answered_local.load(Ordering::Relaxed)
            + shared.answered_cluster.load(Ordering::Relaxed)
            + shared.answered_errors.load(Ordering::Relaxed);
        let epoch = shared.status_epoch.load(Ordering::Relaxed);
        if shared.connected.load(Ordering::Relaxed) && last != Some((state, stats, answered, epoch)) {
            shared.send(PubCmd::Publish {
                tag: Tag::Status,
                topic: shared.topics.status.clone(),
                payload: shared.status_document(state.as_str()),
                retain: true,
                correlation_data: None,
            });
            last = Some((state, stats, answered, epoch));
        }
    }
}
