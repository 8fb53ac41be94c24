//! The device page's memory of the last 15 minutes: answered counts and mean latencies per
//! 10-second slot, the top-1 confidence histogram, the last requests and (when
//! `http.recent_images` > 0) their thumbnails. Every part is a fixed-size ring, so memory is
//! bounded whatever the traffic: 90 slots, 10 histogram bins, `RECENT` requests with clipped
//! strings, at most `MAX_RECENT_IMAGES` thumbnails of at most `thumb::MAX_SIDE` pixels a side.
//!
//! A pure core: time is passed in (milliseconds since the epoch), nothing here does I/O.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

/// Seconds per slot of the charts.
pub const SLOT_SECS: u64 = 10;
/// Slots kept: 15 minutes.
pub const SLOTS: usize = 90;
/// Requests listed on the page.
pub const RECENT: usize = 20;
/// The most thumbnails `http.recent_images` may ask for (at most one per listed request).
pub const MAX_RECENT_IMAGES: usize = RECENT;
/// Bins of the top-1 confidence histogram, over [0, 1].
pub const BINS: usize = 10;
/// Thumbnails being made at once, at most; requests answered meanwhile get none.
const THUMBNAILS_IN_FLIGHT: usize = 2;
/// Characters kept of a request id, label, reason or error message.
const MAX_TEXT: usize = 120;

/// Latency figures per slot, in the order of `LATENCIES`.
pub const LATENCIES: [&str; 4] = ["queue wait", "preprocess", "inference", "total"];

/// One 10-second slot.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Slot {
    /// Start of the slot, seconds since the epoch (a multiple of `SLOT_SECS`).
    pub start_s: u64,
    pub local: u32,
    pub cluster: u32,
    pub errors: u32,
    /// Sum and count of each latency in `LATENCIES`, ms.
    sums_ms: [f64; 4],
    counts: [u32; 4],
}

impl Slot {
    /// The mean of latency `i` of `LATENCIES` in this slot, ms.
    pub fn mean_ms(&self, i: usize) -> Option<f64> {
        let n = *self.counts.get(i)?;
        (n > 0).then(|| self.sums_ms[i] / f64::from(n))
    }
}

/// One answered request, as listed on the page.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Recent {
    /// Numbered from 1 since start; thumbnails are attached by this number.
    pub n: u64,
    pub at_ms: u64,
    pub id: String,
    pub label: Option<String>,
    pub score: Option<f32>,
    pub source: String,
    pub reason: String,
    pub total_ms: Option<f64>,
    /// The error code and message of an error reply.
    pub error: Option<(String, String)>,
}

/// What the page shows, copied out under the lock.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    /// `SLOTS` slots ending with the current one, oldest first (empty slots included).
    pub slots: Vec<Slot>,
    /// Top-1 scores of local inferences in `BINS` bins over [0, 1].
    pub confidence: [u64; BINS],
    /// Local inferences whose confidence was below `offload.min_confidence`.
    pub below_threshold: u64,
    pub min_confidence: f32,
    /// Newest first.
    pub recent: Vec<Recent>,
    /// PNG thumbnails by request number.
    #[serde(skip)]
    pub images: Vec<(u64, Vec<u8>)>,
    pub recent_images: usize,
}

#[derive(Debug, Default)]
struct Inner {
    slots: VecDeque<Slot>,
    confidence: [u64; BINS],
    below: u64,
    recent: VecDeque<Recent>,
    images: VecDeque<(u64, Vec<u8>)>,
    next: u64,
}

/// Shared by the workers (which record) and the HTTP server (which renders).
#[derive(Debug)]
pub struct History {
    inner: Mutex<Inner>,
    recent_images: usize,
    min_confidence: f32,
    thumbnails_in_flight: AtomicUsize,
}

/// Leave to make one thumbnail (see `History::thumbnail_ticket`).
pub struct Ticket {
    history: Arc<History>,
}

impl Ticket {
    /// Makes the thumbnail of request `n`'s image and keeps it (blocking: decodes the image).
    pub fn attach(self, n: u64, preprocessor: &edge_runtime::preprocess::Preprocessor, image: &[u8]) {
        if let Some(png) = super::thumb::thumbnail(preprocessor, image) {
            self.history.attach_image(n, png);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.history.thumbnails_in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The parts of a reply document the page lists.
#[derive(Deserialize, Default)]
struct ReplyView {
    #[serde(default)]
    id: String,
    #[serde(default)]
    source: String,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    top: Vec<LabelView>,
    timings_ms: Option<TimingsView>,
    error: Option<ErrorView>,
}

#[derive(Deserialize)]
struct LabelView {
    label: String,
    score: f32,
}

#[derive(Deserialize)]
struct TimingsView {
    queued: f64,
    preprocess: f64,
    inference: f64,
    total: f64,
}

#[derive(Deserialize)]
struct ErrorView {
    code: String,
    message: String,
}

impl History {
    /// `recent_images` is clamped to `MAX_RECENT_IMAGES` (config validation refuses more).
    pub fn new(recent_images: usize, min_confidence: f32) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            recent_images: recent_images.min(MAX_RECENT_IMAGES),
            min_confidence,
            thumbnails_in_flight: AtomicUsize::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether thumbnails are kept (`http.recent_images` > 0).
    pub fn keeps_images(&self) -> bool {
        self.recent_images > 0
    }

    /// Leave to make a thumbnail: `None` when thumbnails are off, or when
    /// `THUMBNAILS_IN_FLIGHT` are being made (their CPU and memory stay bounded under load).
    pub fn thumbnail_ticket(self: &Arc<Self>) -> Option<Ticket> {
        if !self.keeps_images() {
            return None;
        }
        let taken = self
            .thumbnails_in_flight
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < THUMBNAILS_IN_FLIGHT).then_some(n + 1)
            });
        taken.is_ok().then(|| Ticket {
            history: self.clone(),
        })
    }

