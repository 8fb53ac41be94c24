//! The queue's pure core: limits, counters, leases, and the lease/retry/dead-letter/expiry
//! decisions, as plain data with no storage and no clock (time comes in as a parameter).

use std::collections::BTreeMap;
use std::fmt;
use std::num::{NonZeroU32, NonZeroU64, NonZeroUsize};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The position of a request in the queue: assigned at enqueue, increasing, never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Seq(u64);

impl Seq {
    pub const fn new(value: u64) -> Self {
        Self(value)
    }

    pub const fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Wall-clock time in milliseconds since the Unix epoch, as carried by requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UnixMillis(pub u64);

impl UnixMillis {
    /// Reads the system clock (the only clock call of the queue, for callers at the edge).
    pub fn now() -> Self {
        Self::from_system_time(SystemTime::now())
    }

    pub fn from_system_time(t: SystemTime) -> Self {
        let ms = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis());
        Self(u64::try_from(ms).unwrap_or(u64::MAX))
    }

    pub fn saturating_add(self, d: Duration) -> Self {
        Self(
            self.0
                .saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        )
    }
}

/// Bounds and retry policy, validated by construction (`NonZero*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLimits {
    /// Requests in the system: pending + leased + replies awaiting the broker's ack.
    pub max_items: NonZeroUsize,
    /// Payload bytes of pending + leased requests.
    pub max_bytes: NonZeroU64,
    /// Leases an item may take before it is dead-lettered (crashes and expiries count).
    pub max_attempts: NonZeroU32,
    /// How long a lease lasts before the item is handed out again.
    pub visibility_timeout: Duration,
    /// Dead letters kept for inspection; the oldest are pruned beyond this.
    pub max_dead_letters: NonZeroUsize,
}

impl Default for QueueLimits {
    /// 1,000 items, 256 MiB, 3 attempts, 60 s visibility, 1,000 dead letters.
    fn default() -> Self {
        const MAX_ITEMS: NonZeroUsize = NonZeroUsize::new(1_000).unwrap();
        const MAX_BYTES: NonZeroU64 = NonZeroU64::new(256 * 1024 * 1024).unwrap();
        const MAX_ATTEMPTS: NonZeroU32 = NonZeroU32::new(3).unwrap();
        const MAX_DEAD: NonZeroUsize = NonZeroUsize::new(1_000).unwrap();
        Self {
            max_items: MAX_ITEMS,
            max_bytes: MAX_BYTES,
            max_attempts: MAX_ATTEMPTS,
            visibility_timeout: Duration::from_secs(60),
            max_dead_letters: MAX_DEAD,
        }
    }
}

/// A snapshot of the counters; maintained on every operation, never computed by scanning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueStats {
    pub pending: usize,
    pub leased: usize,
    pub outbox: usize,
    pub dead: usize,
    /// Payload bytes of pending + leased requests (what `max_bytes` bounds).
    pub bytes: u64,
}

/// What the index keeps for a pending item: enough to decide without reading the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ItemMeta {
    /// Leases taken so far (a release gives its lease back).
    pub attempts: u32,
    pub payload_len: u64,
}

/// Whether a new request of a given size may be admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    Admit,
    /// Would exceed a bound now; may fit once items leave.
    Full {
        items: usize,
        bytes: u64,
    },
    /// Larger than `max_bytes` on its own: it can never fit.
    TooLarge {
        max_bytes: u64,
    },
}

/// What to do with the oldest pending item at lease time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LeaseDecision {
    /// Hand it to a worker: this is its `attempt`-th lease.
    Work { attempt: u32, expires_at: UnixMillis },
    /// Its deadline has passed: hand it out for a `deadline_exceeded` reply.
    Expired { attempt: u32, expires_at: UnixMillis },
    /// It used all its attempts: record a dead letter, hand it out for an `internal` reply.
    /// The attempt count is not raised again.
    DeadLetter { attempts: u32, expires_at: UnixMillis },
}

impl LeaseDecision {
    pub(crate) fn attempts_after(self) -> u32 {
        match self {
            Self::Work { attempt, .. } | Self::Expired { attempt, .. } => attempt,
            Self::DeadLetter { attempts, .. } => attempts,
        }
    }

