//! Opening the queue: checking the directory and layout, recovering after a crash (leases
//! void, counters rebuilt), moving a damaged queue aside when asked to, and the read-side
//! calls (stats, outbox, dead letters, flush).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use rusqlite::{Connection, ErrorCode, OpenFlags};

use super::error::QueueError;
use super::layout::{self, DeadLetter, DeadReason};
use super::ledger::{Ledger, QueueLimits, QueueStats, Recovered, Seq, UnixMillis};
use super::record::StoredReply;
use super::tables::{self, Table, TableOps, Tables};

/// SQLite's page cache for the queue's connection (its default is 2 MiB; the hot set is the
/// head of `pending`, the indexes and the outbox).
pub const CACHE_CAPACITY_BYTES: u64 = 8 * 1024 * 1024;

/// How long `open` waits for another holder of the database (a process shutting down) before
/// it reports the queue as in use.
const LOCK_WAIT: Duration = Duration::from_secs(1);

/// The longest `open` spends checking the database's structure (`PRAGMA quick_check`); a
/// larger queue on a slow card is opened unchecked (SQLite still checks every page it reads).
const CHECK_BUDGET: Duration = Duration::from_secs(3);

/// SQLite's page size for new queues (its default is 4 KiB). A durable enqueue writes the
/// database header, two leaf pages (body, pending index), the free-list page it takes pages
/// from, and the image's overflow pages: with 8 KiB pages that is about 1.3x the image in the
/// log, in 17 frames for 100 KB, against 1.5x with 16 KiB pages and 29 frames with 4 KiB
/// (`edge-bench --only queue` measured 8 KiB fastest of the three).
const PAGE_SIZE: i64 = 8 * 1024;

/// The log is truncated to this after a checkpoint, so it does not keep the size of a burst.
const WAL_SIZE_LIMIT: i64 = 16 * 1024 * 1024;

/// What `open_or_quarantine` does with a queue it cannot open (`queue.on_damage`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnDamage {
    /// Refuse to start (`QueueError::Damaged`): nothing is moved or deleted.
    #[default]
    Refuse,
    /// Move the directory aside (kept for inspection) and start with an empty queue.
    Quarantine,
}

/// A damaged queue directory that was moved aside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quarantined {
    /// Where the damaged directory now is.
    pub moved_to: PathBuf,
    /// Why it could not be opened.
    pub reason: String,
}

/// The durable request queue. Cheap to clone; clones share one database and one ledger.
#[derive(Clone)]
pub struct Queue {
    pub(super) inner: Arc<Inner>,
}

pub(super) struct Inner {
    pub(super) path: PathBuf,
    pub(super) db: Tables,
    pub(super) limits: QueueLimits,
    /// Held across every state change so the counters always match the tables.
    pub(super) ledger: Mutex<Ledger>,
    /// The counters as of the last change, readable while a change waits on the disk.
    pub(super) stats: Mutex<QueueStats>,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("path", &self.inner.path)
            .field("stats", &self.stats())
            .finish()
    }
}

/// The ledger, locked; publishes the counters for `stats()` when released.
pub(super) struct LedgerGuard<'a> {
    guard: MutexGuard<'a, Ledger>,
    stats: &'a Mutex<QueueStats>,
}

impl std::ops::Deref for LedgerGuard<'_> {
    type Target = Ledger;
    fn deref(&self) -> &Ledger {
        &self.guard
    }
}

impl std::ops::DerefMut for LedgerGuard<'_> {
    fn deref_mut(&mut self) -> &mut Ledger {
        &mut self.guard
    }
}

impl Drop for LedgerGuard<'_> {
    fn drop(&mut self) {
        *self.stats.lock().unwrap_or_else(PoisonError::into_inner) = self.guard.stats();
    }
}

