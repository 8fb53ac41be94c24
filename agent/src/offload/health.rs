//! The offload client's pure core: which endpoint takes the next call, when a failing one
//! leaves the rotation, whether a failed call is worth a second try, and the circuit breaker
//! over the whole pool. No I/O and no clock of its own (every decision takes `now`), so the
//! rules are tested here; `mod.rs` makes the calls.
//!
//! **Ejection never empties the rotation.** A failing endpoint is left out for `eject_for`
//! only while another endpoint stays in. A pool reached through one address (an ingress or a
//! Gateway, a ClusterIP Service) is a single endpoint: ejecting it after one failed call would
//! make the whole pool unavailable for `eject_for`, although the proxy behind it may have
//! healthy pods. Whether the pool as a whole is down is the breaker's decision
//! (`failure_threshold` consecutive failed requests), not the ejection's.
//!
//! **A retry may go to the same endpoint** when no other is in rotation: through an L7 proxy
//! the second try is balanced anew and usually reaches another pod. Not after a timeout
//! (or any failure that took the whole deadline, such as a connect timeout), though: the
//! deadline is spent, and the same address would most likely make the request wait a second
//! deadline.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How a call failed, as far as the next try is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Connection refused or reset, UNAVAILABLE, RESOURCE_EXHAUSTED...: another try (another
    /// endpoint, or another pod behind the same proxy) may succeed at once.
    Transient,
    /// The call's deadline passed (or the pool said DEADLINE_EXCEEDED).
    Deadline,
    /// The pool answered, but not usefully (NOT_FOUND, INVALID_ARGUMENT, an unreadable
    /// reply): every endpoint of the pool would answer the same.
    Permanent,
}

impl Failure {
    /// Whether the endpoint should leave the rotation for a while.
    pub fn ejects(self) -> bool {
        self != Failure::Permanent
    }

    /// The failure of a call that took `took` with `deadline`: a transient one that used up the
    /// whole deadline (a connection whose handshake never finished before the connect
    /// timeout, a stalled link) counts as a deadline.
    pub fn given_time(self, took: Duration, deadline: Duration) -> Failure {
        match self {
            Failure::Transient if took >= deadline => Failure::Deadline,
            f => f,
        }
    }

    /// Whether a second try is worth it, `same_endpoint` telling where it would go.
    pub fn worth_retrying(self, same_endpoint: bool) -> bool {
        match self {
            Failure::Transient => true,
            Failure::Deadline => !same_endpoint,
            Failure::Permanent => false,
        }
    }
}

/// Which endpoints take calls: the ones not ejected, and never none of them.
#[derive(Debug, Default)]
pub struct Rotation {
    ejected: HashMap<String, Instant>,
}

impl Rotation {
    fn out(&self, addr: &str, now: Instant) -> bool {
        self.ejected.get(addr).is_some_and(|&until| now < until)
    }

    /// How many of `addrs` take calls now. When every one of them is ejected (only possible
    /// after the list changed, e.g. the healthy ones left DNS), all of them do.
    pub fn in_rotation(&self, addrs: &[&str], now: Instant) -> usize {
        match addrs.iter().filter(|a| !self.out(a, now)).count() {
            0 => addrs.len(),
            n => n,
        }
    }

    /// The index in `addrs` of the endpoint for the next call, round-robin from `start`: the
    /// first one in rotation other than `avoid` (the endpoint that just failed), or `avoid`
    /// itself when no other is in rotation. `None` only for an empty list.
    pub fn pick(&self, addrs: &[&str], start: usize, avoid: Option<&str>, now: Instant) -> Option<usize> {
        let n = addrs.len();
        let any_in = addrs.iter().any(|a| !self.out(a, now));
        let usable = |i: &usize| !any_in || !self.out(addrs[*i], now);
        let order = || (0..n).map(|k| start.wrapping_add(k) % n);
        order()
            .filter(usable)
            .find(|&i| Some(addrs[i]) != avoid)
            .or_else(|| order().find(usable))
    }

