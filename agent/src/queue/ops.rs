//! A request's way through the queue: enqueue, lease, complete (reply into the outbox),
//! release, lease expiry, and the broker's ack of the reply.

use super::error::QueueError;
use super::layout::{DeadLetter, DeadReason};
use super::ledger::{Admission, ItemMeta, LeaseDecision, Ledger, Seq, UnixMillis};
use super::record::{StoredReply, StoredRequest};
use super::store::{Queue, blocking};
use super::tables;
use super::tables::{Sync, Table, TableOps};

/// The answer to `enqueue`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "only `Enqueued` allows acknowledging the request to the broker"]
pub enum EnqueueOutcome {
    /// Stored and flushed to disk: the request may now be acknowledged.
    Enqueued(Seq),
    /// A bound would be exceeded; nothing was written. Do not acknowledge; retry later.
    Full { items: usize, bytes: u64 },
    /// The payload alone exceeds `max_bytes` and can never fit; nothing was written.
    TooLarge { payload_bytes: u64, max_bytes: u64 },
}

/// An item handed to a worker until `expires_at`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    seq: Seq,
    attempt: u32,
    expires_at: UnixMillis,
    request: StoredRequest,
}

impl Lease {
    pub fn seq(&self) -> Seq {
        self.seq
    }

    /// Leases this item has taken, this one included (1 on first delivery).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    pub fn expires_at(&self) -> UnixMillis {
        self.expires_at
    }

    pub fn request(&self) -> &StoredRequest {
        &self.request
    }

    pub fn into_request(self) -> StoredRequest {
        self.request
    }
}

/// What `lease` hands out. Every variant must be finished with `complete` (with the reply
/// it calls for) or `release`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leased {
    /// Classify it.
    Ready(Lease),
    /// Its deadline passed while queued: reply `deadline_exceeded`.
    Expired(Lease),
    /// It used up its attempts and is now in the dead letters: reply `internal`.
    DeadLettered(Lease),
}

impl Leased {
    pub fn lease(&self) -> &Lease {
        match self {
            Self::Ready(l) | Self::Expired(l) | Self::DeadLettered(l) => l,
        }
    }

    pub fn seq(&self) -> Seq {
        self.lease().seq
    }
}

impl Queue {
    /// Stores a request durably (committed with an fsync of the log). Only `Enqueued` means
    /// durable: acknowledge the MQTT message then, and never before. Blocks on `fsync`; from
    /// async code use `enqueue_async`.
    pub fn enqueue(&self, request: &StoredRequest) -> Result<EnqueueOutcome, QueueError> {
        self.write_request(&Encoded::of(request)?, Sync::Full)
    }

    /// `enqueue` on a blocking thread.
    pub async fn enqueue_async(&self, request: &StoredRequest) -> Result<EnqueueOutcome, QueueError> {
        let (queue, encoded) = (self.clone(), Encoded::of(request)?);
        blocking(move || queue.write_request(&encoded, Sync::Full)).await
    }

    /// Group commit, first half: stores a request in a commit that is not synced. It is not
    /// durable, and must not be acknowledged, until a later durable commit
    /// ([`Queue::flush_through`], or any `enqueue`/`reply_directly`/`lease`/`complete`, since
    /// the fsync of the log covers every earlier commit). Writes without waiting for the
    /// disk (the log is appended to, not synced). On a blocking thread, like every call that takes the database (another caller may be
    /// in an fsync).
    pub async fn enqueue_unflushed(&self, request: &StoredRequest) -> Result<EnqueueOutcome, QueueError> {
        let (queue, encoded) = (self.clone(), Encoded::of(request)?);
        blocking(move || queue.write_request(&encoded, Sync::Normal)).await
    }

    /// Group commit, second half: makes every commit so far durable; requests enqueued up to
    /// `seq` may then be acknowledged.
    pub async fn flush_through(&self, _seq: Seq) -> Result<(), QueueError> {
        let queue = self.clone();
        blocking(move || queue.flush()).await
    }

    /// Group commit of requests that arrived together: one durable transaction for all. The
    /// outcomes are in order; the `Enqueued` ones are durable when this returns. An error
    /// leaves none of them acknowledgeable.
    pub async fn enqueue_many_async(
        &self,
        requests: &[&StoredRequest],
    ) -> Result<Vec<EnqueueOutcome>, QueueError> {
        let encoded = requests
            .iter()
            .map(|r| Encoded::of(r))
            .collect::<Result<Vec<_>, _>>()?;
        let queue = self.clone();
        blocking(move || queue.write_requests(&encoded)).await
    }

