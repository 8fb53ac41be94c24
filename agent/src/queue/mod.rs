//! The durable request queue on SQLite: a request is acknowledged to the broker only once
//! it is on disk, and leaves only once the broker has acknowledged its reply.
//!
//! # Life of a request
//!
//! ```text
//!   enqueue ──► pending ──lease──► leased ──complete──► outbox ──reply_acked──► gone
//!     │fsync      ▲  ▲      │        │  │                 │
//!     ▼           │  │      │        │  └─ attempts used up: also written to `dead`,
//!   PUBACK        │  │      │        │     handed out as `DeadLettered` (reply `internal`)
//!                 │  └──────┼────────┘ requeue_expired (attempt kept) / release (attempt
//!                 │         │          given back) / restart (attempt kept)
//!                 └─ crash ─┘
//! ```
//!
//! A request refused at ingress (malformed, too large) skips the queue: `reply_directly`
//! writes its error reply straight into the outbox under a new sequence number, durably,
//! and the request is acknowledged after that, like an enqueued one.
//!
//! # Why SQLite
//!
//! The engine was chosen by measurement (docs/queue-engines.md, docs/reliability.md): under
//! simulated power cuts (LazyFS drops whatever was not fsynced) sled 0.34, the first engine,
//! lost acknowledged requests and twice left a directory it could not reopen (one spins
//! forever at open); SQLite and redb lost nothing. SQLite's write-ahead log is the record: no
//! sidecar file, no log format of ours.
//!
//! # Tables and key layout
//!
//! One SQLite database per queue directory, `queue.sqlite3`, in WAL mode (`queue.sqlite3-wal`
//! beside it), opened with `locking_mode=EXCLUSIVE`: one process owns the queue, a second
//! `open` gets `Locked`. `PRAGMA application_id` marks the file as a queue and `PRAGMA
//! user_version` holds the layout version (2; 1 was sled's). Every data table is `seq
//! INTEGER PRIMARY KEY, v BLOB`: the key is the item's sequence number, so key order is
//! arrival order. Numbers are assigned at enqueue, increase, and are never reused: `meta`
//! `next_seq` holds a reservation (every number handed out is below it), raised by 1,024 in
//! the same transaction as the enqueue that reaches it, so most enqueues do not rewrite the
//! `meta` page; on open the next number is the reservation or the highest key in any table
//! plus one, whichever is larger (a restart may skip the rest of a block).
//!
//! | table     | value                                                   | present while |
//! |-----------|---------------------------------------------------------|---------------|
//! | `items`   | request record (`StoredRequest`, the image included)   | pending or leased |
//! | `pending` | index entry `[1][attempts u32][payload_len u64]`        | waiting for a worker |
//! | `leased`  | the same index entry, attempts including this lease     | a worker holds it |
//! | `outbox`  | reply record (`StoredReply`)                            | reply not yet acked |
//! | `dead`    | dead letter: reason, attempts, time, note, raw request  | kept for inspection |
//! | `meta`    | `next_seq` = u64 BE (reservation); `flushes` = u64      | always |
//!
//! The body lives in `items` and is written once by the queue: leasing and requeueing only
//! move the 13-byte index entry between `pending` and `leased` and never touch `items`.
//! Every record starts with a version byte (1), so the format can evolve; a record of an
//! unknown version is treated as undecodable (below). Integers are big-endian, byte strings
//! carry a u32 length prefix, optional fields a 0/1 presence byte (see `codec`).
//!
//! # Invariants
//!
//! - A sequence number is in exactly one of `pending`, `leased`, `outbox`, and its body is in
//!   `items` exactly while it is in `pending` or `leased`. Each move is one SQLite
//!   transaction across the tables involved, so a crash or a power cut sees the state before
//!   or after it, never between.
//! - `dead` may additionally hold a number that is still leased (a dead-lettered item waiting
//!   for its error reply).
//! - The counters (`stats()`) change only under the queue's lock, right after the commit they
//!   describe; they are rebuilt from the tables on open and never computed by scanning
//!   afterwards. `stats()` reads a copy published when the lock is released, so it never
//!   waits on the disk. Leases are in memory only (expiry time), `leased` on disk is just
//!   "held".
//!
//! # What is durable before which acknowledgement
//!
//! A durable commit runs with `synchronous=FULL`: SQLite fsyncs the log before the commit
//! returns. The others run with `synchronous=NORMAL`: written to the log, consistent after a
//! power cut, durable at the next durable commit (the log's fsync covers everything before it).
//!
//! | call | durable before it returns | so the caller may |
//! |------|---------------------------|-------------------|
//! | `enqueue` → `Enqueued` | body, pending entry, counter | PUBACK the request |
//! | `enqueue_many_async` → `Enqueued`s | all of them, one transaction, one fsync | PUBACK them |
//! | `enqueue_leased_async` → `Enqueued` (and a lease when nothing older was pending) | body, leased entry with its first attempt counted (or the pending entry), counter | PUBACK the request, run the worker on the lease |
//! | `enqueue_unflushed` | nothing, until `flush_through` (group commit) | PUBACK after the flush |
//! | `reply_directly` → `Enqueued` | the reply in outbox, counter | PUBACK the refused request, publish the reply |
//! | `lease` | nothing; the raised attempt count is in the log, safe from a process crash | run the worker (a crash in it is counted) |
//! | `complete` | nothing; removal of body and lease and the reply are in the log | publish the reply |
//! | `reply_acked`, `release`, `requeue_expired` | nothing (durable with the next durable commit) | - |
//!
//! Only what acknowledges a request to the broker is synced: that is the promise. A commit
//! written to the log survives the death of the process (it is in the kernel's page cache);
//! a power cut may take the unsynced tail of the log, and each such loss only repeats work:
//! a lost lease gives an item one more try, a lost completion has the request (whose body
//! is still stored) classified and answered again, a duplicate the client drops by id. So a
//! request costs one fsync on its way through, before its PUBACK; the agent also calls
//! `sync_if_needed` every second, so an idle device does not keep unsynced work around.
//!
//! Every call takes the connection's lock for one transaction, so calls are serialised; the
//! `_async` forms run on tokio's blocking threads and never block the runtime on `fsync`.
//!
//! # After a crash or a power cut
//!
//! SQLite replays or discards its log at open (a torn last transaction is discarded: it was
//! never durable). Then `Queue::open` recovers:
//! - during `enqueue` before it returned: the request was not acknowledged, the broker
//!   redelivers it; if the commit reached the disk anyway it is queued twice (at-least-once,
//!   replies carry the request id);
//! - while leased: every `leased` entry goes back to `pending` with its attempt count, ahead of
//!   newer items; once the count reaches `max_attempts` the next lease writes a dead letter
//!   and hands the item out as `DeadLettered` for an `internal` reply. An item that keeps
//!   killing the process is therefore tried `max_attempts` times, then answered;
//! - after `complete`, before the broker's ack: the reply is in `outbox()`; publish it again
//!   (after a power cut that took the completion too, the request is pending again and is
//!   answered again);
//! - after the ack, before `reply_acked` reached the disk: the reply is published again, a
//!   duplicate the client drops by request id;
//! - a release not yet durable: the item is held on disk, so it comes back as pending, with
//!   the attempt counted.
//!
//! A record that cannot be decoded (an index entry, a request body, a reply, a negative key)
//! never panics and is never dropped silently: everything stored under its number is moved
//! into one `Undecodable` dead letter with a note and the raw request bytes, and a warning is
//! logged. A database SQLite reports as corrupt (at open it runs `PRAGMA quick_check`, given
//! up after 3 s on a large queue), a foreign file, an unknown layout, a directory holding an
//! earlier version's sled queue or other files fails `open` with `QueueError::Damaged`, naming
//! the path and the recovery (move the directory aside and start empty); `open` deletes
//! nothing. `open_or_quarantine` with `OnDamage::Quarantine` does the moving aside itself
//! (`<dir>.damaged-<unix seconds>`, the rename fsynced) and starts empty, for unattended
//! devices. Opening never loops: every step is bounded (the lock wait at 1 s, the check at 3 s,
//! the rest by the queue's limits).
//!
//! # What is bounded, and how
//!
//! - Requests: `max_items` counts pending + leased + outbox, i.e. every request not yet
//!   answered and acknowledged. `max_bytes` counts image payload bytes of pending + leased.
//!   Past either bound `enqueue` returns `Full` without writing anything; the caller stops
//!   acknowledging, and the broker holds the messages. A payload larger than `max_bytes`
//!   alone is `TooLarge`, since waiting would never help.
//! - Dead letters: at most `max_dead_letters`; the oldest are pruned (they were answered).
//! - Memory: SQLite's page cache is capped at `CACHE_CAPACITY_BYTES` (8 MiB of 16 KiB
//!   pages); the in-memory
//!   lease table holds one small entry per leased item.
//! - Disk: the database reuses the pages of removed rows (its file keeps the size of the
//!   largest backlog it held); pages are 16 KiB (an image spans 4x fewer than at SQLite's
//!   default 4 KiB, so a commit is fewer writes); the log is checkpointed into the database
//!   every 16 MiB and truncated to 16 MiB after a checkpoint.

mod codec;
mod error;
mod layout;
mod ledger;
mod ops;
mod record;
mod store;
mod tables;

#[cfg(test)]
mod crash_tests;
#[cfg(test)]
mod damage_tests;
#[cfg(test)]
mod tests;

pub use codec::DecodeError;
pub use error::QueueError;
pub use layout::{DeadLetter, DeadReason};
pub use ledger::{QueueLimits, QueueStats, Seq, UnixMillis};
pub use ops::{EnqueueOutcome, Lease, Leased};
pub use record::{Protocol, StoredReply, StoredRequest};
pub use store::{CACHE_CAPACITY_BYTES, OnDamage, Quarantined, Queue};