    /// Leaves `addr` out of the rotation until `now + eject_for`, unless no other endpoint of
    /// `addrs` would stay in. Returns whether it was ejected.
    pub fn eject(&mut self, addrs: &[&str], addr: &str, now: Instant, eject_for: Duration) -> bool {
        // Forget ejections that ended or whose endpoint left the list.
        self.ejected
            .retain(|a, until| now < *until && addrs.contains(&a.as_str()));
        let others_in = addrs.iter().filter(|a| **a != addr && !self.out(a, now)).count();
        if others_in == 0 {
            return false;
        }
        self.ejected.insert(addr.to_owned(), now + eject_for);
        true
    }
}

/// The breaker's state, as exported in metrics (0 closed, 1 open, 2 half-open).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

/// How a request went through the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Normal,
    /// The one request sent while half-open: its outcome closes or reopens the breaker.
    Probe,
}

/// A change of the breaker, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Opened { failures: u32 },
    Closed,
}

/// The circuit breaker over the whole pool: opens after `threshold` consecutive failed
/// requests; while open nothing is sent; `open_for` later one request probes (half-open) and
/// its success closes the breaker, its failure opens it again. A probe that never settles (its
/// task was cancelled) is forgotten after `open_for`, so the breaker cannot stay stuck.
#[derive(Debug)]
pub struct Breaker {
    threshold: u32,
    open_for: Duration,
    failures: u32,
    opened_at: Option<Instant>,
    probe_since: Option<Instant>,
}

impl Breaker {
    pub fn new(threshold: u32, open_for: Duration) -> Self {
        Self {
            threshold: threshold.max(1),
            open_for,
            failures: 0,
            opened_at: None,
            probe_since: None,
        }
    }

    pub fn state(&self, now: Instant) -> BreakerState {
        match self.opened_at {
            None => BreakerState::Closed,
            Some(t) if now.saturating_duration_since(t) >= self.open_for => BreakerState::HalfOpen,
            Some(_) => BreakerState::Open,
        }
    }

    fn probe_out(&self, now: Instant) -> bool {
        self.probe_since
            .is_some_and(|t| now.saturating_duration_since(t) < self.open_for)
    }

    /// Whether `admit` would let a request through now.
    pub fn would_admit(&self, now: Instant) -> bool {
        match self.state(now) {
            BreakerState::Closed => true,
            BreakerState::HalfOpen => !self.probe_out(now),
            BreakerState::Open => false,
        }
    }

    /// Lets a request through (`Some`), as the probe when half-open, or not (`None`).
    pub fn admit(&mut self, now: Instant) -> Option<Admission> {
        match self.state(now) {
            BreakerState::Closed => Some(Admission::Normal),
            BreakerState::HalfOpen if !self.probe_out(now) => {
                self.probe_since = Some(now);
                Some(Admission::Probe)
            }
            _ => None,
        }
    }

    /// Forgets an admission without a verdict (a call cut short by the request's own deadline
    /// says nothing about the pool): a probe may go again at once.
    pub fn release(&mut self, admission: Admission) {
        if admission == Admission::Probe {
            self.probe_since = None;
        }
    }

