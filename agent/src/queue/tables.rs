//! The SQLite side of the queue: the tables, and each state change as one SQLite transaction
//! across the tables involved. No bookkeeping here; `Queue` pairs every change with the ledger.
//!
//! Every transaction says whether it must be durable when it returns ([`Sync::Full`]: the
//! write-ahead log is fsynced at its commit, covering every earlier commit too) or may wait for
//! the next durable one ([`Sync::Normal`]: written to the log, not synced).

use std::sync::{Mutex, MutexGuard, PoisonError};

use rusqlite::types::ValueRef;
use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};

use super::layout::{self, DeadLetter, DeadReason};
use super::ledger::{ItemMeta, Seq, UnixMillis};

/// A table of the queue: `seq INTEGER PRIMARY KEY` and one BLOB value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Table {
    Items,
    Pending,
    Leased,
    Outbox,
    Dead,
}

impl Table {
    pub(crate) const DATA: [Self; 5] = [Self::Items, Self::Pending, Self::Leased, Self::Outbox, Self::Dead];

    pub(crate) const fn name(self) -> &'static str {
        match self {
            Self::Items => layout::ITEMS,
            Self::Pending => layout::PENDING,
            Self::Leased => layout::LEASED,
            Self::Outbox => layout::OUTBOX,
            Self::Dead => layout::DEAD,
        }
    }
}

/// Whether a commit must be on disk when it returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sync {
    /// `synchronous=FULL`: the log is fsynced at commit (and with it every earlier commit).
    Full,
    /// `synchronous=NORMAL`: consistent after a power cut, durable at the next `Full` commit.
    Normal,
}

impl Sync {
    const fn pragma(self) -> &'static str {
        match self {
            Self::Full => "FULL",
            Self::Normal => "NORMAL",
        }
    }
}

struct Conn {
    conn: Connection,
    sync: Sync,
    /// Bumped by every `flush`, so that it always has something to commit.
    flushes: u64,
    /// A `Normal` commit happened since the last `Full` one.
    unsynced: bool,
}

/// The queue's one connection. Its methods each run one transaction.
pub(crate) struct Tables {
    conn: Mutex<Conn>,
}

/// A row as read: the key as stored, the value's bytes.
pub(crate) type Row = (i64, Vec<u8>);

/// The value column read as bytes whatever SQLite's storage class says (a TEXT value is
/// bytes too; a number or NULL, which only damage makes, reads as empty and fails decoding).
fn value_bytes(v: ValueRef<'_>) -> Vec<u8> {
    match v {
        ValueRef::Blob(b) | ValueRef::Text(b) => b.to_vec(),
        ValueRef::Null | ValueRef::Integer(_) | ValueRef::Real(_) => Vec::new(),
    }
}

/// A sequence number as an SQLite key (numbers above `i64::MAX` are never assigned).
fn key(seq: Seq) -> i64 {
    i64::try_from(seq.get()).unwrap_or(i64::MAX)
}

/// The operations on one table inside a transaction (or on the bare connection).
pub(crate) trait TableOps {
    fn conn(&self) -> &Connection;

    fn get(&self, table: Table, seq: Seq) -> rusqlite::Result<Option<Vec<u8>>> {
        let sql = format!("SELECT v FROM {} WHERE seq = ?1", table.name());
        self.conn()
            .prepare_cached(&sql)?
            .query_row([key(seq)], |r| Ok(value_bytes(r.get_ref(0)?)))
            .optional()
    }

    /// Inserts or replaces.
    fn insert(&self, table: Table, seq: Seq, value: &[u8]) -> rusqlite::Result<()> {
        let sql = format!("INSERT OR REPLACE INTO {} (seq, v) VALUES (?1, ?2)", table.name());
        self.conn()
            .prepare_cached(&sql)?
            .execute(params![key(seq), value])
            .map(drop)
    }

    /// `insert`, returning whether the key is new (for dead letters, which a crash may have
    /// written already).
    fn insert_new(&self, table: Table, seq: Seq, value: &[u8]) -> rusqlite::Result<bool> {
        let existed = self.contains_key(table, key(seq))?;
        self.insert(table, seq, value)?;
        Ok(!existed)
    }