fn damaged(path: &Path, reason: impl Into<String>) -> QueueError {
    QueueError::Damaged {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

/// An SQLite error at open: a damaged or foreign file is `Damaged`, the rest (permissions,
/// disk) is `Open`, a lock held elsewhere is `Locked`.
fn open_error(path: &Path, e: rusqlite::Error) -> QueueError {
    match e.sqlite_error_code() {
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase) => damaged(path, e.to_string()),
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => QueueError::Locked {
            path: path.to_owned(),
        },
        _ => QueueError::Open {
            path: path.to_owned(),
            source: e,
        },
    }
}

/// Files sled 0.34 (the engine of earlier versions) keeps in a queue directory.
const SLED_FILES: [&str; 3] = ["conf", "db", "blobs"];

/// Refuses paths that are not (or not only) a queue: a file, a directory holding an earlier
/// version's sled queue, or a directory with other content.
fn check_directory(path: &Path) -> Result<(), QueueError> {
    let io = |e: std::io::Error| QueueError::Io {
        path: path.to_owned(),
        source: e,
    };
    if !path.exists() {
        return Ok(());
    }
    if !path.is_dir() {
        return Err(damaged(path, "it is not a directory"));
    }
    let mut names = Vec::new();
    for entry in std::fs::read_dir(path).map_err(io)? {
        names.push(entry.map_err(io)?.file_name().to_string_lossy().into_owned());
    }
    let ours = |n: &String| n.starts_with(layout::DB_FILE);
    if names.iter().any(ours) || names.is_empty() {
        return Ok(());
    }
    if names
        .iter()
        .any(|n| SLED_FILES.contains(&n.as_str()) || n.starts_with("snap."))
    {
        return Err(damaged(
            path,
            "it holds a sled queue, the storage engine of earlier versions of the agent, which \
             this version does not read (and which a power cut can leave unreadable)",
        ));
    }
    Err(damaged(
        path,
        format!(
            "the directory holds files ({}) but no {} queue database; not writing into it",
            names.join(", "),
            layout::DB_FILE
        ),
    ))
}

/// Opens the database file with the queue's settings: WAL, the lock held for the whole
/// session, a bounded cache and log.
fn connect(path: &Path) -> Result<Connection, QueueError> {
    let file = path.join(layout::DB_FILE);
    let flags =
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(&file, flags).map_err(|e| open_error(path, e))?;
    // Every statement of the queue (a few per table) stays prepared.
    conn.set_prepared_statement_cache_capacity(64);
    let setup = || -> rusqlite::Result<String> {
        conn.busy_timeout(LOCK_WAIT)?;
        // One process owns the queue: the lock is taken at the first read and kept until
        // the connection closes (in WAL mode this also keeps the index in memory, no -shm).
        conn.pragma_update(None, "locking_mode", "EXCLUSIVE")?;
        // Only a new database takes it (before its first write).
        conn.pragma_update(None, "page_size", PAGE_SIZE)?;
        let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT)?;
        // Checkpoint (copy the log into the database, two more fsyncs) every 16 MiB of log.
        conn.pragma_update(None, "wal_autocheckpoint", WAL_SIZE_LIMIT / PAGE_SIZE)?;
        conn.pragma_update(None, "cache_size", -((CACHE_CAPACITY_BYTES / 1024) as i64))?;
        conn.pragma_update(None, "cell_size_check", true)?;
        Ok(mode)
    };
    let mode = setup().map_err(|e| open_error(path, e))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(damaged(
            path,
            format!("SQLite would not use its write-ahead log (mode {mode})"),
        ));
    }
    Ok(conn)
}

/// `PRAGMA quick_check`, given up (with a warning, not an error) past `CHECK_BUDGET`.
fn quick_check(path: &Path, conn: &mut Connection) -> Result<(), QueueError> {
    let started = Instant::now();
    let _ = conn.progress_handler(10_000, Some(move || started.elapsed() > CHECK_BUDGET));
    let result: rusqlite::Result<Vec<String>> = conn
        .prepare("PRAGMA quick_check(5)")
        .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect());
    let _ = conn.progress_handler(0, None::<fn() -> bool>);
    match result {
        Ok(lines) if lines.len() == 1 && lines[0] == "ok" => Ok(()),
        Ok(lines) => Err(damaged(
            path,
            format!("SQLite's integrity check failed: {}", lines.join("; ")),
        )),
        Err(e) if e.sqlite_error_code() == Some(ErrorCode::OperationInterrupted) => {
            tracing::warn!(
                path = %path.display(),
                "the queue's integrity check took over {} s; opened without it",
                CHECK_BUDGET.as_secs()
            );
            Ok(())
        }
        Err(e) => Err(open_error(path, e)),
    }
}

