//! The sled side of the queue: the trees, and each state change as one atomic multi-tree
//! transaction. No bookkeeping here; `Queue` pairs every change with the ledger.

use std::convert::Infallible;

use sled::transaction::{TransactionError, TransactionResult, Transactional};
use sled::{Db, IVec, Tree};

use super::layout::{self, DeadLetter, DeadReason};
use super::ledger::{ItemMeta, Seq, UnixMillis};

pub(crate) struct Trees {
    pub items: Tree,
    pub pending: Tree,
    pub leased: Tree,
    pub outbox: Tree,
    pub dead: Tree,
    pub meta: Tree,
}

/// Every transaction here is infallible apart from storage errors: the checks happen before,
/// under the queue's lock.
fn run<T>(result: TransactionResult<T, Infallible>) -> sled::Result<T> {
    result.map_err(|e| match e {
        TransactionError::Storage(e) => e,
        TransactionError::Abort(never) => match never {},
    })
}

impl Trees {
    pub(crate) fn open(db: &Db) -> sled::Result<Self> {
        Ok(Self {
            items: db.open_tree(layout::ITEMS)?,
            pending: db.open_tree(layout::PENDING)?,
            leased: db.open_tree(layout::LEASED)?,
            outbox: db.open_tree(layout::OUTBOX)?,
            dead: db.open_tree(layout::DEAD)?,
            meta: db.open_tree(layout::META)?,
        })
    }

    /// The highest sequence number present in any tree, plus one (0 for an empty queue).
    /// Keys that are not sequence numbers (only damage makes them) are skipped.
    pub(crate) fn next_seq_from_keys(&self) -> sled::Result<u64> {
        let mut next = 0;
        for tree in [&self.items, &self.pending, &self.leased, &self.outbox, &self.dead] {
            for key in tree.iter().keys().rev() {
                if let Some(seq) = Seq::from_key(&key?) {
                    next = next.max(seq.get().saturating_add(1));
                    break;
                }
            }
        }
        Ok(next)
    }

    /// Enqueue: body, pending index and the sequence counter, all or nothing.
    pub(crate) fn insert_request(&self, seq: Seq, body: &[u8], payload_len: u64) -> sled::Result<()> {
        let key = seq.to_key();
        let index = layout::encode_index(ItemMeta {
            attempts: 0,
            payload_len,
        });
        let next = seq.get().saturating_add(1).to_be_bytes();
        run(
            (&self.items, &self.pending, &self.meta).transaction(|(items, pending, meta)| {
                items.insert(&key, body)?;
                pending.insert(&key, &index)?;
                meta.insert(layout::META_NEXT_SEQ, &next)?;
                Ok(())
            }),
        )
    }

    /// A request answered without queueing (rejected at ingress): its reply enters the outbox
    /// under a new sequence number, with the counter, all or nothing.
    pub(crate) fn insert_reply(&self, seq: Seq, reply: &[u8]) -> sled::Result<()> {
        let key = seq.to_key();
        let next = seq.get().saturating_add(1).to_be_bytes();
        run((&self.outbox, &self.meta).transaction(|(outbox, meta)| {
            outbox.insert(&key, reply)?;
            meta.insert(layout::META_NEXT_SEQ, &next)?;
            Ok(())
        }))
    }

    /// Lease: pending → leased with the new attempt count; with `dead`, also records the dead
    /// letter. Returns whether the dead letter is new (not a rewrite after a crash).
    pub(crate) fn move_to_leased(&self, seq: Seq, meta: ItemMeta, dead: Option<&[u8]>) -> sled::Result<bool> {
        let key = seq.to_key();
        let index = layout::encode_index(meta);
        run(
            (&self.pending, &self.leased, &self.dead).transaction(|(pending, leased, dead_tree)| {
                pending.remove(&key)?;
                leased.insert(&key, &index)?;
                match dead {
                    Some(record) => Ok(dead_tree.insert(&key, record)?.is_none()),
                    None => Ok(false),
                }
            }),
        )
    }

    /// Expiry, release and crash recovery: leased → pending with the given attempt count.
    pub(crate) fn move_to_pending(&self, seq: Seq, meta: ItemMeta) -> sled::Result<()> {
        let key = seq.to_key();
        let index = layout::encode_index(meta);
        run((&self.pending, &self.leased).transaction(|(pending, leased)| {
            leased.remove(&key)?;
            pending.insert(&key, &index)?;
            Ok(())
        }))
    }

    /// Completion: the body and the lease go, the reply enters the outbox, all or nothing.
    pub(crate) fn complete(&self, seq: Seq, reply: &[u8]) -> sled::Result<()> {
        let key = seq.to_key();
        run(
            (&self.items, &self.leased, &self.outbox).transaction(|(items, leased, outbox)| {
                items.remove(&key)?;
                leased.remove(&key)?;
                outbox.insert(&key, reply)?;
                Ok(())
            }),
        )
    }

    /// Removes everything stored under `seq` and keeps it as an `Undecodable` dead letter
    /// holding the raw request bytes, if there were any. Returns whether the letter is new.
    pub(crate) fn quarantine(&self, seq: Seq, note: &str, at: UnixMillis) -> sled::Result<bool> {
        let key = seq.to_key();
        let trees = (&self.items, &self.pending, &self.leased, &self.outbox, &self.dead);
        run(trees.transaction(|(items, pending, leased, outbox, dead)| {
            let raw = items.remove(&key)?;
            pending.remove(&key)?;
            leased.remove(&key)?;
            outbox.remove(&key)?;
            let letter = DeadLetter {
                seq,
                reason: DeadReason::Undecodable,
                attempts: 0,
                at,
                note: note.to_owned(),
                raw_request: raw.map(|v| v.to_vec()),
            };
            // The raw bytes came out of a u32-prefixed field or a sled value; if they still
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
            Ok(dead.insert(&key, record)?.is_none())
        }))
    }

    /// Moves an entry whose key is not a sequence number out of `tree` into a dead letter
    /// under `seq` (a fresh number). Returns whether the letter is new.
    pub(crate) fn quarantine_stray(
        &self,
        tree: &Tree,
        key: &IVec,
        seq: Seq,
        note: &str,
        at: UnixMillis,
    ) -> sled::Result<bool> {
        let letter = DeadLetter {
            seq,
            reason: DeadReason::Undecodable,
            attempts: 0,
            at,
            note: format!("{note} (key {key:02x?})"),
            raw_request: None,
        };
        let record = letter.encode().unwrap_or_default();
        let next = seq.get().saturating_add(1).to_be_bytes();
        run((tree, &self.dead, &self.meta).transaction(|(tree, dead, meta)| {
            tree.remove(key)?;
            meta.insert(layout::META_NEXT_SEQ, &next)?;
            Ok(dead.insert(&seq.to_key(), record.as_slice())?.is_none())
        }))
    }

    /// Drops the `count` oldest dead letters; returns how many there were to drop.
    pub(crate) fn prune_dead(&self, count: usize) -> sled::Result<usize> {
        let mut pruned = 0;
        while pruned < count && self.dead.pop_min()?.is_some() {
            pruned += 1;
        }
        Ok(pruned)
    }
}
