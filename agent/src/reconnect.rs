//! How long to wait before connecting to the broker again: exponential backoff with jitter,
//! which starts over only once a connection has stayed up for `STABLE`.
//!
//! Resetting at every CONNACK made a connection that dies right after it (a message the broker
//! redelivers at each connection and that kills it, a broker that accepts then drops us) a
//! loop of about ten reconnects a second. Here such connections count as failures: the delay
//! doubles up to `mqtt.reconnect_max_ms` until one lasts.

use std::time::{Duration, Instant};

/// A connection up at least this long ends the backoff: the next failure waits the minimum.
pub const STABLE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
    up_since: Option<Instant>,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max: max.max(min),
            next: min,
            up_since: None,
        }
    }

    /// A connection was made (CONNACK).
    pub fn connected(&mut self, now: Instant) {
        self.up_since = Some(now);
    }

    /// The connection failed or could not be made: the delay before the next attempt, with
    /// up to a quarter more of jitter taken from `entropy` (any varying number).
    pub fn failed(&mut self, now: Instant, entropy: u64) -> Duration {
        if let Some(since) = self.up_since.take()
            && now.saturating_duration_since(since) >= STABLE
        {
            self.next = self.min;
        }
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        let spread = delay.as_millis() as u64 / 4 + 1;
        delay + Duration::from_millis(entropy % spread)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn delays_double_up_to_the_maximum_while_connections_die_at_once() {
        let mut b = Backoff::new(100 * MS, 1000 * MS);
        let t0 = Instant::now();
        let mut delays = Vec::new();
        for i in 0..6 {
            let now = t0 + i * 50 * MS;
            b.connected(now);
            delays.push(b.failed(now + 5 * MS, 0));
        }
        assert_eq!(
            delays,
            [100 * MS, 200 * MS, 400 * MS, 800 * MS, 1000 * MS, 1000 * MS]
        );
    }

    #[test]
    fn a_connection_that_lasted_starts_the_backoff_over() {
        let mut b = Backoff::new(100 * MS, 10_000 * MS);
        let t0 = Instant::now();
        for _ in 0..4 {
            b.failed(t0, 0);
        }
        b.connected(t0);
        assert_eq!(b.failed(t0 + STABLE, 0), 100 * MS);
        assert_eq!(
            b.failed(t0 + STABLE, 0),
            200 * MS,
            "no connection since: growing again"
        );
    }

    #[test]
    fn failures_without_a_connection_keep_growing() {
        let mut b = Backoff::new(100 * MS, 400 * MS);
        let t = Instant::now();
        let d: Vec<_> = (0..4).map(|_| b.failed(t, 0)).collect();
        assert_eq!(d, [100 * MS, 200 * MS, 400 * MS, 400 * MS]);
    }

    #[test]
    fn jitter_adds_at_most_a_quarter() {
        let mut b = Backoff::new(400 * MS, 400 * MS);
        let t = Instant::now();
        for entropy in [0, 1, 99, 100, 101, u64::MAX] {
            let d = b.failed(t, entropy);
            assert!(d >= 400 * MS && d <= 500 * MS, "{d:?}");
        }
    }
}