/// Checks the file is ours and of this layout, or makes a new one.
fn check_layout(path: &Path, conn: &Connection) -> Result<(), QueueError> {
    let err = |e| open_error(path, e);
    let app: i64 = conn
        .pragma_query_value(None, "application_id", |r| r.get(0))
        .map_err(err)?;
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(err)?;
    let tables: i64 = conn
        .query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get(0))
        .map_err(err)?;
    if app == 0 && version == 0 && tables == 0 {
        let schema = format!(
            "BEGIN IMMEDIATE; {} PRAGMA application_id = {}; PRAGMA user_version = {}; COMMIT;",
            tables::SCHEMA,
            layout::APPLICATION_ID,
            layout::LAYOUT_VERSION
        );
        return conn.execute_batch(&schema).map_err(err);
    }
    if app != layout::APPLICATION_ID {
        return Err(damaged(path, "its database is not an edge-agent queue"));
    }
    if version != layout::LAYOUT_VERSION {
        return Err(damaged(
            path,
            format!(
                "its layout version is {version}, this agent reads version {}",
                layout::LAYOUT_VERSION
            ),
        ));
    }
    Ok(())
}

fn warn_quarantined(seq: Seq, note: &str) {
    tracing::warn!(seq = seq.get(), note, "queue record moved to the dead letters");
}

/// Voids every lease (attempt counts kept) and counts what is left, moving undecodable
/// entries to the dead letters.
fn recover(db: &Tables, next_seq: u64, reserved: u64, now: UnixMillis) -> rusqlite::Result<Recovered> {
    let (mut next_seq, mut reserved) = (next_seq, reserved);
    let mut stray = |table: Table, k: i64, note: &str| -> rusqlite::Result<()> {
        let seq = Seq::new(next_seq);
        next_seq = next_seq.saturating_add(1);
        let reserve = (next_seq > reserved).then(|| next_seq.saturating_add(super::ledger::SEQ_BLOCK));
        warn_quarantined(seq, note);
        db.quarantine_stray(table, k, seq, reserve, note, now)?;
        reserved = reserve.unwrap_or(reserved);
        Ok(())
    };
    for (k, value) in db.read(|c| c.all(Table::Leased))? {
        match (tables::seq_of(k), layout::decode_index(&value)) {
            (Some(seq), Ok(meta)) => db.move_to_pending(seq, meta)?,
            (Some(seq), Err(e)) => {
                let note = format!("at open, leased entry: {e}");
                warn_quarantined(seq, &note);
                db.quarantine(seq, &note, now)?;
            }
            (None, _) => stray(Table::Leased, k, "at open, leased entry with a malformed key")?,
        }
    }
    let mut recovered = Recovered::default();
    for (k, value) in db.read(|c| c.all(Table::Pending))? {
        match (tables::seq_of(k), layout::decode_index(&value)) {
            (Some(_), Ok(meta)) => {
                recovered.pending += 1;
                recovered.pending_bytes += meta.payload_len;
            }
            (Some(seq), Err(e)) => {
                let note = format!("at open, pending entry: {e}");
                warn_quarantined(seq, &note);
                db.quarantine(seq, &note, now)?;
            }
            (None, _) => stray(Table::Pending, k, "at open, pending entry with a malformed key")?,
        }
    }
    recovered.outbox = db.read(|c| c.count(Table::Outbox))?;
    recovered.dead = db.read(|c| c.count(Table::Dead))?;
    recovered.next_seq = next_seq;
    recovered.reserved = reserved;
    Ok(recovered)
}

