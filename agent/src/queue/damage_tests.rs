//! The queue on damaged storage: undecodable records, garbage directories, an earlier
//! version's sled queue, foreign and corrupt databases, unknown layouts, quarantine, and a
//! database already in use.

use std::path::Path;

use super::layout;
use super::tests::{T0, enqueued, ready, reply, request, roomy, stats};
use super::*;

/// Rewrites one raw value with the queue closed, as a disk fault or a bug would.
fn poke(dir: &Path, table: &str, key: i64, value: &[u8]) {
    let db = rusqlite::Connection::open(dir.join(layout::DB_FILE)).unwrap();
    db.execute(
        &format!("INSERT OR REPLACE INTO {table} (seq, v) VALUES (?1, ?2)"),
        rusqlite::params![key, value],
    )
    .unwrap();
}

fn key(seq: Seq) -> i64 {
    i64::try_from(seq.get()).unwrap()
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
    poke(dir.path(), layout::ITEMS, key(seqs[1]), b"\x01garbage");
    poke(dir.path(), layout::PENDING, key(seqs[2]), b"not an index entry");
    poke(dir.path(), layout::OUTBOX, key(seqs[0]), b"\x07");
    poke(dir.path(), layout::PENDING, -5, b"");

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

fn garbage(len: u32) -> Vec<u8> {
    (0..len)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

fn assert_damaged(err: &QueueError, path: &Path, what: &str) {
    let msg = err.to_string();
    assert!(matches!(err, QueueError::Damaged { .. }), "{what}: {err:?}");
    assert!(!err.is_retryable(), "{what}");
    assert!(
        msg.contains(&path.display().to_string()) && msg.contains("move the directory aside"),
        "{what}: {msg}"
    );
}

#[test]
fn open_on_garbage_directory_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    // A queue directory of an earlier version (sled's files), as a power cut left it.
    let sled = dir.path().join("queue");
    std::fs::create_dir(&sled).unwrap();
    std::fs::write(sled.join("conf"), b"").unwrap();
    std::fs::write(sled.join("db"), garbage(64 * 1024)).unwrap();
    let err = Queue::open(&sled, roomy()).unwrap_err();
    assert_damaged(&err, &sled, "sled directory");
    assert!(err.to_string().contains("sled"), "{err}");
    assert_eq!(
        std::fs::read(sled.join("db")).unwrap(),
        garbage(64 * 1024),
        "nothing was touched"
    );
    assert!(!sled.join(layout::DB_FILE).exists(), "nothing was added");

    // Our file name holding garbage, and a valid SQLite database that is not a queue.
    let junk = dir.path().join("junk");
    std::fs::create_dir(&junk).unwrap();
    std::fs::write(junk.join(layout::DB_FILE), garbage(64 * 1024)).unwrap();
    assert_damaged(&Queue::open(&junk, roomy()).unwrap_err(), &junk, "garbage file");
    assert_eq!(
        std::fs::read(junk.join(layout::DB_FILE)).unwrap(),
        garbage(64 * 1024)
    );

    let foreign = dir.path().join("foreign");
    std::fs::create_dir(&foreign).unwrap();
    let db = rusqlite::Connection::open(foreign.join(layout::DB_FILE)).unwrap();
    db.execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);")
        .unwrap();
    drop(db);
    let err = Queue::open(&foreign, roomy()).unwrap_err();
    assert_damaged(&err, &foreign, "foreign database");
    assert!(err.to_string().contains("not an edge-agent queue"), "{err}");

    let other = dir.path().join("not-a-queue");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("notes.txt"), "hello").unwrap();
    assert_damaged(&Queue::open(&other, roomy()).unwrap_err(), &other, "other files");
    assert!(matches!(
        Queue::open(other.join("notes.txt"), roomy()),
        Err(QueueError::Damaged { .. })
    ));
}

#[test]
fn unknown_layout_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(Queue::open(dir.path(), roomy()).unwrap());
    let db = rusqlite::Connection::open(dir.path().join(layout::DB_FILE)).unwrap();
    db.pragma_update(None, "user_version", 9).unwrap();
    drop(db);
    let err = Queue::open(dir.path(), roomy()).unwrap_err();
    assert!(err.to_string().contains("layout version is 9"), "{err}");
}

#[test]
fn corrupt_database_pages_are_refused_not_skipped() {
    // Damage SQLite's own checks find: bytes flipped inside the table pages (what a failing
    // card does), and a file cut short. Both stop the open instead of losing requests quietly.
    type Damage = fn(&mut Vec<u8>);
    let damages: [(&str, Damage); 2] = [
        ("flipped bytes in the tables", |b| {
            for page in (2..b.len() / 4096).step_by(2) {
                let at = page * 4096 + 8;
                b[at..at + 64].iter_mut().for_each(|x| *x ^= 0x5A);
            }
        }),
        ("truncated file", |b| b.truncate(b.len() / 2)),
    ];
    for (what, damage) in damages {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::open(dir.path(), roomy()).unwrap();
        for i in 0..50 {
            enqueued(&q, &request(&format!("r{i}"), 3_000));
        }
        drop(q); // closing checkpoints the log into the database file
        let db = dir.path().join(layout::DB_FILE);
        let mut bytes = std::fs::read(&db).unwrap();
        assert!(bytes.len() > 100_000, "{what}: the records are in the file");
        damage(&mut bytes);
        std::fs::write(&db, &bytes).unwrap();
        let err = Queue::open(dir.path(), roomy()).unwrap_err();
        assert_damaged(&err, dir.path(), what);
        assert!(
            Queue::open(dir.path(), roomy()).is_err(),
            "{what}: refused again, not forgotten"
        );
        assert_eq!(std::fs::read(&db).unwrap(), bytes, "{what}: nothing was touched");
    }
}

#[test]
fn quarantine_moves_a_damaged_queue_aside_and_starts_empty() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("queue");
    std::fs::create_dir(&path).unwrap();
    std::fs::write(path.join(layout::DB_FILE), garbage(10_000)).unwrap();

    let err = Queue::open_or_quarantine(&path, roomy(), OnDamage::Refuse).unwrap_err();
    assert!(matches!(err, QueueError::Damaged { .. }), "{err:?}");
    assert_eq!(
        std::fs::read(path.join(layout::DB_FILE)).unwrap(),
        garbage(10_000)
    );

    let (q, quarantined) = Queue::open_or_quarantine(&path, roomy(), OnDamage::Quarantine).unwrap();
    let quarantined = quarantined.expect("the damaged queue was moved aside");
    assert!(
        quarantined
            .moved_to
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("queue.damaged-"),
        "{quarantined:?}"
    );
    assert_eq!(
        std::fs::read(quarantined.moved_to.join(layout::DB_FILE)).unwrap(),
        garbage(10_000),
        "kept as it was for inspection"
    );
    assert!(!quarantined.reason.is_empty());
    assert_eq!(q.stats(), stats(0, 0, 0, 0, 0));
    let seq = enqueued(&q, &request("after", 5));
    drop(q);

    // A healthy queue is never moved.
    let (q, none) = Queue::open_or_quarantine(&path, roomy(), OnDamage::Quarantine).unwrap();
    assert_eq!(none, None);
    assert_eq!(ready(&q, T0).seq(), seq);
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