    /// Records a request's outcome.
    pub fn settle(&mut self, ok: bool, admission: Admission, now: Instant) -> Option<Transition> {
        let probe = admission == Admission::Probe;
        if probe {
            self.probe_since = None;
        }
        if ok {
            self.failures = 0;
            return self.opened_at.take().map(|_| Transition::Closed);
        }
        self.failures = self.failures.saturating_add(1);
        let was_closed = self.opened_at.is_none();
        if probe || (was_closed && self.failures >= self.threshold) {
            self.opened_at = Some(now);
            return Some(Transition::Opened {
                failures: self.failures,
            });
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EJECT: Duration = Duration::from_secs(5);

    #[test]
    fn a_released_probe_leaves_the_breaker_as_it_was_and_lets_another_probe_go() {
        let t0 = Instant::now();
        let mut b = Breaker::new(1, Duration::from_secs(2));
        assert!(b.settle(false, Admission::Normal, t0).is_some());
        let t1 = t0 + Duration::from_secs(2);
        let probe = b.admit(t1).expect("half-open admits a probe");
        assert_eq!(probe, Admission::Probe);
        assert_eq!(b.admit(t1), None, "one probe at a time");
        b.release(probe);
        assert_eq!(b.state(t1), BreakerState::HalfOpen);
        assert_eq!(b.admit(t1), Some(Admission::Probe));
    }

    #[test]
    fn the_only_endpoint_is_never_ejected() {
        let now = Instant::now();
        let mut r = Rotation::default();
        let one = ["pool.example.com:443"];
        assert!(!r.eject(&one, one[0], now, EJECT));
        assert_eq!(r.in_rotation(&one, now), 1);
        assert_eq!(r.pick(&one, 7, None, now), Some(0));
    }

    #[test]
    fn a_retry_goes_to_the_same_endpoint_when_no_other_is_in_rotation() {
        let now = Instant::now();
        let r = Rotation::default();
        let one = ["pool.example.com:443"];
        assert_eq!(r.pick(&one, 3, Some(one[0]), now), Some(0));

        let mut r = Rotation::default();
        let two = ["a:1", "b:1"];
        assert!(r.eject(&two, "a:1", now, EJECT));
        // b failed too: the only one in rotation, so the retry goes to b again, not to a.
        assert_eq!(r.pick(&two, 0, Some("b:1"), now), Some(1));
    }

    #[test]
    fn the_last_endpoint_in_rotation_stays_and_ejections_end() {
        let now = Instant::now();
        let mut r = Rotation::default();
        let three = ["a:1", "b:1", "c:1"];
        assert!(r.eject(&three, "a:1", now, EJECT));
        assert!(r.eject(&three, "b:1", now, EJECT));
        assert!(
            !r.eject(&three, "c:1", now, EJECT),
            "c is the last one in rotation"
        );
        assert_eq!(r.in_rotation(&three, now), 1);
        for start in 0..6 {
            assert_eq!(r.pick(&three, start, None, now), Some(2));
        }
        let later = now + EJECT;
        assert_eq!(r.in_rotation(&three, later), 3);
        // Ended ejections no longer count: a can be ejected again while b and c are in.
        assert!(r.eject(&three, "a:1", later, EJECT));
        assert_eq!(r.in_rotation(&three, later), 2);
    }

    #[test]
    fn round_robin_skips_ejected_endpoints_and_the_one_that_just_failed() {
        let now = Instant::now();
        let mut r = Rotation::default();
        let three = ["a:1", "b:1", "c:1"];
        let picks: Vec<_> = (0..6).map(|s| r.pick(&three, s, None, now)).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2].map(Some));
        assert!(r.eject(&three, "b:1", now, EJECT));
        let picks: Vec<_> = (0..3).map(|s| r.pick(&three, s, None, now)).collect();
        assert_eq!(picks, [0, 2, 2].map(Some));
        assert_eq!(r.pick(&three, 0, Some("a:1"), now), Some(2));
        assert_eq!(r.pick(&[], 0, None, now), None);
    }

    #[test]
    fn when_every_listed_endpoint_is_ejected_all_of_them_take_calls() {
        // a and b ejected while c was in; then DNS drops c.
        let now = Instant::now();
        let mut r = Rotation::default();
        assert!(r.eject(&["a:1", "b:1", "c:1"], "a:1", now, EJECT));
        assert!(r.eject(&["a:1", "b:1", "c:1"], "b:1", now, EJECT));
        let left = ["a:1", "b:1"];
        assert_eq!(r.in_rotation(&left, now), 2);
        assert_eq!(r.pick(&left, 1, None, now), Some(1));
        assert_eq!(r.pick(&left, 1, Some("b:1"), now), Some(0));
    }

