//! Benchmark 5: Durable enqueue: requests per second and MB/s into the SQLite queue with the fsync
//! that precedes the PUBACK, 100 KB payloads, against writing the same bytes with fsync to a
//! plain file.
//!
//! The queue is measured as a device runs it: after requests have gone through it (enqueued,
//! leased, completed, their replies acknowledged) long enough for SQLite to have checkpointed
//! its log once, so commits overwrite the log file in place and reuse freed pages, and the
//! timed window is long enough to hold its checkpoints (about one per 16 MiB of log). A new
//! queue's first 16 MiB, where every commit also extends the log file, is reported beside it.

use std::io::Write;
use std::num::{NonZeroU32, NonZeroU64, NonZeroUsize};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use edge_agent::queue::{
    EnqueueOutcome, Protocol, Queue, QueueLimits, StoredReply, StoredRequest, UnixMillis,
};

use crate::Ctx;
use crate::report::{Report, Target};
use crate::stats::median;

const S: &str = "queue";
const PAYLOAD: usize = 100 * 1024;
const GROUP: usize = 8;
/// Requests per timed window: each puts about 130 KiB in the log, so the window holds two of
/// the checkpoints that come every 16 MiB of log.
const TIMED: usize = 256;
/// Requests taken through their whole life before the timed window of a running queue.
const WARM_UP: usize = 192;

fn request(i: usize) -> StoredRequest {
    StoredRequest {
        request_id: format!("req-{i}"),
        received_at: UnixMillis::now(),
        deadline: None,
        reply_topic: format!("app/replies/{i}"),
        correlation_data: Some(i.to_be_bytes().to_vec()),
        top_k: Some(5),
        protocol: Protocol::V5,
        payload: vec![(i % 251) as u8; PAYLOAD],
    }
}

fn limits() -> QueueLimits {
    QueueLimits {
        max_items: NonZeroUsize::new(100_000).unwrap_or(NonZeroUsize::MIN),
        max_bytes: NonZeroU64::new(8 << 30).unwrap_or(NonZeroU64::MIN),
        max_attempts: NonZeroU32::new(3).unwrap_or(NonZeroU32::MIN),
        visibility_timeout: Duration::from_secs(60),
        max_dead_letters: NonZeroUsize::new(100).unwrap_or(NonZeroUsize::MIN),
    }
}

/// The queue's state when the timed window starts.
#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    /// Just created: every commit extends the log file.
    New,
    /// `WARM_UP` requests went through their whole life first: the log has been checkpointed
    /// and is overwritten in place, freed pages are reused.
    Running,
}

/// Takes each request through its life as the daemon does: durable enqueue, lease, complete
/// (the reply into the outbox), reply acknowledged.
async fn run_through(q: &Queue, requests: &[StoredRequest]) -> Result<()> {
    for r in requests {
        let outcome = q.enqueue_async(r).await?;
        anyhow::ensure!(
            matches!(outcome, EnqueueOutcome::Enqueued(_)),
            "not enqueued: {outcome:?}"
        );
        let leased = q.lease(UnixMillis::now())?.context("nothing to lease")?;
        let reply = StoredReply {
            request_id: r.request_id.clone(),
            topic: r.reply_topic.clone(),
            correlation_data: r.correlation_data.clone(),
            protocol: r.protocol,
            payload: vec![b' '; 400],
        };
        q.complete_async(leased.seq(), &reply).await?;
        q.reply_acked_async(leased.seq()).await?;
    }
    Ok(())
}

/// Requests per second into a queue in `dir` in `state`, `group` requests per flush.
async fn queue_rate(
    dir: &Path,
    requests: &[StoredRequest],
    group: usize,
    state: State,
    latencies: &mut Vec<f64>,
) -> Result<f64> {
    let q = Queue::open(dir, limits())?;
    if state == State::Running {
        run_through(&q, &requests[..WARM_UP.min(requests.len())]).await?;
    }
    let start = Instant::now();
    for chunk in requests.chunks(group) {
        let call = Instant::now();
        let refs: Vec<&StoredRequest> = chunk.iter().collect();
        let outcomes = if group == 1 {
            vec![q.enqueue_async(refs[0]).await?]
        } else {
            q.enqueue_many_async(&refs).await?
        };
        if let Some(o) = outcomes
            .iter()
            .find(|o| !matches!(o, EnqueueOutcome::Enqueued(_)))
        {
            anyhow::bail!("not enqueued: {o:?}");
        }
        latencies.push(crate::stats::ms(call.elapsed()));
    }
    Ok(requests.len() as f64 / start.elapsed().as_secs_f64())
}

/// The same bytes appended to a plain file, `fdatasync` after every `group` requests.
fn file_rate(path: &Path, requests: &[StoredRequest], group: usize) -> Result<f64> {
    let mut f = std::fs::File::create(path)?;
    let start = Instant::now();
    for chunk in requests.chunks(group) {
        for r in chunk {
            f.write_all(&r.payload)?;
        }
        f.sync_data()?;
    }
    Ok(requests.len() as f64 / start.elapsed().as_secs_f64())
}