    /// `enqueue` for a request that arrives while a worker waits: when nothing older is
    /// pending, the request is stored already leased to that worker (its first attempt
    /// counted), in the same durable commit, and handed back; the worker then skips the
    /// lease's own transaction and the read of the body it just wrote. Otherwise it is
    /// enqueued as pending, exactly as by `enqueue`, and `None` comes back with the outcome.
    /// `Enqueued` means durable, as for `enqueue`; a returned lease must be finished
    /// (`complete` or `release`) like one from `lease`.
    pub async fn enqueue_leased_async(
        &self,
        request: &StoredRequest,
        now: UnixMillis,
    ) -> Result<(EnqueueOutcome, Option<Leased>), QueueError> {
        let (queue, encoded, request) = (self.clone(), Encoded::of(request)?, request.clone());
        blocking(move || queue.write_leased(&encoded, request, now)).await
    }

    fn write_leased(
        &self,
        encoded: &Encoded,
        request: StoredRequest,
        now: UnixMillis,
    ) -> Result<(EnqueueOutcome, Option<Leased>), QueueError> {
        let mut ledger = self.ledger();
        let seq = match admit(&ledger, encoded.payload_len) {
            Ok(()) => ledger.next_seq(),
            Err(refused) => return Ok((refused, None)),
        };
        let fresh = ItemMeta {
            attempts: 0,
            payload_len: encoded.payload_len,
        };
        let decision = ledger.decide_lease(fresh, request.deadline, now);
        let db = &self.inner.db;
        let reserve = ledger.reservation(seq);
        if ledger.has_pending() || matches!(decision, LeaseDecision::DeadLetter { .. }) {
            // Older items go first (and an item is dead-lettered only by `lease`).
            db.insert_request(Sync::Full, seq, &encoded.body, encoded.payload_len, reserve)?;
            ledger.on_reserved(reserve);
            ledger.on_enqueued(seq, encoded.payload_len);
            return Ok((EnqueueOutcome::Enqueued(seq), None));
        }
        let leased_meta = ItemMeta {
            attempts: decision.attempts_after(),
            ..fresh
        };
        db.insert_leased(seq, &encoded.body, leased_meta, reserve)?;
        ledger.on_reserved(reserve);
        ledger.on_enqueued(seq, encoded.payload_len);
        ledger.on_leased(seq, fresh, decision);
        let lease = Lease {
            seq,
            attempt: decision.attempts_after(),
            expires_at: decision.expires_at(),
            request,
        };
        let leased = match decision {
            LeaseDecision::Expired { .. } => Leased::Expired(lease),
            _ => Leased::Ready(lease),
        };
        Ok((EnqueueOutcome::Enqueued(seq), Some(leased)))
    }

    fn write_request(&self, request: &Encoded, sync: Sync) -> Result<EnqueueOutcome, QueueError> {
        let mut ledger = self.ledger();
        let seq = match admit(&ledger, request.payload_len) {
            Ok(()) => ledger.next_seq(),
            Err(refused) => return Ok(refused),
        };
        let db = &self.inner.db;
        let reserve = ledger.reservation(seq);
        db.insert_request(sync, seq, &request.body, request.payload_len, reserve)?;
        ledger.on_reserved(reserve);
        ledger.on_enqueued(seq, request.payload_len);
        Ok(EnqueueOutcome::Enqueued(seq))
    }

    fn write_requests(&self, requests: &[Encoded]) -> Result<Vec<EnqueueOutcome>, QueueError> {
        let mut ledger = self.ledger();
        // Admission as if each were enqueued in turn; the counters change only after commit.
        let mut outcomes = Vec::with_capacity(requests.len());
        let mut admitted: Vec<(Seq, &Encoded)> = Vec::new();
        let mut shadow = ledger.clone();
        for request in requests {
            match admit(&shadow, request.payload_len) {
                Ok(()) => {
                    let seq = shadow.next_seq();
                    shadow.on_enqueued(seq, request.payload_len);
                    admitted.push((seq, request));
                    outcomes.push(EnqueueOutcome::Enqueued(seq));
                }
                Err(refused) => outcomes.push(refused),
            }
        }
        let Some(&(last, _)) = admitted.last() else {
            return Ok(outcomes);
        };
        let reserve = ledger.reservation(last);
        self.inner.db.transact(Sync::Full, |tx| {
            for (i, (seq, r)) in admitted.iter().enumerate() {
                let reserve = if i + 1 == admitted.len() { reserve } else { None };
                tables::insert_request_in(tx, *seq, &r.body, r.payload_len, reserve)?;
            }
            Ok(())
        })?;
        ledger.on_reserved(reserve);
        for (seq, r) in admitted {
            ledger.on_enqueued(seq, r.payload_len);
        }
        Ok(outcomes)
    }

