//! Opening the queue: checking the directory and layout, recovering after a crash (leases
//! void, counters rebuilt), and the read-side calls (stats, outbox, dead letters, flush).

use std::fs::{File, TryLockError};
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use sled::{Db, IVec, Tree};

use super::error::QueueError;
use super::layout::{self, DeadLetter, DeadReason};
use super::ledger::{Ledger, QueueLimits, QueueStats, Recovered, Seq, UnixMillis};
use super::record::StoredReply;
use super::trees::Trees;
use super::watermark::{self, Watermark};

/// sled's page cache. Its default (1 GiB) is the whole RAM of a small device; the queue's
/// hot set is the head of `pending`, the indexes and the outbox.
pub const CACHE_CAPACITY_BYTES: u64 = 32 * 1024 * 1024;

/// The durable request queue. Cheap to clone; clones share one database and one ledger.
#[derive(Clone)]
pub struct Queue {
    pub(super) inner: Arc<Inner>,
}

pub(super) struct Inner {
    pub(super) path: PathBuf,
    pub(super) db: Db,
    pub(super) trees: Trees,
    pub(super) watermark: Watermark,
    /// Held across every state change so the counters always match the trees.
    pub(super) ledger: Mutex<Ledger>,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("path", &self.inner.path)
            .field("stats", &self.stats())
            .finish()
    }
}

fn open_error(path: &Path, e: sled::Error) -> QueueError {
    match e {
        sled::Error::Io(_) => QueueError::Open {
            path: path.to_owned(),
            source: e,
        },
        other => QueueError::Damaged {
            path: path.to_owned(),
            reason: other.to_string(),
        },
    }
}