    #[test]
    fn retries_follow_the_failure() {
        assert!(Failure::Transient.worth_retrying(true));
        assert!(Failure::Transient.worth_retrying(false));
        assert!(Failure::Deadline.worth_retrying(false));
        assert!(
            !Failure::Deadline.worth_retrying(true),
            "a second deadline on the same address"
        );
        assert!(!Failure::Permanent.worth_retrying(false));
        assert!(Failure::Transient.ejects() && Failure::Deadline.ejects());
        assert!(!Failure::Permanent.ejects());
        let deadline = Duration::from_secs(1);
        assert_eq!(
            Failure::Transient.given_time(Duration::from_millis(1000), deadline),
            Failure::Deadline,
            "a connect timeout is the deadline spent"
        );
        assert_eq!(
            Failure::Transient.given_time(Duration::from_millis(3), deadline),
            Failure::Transient
        );
        assert_eq!(
            Failure::Permanent.given_time(deadline, deadline),
            Failure::Permanent
        );
    }

    #[test]
    fn breaker_opens_after_the_threshold_probes_once_and_closes_on_success() {
        let open_for = Duration::from_secs(10);
        let t0 = Instant::now();
        let mut b = Breaker::new(3, open_for);
        for i in 1..=2 {
            assert_eq!(b.admit(t0), Some(Admission::Normal));
            assert_eq!(b.settle(false, Admission::Normal, t0), None, "failure {i}");
        }
        assert_eq!(b.admit(t0), Some(Admission::Normal));
        assert_eq!(
            b.settle(false, Admission::Normal, t0),
            Some(Transition::Opened { failures: 3 })
        );
        assert_eq!(b.state(t0), BreakerState::Open);
        assert!(!b.would_admit(t0 + Duration::from_secs(9)));
        assert_eq!(b.admit(t0 + Duration::from_secs(9)), None);

        let t1 = t0 + open_for;
        assert_eq!(b.state(t1), BreakerState::HalfOpen);
        assert_eq!(b.admit(t1), Some(Admission::Probe));
        assert!(!b.would_admit(t1), "one probe at a time");
        assert_eq!(b.admit(t1), None);
        assert_eq!(b.settle(true, Admission::Probe, t1), Some(Transition::Closed));
        assert_eq!(b.state(t1), BreakerState::Closed);
        assert!(b.would_admit(t1));
    }

    #[test]
    fn a_failed_probe_reopens_and_a_success_resets_the_count() {
        let open_for = Duration::from_secs(2);
        let t0 = Instant::now();
        let mut b = Breaker::new(2, open_for);
        b.settle(false, Admission::Normal, t0);
        b.settle(true, Admission::Normal, t0);
        assert_eq!(
            b.settle(false, Admission::Normal, t0),
            None,
            "the count restarted"
        );
        assert!(b.settle(false, Admission::Normal, t0).is_some());
        let t1 = t0 + open_for;
        assert_eq!(b.admit(t1), Some(Admission::Probe));
        assert!(matches!(
            b.settle(false, Admission::Probe, t1),
            Some(Transition::Opened { .. })
        ));
        assert_eq!(b.state(t1), BreakerState::Open, "open again for open_for");
        assert_eq!(b.state(t1 + open_for), BreakerState::HalfOpen);
    }

    #[test]
    fn a_probe_that_never_settles_is_forgotten() {
        let open_for = Duration::from_secs(2);
        let t0 = Instant::now();
        let mut b = Breaker::new(1, open_for);
        b.settle(false, Admission::Normal, t0);
        let t1 = t0 + open_for;
        assert_eq!(b.admit(t1), Some(Admission::Probe));
        // Its task was cancelled: no settle. Another probe goes after open_for.
        assert_eq!(b.admit(t1 + Duration::from_secs(1)), None);
        assert_eq!(b.admit(t1 + open_for), Some(Admission::Probe));
    }
}