    /// Answers a request without queueing it (refused at ingress, e.g. malformed or too
    /// large): the reply goes straight to the outbox in a durable commit, so the request may
    /// be acknowledged on `Enqueued` exactly as after `enqueue`. Counts against `max_items`.
    pub async fn reply_directly(&self, reply: &StoredReply) -> Result<EnqueueOutcome, QueueError> {
        let record = reply.encode().map_err(|_| QueueError::RecordTooLarge {
            record: "reply",
            request_id: reply.request_id.clone(),
        })?;
        let queue = self.clone();
        blocking(move || {
            let mut ledger = queue.ledger();
            if let Admission::Full { items, bytes } = ledger.admit_reply() {
                return Ok(EnqueueOutcome::Full { items, bytes });
            }
            let seq = ledger.next_seq();
            let reserve = ledger.reservation(seq);
            queue.inner.db.insert_reply(Sync::Full, seq, &record, reserve)?;
            ledger.on_reserved(reserve);
            ledger.on_reply_inserted(seq);
            Ok(EnqueueOutcome::Enqueued(seq))
        })
        .await
    }

    /// Leases the oldest pending item, deciding at `now` whether it is work, expired, or
    /// dead-lettered. The new attempt count is committed (written to the log, not synced)
    /// before the item is returned: a crash of the process in the worker cannot lose it, so
    /// an item that crashes the process is counted; a power cut may lose the count, which
    /// only gives the item one more try. Undecodable items met on the way become dead
    /// letters and are skipped.
    pub fn lease(&self, now: UnixMillis) -> Result<Option<Leased>, QueueError> {
        let db = &self.inner.db;
        let mut ledger = self.ledger();
        loop {
            let Some((k, index)) = db.read(|c| c.first(Table::Pending))? else {
                return Ok(None);
            };
            let Some(seq) = tables::seq_of(k) else {
                let (seq, note) = (ledger.take_seq(), "pending entry with a malformed key");
                tracing::warn!(seq = seq.get(), note, "queue record moved to the dead letters");
                let reserve = ledger.reservation(seq);
                let new = db.quarantine_stray(Table::Pending, k, seq, reserve, note, now)?;
                ledger.on_reserved(reserve);
                self.note_dead(&mut ledger, new)?;
                continue;
            };
            let meta = match super::layout::decode_index(&index) {
                Ok(meta) => meta,
                Err(e) => {
                    self.quarantine_pending(&mut ledger, seq, 0, &format!("pending entry: {e}"), now)?;
                    continue;
                }
            };
            let body = db.read(|c| c.get(Table::Items, seq))?;
            let request = match body.as_deref().map(StoredRequest::decode) {
                Some(Ok(request)) => request,
                Some(Err(e)) => {
                    let note = format!("{e}");
                    self.quarantine_pending(&mut ledger, seq, meta.payload_len, &note, now)?;
                    continue;
                }
                None => {
                    let note = "request body missing";
                    self.quarantine_pending(&mut ledger, seq, meta.payload_len, note, now)?;
                    continue;
                }
            };
            let decision = ledger.decide_lease(meta, request.deadline, now);
            let leased_meta = ItemMeta {
                attempts: decision.attempts_after(),
                payload_len: meta.payload_len,
            };
            let dead = match decision {
                LeaseDecision::DeadLetter { attempts, .. } => {
                    Some(self.dead_record(seq, attempts, now, body)?)
                }
                _ => None,
            };
            let new_dead = db.move_to_leased(seq, leased_meta, dead.as_deref())?;
            ledger.on_leased(seq, meta, decision);
            if dead.is_some() {
                self.note_dead(&mut ledger, new_dead)?;
            }
            let lease = Lease {
                seq,
                attempt: decision.attempts_after(),
                expires_at: decision.expires_at(),
                request,
            };
            return Ok(Some(match decision {
                LeaseDecision::Work { .. } => Leased::Ready(lease),
                LeaseDecision::Expired { .. } => Leased::Expired(lease),
                LeaseDecision::DeadLetter { .. } => Leased::DeadLettered(lease),
            }));
        }
    }

    fn dead_record(
        &self,
        seq: Seq,
        attempts: u32,
        now: UnixMillis,
        body: Option<Vec<u8>>,
    ) -> Result<Vec<u8>, QueueError> {
        let letter = DeadLetter {
            seq,
            reason: DeadReason::MaxAttempts,
            attempts,
            at: now,
            note: format!("leased {attempts} times without completing"),
            raw_request: body,
        };
        letter.encode().map_err(|_| QueueError::RecordTooLarge {
            record: "dead letter",
            request_id: String::new(),
        })
    }