pub fn run(ctx: &Ctx, report: &mut Report) -> Result<()> {
    let n = TIMED;
    let requests: Vec<StoredRequest> = (0..n).map(request).collect();
    let rt = tokio::runtime::Runtime::new()?;
    let (mut single, mut grouped, mut file, mut file_grouped) = (vec![], vec![], vec![], vec![]);
    let mut fresh = vec![];
    let base = ctx.scratch.path().join("queue-bench");
    let (mut lat_single, mut lat_grouped, mut lat_fresh) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..ctx.rounds {
        let dir = |name: &str| base.join(format!("{round}-{name}"));
        const DIRS: [&str; 4] = ["single", "grouped", "fresh", "file"];
        for d in DIRS {
            std::fs::create_dir_all(dir(d)).context("scratch")?;
        }
        let running = State::Running;
        single.push(rt.block_on(queue_rate(&dir("single"), &requests, 1, running, &mut lat_single))?);
        file.push(file_rate(&dir("file").join("plain"), &requests, 1)?);
        grouped.push(rt.block_on(queue_rate(
            &dir("grouped"),
            &requests,
            GROUP,
            running,
            &mut lat_grouped,
        ))?);
        file_grouped.push(file_rate(&dir("file").join("plain-grouped"), &requests, GROUP)?);
        fresh.push(rt.block_on(queue_rate(
            &dir("fresh"),
            &requests,
            1,
            State::New,
            &mut lat_fresh,
        ))?);
        for d in DIRS {
            let _ = std::fs::remove_dir_all(dir(d));
        }
    }
    let (single, grouped, file, file_grouped, fresh) = (
        median(&single),
        median(&grouped),
        median(&file),
        median(&file_grouped),
        median(&fresh),
    );
    let mb = |rate: f64| rate * PAYLOAD as f64 / 1e6;
    use crate::stats::quantile;
    report.note(
        S,
        format!(
            "Latency of one durable enqueue (write + flush), over {} calls: p50 {:.2} ms, p99 {:.2} ms, \
             max {:.1} ms; a group of {GROUP}: p50 {:.2} ms, max {:.1} ms (running queue; the tail \
             is SQLite's checkpoint, which copies 16 MiB of log into the database with two fsyncs, \
             and the disk's fsync tail on this shared machine). A new queue: p50 {:.2} ms.",
            lat_single.len(),
            quantile(&lat_single, 0.5),
            quantile(&lat_single, 0.99),
            quantile(&lat_single, 1.0),
            quantile(&lat_grouped, 0.5),
            quantile(&lat_grouped, 1.0),
            quantile(&lat_fresh, 0.5),
        ),
    );
    report.row(
        S,
        "durable enqueue, one request per flush",
        single,
        "req/s",
        Some(("plain file, fdatasync per request", file)),
        Target::RatioAtLeast(0.5),
    );
    report.row(
        S,
        format!("durable enqueue, group commit of {GROUP} arriving together"),
        grouped,
        "req/s",
        Some(("plain file, fdatasync per request", file)),
        Target::RatioAtLeast(0.5),
    );
    report.row(
        S,
        format!("durable enqueue, group commit of {GROUP}, vs the file grouped the same way"),
        grouped,
        "req/s",
        Some((&format!("plain file, fdatasync per {GROUP}"), file_grouped)),
        Target::None,
    );
    report.row(
        S,
        "durable enqueue, one request per flush, a new queue's first requests",
        fresh,
        "req/s",
        Some(("plain file, fdatasync per request", file)),
        Target::None,
    );
    report.note(
        S,
        format!(
            "{n} requests of {} KB each per round into a queue on the scratch disk ({}), {} rounds \
             interleaved with the file (appended to, one new file per round). The rows without a \
             qualifier time a running queue: a new one into which {WARM_UP} requests first went \
             through their whole life (durable enqueue, lease, complete, reply acknowledged), so \
             SQLite has checkpointed its log and overwrites it in place, as on a device that has \
             been up a while. A new queue's first 16 MiB of log extend the log file at every \
             commit, and each fsync then also commits the file's new size: {:.1} MB/s, {:.2}x the \
             file. MB/s of the running queue: {:.1} (one per flush) and {:.1} (grouped); file {:.1} \
             and {:.1}. One request per flush is what the daemon's ingress does when requests \
             arrive one at a time; it commits every request already waiting in one flush \
             (`Queue::enqueue_many_async`) when several arrive together.",
            PAYLOAD / 1024,
            ctx.scratch.path().display(),
            ctx.rounds,
            mb(fresh),
            fresh / file,
            mb(single),
            mb(grouped),
            mb(file),
            mb(file_grouped)
        ),
    );
    Ok(())
}
