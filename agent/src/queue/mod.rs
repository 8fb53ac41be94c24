//! The durable request queue on sled: a request is acknowledged to the broker only once it is
//! on disk, and leaves only once the broker has acknowledged its reply.
//!
//! # Life of a request
//!
//! ```text
//!   enqueue ──► pending ──lease──► leased ──complete──► outbox ──reply_acked──► gone
//!     │flush      ▲  ▲      │flush   │  │                 │flush
//!     ▼           │  │      │        │  └─ attempts used up: also written to `dead`,
//!   PUBACK        │  │      │        │     handed out as `DeadLettered` (reply `internal`)
//!                 │  └──────┼────────┘ requeue_expired (attempt kept) / release (attempt
//!                 │         │          given back) / restart (attempt kept)
//!                 └─ crash ─┘
//! ```
//!
//! A request refused at ingress (malformed, too large) skips the queue: `reply_directly`
//! writes its error reply straight into the outbox under a new sequence number and flushes,
//! and the request is acknowledged after that, like an enqueued one.
//!
//! # Trees and key layout
//!
//! One sled database per queue directory. Every key in the data trees is the item's sequence
//! number, a `u64` in big-endian bytes, so key order is arrival order and `first()` is the
//! oldest item. Numbers are assigned at enqueue, increase, and are never reused: the next one
//! is stored in `meta` with every enqueue and, on open, is also checked against the highest
//! key in any tree.
//!
//! | tree      | value                                                   | present while |
//! |-----------|---------------------------------------------------------|---------------|
//! | `items`   | request record (`StoredRequest`, the image included)   | pending or leased |
//! | `pending` | index entry `[1][attempts u32][payload_len u64]`        | waiting for a worker |
//! | `leased`  | the same index entry, attempts including this lease     | a worker holds it |
//! | `outbox`  | reply record (`StoredReply`)                            | reply not yet acked |
//! | `dead`    | dead letter: reason, attempts, time, note, raw request  | kept for inspection |
//! | `meta`    | `format` = layout version (1); `next_seq` = u64 BE      | always |
//!
//! Beside sled's own files (`conf`, `db`, `blobs/`, `snap.*`) the directory holds
//! `edge-queue.watermark` (see "After a crash").
//!
//! The body lives in `items` and is written once by the queue: leasing and requeueing only
//! move the 13-byte index entry between `pending` and `leased` and never touch `items`.
//! Every record starts with a version byte (1), so the format can evolve; a record of an
//! unknown version is treated as undecodable (below), a database whose `meta` `format` is
//! unknown is refused at open. Integers are big-endian, byte strings carry a u32
//! length prefix, optional fields a 0/1 presence byte (see `codec`).
//!
//! # Invariants
//!
//! - A sequence number is in exactly one of `pending`, `leased`, `outbox`, and its body is in
//!   `items` exactly while it is in `pending` or `leased`. Each move is one sled transaction
//!   across the trees involved, so a crash sees the state before or after it, never between.
//! - `dead` may additionally hold a number that is still leased (a dead-lettered item waiting
//!   for its error reply).
//! - The counters (`stats()`) change only under the queue's lock, right after the sled change
//!   they describe; they are rebuilt from the trees on open and never computed by scanning
//!   afterwards. Leases are in memory only (expiry time), `leased` on disk is just "held".
//!
//! # What is flushed before which acknowledgement
//!
//! | call | flushed before it returns | so the caller may |
//! |------|---------------------------|-------------------|
//! | `enqueue` → `Enqueued` | body, pending entry, counter | PUBACK the request |
//! | `reply_directly` → `Enqueued` | the reply in outbox, counter | PUBACK the refused request, publish the reply |
//! | `lease` | the raised attempt count | run the worker (a crash in it is counted) |
//! | `complete` | removal of body and lease, reply in outbox | publish the reply |
//! | `reply_acked`, `release`, `requeue_expired` | nothing (sled's background flush, 500 ms) | - |
//!
//! sled's flush is global (one log for every tree), so it also covers earlier writes of other
//! callers. `enqueue_async` and `complete_async` await sled's `flush_async` instead of blocking
//! a thread on `fsync`.
//!
//! # After a crash
//!
//! Recovery runs in `Queue::open`:
//! - during `enqueue` before the flush returned: the request was not acknowledged, the broker
//!   redelivers it; if the write reached the disk anyway it is queued twice (at-least-once,
//!   replies carry the request id);
//! - while leased: every `leased` entry goes back to `pending` with its attempt count, ahead of
//!   newer items; once the count reaches `max_attempts` the next lease writes a dead letter
//!   and hands the item out as `DeadLettered` for an `internal` reply. An item that keeps
//!   killing the process is therefore tried `max_attempts` times, then answered;
//! - after `complete`, before the broker's ack: the reply is in `outbox()`; publish it again;
//! - after the ack, before `reply_acked` reached the disk: the reply is published again, a
//!   duplicate the client drops by request id;
//! - a release not yet flushed: the item is held on disk, so it comes back as pending, with
//!   the attempt counted.
//!
//! A record that cannot be decoded (an index entry, a request body, a reply, a key) never
//! panics and is never dropped silently: everything stored under its number is moved into one
//! `Undecodable` dead letter with a note and the raw request bytes, and a warning is logged.
//! A database sled cannot read (or that panics sled while opening) fails `open` with
//! `QueueError::Damaged`, naming the path and the recovery (move the directory aside and
//! start empty); the queue deletes nothing. A non-empty directory that holds no sled database
//! is refused the same way.
//!
//! sled itself is not that careful: its recovery treats an unreadable stretch of the log as a
//! torn write, keeps what precedes it and writes over the rest, silently; a wholly garbage
//! `db` file opens as an empty database. To make that loud, the queue keeps a sidecar file,
//! `edge-queue.watermark` (`[E Q W 1][next_seq u64 BE]`), raised after every enqueue's flush.
//! If sled recovers a sequence counter below it, acknowledged requests were lost and `open`
//! fails with `Damaged` instead of carrying on. (Losses that hit only replies or leases, with
//! no later enqueue, are not detected this way.)
//!
//! # What is bounded, and how
//!
//! - Requests: `max_items` counts pending + leased + outbox, i.e. every request not yet
//!   answered and acknowledged. `max_bytes` counts image payload bytes of pending + leased.
//!   Past either bound `enqueue` returns `Full` without writing anything; the caller stops
//!   acknowledging, and the broker holds the messages. A payload larger than `max_bytes`
//!   alone is `TooLarge`, since waiting would never help.
//! - Dead letters: at most `max_dead_letters`; the oldest are pruned (they were answered).
//! - Memory: sled's page cache is capped at `CACHE_CAPACITY_BYTES` (32 MiB, instead of
//!   sled's 1 GiB default); the in-memory lease table holds one small entry per leased item.
//! - Disk: sled is log-structured, and enqueue/dequeue churn is its known weak spot: space
//!   of removed values comes back only when segments are cleaned, so files can grow beyond
//!   the live data (sled issues 1333, 1374). The queue runs in `Mode::LowSpace`, which cleans
//!   and rewrites segments more eagerly at some cost in write throughput, the right trade for
//!   a device whose rate is bounded by inference. Log messages over ~128 KiB (a large image,
//!   or a consolidated leaf of `items`) go to separate blob files in `blobs/`, removed when
//!   sled cleans the segment that points at them. Measuring growth under sustained churn and
//!   fault injection is left to a later issue.

mod codec;
mod error;
mod layout;
mod ledger;
mod ops;
mod record;
mod store;
mod trees;
mod watermark;

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
pub use store::{CACHE_CAPACITY_BYTES, Queue};
