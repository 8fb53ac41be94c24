//! Issue 17, part 4: what a third-party client sees of replies and of the final status.
//!
//! 1. A reply the broker acknowledged leaves the outbox, whatever happened before (SIGKILLs
//!    and restarts with a persistent session), with Eclipse Paho (Python, MQTT 5) as the
//!    application;
//! 2. after SIGTERM with replies still outstanding, the retained status says `offline`.
//!
//! Real Mosquitto with persistence, real `edge-agent run` processes, the real EfficientNet-Lite0
//! bundle.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use edge_e2e::daemon::{Agent, AgentSpec, Mosquitto, PahoClient, TestClient};
use edge_e2e::{efficientnet_bundle, shared_models};

use crate::conformance::var;
use crate::daemon::block;
use crate::powercut::{queue_state, wait_for_outbox};

/// The agent's outbox, once it is empty or after `timeout`.
fn outbox_after(agent: &Agent, timeout: Duration) -> f64 {
    let end = Instant::now() + timeout;
    loop {
        let outbox = queue_state(agent).get("outbox").copied().unwrap_or(f64::NAN);
        if outbox == 0.0 || Instant::now() > end {
            return outbox;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The lines of `log` that contain `what`, without terminal colours.
fn lines_with(log: &str, what: &str) -> Vec<String> {
    log.lines()
        .map(strip_colours)
        .filter(|l| l.contains(what))
        .collect()
}

/// The queue sequence numbers of a `publishing replies not yet acknowledged ... seqs=[..]` line.
fn seqs_in(line: &str) -> Vec<u64> {
    let Some(list) = line
        .split("seqs=[")
        .nth(1)
        .and_then(|rest| rest.split(']').next())
    else {
        panic!("no seqs in {line:?}");
    };
    list.split(',')
        .map(|n| {
            n.trim()
                .parse()
                .unwrap_or_else(|e| panic!("seq {n:?} in {line:?}: {e}"))
        })
        .collect()
}

/// `line` without its ANSI escape sequences (`ESC [ ... m`).
fn strip_colours(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// 200 requests from Paho in 4 rounds of 50; in each of the first 3 the agent is SIGKILLed
/// after a seeded-random number of replies and restarted on its queue (the broker keeps its
/// session). Before each kill the broker is paused until replies wait in the outbox, so every
/// restart starts by publishing the outbox again (as in the report: `outbox=1` at each
/// start). After each round, once every request sent is answered, the outbox must empty: each
/// reply in it was published and acknowledged by the broker; no reply is published again at
/// two starts (one that was must have left the outbox in between); the agent never had to
/// resynchronise its publish tracker. Then SIGTERM: stopped with nothing left. Duplicates
/// (at-least-once) are counted and printed.
#[test]
fn every_reply_the_broker_acknowledged_leaves_the_outbox_across_kill_9_restarts() {
    const DEVICE: &str = "cam-outbox";
    const ROUNDS: usize = 4;
    const PER_ROUND: usize = 50;
    let python = PathBuf::from(var("EDGE_MQTT_PYTHON"));
    let broker = Mosquitto::start_verbose();
    let spec = AgentSpec::new(DEVICE, &efficientnet_bundle(), Some(broker.url()))
        .env("EDGE_AGENT_LOG__LEVEL", "info,edge_agent::daemon=debug");
    let mut agent = Agent::start(spec);
    let image = shared_models().join("coffee.jpg");
    let mut paho = PahoClient::start(&python, broker.port, DEVICE, "app/outbox", &image, "po");
    let mut seed: u64 = 0x17_0004;
    let mut sent = 0;
    for round in 0..ROUNDS {
        let before = sent;
        paho.send(PER_ROUND);
        sent += PER_ROUND;
        if round + 1 < ROUNDS {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let at = before + 5 + (seed >> 33) as usize % (PER_ROUND - 10);
            let got = paho.wait_answered(at, Duration::from_secs(120));
            assert!(
                got >= at,
                "round {round}: stalled at {got} answered:\n{}",
                agent.log()
            );
            std::thread::sleep(Duration::from_millis((seed >> 40) % 100));
            broker.pause();
            wait_for_outbox(&agent, Duration::from_secs(30));
            agent.kill9();
            broker.resume();
            agent.start_again();
        }
        let got = paho.wait_answered(sent, Duration::from_secs(180));
        assert_eq!(
            got,
            sent,
            "round {round}: not every request answered:\n{}",
            agent.log()
        );
        let outbox = outbox_after(&agent, Duration::from_secs(15));
        assert_eq!(
            outbox,
            0.0,
            "round {round}: every request is answered but replies stay in the outbox\n{}\nbroker:\n{}",
            agent.log(),
            broker.log()
        );
    }
    let (_, metrics) = agent.http_get("/metrics").unwrap_or_default();
    let resyncs = metrics
        .lines()
        .find_map(|l| l.strip_prefix("edge_agent_publish_tracker_resyncs_total "))
        .unwrap_or_else(|| panic!("no resync counter in /metrics:\n{metrics}"));
    assert_eq!(
        resyncs.trim(),
        "0",
        "the publish tracker lost step with the client"
    );
    let status = agent.terminate();
    assert!(status.success(), "exit status {status}:\n{}", agent.log());
    let log = agent.log();
    let replies = paho.finish();
    let distinct = replies
        .iter()
        .filter_map(|r| r["correlation"].as_str())
        .collect::<std::collections::HashSet<_>>()
        .len();
    let errors = replies.iter().filter(|r| !r["error"].is_null()).count();
    let opened = lines_with(&log, "queue opened");
    let republished = lines_with(&log, "publishing replies not yet acknowledged");
    println!(
        "paho: {sent} requests, {} replies, {distinct} distinct, {} duplicates, {errors} errors; {} starts",
        replies.len(),
        replies.len() - distinct,
        agent.starts
    );
    for l in opened.iter().chain(&republished) {
        println!("  {l}");
    }
    assert_eq!(
        republished.len(),
        ROUNDS - 1,
        "every restart publishes the replies the kill left in the outbox: {republished:?}"
    );
    let mut seen = std::collections::HashSet::new();
    for line in &republished {
        for seq in seqs_in(line) {
            assert!(
                seen.insert(seq),
                "reply {seq} was published again at two starts: it did not leave the outbox \
                 after its first republication: {republished:?}"
            );
        }
    }
    assert_eq!(distinct, sent, "every request answered");
    assert_eq!(errors, 0, "no error replies");
    let stopped = lines_with(&log, "stopped");
    assert!(
        stopped.last().is_some_and(|l| l.contains("outbox=0")),
        "stopped with replies in the outbox: {stopped:?}"
    );
}

/// SIGTERM with replies outstanding, 4 times on the same queue: 40 requests, SIGTERM once 10
/// are answered; in 2 of the cycles the broker is paused (SIGSTOP) across the SIGTERM and
/// resumed 2 s later, so nothing the agent sends is acknowledged meanwhile. After each, a new
/// subscriber must get the retained status `offline` (from the final status or, if the broker
/// could not acknowledge it in time, from the last will).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_sigterm_with_replies_outstanding_the_retained_status_is_offline() {
    const DEVICE: &str = "cam-final";
    const CYCLES: usize = 4;
    const PER_CYCLE: usize = 40;
    let python = PathBuf::from(var("EDGE_MQTT_PYTHON"));
    let broker = Mosquitto::start_verbose();
    let spec = AgentSpec::new(DEVICE, &efficientnet_bundle(), Some(broker.url()));
    let mut agent = block(|| Agent::start(spec));
    let image = shared_models().join("coffee.jpg");
    let mut paho = block(|| PahoClient::start(&python, broker.port, DEVICE, "app/final", &image, "pf"));
    let status_topic = format!("edge/{DEVICE}/status");
    let mut sent = 0;
    for cycle in 0..CYCLES {
        if cycle > 0 {
            block(|| agent.start_again());
        }
        paho.send(PER_CYCLE);
        sent += PER_CYCLE;
        let answered = block(|| paho.wait_answered(sent - PER_CYCLE + 10, Duration::from_secs(120)));
        assert!(
            answered >= sent - PER_CYCLE + 10,
            "cycle {cycle}: stalled:\n{}",
            agent.log()
        );
        let paused = cycle % 2 == 1;
        let outstanding = queue_state(&agent);
        let exit = block(|| {
            std::thread::scope(|s| {
                if paused {
                    broker.pause();
                    s.spawn(|| {
                        std::thread::sleep(Duration::from_secs(2));
                        broker.resume();
                    });
                }
                agent.terminate()
            })
        });
        assert!(
            exit.success(),
            "cycle {cycle}: exit status {exit}:\n{}",
            agent.log()
        );
        let late = TestClient::connect(broker.port, &format!("t-final-{cycle}"), &[&status_topic]).await;
        let got = late
            .wait_for(&status_topic, Duration::from_secs(10), |r| !r.is_empty())
            .await;
        let state = got.first().map(|m| (m.retain, m.json()["state"].clone()));
        println!(
            "cycle {cycle}: broker paused {paused}, queue at SIGTERM {outstanding:?}, retained status {state:?}"
        );
        assert_eq!(
            state,
            Some((true, "offline".into())),
            "cycle {cycle}: the retained status after SIGTERM\nagent:\n{}\nbroker:\n{}",
            agent.log(),
            broker.log()
        );
    }
    let log = agent.log();
    for l in lines_with(&log, "offline status") {
        println!("  {l}");
    }
    block(|| paho.finish());
}