    /// A local inference's top-1 score, and whether its confidence (by
    /// `offload.confidence_measure`) was below `offload.min_confidence`.
    pub fn confidence(&self, top1: f32, below_threshold: bool) {
        let bin = if top1.is_finite() {
            ((top1.clamp(0.0, 1.0) * BINS as f32) as usize).min(BINS - 1)
        } else {
            0
        };
        let mut g = self.lock();
        g.confidence[bin] += 1;
        g.below += u64::from(below_threshold);
    }

    /// An answered request, from its reply document (as published); returns its number for
    /// `attach_image`.
    pub fn answered(&self, now_ms: u64, reply: &[u8]) -> u64 {
        let view: ReplyView = serde_json::from_slice(reply).unwrap_or_default();
        let mut g = self.lock();
        g.next += 1;
        let n = g.next;
        let slot = current_slot(&mut g.slots, now_ms);
        match (&view.error, view.source.as_str()) {
            (Some(_), _) => slot.errors += 1,
            (None, "cluster") => slot.cluster += 1,
            (None, _) => slot.local += 1,
        }
        if let Some(t) = &view.timings_ms {
            for (i, v) in [t.queued, t.preprocess, t.inference, t.total]
                .into_iter()
                .enumerate()
            {
                if v.is_finite() && v >= 0.0 {
                    slot.sums_ms[i] += v;
                    slot.counts[i] += 1;
                }
            }
        }
        let top = view.top.first();
        let recent = Recent {
            n,
            at_ms: now_ms,
            id: super::html::clip(&view.id, MAX_TEXT),
            label: top.map(|l| super::html::clip(&l.label, MAX_TEXT)),
            score: top.map(|l| l.score),
            source: super::html::clip(&view.source, MAX_TEXT),
            reason: super::html::clip(&view.reason, MAX_TEXT),
            total_ms: view.timings_ms.as_ref().map(|t| t.total),
            error: view.error.map(|e| {
                (
                    super::html::clip(&e.code, MAX_TEXT),
                    super::html::clip(&e.message, MAX_TEXT),
                )
            }),
        };
        if g.recent.len() == RECENT {
            g.recent.pop_back();
        }
        g.recent.push_front(recent);
        n
    }

    /// The thumbnail of request `n`; the oldest goes when `recent_images` are kept. Dropped
    /// when thumbnails are off or the request already left the list.
    pub fn attach_image(&self, n: u64, png: Vec<u8>) {
        if self.recent_images == 0 {
            return;
        }
        let mut g = self.lock();
        if !g.recent.iter().any(|r| r.n == n) {
            return;
        }
        while g.images.len() >= self.recent_images {
            g.images.pop_front();
        }
        g.images.push_back((n, png));
    }

    pub fn snapshot(&self, now_ms: u64) -> Snapshot {
        let g = self.lock();
        let now_slot = now_ms / 1000 / SLOT_SECS * SLOT_SECS;
        let first = now_slot.saturating_sub(SLOT_SECS * (SLOTS as u64 - 1));
        let slots = (0..SLOTS as u64)
            .map(|i| {
                let start_s = first + i * SLOT_SECS;
                g.slots
                    .iter()
                    .find(|s| s.start_s == start_s)
                    .cloned()
                    .unwrap_or(Slot {
                        start_s,
                        ..Slot::default()
                    })
            })
            .collect();
        Snapshot {
            slots,
            confidence: g.confidence,
            below_threshold: g.below,
            min_confidence: self.min_confidence,
            recent: g.recent.iter().cloned().collect(),
            images: g.images.iter().cloned().collect(),
            recent_images: self.recent_images,
        }
    }
}