    pub(crate) fn expires_at(self) -> UnixMillis {
        match self {
            Self::Work { expires_at, .. }
            | Self::Expired { expires_at, .. }
            | Self::DeadLetter { expires_at, .. } => expires_at,
        }
    }
}

/// A lease held by a worker (in memory only: every lease is void after a restart).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ActiveLease {
    /// Attempts before this lease: what a release restores.
    pub attempts_before: u32,
    /// Attempts including this lease: what an expiry or a crash keeps.
    pub attempts: u32,
    pub payload_len: u64,
    pub expires_at: UnixMillis,
}

/// Counters recovered from the trees at open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Recovered {
    pub pending: usize,
    pub pending_bytes: u64,
    pub outbox: usize,
    pub dead: usize,
    pub next_seq: u64,
    /// The `next_seq` stored in `meta`: every number handed out so far is below it.
    pub reserved: u64,
}

/// Sequence numbers reserved in `meta` at a time, so that an enqueue rewrites the `meta`
/// page once per this many requests. A restart may skip the unused rest of a block.
pub(crate) const SEQ_BLOCK: u64 = 1024;

/// The bookkeeping of the whole queue. The store applies a change to the database first and then
/// tells the ledger, under one lock, so the counters always describe what is on disk.
#[derive(Debug, Clone)]
pub(crate) struct Ledger {
    limits: QueueLimits,
    pending: usize,
    pending_bytes: u64,
    leases: BTreeMap<Seq, ActiveLease>,
    leased_bytes: u64,
    outbox: usize,
    dead: usize,
    next_seq: u64,
    reserved: u64,
}

impl Ledger {
    pub(crate) fn new(limits: QueueLimits, recovered: Recovered) -> Self {
        Self {
            limits,
            pending: recovered.pending,
            pending_bytes: recovered.pending_bytes,
            leases: BTreeMap::new(),
            leased_bytes: 0,
            outbox: recovered.outbox,
            dead: recovered.dead,
            next_seq: recovered.next_seq,
            reserved: recovered.reserved,
        }
    }

    /// The value to store in `meta` with a write that uses `seq`, if the reservation must
    /// grow (`None`: `seq` is already below it). Tell `on_reserved` once committed.
    pub(crate) fn reservation(&self, seq: Seq) -> Option<u64> {
        let needed = seq.0.saturating_add(1);
        (needed > self.reserved).then(|| needed.saturating_add(SEQ_BLOCK))
    }

    pub(crate) fn on_reserved(&mut self, reserved: Option<u64>) {
        if let Some(r) = reserved {
            self.reserved = self.reserved.max(r);
        }
    }

    fn items(&self) -> usize {
        self.pending + self.leases.len() + self.outbox
    }

    fn bytes(&self) -> u64 {
        self.pending_bytes + self.leased_bytes
    }

    pub(crate) fn stats(&self) -> QueueStats {
        QueueStats {
            pending: self.pending,
            leased: self.leases.len(),
            outbox: self.outbox,
            dead: self.dead,
            bytes: self.bytes(),
        }
    }

    pub(crate) fn admit(&self, payload_len: u64) -> Admission {
        let max_bytes = self.limits.max_bytes.get();
        if payload_len > max_bytes {
            return Admission::TooLarge { max_bytes };
        }
        let (items, bytes) = (self.items(), self.bytes());
        if items >= self.limits.max_items.get() || bytes.saturating_add(payload_len) > max_bytes {
            return Admission::Full { items, bytes };
        }
        Admission::Admit
    }

    /// Whether any item waits for a worker.
    pub(crate) fn has_pending(&self) -> bool {
        self.pending > 0
    }

    /// The sequence number the next enqueue will use.
    pub(crate) fn next_seq(&self) -> Seq {
        Seq(self.next_seq)
    }

    /// Uses up a sequence number for something other than a request (a stray record's dead
    /// letter).
    pub(crate) fn take_seq(&mut self) -> Seq {
        let seq = Seq(self.next_seq);
        self.next_seq = self.next_seq.saturating_add(1);
        seq
    }

    pub(crate) fn on_enqueued(&mut self, seq: Seq, payload_len: u64) {
        self.next_seq = self.next_seq.max(seq.0.saturating_add(1));
        self.pending += 1;
        self.pending_bytes += payload_len;
    }

