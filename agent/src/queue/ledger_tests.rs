//! Plain unit tests of the pure core: admission, lease decisions, requeue, dead-letter cap.

use super::*;

fn limits(max_items: usize, max_bytes: u64, max_attempts: u32) -> QueueLimits {
    QueueLimits {
        max_items: NonZeroUsize::new(max_items).unwrap(),
        max_bytes: NonZeroU64::new(max_bytes).unwrap(),
        max_attempts: NonZeroU32::new(max_attempts).unwrap(),
        visibility_timeout: Duration::from_secs(10),
        max_dead_letters: NonZeroUsize::new(2).unwrap(),
    }
}

fn meta(attempts: u32, payload_len: u64) -> ItemMeta {
    ItemMeta {
        attempts,
        payload_len,
    }
}

#[test]
fn admission_counts_items_in_every_state_and_bytes_of_unfinished_ones() {
    let mut l = Ledger::new(limits(3, 100, 3), Recovered::default());
    l.on_enqueued(Seq(0), 40);
    l.on_enqueued(Seq(1), 40);
    assert_eq!(l.admit(30), Admission::Full { items: 2, bytes: 80 });
    assert_eq!(l.admit(20), Admission::Admit);
    let d = l.decide_lease(meta(0, 40), None, UnixMillis(0));
    l.on_leased(Seq(0), meta(0, 40), d);
    l.on_completed(Seq(0));
    // The reply still holds an item slot, but its payload no longer counts.
    assert_eq!(
        l.stats(),
        QueueStats {
            pending: 1,
            leased: 0,
            outbox: 1,
            dead: 0,
            bytes: 40
        }
    );
    l.on_enqueued(Seq(2), 60);
    assert_eq!(l.admit(1), Admission::Full { items: 3, bytes: 100 });
    l.on_reply_acked();
    assert_eq!(l.admit(1), Admission::Full { items: 2, bytes: 100 });
    assert_eq!(l.admit(0), Admission::Admit);
    assert_eq!(l.admit(101), Admission::TooLarge { max_bytes: 100 });
}

#[test]
fn sequence_numbers_continue_after_the_recovered_one() {
    let mut l = Ledger::new(
        limits(3, 100, 3),
        Recovered {
            next_seq: 41,
            ..Recovered::default()
        },
    );
    assert_eq!(l.next_seq(), Seq(41));
    l.on_enqueued(Seq(41), 1);
    assert_eq!(l.next_seq(), Seq(42));
}

#[test]
fn lease_counts_an_attempt_and_sets_the_visibility_deadline() {
    let l = Ledger::new(limits(3, 100, 3), Recovered::default());
    let d = l.decide_lease(meta(1, 5), None, UnixMillis(1_000));
    assert_eq!(
        d,
        LeaseDecision::Work {
            attempt: 2,
            expires_at: UnixMillis(11_000)
        }
    );
}

#[test]
fn past_deadline_is_expired_and_future_deadline_is_work() {
    let l = Ledger::new(limits(3, 100, 3), Recovered::default());
    let now = UnixMillis(5_000);
    assert!(matches!(
        l.decide_lease(meta(0, 5), Some(now), now),
        LeaseDecision::Expired { .. }
    ));
    let later = Some(UnixMillis(5_001));
    assert!(matches!(
        l.decide_lease(meta(0, 5), later, now),
        LeaseDecision::Work { .. }
    ));
}

#[test]
fn item_is_dead_lettered_once_attempts_reach_the_maximum() {
    let l = Ledger::new(limits(3, 100, 2), Recovered::default());
    let now = UnixMillis(0);
    assert!(matches!(
        l.decide_lease(meta(1, 5), None, now),
        LeaseDecision::Work { attempt: 2, .. }
    ));
    // Dead-lettering wins over an expired deadline: the poison item is kept for inspection.
    let d = l.decide_lease(meta(2, 5), Some(now), now);
    assert!(matches!(d, LeaseDecision::DeadLetter { attempts: 2, .. }));
    assert_eq!(d.attempts_after(), 2);
}

#[test]
fn release_restores_attempts_and_expiry_keeps_them() {
    let mut l = Ledger::new(
        limits(3, 100, 3),
        Recovered {
            pending: 1,
            pending_bytes: 9,
            ..Default::default()
        },
    );
    let d = l.decide_lease(meta(0, 9), None, UnixMillis(0));
    l.on_leased(Seq(0), meta(0, 9), d);
    let lease = l.lease(Seq(0)).unwrap();
    assert_eq!(Ledger::requeue_meta(lease, false), meta(0, 9));
    assert_eq!(Ledger::requeue_meta(lease, true), meta(1, 9));
    l.on_requeued(Seq(0));
    assert_eq!(
        l.stats(),
        QueueStats {
            pending: 1,
            leased: 0,
            outbox: 0,
            dead: 0,
            bytes: 9
        }
    );
}

#[test]
fn expired_leases_are_found_at_their_deadline() {
    let mut l = Ledger::new(
        limits(9, 100, 3),
        Recovered {
            pending: 2,
            pending_bytes: 2,
            ..Default::default()
        },
    );
    let d0 = l.decide_lease(meta(0, 1), None, UnixMillis(0));
    l.on_leased(Seq(0), meta(0, 1), d0);
    let d1 = l.decide_lease(meta(0, 1), None, UnixMillis(5_000));
    l.on_leased(Seq(1), meta(0, 1), d1);
    assert!(l.expired_leases(UnixMillis(9_999)).is_empty());
    assert_eq!(l.expired_leases(UnixMillis(10_000)), vec![Seq(0)]);
    assert_eq!(l.expired_leases(UnixMillis(20_000)), vec![Seq(0), Seq(1)]);
}

#[test]
fn completing_an_unknown_seq_changes_nothing() {
    let mut l = Ledger::new(limits(3, 100, 3), Recovered::default());
    l.on_completed(Seq(9));
    l.on_requeued(Seq(9));
    assert_eq!(l.stats(), QueueStats::default());
}

#[test]
fn dead_letters_beyond_the_cap_are_pruned_oldest_first() {
    let mut l = Ledger::new(
        limits(3, 100, 3),
        Recovered {
            dead: 2,
            ..Default::default()
        },
    );
    assert_eq!(l.dead_excess(), 0);
    l.on_dead_written(false);
    assert_eq!(l.dead_excess(), 0);
    l.on_dead_written(true);
    assert_eq!(l.dead_excess(), 1);
    l.on_dead_pruned();
    assert_eq!(l.stats().dead, 2);
}