    fn quarantine_pending(
        &self,
        ledger: &mut Ledger,
        seq: Seq,
        payload_len: u64,
        note: &str,
        now: UnixMillis,
    ) -> Result<(), QueueError> {
        tracing::warn!(seq = seq.get(), note, "queue record moved to the dead letters");
        let new = self.inner.db.quarantine(seq, note, now)?;
        ledger.forget_pending(payload_len);
        self.note_dead(ledger, new)?;
        Ok(())
    }

    /// Finishes a lease: atomically removes the request and puts its reply in the outbox (a
    /// commit written to the log, not synced: a crash of the process cannot lose it; a power
    /// cut before the next durable commit can, and then the request, whose body is still
    /// stored, is classified and answered again: a duplicate, never a loss). Publish the
    /// reply after this returns; call `reply_acked` when the broker acknowledges it. Fails
    /// with `NotLeased` if the lease was lost (expired, released).
    pub fn complete(&self, seq: Seq, reply: &StoredReply) -> Result<(), QueueError> {
        let record = encode_reply(reply)?;
        self.write_completion(seq, &record)
    }

    /// `complete` on a blocking thread.
    pub async fn complete_async(&self, seq: Seq, reply: &StoredReply) -> Result<(), QueueError> {
        let (queue, record) = (self.clone(), encode_reply(reply)?);
        blocking(move || queue.write_completion(seq, &record)).await
    }

    fn write_completion(&self, seq: Seq, record: &[u8]) -> Result<(), QueueError> {
        let mut ledger = self.ledger();
        if ledger.lease(seq).is_none() {
            return Err(QueueError::NotLeased { seq });
        }
        self.inner.db.complete(seq, record)?;
        ledger.on_completed(seq);
        Ok(())
    }

    /// Gives a lease back without counting its attempt (graceful shutdown). Not durable on
    /// its own: call `flush` once all are released; after a crash the lease is void anyway.
    pub fn release(&self, seq: Seq) -> Result<(), QueueError> {
        self.requeue(&mut self.ledger(), seq, false)
    }

    /// Returns every lease whose visibility timeout has passed at `now` to pending, keeping
    /// its attempt; returns how many. Call it periodically.
    pub fn requeue_expired(&self, now: UnixMillis) -> Result<usize, QueueError> {
        let mut ledger = self.ledger();
        let expired = ledger.expired_leases(now);
        for &seq in &expired {
            self.requeue(&mut ledger, seq, true)?;
        }
        Ok(expired.len())
    }

    fn requeue(&self, ledger: &mut Ledger, seq: Seq, counted: bool) -> Result<(), QueueError> {
        let lease = ledger.lease(seq).ok_or(QueueError::NotLeased { seq })?;
        self.inner
            .db
            .move_to_pending(seq, Ledger::requeue_meta(lease, counted))?;
        ledger.on_requeued(seq);
        Ok(())
    }

    /// The broker acknowledged the reply: the request leaves the system. Returns false if it
    /// was not in the outbox (already acknowledged). Not synced: losing it in a power cut
    /// only republishes the reply, which clients drop by request id.
    pub fn reply_acked(&self, seq: Seq) -> Result<bool, QueueError> {
        let mut ledger = self.ledger();
        let removed = self.inner.db.remove_reply(seq)?;
        if removed {
            ledger.on_reply_acked();
        }
        Ok(removed)
    }

    /// `reply_acked` on a blocking thread (it waits for the database, which may be busy with
    /// another caller's fsync).
    pub async fn reply_acked_async(&self, seq: Seq) -> Result<bool, QueueError> {
        let queue = self.clone();
        blocking(move || queue.reply_acked(seq)).await
    }
}

/// A request encoded for storage, with what admission needs.
struct Encoded {
    body: Vec<u8>,
    payload_len: u64,
}

impl Encoded {
    fn of(request: &StoredRequest) -> Result<Self, QueueError> {
        let body = request.encode().map_err(|_| QueueError::RecordTooLarge {
            record: "request",
            request_id: request.request_id.clone(),
        })?;
        Ok(Self {
            body,
            payload_len: request.payload_len(),
        })
    }
}

fn encode_reply(reply: &StoredReply) -> Result<Vec<u8>, QueueError> {
    reply.encode().map_err(|_| QueueError::RecordTooLarge {
        record: "reply",
        request_id: reply.request_id.clone(),
    })
}

/// `Ok` when a request of `payload_len` bytes may be enqueued now, else the outcome to return.
fn admit(ledger: &Ledger, payload_len: u64) -> Result<(), EnqueueOutcome> {
    match ledger.admit(payload_len) {
        Admission::Admit => Ok(()),
        Admission::Full { items, bytes } => Err(EnqueueOutcome::Full { items, bytes }),
        Admission::TooLarge { max_bytes } => Err(EnqueueOutcome::TooLarge {
            payload_bytes: payload_len,
            max_bytes,
        }),
    }
}
