//! A request's way through the queue: enqueue, lease, complete (reply into the outbox),
//! release, lease expiry, and the broker's ack of the reply.

use super::error::QueueError;
use super::layout::{DeadLetter, DeadReason};
use super::ledger::{Admission, ItemMeta, LeaseDecision, Ledger, Seq, UnixMillis};
use super::record::{StoredReply, StoredRequest};
use super::store::Queue;

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
    /// Stores a request and flushes it to disk. Only `Enqueued` means durable: acknowledge
    /// the MQTT message then, and never before. Blocks on `fsync`; from async code use
    /// `enqueue_async` or a blocking task.
    pub fn enqueue(&self, request: &StoredRequest) -> Result<EnqueueOutcome, QueueError> {
        let outcome = self.write_request(request)?;
        if let EnqueueOutcome::Enqueued(seq) = outcome {
            self.inner.db.flush()?;
            self.inner.watermark.raise(seq.get().saturating_add(1));
        }
        Ok(outcome)
    }

    /// `enqueue` with the flush awaited instead of blocked on (sled's own flusher does it).
    pub async fn enqueue_async(&self, request: &StoredRequest) -> Result<EnqueueOutcome, QueueError> {
        let outcome = self.write_request(request)?;
        if let EnqueueOutcome::Enqueued(seq) = outcome {
            self.inner.db.flush_async().await?;
            self.inner.watermark.raise(seq.get().saturating_add(1));
        }
        Ok(outcome)
    }

    /// Group commit, first half: stores a request without flushing. It is not durable, and
    /// must not be acknowledged, until a later flush ([`Queue::flush_through`], or any
    /// `enqueue`/`enqueue_async`/`reply_directly`, since a flush covers every earlier write).
    pub fn enqueue_unflushed(&self, request: &StoredRequest) -> Result<EnqueueOutcome, QueueError> {
        self.write_request(request)
    }

    /// Group commit, second half: flushes every write so far; requests enqueued up to `seq`
    /// are then durable and may be acknowledged.
    pub async fn flush_through(&self, seq: Seq) -> Result<(), QueueError> {
        self.inner.db.flush_async().await?;
        self.inner.watermark.raise(seq.get().saturating_add(1));
        Ok(())
    }

    /// Group commit of requests that arrived together: one flush for all. The outcomes are
    /// in order; the `Enqueued` ones are durable when this returns. An error leaves none of
    /// them acknowledgeable (some may still reach the disk and be queued twice on
    /// redelivery: at-least-once).
    pub async fn enqueue_many_async(
        &self,
        requests: &[&StoredRequest],
    ) -> Result<Vec<EnqueueOutcome>, QueueError> {
        let mut outcomes = Vec::with_capacity(requests.len());
        let mut last = None;
        for request in requests {
            let outcome = self.enqueue_unflushed(request)?;
            if let EnqueueOutcome::Enqueued(seq) = outcome {
                last = Some(seq);
            }
            outcomes.push(outcome);
        }
        if let Some(seq) = last {
            self.flush_through(seq).await?;
        }
        Ok(outcomes)
    }

    fn write_request(&self, request: &StoredRequest) -> Result<EnqueueOutcome, QueueError> {
        let too_large = |_| QueueError::RecordTooLarge {
            record: "request",
            request_id: request.request_id.clone(),
        };
        let payload_len = request.payload_len();
        let body = request.encode().map_err(too_large)?;
        let mut ledger = self.ledger();
        match ledger.admit(payload_len) {
            Admission::Admit => {}
            Admission::Full { items, bytes } => return Ok(EnqueueOutcome::Full { items, bytes }),
            Admission::TooLarge { max_bytes } => {
                return Ok(EnqueueOutcome::TooLarge {
                    payload_bytes: payload_len,
                    max_bytes,
                });
            }
        }
        let seq = ledger.next_seq();
        self.inner.trees.insert_request(seq, &body, payload_len)?;
        ledger.on_enqueued(seq, payload_len);
        Ok(EnqueueOutcome::Enqueued(seq))
    }

    /// Answers a request without queueing it (refused at ingress, e.g. malformed or too
    /// large): the reply goes straight to the outbox and is flushed, so the request may be
    /// acknowledged on `Enqueued` exactly as after `enqueue`. Counts against `max_items`.
    pub async fn reply_directly(&self, reply: &StoredReply) -> Result<EnqueueOutcome, QueueError> {
        let record = reply.encode().map_err(|_| QueueError::RecordTooLarge {
            record: "reply",
            request_id: reply.request_id.clone(),
        })?;
        let seq = {
            let mut ledger = self.ledger();
            if let Admission::Full { items, bytes } = ledger.admit_reply() {
                return Ok(EnqueueOutcome::Full { items, bytes });
            }
            let seq = ledger.next_seq();
            self.inner.trees.insert_reply(seq, &record)?;
            ledger.on_reply_inserted(seq);
            seq
        };
        self.inner.db.flush_async().await?;
        self.inner.watermark.raise(seq.get().saturating_add(1));
        Ok(EnqueueOutcome::Enqueued(seq))
    }

    /// Leases the oldest pending item, deciding at `now` whether it is work, expired, or
    /// dead-lettered. The new attempt count is flushed before the item is returned, so an
    /// item that crashes the process is counted. Undecodable items met on the way become
    /// dead letters and are skipped.
    pub fn lease(&self, now: UnixMillis) -> Result<Option<Leased>, QueueError> {
        let leased = self.take_lease(now)?;
        if leased.is_some() {
            self.inner.db.flush()?;
        }
        Ok(leased)
    }

    fn take_lease(&self, now: UnixMillis) -> Result<Option<Leased>, QueueError> {
        let trees = &self.inner.trees;
        let mut ledger = self.ledger();
        loop {
            let Some((key, index)) = trees.pending.first()? else {
                return Ok(None);
            };
            let Some(seq) = Seq::from_key(&key) else {
                let (seq, note) = (ledger.take_seq(), "pending entry with a malformed key");
                tracing::warn!(seq = seq.get(), note, "queue record moved to the dead letters");
                let new = trees.quarantine_stray(&trees.pending, &key, seq, note, now)?;
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
            let body = trees.items.get(key)?;
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
            let new_dead = trees.move_to_leased(seq, leased_meta, dead.as_deref())?;
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
        body: Option<sled::IVec>,
    ) -> Result<Vec<u8>, QueueError> {
        let letter = DeadLetter {
            seq,
            reason: DeadReason::MaxAttempts,
            attempts,
            at: now,
            note: format!("leased {attempts} times without completing"),
            raw_request: body.map(|b| b.to_vec()),
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
        let new = self.inner.trees.quarantine(seq, note, now)?;
        ledger.forget_pending(payload_len);
        self.note_dead(ledger, new)?;
        Ok(())
    }

    /// Finishes a lease: atomically removes the request and puts its reply in the outbox,
    /// then flushes. Publish the reply after this returns; call `reply_acked` when the broker
    /// acknowledges it. Fails with `NotLeased` if the lease was lost (expired, released).
    pub fn complete(&self, seq: Seq, reply: &StoredReply) -> Result<(), QueueError> {
        self.write_completion(seq, reply)?;
        self.inner.db.flush()?;
        Ok(())
    }

    /// `complete` with the flush awaited instead of blocked on.
    pub async fn complete_async(&self, seq: Seq, reply: &StoredReply) -> Result<(), QueueError> {
        self.write_completion(seq, reply)?;
        self.inner.db.flush_async().await?;
        Ok(())
    }

    fn write_completion(&self, seq: Seq, reply: &StoredReply) -> Result<(), QueueError> {
        let record = reply.encode().map_err(|_| QueueError::RecordTooLarge {
            record: "reply",
            request_id: reply.request_id.clone(),
        })?;
        let mut ledger = self.ledger();
        if ledger.lease(seq).is_none() {
            return Err(QueueError::NotLeased { seq });
        }
        self.inner.trees.complete(seq, &record)?;
        ledger.on_completed(seq);
        Ok(())
    }

    /// Gives a lease back without counting its attempt (graceful shutdown). Not flushed on
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
            .trees
            .move_to_pending(seq, Ledger::requeue_meta(lease, counted))?;
        ledger.on_requeued(seq);
        Ok(())
    }

    /// The broker acknowledged the reply: the request leaves the system. Returns false if it
    /// was not in the outbox (already acknowledged). Not flushed: losing it in a crash only
    /// republishes the reply, which clients drop by request id.
    pub fn reply_acked(&self, seq: Seq) -> Result<bool, QueueError> {
        let mut ledger = self.ledger();
        let removed = self.inner.trees.outbox.remove(seq.to_key())?.is_some();
        if removed {
            ledger.on_reply_acked();
        }
        Ok(removed)
    }
}