fn damaged(path: &Path, reason: impl Into<String>) -> QueueError {
    QueueError::Damaged {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

/// Refuses paths sled would happily scribble over: a file, or a directory with other content.
fn check_directory(path: &Path) -> Result<(), QueueError> {
    let io = |e: std::io::Error| QueueError::Open {
        path: path.to_owned(),
        source: sled::Error::Io(e),
    };
    if !path.exists() {
        return Ok(());
    }
    if !path.is_dir() {
        return Err(damaged(path, "it is not a directory"));
    }
    let non_empty = std::fs::read_dir(path).map_err(io)?.next().is_some();
    if non_empty && !path.join("db").is_file() && !path.join("conf").is_file() {
        return Err(damaged(
            path,
            "the directory holds files but no sled database; not writing into it",
        ));
    }
    Ok(())
}

/// Waits up to a second for sled's lock on `db` (the same `flock` sled takes) to be free. A
/// queue closed a moment ago can hold it briefly: sled's threads wind down after the drop, and
/// a process forked meanwhile (before its exec) shares the open file.
pub(super) fn wait_for_lock(path: &Path) -> Result<(), QueueError> {
    const TRIES: u32 = 20;
    let Ok(file) = File::open(path.join("db")) else {
        return Ok(());
    }; // sled creates it
    for _ in 0..TRIES {
        match file.try_lock() {
            Ok(()) => return Ok(()), // released when `file` closes
            Err(TryLockError::WouldBlock) => std::thread::sleep(Duration::from_millis(50)),
            Err(TryLockError::Error(_)) => return Ok(()), // let sled report it
        }
    }
    Err(QueueError::Locked {
        path: path.to_owned(),
    })
}

/// Opens sled, turning a panic on damaged files into an error.
fn open_db(path: &Path) -> Result<(Db, Trees), QueueError> {
    let config = sled::Config::new()
        .path(path)
        .cache_capacity(CACHE_CAPACITY_BYTES)
        .mode(sled::Mode::LowSpace);
    let opened = panic::catch_unwind(AssertUnwindSafe(|| {
        let db = config.open()?;
        let trees = Trees::open(&db)?;
        Ok::<_, sled::Error>((db, trees))
    }));
    match opened {
        Ok(Ok(pair)) => Ok(pair),
        Ok(Err(e)) => Err(open_error(path, e)),
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("unknown failure");
            Err(damaged(
                path,
                format!("the storage engine failed while reading it ({what})"),
            ))
        }
    }
}

/// Checks (or, on a fresh database, writes) the layout marker.
fn check_layout(path: &Path, db: &Db, trees: &Trees) -> Result<(), QueueError> {
    let err = |e| open_error(path, e);
    match trees.meta.get(layout::META_FORMAT).map_err(err)? {
        Some(v) if *v == [layout::LAYOUT_VERSION] => Ok(()),
        Some(v) => Err(damaged(
            path,
            format!(
                "its layout version is {v:?}, this agent reads version {}",
                layout::LAYOUT_VERSION
            ),
        )),
        None => {
            let data_trees = [
                &trees.items,
                &trees.pending,
                &trees.leased,
                &trees.outbox,
                &trees.dead,
            ];
            if data_trees.iter().any(|t| !t.is_empty()) {
                return Err(damaged(path, "it holds queue records but no layout marker"));
            }
            trees
                .meta
                .insert(layout::META_FORMAT, &[layout::LAYOUT_VERSION])
                .map_err(err)?;
            db.flush().map_err(err)?;
            Ok(())
        }
    }
}

fn warn_quarantined(seq: Seq, note: &str) {
    tracing::warn!(seq = seq.get(), note, "queue record moved to the dead letters");
}

/// Voids every lease (attempt counts kept) and counts what is left, moving undecodable
/// entries to the dead letters.
fn recover(trees: &Trees, mut next_seq: u64, now: UnixMillis) -> sled::Result<Recovered> {
    let mut stray = |tree: &Tree, key: &IVec, note: &str| -> sled::Result<()> {
        let seq = Seq::new(next_seq);
        next_seq = next_seq.saturating_add(1);
        warn_quarantined(seq, note);
        trees.quarantine_stray(tree, key, seq, note, now).map(drop)
    };
    let leased: Vec<(IVec, IVec)> = trees.leased.iter().collect::<sled::Result<_>>()?;
    for (key, value) in leased {
        match (Seq::from_key(&key), layout::decode_index(&value)) {
            (Some(seq), Ok(meta)) => trees.move_to_pending(seq, meta)?,
            (Some(seq), Err(e)) => {
                let note = format!("at open, leased entry: {e}");
                warn_quarantined(seq, &note);
                trees.quarantine(seq, &note, now)?;
            }
            (None, _) => stray(&trees.leased, &key, "at open, leased entry with a malformed key")?,
        }
    }
    let mut recovered = Recovered::default();
    let pending: Vec<(IVec, IVec)> = trees.pending.iter().collect::<sled::Result<_>>()?;
    for (key, value) in pending {
        match (Seq::from_key(&key), layout::decode_index(&value)) {
            (Some(_), Ok(meta)) => {
                recovered.pending += 1;
                recovered.pending_bytes += meta.payload_len;
            }
            (Some(seq), Err(e)) => {
                let note = format!("at open, pending entry: {e}");
                warn_quarantined(seq, &note);
                trees.quarantine(seq, &note, now)?;
            }
            (None, _) => stray(
                &trees.pending,
                &key,
                "at open, pending entry with a malformed key",
            )?,
        }
    }
    recovered.outbox = trees.outbox.len();
    recovered.dead = trees.dead.len();
    recovered.next_seq = next_seq;
    Ok(recovered)
}

impl Queue {
    /// Opens (or creates) the queue at `path` and recovers it: leases from before a crash
    /// become pending again with their attempt counts, counters are rebuilt, undecodable
    /// index entries become dead letters. A damaged database, or one that came back with
    /// fewer records than were acknowledged, is an error naming the path and the way out; the
    /// queue never deletes anything to make an open succeed.
    pub fn open(path: impl AsRef<Path>, limits: QueueLimits) -> Result<Self, QueueError> {
        let path = path.as_ref();
        check_directory(path)?;
        wait_for_lock(path)?;
        let (db, trees) = open_db(path)?;
        let err = |e| open_error(path, e);
        let stored_next = trees.meta.get(layout::META_NEXT_SEQ).map_err(err)?;
        let stored_next = stored_next.as_deref().and_then(layout::decode_u64).unwrap_or(0);
        let next_seq = stored_next.max(trees.next_seq_from_keys().map_err(err)?);
        if let Some(flushed) = watermark::read(path).filter(|&w| w > next_seq) {
            return Err(damaged(
                path,
                format!(
                    "acknowledged requests are missing: sequence numbers up to {} were flushed, but \
                     sled recovered the queue only up to {next_seq} (its recovery drops log records \
                     it cannot read)",
                    flushed - 1
                ),
            ));
        }
        check_layout(path, &db, &trees)?;
        let recovered = recover(&trees, next_seq, UnixMillis::now()).map_err(err)?;
        db.flush().map_err(err)?;
        let watermark = Watermark::open(path, recovered.next_seq).map_err(|e| QueueError::Open {
            path: path.to_owned(),
            source: sled::Error::Io(e),
        })?;
        let ledger = Mutex::new(Ledger::new(limits, recovered));
        let inner = Inner {
            path: path.to_owned(),
            db,
            trees,
            watermark,
            ledger,
        };
        let queue = Self {
            inner: Arc::new(inner),
        };
        queue.prune_dead(&mut queue.ledger()).map_err(err)?;
        Ok(queue)
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    pub fn limits(&self) -> QueueLimits {
        *self.ledger().limits()
    }

    pub(super) fn ledger(&self) -> MutexGuard<'_, Ledger> {
        // Every change writes sled first and the ledger after, so a panic in between leaves
        // at worst a counter off by one; keep serving rather than poison the agent.
        self.inner.ledger.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counters, without touching the disk.
    pub fn stats(&self) -> QueueStats {
        self.ledger().stats()
    }

    /// Makes every change so far durable (for graceful shutdown after `release`).
    pub fn flush(&self) -> Result<(), QueueError> {
        self.inner.db.flush()?;
        Ok(())
    }

    /// Records a new or rewritten dead letter and prunes the oldest beyond the cap.
    pub(super) fn note_dead(&self, ledger: &mut Ledger, new: bool) -> sled::Result<()> {
        ledger.on_dead_written(new);
        self.prune_dead(ledger)
    }

    fn prune_dead(&self, ledger: &mut Ledger) -> sled::Result<()> {
        let excess = ledger.dead_excess();
        if excess > 0 {
            for _ in 0..self.inner.trees.prune_dead(excess)? {
                ledger.on_dead_pruned();
            }
        }
        Ok(())
    }

    /// Replies not yet acknowledged by the broker, oldest first: publish them again after a
    /// restart or reconnect. An undecodable reply becomes a dead letter.
    pub fn outbox(&self) -> Result<Vec<(Seq, StoredReply)>, QueueError> {
        let mut ledger = self.ledger();
        let mut replies = Vec::new();
        let (mut bad, mut strays) = (Vec::new(), Vec::new());
        for entry in self.inner.trees.outbox.iter() {
            let (key, value) = entry?;
            match (Seq::from_key(&key), StoredReply::decode(&value)) {
                (Some(seq), Ok(reply)) => replies.push((seq, reply)),
                (Some(seq), Err(e)) => bad.push((seq, format!("outbox entry: {e}"))),
                (None, _) => strays.push(key),
            }
        }
        let trees = &self.inner.trees;
        for (seq, note) in bad {
            warn_quarantined(seq, &note);
            let new = trees.quarantine(seq, &note, UnixMillis::now())?;
            ledger.forget_outbox();
            self.note_dead(&mut ledger, new)?;
        }
        for key in strays {
            let (seq, note) = (ledger.take_seq(), "outbox entry with a malformed key");
            warn_quarantined(seq, note);
            let new = trees.quarantine_stray(&trees.outbox, &key, seq, note, UnixMillis::now())?;
            ledger.forget_outbox();
            self.note_dead(&mut ledger, new)?;
        }
        Ok(replies)
    }

    /// The dead letters, oldest first (at most `max_dead_letters`). A letter whose own record
    /// is unreadable is listed with a note saying so.
    pub fn dead_letters(&self) -> Result<Vec<DeadLetter>, QueueError> {
        let mut letters = Vec::new();
        for entry in self.inner.trees.dead.iter() {
            let (key, value) = entry?;
            let seq = Seq::from_key(&key).unwrap_or(Seq::new(u64::MAX));
            letters.push(DeadLetter::decode(seq, &value).unwrap_or_else(|e| DeadLetter {
                seq,
                reason: DeadReason::Undecodable,
                attempts: 0,
                at: UnixMillis(0),
                note: format!("{e}"),
                raw_request: Some(value.to_vec()),
            }));
        }
        Ok(letters)
    }
}