impl Queue {
    /// Opens (or creates) the queue at `path` and recovers it: leases from before a crash
    /// become pending again with their attempt counts, counters are rebuilt, undecodable
    /// index entries become dead letters. A damaged database (or a directory that is not a
    /// queue) is an error naming the path and the way out; the queue never deletes anything
    /// to make an open succeed.
    pub fn open(path: impl AsRef<Path>, limits: QueueLimits) -> Result<Self, QueueError> {
        let path = path.as_ref();
        check_directory(path)?;
        // A new directory is synced into its parent: it must survive a power cut with the
        // database in it.
        crate::durable::create_dir(path).map_err(|e| QueueError::Io {
            path: path.to_owned(),
            source: e,
        })?;
        let mut conn = connect(path)?;
        quick_check(path, &mut conn)?;
        check_layout(path, &conn)?;
        let db = Tables::new(conn);
        let err = |e| open_error(path, e);
        let stored_next = db.read(|c| c.meta_get(layout::META_NEXT_SEQ)).map_err(err)?;
        let stored_next = stored_next.as_deref().and_then(layout::decode_u64).unwrap_or(0);
        let next_seq = stored_next.max(db.next_seq_from_keys().map_err(err)?);
        let recovered = recover(&db, next_seq, stored_next, UnixMillis::now()).map_err(err)?;
        db.flush().map_err(err)?;
        let ledger = Ledger::new(limits, recovered);
        let stats = Mutex::new(ledger.stats());
        let inner = Inner {
            path: path.to_owned(),
            db,
            limits,
            ledger: Mutex::new(ledger),
            stats,
        };
        let queue = Self {
            inner: Arc::new(inner),
        };
        queue.prune_dead(&mut queue.ledger()).map_err(err)?;
        Ok(queue)
    }

    /// `open`, and with `OnDamage::Quarantine` a damaged queue is moved aside (renamed to
    /// `<dir>.damaged-<unix seconds>`, the rename synced) and an empty one opened in its
    /// place; the second value says so. Errors other than damage (a lock held, permissions)
    /// are returned as they are.
    pub fn open_or_quarantine(
        path: impl AsRef<Path>,
        limits: QueueLimits,
        on_damage: OnDamage,
    ) -> Result<(Self, Option<Quarantined>), QueueError> {
        let path = path.as_ref();
        match Self::open(path, limits) {
            Err(QueueError::Damaged { reason, .. }) if on_damage == OnDamage::Quarantine => {
                let moved_to = quarantine_dir(path)?;
                tracing::error!(
                    path = %path.display(),
                    moved_to = %moved_to.display(),
                    reason,
                    "the queue was damaged: moved aside for inspection, starting with an empty queue"
                );
                let queue = Self::open(path, limits)?;
                Ok((queue, Some(Quarantined { moved_to, reason })))
            }
            other => other.map(|q| (q, None)),
        }
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    pub fn limits(&self) -> QueueLimits {
        self.inner.limits
    }

    pub(super) fn ledger(&self) -> LedgerGuard<'_> {
        // Every change writes the database first and the ledger after, so a panic in between
        // leaves at worst a counter off by one; keep serving rather than poison the agent.
        LedgerGuard {
            guard: self.inner.ledger.lock().unwrap_or_else(PoisonError::into_inner),
            stats: &self.inner.stats,
        }
    }

