//! kill -9 in the middle of enqueueing: a child process (this test binary, re-run on one
//! helper test) writes and reports what the queue acknowledged; every reported item must be
//! found after the kill.

use std::collections::BTreeSet;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::tests::{enqueued, reply, request};
use super::*;

const DIR_VAR: &str = "EDGE_QUEUE_CRASH_CHILD_DIR";
const HELPER: &str = "queue::crash_tests::crash_child_enqueues_until_killed";

fn crash_limits() -> QueueLimits {
    QueueLimits {
        max_attempts: std::num::NonZeroU32::new(100).unwrap(),
        ..super::tests::limits(1 << 20, 1 << 40, 1)
    }
}

/// Not a test on its own: a no-op unless the parent below runs it in a child process.
#[test]
fn crash_child_enqueues_until_killed() {
    let Some(dir) = std::env::var_os(DIR_VAR) else {
        return;
    };
    let q = Queue::open(&dir, crash_limits()).unwrap();
    for i in 0u64.. {
        // Images of varying size, some spanning many SQLite overflow pages.
        let seq = enqueued(&q, &request(&format!("k{i}"), 1_000 + (i as usize % 7) * 40_000));
        println!("ENQUEUED {}", seq.get());
        if i % 3 == 0
            && let Some(leased) = q.lease(UnixMillis::now()).unwrap()
        {
            q.complete(leased.seq(), &reply("k")).unwrap();
            println!("COMPLETED {}", leased.seq().get());
        }
    }
}

/// What a child reported before it died.
#[derive(Default)]
struct Reported {
    enqueued: BTreeSet<u64>,
    completed: BTreeSet<u64>,
}

fn run_child_and_kill(dir: &std::path::Path, kill_after_lines: usize) -> Reported {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", HELPER, "--nocapture", "--test-threads=1"])
        .env(DIR_VAR, dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut reported = Reported::default();
    let mut lines = BufReader::new(stdout).lines();
    let mut seen = 0;
    while seen < kill_after_lines {
        let Some(line) = lines.next() else { break };
        let line = line.unwrap();
        if let Some(seq) = line.strip_prefix("ENQUEUED ") {
            reported.enqueued.insert(seq.parse().unwrap());
            seen += 1;
        } else if let Some(seq) = line.strip_prefix("COMPLETED ") {
            reported.completed.insert(seq.parse().unwrap());
        }
    }
    child.kill().unwrap(); // SIGKILL on Unix
    // Lines already in the pipe were reported before the kill: they count too.
    for line in lines.map_while(Result::ok) {
        if let Some(seq) = line.strip_prefix("ENQUEUED ") {
            reported.enqueued.insert(seq.parse().unwrap());
        } else if let Some(seq) = line.strip_prefix("COMPLETED ") {
            reported.completed.insert(seq.parse().unwrap());
        }
    }
    child.wait().unwrap();
    reported
}

#[test]
fn acknowledged_items_survive_sigkill_during_enqueue() {
    let dir = tempfile::tempdir().unwrap();
    let mut all = Reported::default();
    let random = RandomState::new();
    for round in 0..3u64 {
        // A random moment: after 20..220 acknowledged enqueues.
        let kill_after = 20 + (random.hash_one(round) % 200) as usize;
        let reported = run_child_and_kill(dir.path(), kill_after);
        assert!(
            reported.enqueued.len() >= kill_after.min(20),
            "child reported too little"
        );
        all.enqueued.extend(reported.enqueued);
        all.completed.extend(reported.completed);

        let q = Queue::open(dir.path(), crash_limits()).unwrap();
        let outbox: BTreeSet<u64> = q.outbox().unwrap().iter().map(|(s, _)| s.get()).collect();
        let mut held = Vec::new();
        while let Some(leased) = q.lease(UnixMillis::now()).unwrap() {
            held.push(leased.seq());
        }
        for &seq in &held {
            q.release(seq).unwrap();
        }
        q.flush().unwrap();
        let present: BTreeSet<u64> = outbox
            .iter()
            .copied()
            .chain(held.iter().map(|s| s.get()))
            .collect();
        let lost: Vec<_> = all.enqueued.difference(&present).collect();
        assert!(lost.is_empty(), "round {round}: acknowledged but lost: {lost:?}");
        let lost_replies: Vec<_> = all.completed.difference(&outbox).collect();
        assert!(
            lost_replies.is_empty(),
            "round {round}: completed but no reply: {lost_replies:?}"
        );
        eprintln!(
            "round {round}: killed after {kill_after}; {} acknowledged and {} completed so far, all found",
            all.enqueued.len(),
            all.completed.len()
        );
        let stats = q.stats();
        assert_eq!((stats.pending, stats.outbox), (held.len(), outbox.len()));
        drop(q);
        std::thread::sleep(Duration::from_millis(10));
    }
}