/// The slot `now_ms` falls in, created (and the oldest dropped) as time moves on.
fn current_slot(slots: &mut VecDeque<Slot>, now_ms: u64) -> &mut Slot {
    let start_s = now_ms / 1000 / SLOT_SECS * SLOT_SECS;
    let oldest = start_s.saturating_sub(SLOT_SECS * (SLOTS as u64 - 1));
    slots.retain(|s| s.start_s >= oldest && s.start_s <= start_s);
    if slots.back().is_none_or(|s| s.start_s != start_s) {
        // A clock stepping back lands in an existing slot or a new one at the end.
        if let Some(i) = slots.iter().position(|s| s.start_s == start_s) {
            return &mut slots[i];
        }
        slots.push_back(Slot {
            start_s,
            ..Slot::default()
        });
        if slots.len() > SLOTS {
            slots.pop_front();
        }
    }
    let last = slots.len() - 1;
    &mut slots[last]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok_reply(id: &str, label: &str, source: &str, total: f64) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "id": id, "source": source, "reason": "local_only",
            "top": [{"label": label, "index": 1, "score": 0.9}],
            "timings_ms": {"queued": 1.0, "preprocess": 2.0, "inference": 3.0, "total": total},
        }))
        .unwrap()
    }

    #[test]
    fn slots_cover_fifteen_minutes_and_forget_older_ones() {
        let h = History::new(0, 0.5);
        let t0 = 1_700_000_000_000u64;
        // One request a second for an hour: the ring never holds more than SLOTS slots.
        for s in 0..3600 {
            h.answered(t0 + s * 1000, &ok_reply("r", "cat", "local", 10.0));
            assert!(h.lock().slots.len() <= SLOTS);
        }
        let now = t0 + 3599 * 1000;
        let snap = h.snapshot(now);
        assert_eq!(snap.slots.len(), SLOTS);
        let counted: u32 = snap.slots.iter().map(|s| s.local).sum();
        // 89 full slots and the current one (partial, depending on alignment).
        assert!((890..=900).contains(&counted), "{counted}");
        assert_eq!(snap.slots.last().unwrap().mean_ms(3), Some(10.0));
        // Quiet for 20 minutes: every slot is empty again.
        let later = h.snapshot(now + 20 * 60 * 1000);
        assert!(later.slots.iter().all(|s| s.local == 0 && s.mean_ms(0).is_none()));
    }

    #[test]
    fn paths_errors_and_latencies_are_counted_per_slot() {
        let h = History::new(0, 0.5);
        let t = 1_700_000_000_000u64;
        h.answered(t, &ok_reply("a", "cat", "local", 10.0));
        h.answered(t, &ok_reply("b", "dog", "cluster", 30.0));
        let err = br#"{"id":"c","error":{"code":"invalid_image","message":"not a JPEG"}}"#;
        h.answered(t, err);
        h.answered(t, b"not json at all");
        let snap = h.snapshot(t);
        let slot = snap.slots.last().unwrap();
        assert_eq!((slot.local, slot.cluster, slot.errors), (2, 1, 1));
        assert_eq!(slot.mean_ms(3), Some(20.0));
        assert_eq!(
            snap.recent[1].error,
            Some(("invalid_image".into(), "not a JPEG".into()))
        );
        assert_eq!(snap.recent[2].label.as_deref(), Some("dog"));
    }

    #[test]
    fn the_request_list_and_image_ring_are_bounded() {
        let h = History::new(3, 0.5);
        let long = "x".repeat(100_000);
        for i in 0..1000 {
            let n = h.answered(1_700_000_000_000, &ok_reply(&long, &long, "local", 1.0));
            assert_eq!(n, i + 1);
            h.attach_image(n, vec![0u8; 1000]);
        }
        let snap = h.snapshot(1_700_000_000_000);
        assert_eq!(snap.recent.len(), RECENT);
        assert_eq!(snap.recent[0].n, 1000);
        assert!(snap.recent.iter().all(|r| r.id.chars().count() <= MAX_TEXT + 1));
        let kept: Vec<u64> = snap.images.iter().map(|(n, _)| *n).collect();
        assert_eq!(kept, vec![998, 999, 1000]);
        // An image for a request no longer listed is not kept.
        h.attach_image(5, vec![1]);
        assert!(h.snapshot(1_700_000_000_000).images.iter().all(|(n, _)| *n != 5));
        // Off by default: nothing is kept.
        let off = History::new(0, 0.5);
        let n = off.answered(1, &ok_reply("a", "b", "local", 1.0));
        off.attach_image(n, vec![0; 10]);
        assert!(!off.keeps_images() && off.snapshot(1).images.is_empty());
        // At most THUMBNAILS_IN_FLIGHT thumbnails are made at once.
        let h = Arc::new(h);
        let tickets: Vec<Ticket> = (0..5).filter_map(|_| h.thumbnail_ticket()).collect();
        assert_eq!(tickets.len(), THUMBNAILS_IN_FLIGHT);
        drop(tickets);
        assert!(h.thumbnail_ticket().is_some());
        assert!(Arc::new(History::new(0, 0.5)).thumbnail_ticket().is_none());
        // A configuration asking for more is clamped.
        assert_eq!(History::new(10_000, 0.5).recent_images, MAX_RECENT_IMAGES);
    }

    #[test]
    fn confidence_lands_in_its_bin_and_counts_below_threshold() {
        let h = History::new(0, 0.5);
        for (s, below) in [
            (0.0, true),
            (0.05, true),
            (0.95, false),
            (1.0, false),
            (f32::NAN, true),
        ] {
            h.confidence(s, below);
        }
        let snap = h.snapshot(0);
        assert_eq!(snap.confidence[0], 3);
        assert_eq!(snap.confidence[BINS - 1], 2);
        assert_eq!(snap.below_threshold, 3);
    }
}