    fn contains_key(&self, table: Table, k: i64) -> rusqlite::Result<bool> {
        let sql = format!("SELECT 1 FROM {} WHERE seq = ?1", table.name());
        Ok(self
            .conn()
            .prepare_cached(&sql)?
            .query_row([k], |_| Ok(()))
            .optional()?
            .is_some())
    }

    /// Removes the row; returns its value if there was one.
    fn remove(&self, table: Table, seq: Seq) -> rusqlite::Result<Option<Vec<u8>>> {
        self.remove_key(table, key(seq))
    }

    fn remove_key(&self, table: Table, k: i64) -> rusqlite::Result<Option<Vec<u8>>> {
        let sql = format!("DELETE FROM {} WHERE seq = ?1 RETURNING v", table.name());
        self.conn()
            .prepare_cached(&sql)?
            .query_row([k], |r| Ok(value_bytes(r.get_ref(0)?)))
            .optional()
    }

    /// The row with the smallest key.
    fn first(&self, table: Table) -> rusqlite::Result<Option<Row>> {
        let sql = format!("SELECT seq, v FROM {} ORDER BY seq LIMIT 1", table.name());
        self.conn()
            .prepare_cached(&sql)?
            .query_row([], |r| Ok((r.get(0)?, value_bytes(r.get_ref(1)?))))
            .optional()
    }

    /// Every row, by key. Only for the tables bounded by the queue's limits.
    fn all(&self, table: Table) -> rusqlite::Result<Vec<Row>> {
        let sql = format!("SELECT seq, v FROM {} ORDER BY seq", table.name());
        let mut stmt = self.conn().prepare_cached(&sql)?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, value_bytes(r.get_ref(1)?))))?;
        rows.collect()
    }

    fn count(&self, table: Table) -> rusqlite::Result<usize> {
        let sql = format!("SELECT count(*) FROM {}", table.name());
        let n: i64 = self.conn().prepare_cached(&sql)?.query_row([], |r| r.get(0))?;
        Ok(usize::try_from(n).unwrap_or(0))
    }

    /// The largest key, if any.
    fn max_key(&self, table: Table) -> rusqlite::Result<Option<i64>> {
        let sql = format!("SELECT max(seq) FROM {}", table.name());
        self.conn().prepare_cached(&sql)?.query_row([], |r| r.get(0))
    }

    fn meta_get(&self, name: &str) -> rusqlite::Result<Option<Vec<u8>>> {
        self.conn()
            .prepare_cached("SELECT v FROM meta WHERE k = ?1")?
            .query_row([name], |r| Ok(value_bytes(r.get_ref(0)?)))
            .optional()
    }

    fn meta_put(&self, name: &str, value: &[u8]) -> rusqlite::Result<()> {
        self.conn()
            .execute(
                "INSERT OR REPLACE INTO meta (k, v) VALUES (?1, ?2)",
                params![name, value],
            )
            .map(drop)
    }
}

impl TableOps for Connection {
    fn conn(&self) -> &Connection {
        self
    }
}

impl TableOps for Transaction<'_> {
    fn conn(&self) -> &Connection {
        self
    }
}

/// The schema of a new queue (layout version 2: SQLite).
pub(crate) const SCHEMA: &str = "
    CREATE TABLE items   (seq INTEGER PRIMARY KEY, v BLOB NOT NULL);
    CREATE TABLE pending (seq INTEGER PRIMARY KEY, v BLOB NOT NULL);
    CREATE TABLE leased  (seq INTEGER PRIMARY KEY, v BLOB NOT NULL);
    CREATE TABLE outbox  (seq INTEGER PRIMARY KEY, v BLOB NOT NULL);
    CREATE TABLE dead    (seq INTEGER PRIMARY KEY, v BLOB NOT NULL);
    CREATE TABLE meta    (k TEXT PRIMARY KEY, v BLOB NOT NULL);
";

