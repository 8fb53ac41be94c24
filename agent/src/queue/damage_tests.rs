//! The queue on damaged storage: undecodable records, garbage directories, unknown layouts,
//! records sled's recovery dropped, and a database already in use.

use std::path::Path;

use super::layout;
use super::tests::{T0, enqueued, ready, reply, request, roomy, stats};
use super::*;

/// Rewrites one raw value with the queue closed, as a disk fault or a bug would.
fn poke(dir: &Path, tree: &str, key: &[u8], value: &[u8]) {
    super::store::wait_for_lock(dir).unwrap(); // the queue was closed a moment ago
    let db = sled::open(dir).unwrap();
    db.open_tree(tree).unwrap().insert(key, value).unwrap();
    db.flush().unwrap();
}

#[test]
fn corrupt_record_goes_to_dead_letter() {
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(dir.path(), roomy()).unwrap();
    let seqs: Vec<Seq> = ["a", "b", "c", "d"]
        .iter()
        .map(|id| enqueued(&q, &request(id, 10)))
        .collect();
    ready(&q, T0);
    q.complete(seqs[0], &reply("a")).unwrap();
    drop(q);
    poke(dir.path(), layout::ITEMS, &seqs[1].to_key(), b"\x01garbage");
    poke(
        dir.path(),
        layout::PENDING,
        &seqs[2].to_key(),
        b"not an index entry",
    );
    poke(dir.path(), layout::OUTBOX, &seqs[0].to_key(), b"\x07");
    poke(dir.path(), layout::PENDING, b"bad key", b"");

    let q = Queue::open(dir.path(), roomy()).unwrap();
    // The bad index and the stray key were found at open; the bad body is found when leased.
    assert_eq!(q.stats(), stats(2, 0, 1, 2, 20));
    assert_eq!(
        ready(&q, T0).seq(),
        seqs[3],
        "b (bad body) and c (bad index) are skipped"
    );
    assert!(
        q.outbox().unwrap().is_empty(),
        "the bad reply went to the dead letters"
    );
    assert_eq!(q.stats(), stats(0, 1, 0, 4, 10));
    let dead = q.dead_letters().unwrap();
    assert!(dead.iter().all(|d| d.reason == DeadReason::Undecodable));
    let body = dead.iter().find(|d| d.seq == seqs[1]).unwrap();
    assert!(body.note.contains("undecodable request record"), "{}", body.note);
    assert_eq!(body.raw_request.as_deref(), Some(&b"\x01garbage"[..]));
    let index = dead.iter().find(|d| d.seq == seqs[2]).unwrap();
    assert_eq!(
        index.request().unwrap().unwrap(),
        request("c", 10),
        "the intact body is kept"
    );
    assert!(dead.iter().any(|d| d.note.contains("malformed key")));
    drop(q);
    let q = Queue::open(dir.path(), roomy()).unwrap();
    assert_eq!(q.stats(), stats(1, 0, 0, 4, 10));
    let newest = dead.iter().map(|d| d.seq).max().unwrap();
    assert!(enqueued(&q, &request("e", 1)) > newest, "no number is reused");
}

#[test]
fn open_on_garbage_directory_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("queue");
    std::fs::create_dir(&path).unwrap();
    let garbage: Vec<u8> = (0..64 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(path.join("conf"), &garbage[..300]).unwrap();
    std::fs::write(path.join("db"), &garbage).unwrap();
    let err = Queue::open(&path, roomy()).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, QueueError::Damaged { .. }), "{err:?}");
    assert!(!err.is_retryable());
    assert!(
        msg.contains(&path.display().to_string()) && msg.contains("move the directory aside"),
        "{msg}"
    );
    assert_eq!(
        std::fs::read(path.join("db")).unwrap(),
        garbage,
        "nothing was touched"
    );

    let other = dir.path().join("not-a-queue");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("notes.txt"), "hello").unwrap();
    assert!(matches!(
        Queue::open(&other, roomy()),
        Err(QueueError::Damaged { .. })
    ));
    assert!(matches!(
        Queue::open(other.join("notes.txt"), roomy()),
        Err(QueueError::Damaged { .. })
    ));
}

#[test]
fn unknown_layout_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(Queue::open(dir.path(), roomy()).unwrap());
    poke(dir.path(), layout::META, layout::META_FORMAT, &[9]);
    let err = Queue::open(dir.path(), roomy()).unwrap_err();
    assert!(err.to_string().contains("layout version is [9]"), "{err}");
}

#[test]
fn acknowledged_records_dropped_by_sled_recovery_are_detected() {
    // sled keeps what precedes an unreadable stretch of its log and silently drops the rest;
    // a wholly garbage log opens empty. Both must stop the open, not lose requests quietly.
    type Damage = fn(&mut Vec<u8>);
    let damages: [(&str, Damage); 3] = [
        ("flipped bytes mid-log", |b| {
            let mid = b.len() / 2;
            b[mid..mid + 64].iter_mut().for_each(|x| *x ^= 0x5A);
        }),
        ("truncated log", |b| b.truncate(b.len() / 2)),
        ("garbage log", |b| {
            b.iter_mut()
                .enumerate()
                .for_each(|(i, x)| *x = (i * 7_919 % 251) as u8)
        }),
    ];
    for (what, damage) in damages {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::open(dir.path(), roomy()).unwrap();
        for i in 0..50 {
            enqueued(&q, &request(&format!("r{i}"), 3_000));
        }
        drop(q);
        let db = dir.path().join("db");
        let mut bytes = std::fs::read(&db).unwrap();
        damage(&mut bytes);
        std::fs::write(&db, &bytes).unwrap();
        let err = Queue::open(dir.path(), roomy()).unwrap_err();
        assert!(matches!(err, QueueError::Damaged { .. }), "{what}: {err:?}");
        assert!(
            err.to_string().contains("acknowledged requests are missing"),
            "{what}: {err}"
        );
        assert!(
            Queue::open(dir.path(), roomy()).is_err(),
            "{what}: refused again, not forgotten"
        );
    }
}

#[test]
fn second_open_of_a_queue_in_use_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(dir.path(), roomy()).unwrap();
    let err = Queue::open(dir.path(), roomy()).unwrap_err();
    assert!(
        matches!(err, QueueError::Locked { .. }) && err.is_retryable(),
        "{err:?}"
    );
    drop(q);
    Queue::open(dir.path(), roomy()).unwrap();
}
