//! The housekeeping task, once a second or when the status changes: hands out again the
//! requests whose lease expired, syncs the queue, publishes the retained status when it
//! changed, resynchronises a publish tracker that lost step with the client, and feeds
//! systemd's watchdog.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tracing::{error, warn};

use super::publisher::{PubCmd, Tag};
use super::status::State;
use super::{Shared, lock};
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
        resync_if_out_of_step(&shared);
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

/// If the publish tracker holds an entry much older than a publish takes to leave and be
/// acknowledged on the current connection, it lost step with the client (a tag that never met
/// its publish would pair every later PUBACK with the reply before it, and leave the last
/// reply in the outbox): reset it and publish the outbox again, as after a lost session.
/// Replies are then delivered twice at worst, never lost, and a reply the broker
/// acknowledged leaves the outbox. The limit is twice the keep-alive, at least 60 s: a broker
/// that stops answering is disconnected by the keep-alive well before.
fn resync_if_out_of_step(shared: &Shared) {
    let keep_alive = Duration::from_secs(shared.config.mqtt.keep_alive_secs);
    let connected_since = *lock(&shared.connected_since);
    let mut tracker = lock(&shared.tracker);
    let oldest = tracker.oldest();
    let now = Instant::now();
    if !out_of_step(now, connected_since, oldest, keep_alive) {
        return;
    }
    let oldest = oldest.unwrap_or(now);
    warn!(
        entries = tracker.len(),
        waited_secs = now.duration_since(oldest).as_secs(),
        "a publish has waited for the broker's acknowledgement longer than the connection allows: \
         publishing the outbox again"
    );
    tracker.reset();
    drop(tracker);
    shared.metrics.publish_resyncs.inc();
    shared.send(PubCmd::Connected {
        session_present: false,
        first: false,
    });
}

/// Whether the tracker's oldest entry has outlived what a live connection allows: twice the
/// keep-alive, at least 60 s, on a connection up at least that long (see
/// `resync_if_out_of_step`).
fn out_of_step(
    now: Instant,
    connected_since: Option<Instant>,
    oldest: Option<Instant>,
    keep_alive: Duration,
) -> bool {
    let limit = (keep_alive * 2).max(Duration::from_secs(60));
    match (connected_since, oldest) {
        (Some(since), Some(oldest)) => {
            now.saturating_duration_since(since) >= limit && now.saturating_duration_since(oldest) >= limit
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_entry_older_than_the_limit_on_a_connection_up_that_long_is_out_of_step() {
        let now = Instant::now() + Duration::from_secs(1_000);
        let ago = |s: u64| Some(now - Duration::from_secs(s));
        let ka = Duration::from_secs(30);
        // Limit: max(2 x 30 s, 60 s) = 60 s.
        assert!(out_of_step(now, ago(600), ago(61), ka));
        assert!(
            !out_of_step(now, ago(600), ago(59), ka),
            "a publish still within the limit"
        );
        assert!(
            !out_of_step(now, ago(30), ago(600), ka),
            "a connection up for less than the limit"
        );
        assert!(!out_of_step(now, None, ago(600), ka), "no connection");
        assert!(!out_of_step(now, ago(600), None, ka), "nothing tracked");
        // A long keep-alive raises the limit: 2 x 100 s.
        let long = Duration::from_secs(100);
        assert!(!out_of_step(now, ago(600), ago(150), long));
        assert!(out_of_step(now, ago(600), ago(201), long));
    }
}