impl Tables {
    pub(crate) fn new(conn: Connection) -> Self {
        Self {
            conn: Mutex::new(Conn {
                conn,
                sync: Sync::Full,
                flushes: 0,
                unsynced: false,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Conn> {
        // A panic inside a transaction rolls it back (the transaction's drop): the connection
        // is still consistent.
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` in one IMMEDIATE transaction and commits it with `sync`.
    pub(crate) fn transact<T>(
        &self,
        sync: Sync,
        f: impl FnOnce(&Transaction<'_>) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<T> {
        let mut guard = self.lock();
        let c = &mut *guard;
        if c.sync != sync {
            c.conn.pragma_update(None, "synchronous", sync.pragma())?;
            c.sync = sync;
        }
        let tx = c.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let out = f(&tx)?;
        tx.commit()?;
        c.unsynced = sync == Sync::Normal;
        Ok(out)
    }

    /// Reads outside any write transaction.
    pub(crate) fn read<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> rusqlite::Result<T> {
        f(&self.lock().conn)
    }

    /// Makes every commit so far durable: one small `Full` commit, whose fsync of the log
    /// covers the `Normal` commits before it.
    pub(crate) fn flush(&self) -> rusqlite::Result<()> {
        let n = {
            let mut c = self.lock();
            c.flushes = c.flushes.wrapping_add(1);
            c.flushes
        };
        self.transact(Sync::Full, |tx| {
            tx.meta_put(layout::META_FLUSHES, &n.to_be_bytes())
        })
    }

    /// `flush` if a commit since the last durable one is not synced yet; returns whether it
    /// flushed.
    pub(crate) fn flush_if_unsynced(&self) -> rusqlite::Result<bool> {
        if !self.lock().unsynced {
            return Ok(false);
        }
        self.flush().map(|()| true)
    }

    /// The highest sequence number present in any table, plus one (0 for an empty queue).
    pub(crate) fn next_seq_from_keys(&self) -> rusqlite::Result<u64> {
        self.read(|c| {
            let mut next = 0u64;
            for table in Table::DATA {
                if let Some(max) = c.max_key(table)? {
                    let after = u64::try_from(max).map_or(0, |m| m.saturating_add(1));
                    next = next.max(after);
                }
            }
            Ok(next)
        })
    }

    /// Enqueue: body, pending index and the sequence counter, all or nothing.
    pub(crate) fn insert_request(
        &self,
        sync: Sync,
        seq: Seq,
        body: &[u8],
        payload_len: u64,
        reserve: Option<u64>,
    ) -> rusqlite::Result<()> {
        self.transact(sync, |tx| insert_request_in(tx, seq, body, payload_len, reserve))
    }

    /// Enqueue straight into a lease (durable): body, leased index with the lease's attempt
    /// count and the sequence counter, all or nothing.
    pub(crate) fn insert_leased(
        &self,
        seq: Seq,
        body: &[u8],
        meta: ItemMeta,
        reserve: Option<u64>,
    ) -> rusqlite::Result<()> {
        let index = layout::encode_index(meta);
        self.transact(Sync::Full, |tx| {
            tx.insert(Table::Items, seq, body)?;
            tx.insert(Table::Leased, seq, &index)?;
            reserve_in(tx, reserve)
        })
    }

    /// A request answered without queueing (rejected at ingress): its reply enters the outbox
    /// under a new sequence number (with a new reservation if given), all or nothing.
    pub(crate) fn insert_reply(
        &self,
        sync: Sync,
        seq: Seq,
        reply: &[u8],
        reserve: Option<u64>,
    ) -> rusqlite::Result<()> {
        self.transact(sync, |tx| {
            tx.insert(Table::Outbox, seq, reply)?;
            reserve_in(tx, reserve)
        })
    }

    /// Lease (not synced): pending → leased with the new attempt count; with `dead`, also records the dead
    /// letter. Returns whether the dead letter is new (not a rewrite after a crash).
    pub(crate) fn move_to_leased(
        &self,
        seq: Seq,
        meta: ItemMeta,
        dead: Option<&[u8]>,
    ) -> rusqlite::Result<bool> {
        let index = layout::encode_index(meta);
        self.transact(Sync::Normal, |tx| {
            tx.remove(Table::Pending, seq)?;
            tx.insert(Table::Leased, seq, &index)?;
            match dead {
                Some(record) => tx.insert_new(Table::Dead, seq, record),
                None => Ok(false),
            }
        })
    }

    /// Expiry, release and crash recovery: leased → pending with the given attempt count.
    pub(crate) fn move_to_pending(&self, seq: Seq, meta: ItemMeta) -> rusqlite::Result<()> {
        let index = layout::encode_index(meta);
        self.transact(Sync::Normal, |tx| {
            tx.remove(Table::Leased, seq)?;
            tx.insert(Table::Pending, seq, &index)
        })
    }

    /// Completion (not synced): the body and the lease go, the reply enters the outbox, all
    /// or nothing.
    pub(crate) fn complete(&self, seq: Seq, reply: &[u8]) -> rusqlite::Result<()> {
        self.transact(Sync::Normal, |tx| {
            tx.remove(Table::Items, seq)?;
            tx.remove(Table::Leased, seq)?;
            tx.insert(Table::Outbox, seq, reply)
        })
    }

    /// The broker acknowledged the reply; returns whether it was there.
    pub(crate) fn remove_reply(&self, seq: Seq) -> rusqlite::Result<bool> {
        self.transact(Sync::Normal, |tx| Ok(tx.remove(Table::Outbox, seq)?.is_some()))
    }

    /// Removes everything stored under `seq` and keeps it as an `Undecodable` dead letter
    /// holding the raw request bytes, if there were any. Returns whether the letter is new.
    pub(crate) fn quarantine(&self, seq: Seq, note: &str, at: UnixMillis) -> rusqlite::Result<bool> {
        self.transact(Sync::Normal, |tx| {
            let raw = tx.remove(Table::Items, seq)?;
            for table in [Table::Pending, Table::Leased, Table::Outbox] {
                tx.remove(table, seq)?;
            }
            let letter = DeadLetter {
                seq,
                reason: DeadReason::Undecodable,
                attempts: 0,
                at,
                note: note.to_owned(),
                raw_request: raw,
            };
            // The raw bytes came out of a u32-prefixed field or a stored value; if they still
            // cannot be framed, keep the note alone rather than lose the letter.
            let record = letter
                .encode()
                .or_else(|_| {
                    DeadLetter {
                        raw_request: None,
                        ..letter.clone()
                    }
                    .encode()
                })
                .unwrap_or_default();
            tx.insert_new(Table::Dead, seq, &record)
        })
    }

    /// Moves a row whose key is not a sequence number (a negative key: only tampering makes
    /// one) out of `table` into a dead letter under `seq` (a fresh number, with a new
    /// reservation if given). Returns whether the letter is new.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn quarantine_stray(
        &self,
        table: Table,
        k: i64,
        seq: Seq,
        reserve: Option<u64>,
        note: &str,
        at: UnixMillis,
    ) -> rusqlite::Result<bool> {
        let letter = DeadLetter {
            seq,
            reason: DeadReason::Undecodable,
            attempts: 0,
            at,
            note: format!("{note} (key {k})"),
            raw_request: None,
        };
        let record = letter.encode().unwrap_or_default();
        self.transact(Sync::Normal, |tx| {
            tx.remove_key(table, k)?;
            reserve_in(tx, reserve)?;
            tx.insert_new(Table::Dead, seq, &record)
        })
    }

    /// Drops the `count` oldest dead letters; returns how many there were to drop.
    pub(crate) fn prune_dead(&self, count: usize) -> rusqlite::Result<usize> {
        let limit = i64::try_from(count).unwrap_or(i64::MAX);
        self.transact(Sync::Normal, |tx| {
            tx.execute(
                "DELETE FROM dead WHERE seq IN (SELECT seq FROM dead ORDER BY seq LIMIT ?1)",
                [limit],
            )
        })
    }
}

/// A stored key as a sequence number (`None` for a negative key).
pub(crate) fn seq_of(k: i64) -> Option<Seq> {
    u64::try_from(k).ok().map(Seq::new)
}

/// Enqueue inside a transaction: body, pending index and, if given, a new reservation of
/// sequence numbers.
pub(crate) fn insert_request_in(
    tx: &Transaction<'_>,
    seq: Seq,
    body: &[u8],
    payload_len: u64,
    reserve: Option<u64>,
) -> rusqlite::Result<()> {
    let index = layout::encode_index(ItemMeta {
        attempts: 0,
        payload_len,
    });
    tx.insert(Table::Items, seq, body)?;
    tx.insert(Table::Pending, seq, &index)?;
    reserve_in(tx, reserve)
}

/// Stores a new reservation (`meta` `next_seq`): every number below it may have been used.
fn reserve_in(tx: &Transaction<'_>, reserve: Option<u64>) -> rusqlite::Result<()> {
    match reserve {
        Some(next) => tx.meta_put(layout::META_NEXT_SEQ, &next.to_be_bytes()),
        None => Ok(()),
    }
}