    /// Counters as of the last change, without waiting for one in progress.
    pub fn stats(&self) -> QueueStats {
        *self.inner.stats.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes every change so far durable (for graceful shutdown after `release`). Blocks on
    /// `fsync`.
    pub fn flush(&self) -> Result<(), QueueError> {
        self.inner.db.flush()?;
        Ok(())
    }

    /// Makes the commits that were not synced (leases, completions, acknowledged replies)
    /// durable, if there are any; returns whether it synced. Call it periodically, so that a
    /// power cut repeats at most that period's work. Blocks on `fsync`.
    pub fn sync_if_needed(&self) -> Result<bool, QueueError> {
        Ok(self.inner.db.flush_if_unsynced()?)
    }

    /// Records a new or rewritten dead letter and prunes the oldest beyond the cap.
    pub(super) fn note_dead(&self, ledger: &mut Ledger, new: bool) -> rusqlite::Result<()> {
        ledger.on_dead_written(new);
        self.prune_dead(ledger)
    }

    fn prune_dead(&self, ledger: &mut Ledger) -> rusqlite::Result<()> {
        let excess = ledger.dead_excess();
        if excess > 0 {
            for _ in 0..self.inner.db.prune_dead(excess)? {
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
        for (k, value) in self.inner.db.read(|c| c.all(Table::Outbox))? {
            match (tables::seq_of(k), StoredReply::decode(&value)) {
                (Some(seq), Ok(reply)) => replies.push((seq, reply)),
                (Some(seq), Err(e)) => bad.push((seq, format!("outbox entry: {e}"))),
                (None, _) => strays.push(k),
            }
        }
        let db = &self.inner.db;
        for (seq, note) in bad {
            warn_quarantined(seq, &note);
            let new = db.quarantine(seq, &note, UnixMillis::now())?;
            ledger.forget_outbox();
            self.note_dead(&mut ledger, new)?;
        }
        for k in strays {
            let (seq, note) = (ledger.take_seq(), "outbox entry with a malformed key");
            warn_quarantined(seq, note);
            let reserve = ledger.reservation(seq);
            let new = db.quarantine_stray(Table::Outbox, k, seq, reserve, note, UnixMillis::now())?;
            ledger.on_reserved(reserve);
            ledger.forget_outbox();
            self.note_dead(&mut ledger, new)?;
        }
        Ok(replies)
    }

    /// `outbox` on a blocking thread.
    pub async fn outbox_async(&self) -> Result<Vec<(Seq, StoredReply)>, QueueError> {
        let queue = self.clone();
        blocking(move || queue.outbox()).await
    }

    /// The dead letters, oldest first (at most `max_dead_letters`). A letter whose own record
    /// is unreadable is listed with a note saying so.
    pub fn dead_letters(&self) -> Result<Vec<DeadLetter>, QueueError> {
        let mut letters = Vec::new();
        for (k, value) in self.inner.db.read(|c| c.all(Table::Dead))? {
            let seq = tables::seq_of(k).unwrap_or(Seq::new(u64::MAX));
            letters.push(DeadLetter::decode(seq, &value).unwrap_or_else(|e| DeadLetter {
                seq,
                reason: DeadReason::Undecodable,
                attempts: 0,
                at: UnixMillis(0),
                note: format!("{e}"),
                raw_request: Some(value),
            }));
        }
        Ok(letters)
    }
}

/// Moves a damaged queue directory aside, next to it, and makes the rename durable.
fn quarantine_dir(path: &Path) -> Result<PathBuf, QueueError> {
    let io = |p: &Path, e| QueueError::Io {
        path: p.to_owned(),
        source: e,
    };
    let secs = UnixMillis::now().0 / 1000;
    let name = path
        .file_name()
        .map_or_else(|| "queue".into(), |n| n.to_string_lossy().into_owned());
    let mut moved_to = path.with_file_name(format!("{name}.damaged-{secs}"));
    let mut n = 1;
    while moved_to.exists() {
        moved_to = path.with_file_name(format!("{name}.damaged-{secs}-{n}"));
        n += 1;
    }
    std::fs::rename(path, &moved_to).map_err(|e| io(path, e))?;
    if let Some(parent) = path.parent() {
        crate::durable::sync_dir(parent).map_err(|e| io(parent, e))?;
    }
    Ok(moved_to)
}

/// Runs a blocking queue call off the async runtime's threads.
pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, QueueError> + Send + 'static,
) -> Result<T, QueueError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| QueueError::Io {
        path: PathBuf::new(),
        source: std::io::Error::other(format!("a queue task failed: {e}")),
    })?
}