    /// Whether one more item (a reply without a request body) fits under `max_items`.
    pub(crate) fn admit_reply(&self) -> Admission {
        let (items, bytes) = (self.items(), self.bytes());
        if items >= self.limits.max_items.get() {
            return Admission::Full { items, bytes };
        }
        Admission::Admit
    }

    pub(crate) fn on_reply_inserted(&mut self, seq: Seq) {
        self.next_seq = self.next_seq.max(seq.0.saturating_add(1));
        self.outbox += 1;
    }

    pub(crate) fn decide_lease(
        &self,
        meta: ItemMeta,
        deadline: Option<UnixMillis>,
        now: UnixMillis,
    ) -> LeaseDecision {
        let expires_at = now.saturating_add(self.limits.visibility_timeout);
        if meta.attempts >= self.limits.max_attempts.get() {
            return LeaseDecision::DeadLetter {
                attempts: meta.attempts,
                expires_at,
            };
        }
        let attempt = meta.attempts + 1;
        match deadline {
            Some(deadline) if deadline <= now => LeaseDecision::Expired { attempt, expires_at },
            _ => LeaseDecision::Work { attempt, expires_at },
        }
    }

    pub(crate) fn on_leased(&mut self, seq: Seq, meta: ItemMeta, decision: LeaseDecision) {
        self.forget_pending(meta.payload_len);
        let lease = ActiveLease {
            attempts_before: meta.attempts,
            attempts: decision.attempts_after(),
            payload_len: meta.payload_len,
            expires_at: decision.expires_at(),
        };
        if let Some(old) = self.leases.insert(seq, lease) {
            self.leased_bytes -= old.payload_len;
        }
        self.leased_bytes += meta.payload_len;
    }

    pub(crate) fn lease(&self, seq: Seq) -> Option<ActiveLease> {
        self.leases.get(&seq).copied()
    }

    /// Leases whose visibility timeout has passed at `now`, oldest item first.
    pub(crate) fn expired_leases(&self, now: UnixMillis) -> Vec<Seq> {
        self.leases
            .iter()
            .filter(|(_, l)| l.expires_at <= now)
            .map(|(s, _)| *s)
            .collect()
    }

    /// The item went from leased to the outbox with its reply.
    pub(crate) fn on_completed(&mut self, seq: Seq) {
        if let Some(lease) = self.leases.remove(&seq) {
            self.leased_bytes -= lease.payload_len;
            self.outbox += 1;
        }
    }

    /// The item went back to pending; `counted` says whether the lease keeps its attempt.
    /// Returns what the pending index must now say about it.
    pub(crate) fn requeue_meta(lease: ActiveLease, counted: bool) -> ItemMeta {
        let attempts = if counted {
            lease.attempts
        } else {
            lease.attempts_before
        };
        ItemMeta {
            attempts,
            payload_len: lease.payload_len,
        }
    }

    pub(crate) fn on_requeued(&mut self, seq: Seq) {
        if let Some(lease) = self.leases.remove(&seq) {
            self.leased_bytes -= lease.payload_len;
            self.pending += 1;
            self.pending_bytes += lease.payload_len;
        }
    }

    pub(crate) fn on_reply_acked(&mut self) {
        self.outbox = self.outbox.saturating_sub(1);
    }

    /// A pending item was found unreadable and moved to the dead letters.
    pub(crate) fn forget_pending(&mut self, payload_len: u64) {
        self.pending = self.pending.saturating_sub(1);
        self.pending_bytes = self.pending_bytes.saturating_sub(payload_len);
    }

    /// An outbox entry was found unreadable and moved to the dead letters.
    pub(crate) fn forget_outbox(&mut self) {
        self.outbox = self.outbox.saturating_sub(1);
    }

    /// A dead letter was written (`new` is false when it replaced one with the same seq).
    pub(crate) fn on_dead_written(&mut self, new: bool) {
        if new {
            self.dead += 1;
        }
    }

    /// How many of the oldest dead letters must go to respect `max_dead_letters`.
    pub(crate) fn dead_excess(&self) -> usize {
        self.dead.saturating_sub(self.limits.max_dead_letters.get())
    }

    pub(crate) fn on_dead_pruned(&mut self) {
        self.dead = self.dead.saturating_sub(1);
    }
}

#[cfg(test)]
#[path = "ledger_tests.rs"]
mod tests;
