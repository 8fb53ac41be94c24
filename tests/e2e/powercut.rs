//! Power cuts (issue 15): `edge-agent run` with its queue and model directory on LazyFS, which
//! drops whatever was not fsynced when told to, exactly what a power cut does to a device.
//! Real Mosquitto, real agent processes, the real EfficientNet-Lite0 bundle.
//!
//! A cut: the agent is frozen (SIGSTOP: it writes nothing more), LazyFS drops its unsynced
//! data, the agent is SIGKILLed and started again on the same directories.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use edge_e2e::daemon::{Agent, AgentSpec, Mosquitto, TestClient, free_port};
use edge_e2e::efficientnet_bundle;
use edge_e2e::lazyfs::LazyFs;
use serde_json::{Value, json};

use crate::daemon::{agent_pubacks, block, summarize, wait_answered};
use crate::faults::queued_ids;
use crate::reload::{efficientnet_version, sha256};

/// The longest an agent may take to serve again after a cut (issue 15).
const BACK_WITHIN: Duration = Duration::from_secs(5);

/// A small JPEG (a few KB): the test is about the queue, not inference speed.
fn small_coffee() -> Vec<u8> {
    let photo = std::fs::read(edge_e2e::shared_models().join("coffee.jpg")).unwrap();
    let img = image::load_from_memory(&photo).expect("coffee.jpg decodes");
    let mut out = std::io::Cursor::new(Vec::new());
    img.thumbnail(160, 160)
        .write_to(&mut out, image::ImageFormat::Jpeg)
        .expect("encode JPEG");
    out.into_inner()
}

/// A seeded pseudo-random sequence (reproducible moments).
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

/// Items in the agent's queue by state, from `/metrics` (0 when it cannot be read).
pub(crate) fn queue_state(agent: &Agent) -> HashMap<&'static str, f64> {
    let (_, body) = agent.http_get("/metrics").unwrap_or_default();
    ["pending", "leased", "outbox"]
        .into_iter()
        .map(|s| {
            let prefix = format!("edge_agent_queue_items{{state=\"{s}\"}} ");
            let v = body
                .lines()
                .find_map(|l| l.strip_prefix(&prefix)?.parse::<f64>().ok())
                .unwrap_or(0.0);
            (s, v)
        })
        .collect()
}

/// Waits until the agent's outbox holds a reply (the broker paused, so none is acknowledged).
///
/// The reply must stay there for [`OUTBOX_SETTLE`]: with the broker paused nothing can
/// acknowledge it, except an acknowledgement the broker sent just before it stopped, still on
/// its way to the agent, which can empty the outbox after it was seen non-empty (a kill then
/// leaves nothing to republish: seen once in CI, the restart's queue opened with `outbox=0`).
pub(crate) fn wait_for_outbox(agent: &Agent, within: Duration) {
    let start = Instant::now();
    let mut seen_since: Option<Instant> = None;
    loop {
        if queue_state(agent)["outbox"] >= 1.0 {
            if seen_since.get_or_insert_with(Instant::now).elapsed() >= OUTBOX_SETTLE {
                return;
            }
        } else {
            seen_since = None;
        }
        assert!(
            start.elapsed() < within,
            "no reply stayed in the outbox within {within:?} with the broker paused"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How long a reply must stay in the outbox, the broker paused, for [`wait_for_outbox`]:
/// acknowledgements already sent reach the agent within milliseconds.
const OUTBOX_SETTLE: Duration = Duration::from_millis(200);

/// Every bundle in the model directory is one of `known` whole (never torn or empty).
fn assert_whole_bundles(models: &Path, known: &[String], cut: usize) {
    for name in ["current.bundle", "previous.bundle"] {
        let path = models.join(name);
        if path.exists() {
            let digest = sha256(&path);
            assert!(
                known.contains(&digest),
                "after cut {cut}: {name} is not a whole bundle ({} bytes, sha256 {digest})",
                std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0)
            );
        }
    }
}

/// 20 cuts at seeded-random moments while 1,200 requests arrive in bursts of 8 (so the
/// agent commits them in groups), with a model reload in flight at 4 of the cuts and the
/// broker paused before 3 of them until a reply waits in the agent's outbox. Asserts:
/// every request the agent acknowledged (its `queued` log line, written once the request's
/// commit was fsynced) is answered; every request sent is answered (the broker redelivers what
/// the agent had not acknowledged), none with an error; after every cut the agent is ready
/// again within 5 s; the model directory only ever holds whole bundles.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_cuts_lose_no_acknowledged_request_and_the_agent_is_back_within_5_s() {
    const DEVICE: &str = "cam-cut";
    const REQUESTS: usize = 1_200;
    const BURST: usize = 8;
    const CUTS: usize = 20;
    const RELOAD_EVERY: usize = 5;
    const HOLD_REPLIES_EVERY: usize = 8;

    let mut fs = block(|| LazyFs::mount().expect("LazyFS mounts (needs /dev/fuse and root)"));
    let queue_dir = fs.path().join("queue");
    let models = fs.path().join("models");
    let versions = tempfile::tempdir().unwrap();
    let v1 = efficientnet_bundle();
    let v2 = efficientnet_version(versions.path(), "2");
    let known = [sha256(&v1), sha256(&v2)];

    let broker = Mosquitto::start_verbose();
    let spec = AgentSpec::new(DEVICE, &v1, Some(broker.url()))
        .env("EDGE_AGENT_LOG__FORMAT", "json")
        .env("EDGE_AGENT_LOG__LEVEL", "info,edge_agent::daemon=debug");
    let mut agent = block(|| Agent::start_in(spec, &queue_dir));
    let client = Arc::new(TestClient::connect(broker.port, "t-cut", &["app/cut"]).await);

    let image = small_coffee();
    let ids: Vec<String> = (0..REQUESTS).map(|i| format!("pc-{i}")).collect();
    let publisher = {
        let (client, ids) = (client.clone(), ids.clone());
        tokio::spawn(async move {
            for burst in ids.chunks(BURST) {
                for id in burst {
                    let topic = format!("edge/{DEVICE}/classify");
                    client.request(&topic, &image, "app/cut", id, &[("id", id)]).await;
                }
                tokio::time::sleep(Duration::from_millis(160)).await;
            }
        })
    };

    let mut rng = Lcg(0x0c07_2026);
    let mut back_after = Vec::new();
    let mut states = Vec::new();
    let mut reloads = 0;
    let mut holds = 0;
    for cut in 1..=CUTS {
        tokio::time::sleep(Duration::from_millis(300 + rng.below(1_200))).await;
        let reloading = cut % RELOAD_EVERY == 0;
        if reloading {
            // Alternate between the two versions so every reload copies a bundle in.
            let source = if reloads % 2 == 0 { &v2 } else { &v1 };
            let doc = json!({"command": "reload", "source": source, "sha256": sha256(source), "id": format!("r{cut}")});
            client
                .publish(
                    &format!("edge/{DEVICE}/control"),
                    serde_json::to_vec(&doc).unwrap(),
                )
                .await;
            reloads += 1;
            tokio::time::sleep(Duration::from_millis(rng.below(400))).await;
        }
        // At some cuts the broker is paused first, until the agent holds replies it sent and
        // the broker has not acknowledged: the cut then lands on a non-empty outbox for sure
        // rather than by luck of timing.
        let hold_replies = cut % HOLD_REPLIES_EVERY == 3;
        if hold_replies {
            holds += 1;
            broker.pause();
            block(|| wait_for_outbox(&agent, Duration::from_secs(10)));
        }
        let state = block(|| queue_state(&agent));
        block(|| agent.freeze());
        block(|| fs.clear_cache()).unwrap_or_else(|e| panic!("cut {cut}: {e:#}\n{}", fs.log()));
        if hold_replies {
            broker.resume();
        }
        let took = block(|| agent.restart_after_cut(Duration::from_secs(60)));
        assert_whole_bundles(&models, &known, cut);
        println!(
            "cut {cut:2}: pending {:>3} leased {} outbox {:>2}{} -> ready again in {} ms",
            state["pending"],
            state["leased"],
            state["outbox"],
            if reloading { ", model reload in flight" } else { "" },
            took.as_millis()
        );
        back_after.push(took);
        states.push((state, reloading));
    }
    publisher.await.unwrap();
    wait_answered(&client, "app/cut", &ids, Duration::from_secs(300)).await;

    let by_id = client.replies_by_id("app/cut");
    let queued = queued_ids(&agent.log());
    let unanswered: Vec<&String> = queued.iter().filter(|id| !by_id.contains_key(*id)).collect();
    let duplicates: usize = by_id.values().map(|v| v.len().saturating_sub(1)).sum();
    let worst = back_after.iter().max().copied().unwrap_or_default();
    let with = |s: &str| states.iter().filter(|(st, _)| st[s] > 0.0).count();
    println!(
        "power cuts: {CUTS} cuts, {} with requests pending, {} leased, {} replies in the outbox, \
         {reloads} during a model reload; requests sent {REQUESTS} / acknowledged by the agent \
         (distinct ids) {} / answered {} / duplicated {duplicates}; worst time to ready {} ms",
        with("pending"),
        with("leased"),
        with("outbox"),
        queued.len(),
        by_id.len(),
        worst.as_millis()
    );
    assert!(
        unanswered.is_empty(),
        "{} acknowledged requests never answered: {:?}",
        unanswered.len(),
        &unanswered[..unanswered.len().min(10)]
    );
    summarize(
        "power cuts",
        &ids,
        &by_id,
        agent_pubacks(&broker, &format!("edge-agent-{DEVICE}")),
    );
    assert!(
        queued.len() >= REQUESTS,
        "the agent acknowledged only {} distinct requests",
        queued.len()
    );
    assert!(
        worst <= BACK_WITHIN,
        "the agent took {worst:?} to be ready after a cut: {back_after:?}"
    );
    assert_eq!(reloads, CUTS / RELOAD_EVERY);
    assert!(
        with("leased") > 0 && with("outbox") >= holds,
        "the cuts caught no lease, or fewer replies in the outbox than the {holds} cuts made \
         with the broker paused: {states:?}"
    );
}

/// The queue directory a power cut left behind under sled (`../shared/fixtures/sled-powerloss`),
/// unpacked.
fn sled_fixture(into: &Path) -> std::path::PathBuf {
    let tarball = edge_e2e::lazyfs::shared_dir().join("fixtures/sled-powerloss/queue-after-power-cut.tar.gz");
    let queue = into.join("queue");
    std::fs::create_dir_all(&queue).unwrap();
    let status = Command::new("tar")
        .arg("xzf")
        .arg(&tarball)
        .arg("-C")
        .arg(&queue)
        .status()
        .expect("run tar");
    assert!(status.success(), "cannot unpack {}", tarball.display());
    queue
}

/// The agent pointed at the sled queue a power cut left behind: by default it exits within 5 s
/// with a clear error and touches nothing; with `queue.on_damage = "quarantine"` it moves the
/// directory aside, serves within 5 s and says so in its status and metrics. Never spins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sled_power_cut_fixture_is_refused_or_quarantined_never_spun_on() {
    let dir = tempfile::tempdir().unwrap();
    let queue = sled_fixture(dir.path());
    let before: HashSet<String> = std::fs::read_dir(&queue)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let spec = AgentSpec::new("cam-sled", &efficientnet_bundle(), None).env(
        "EDGE_AGENT_EMBEDDED_BROKER__LISTEN",
        format!("127.0.0.1:{}", free_port()),
    );

    let started = Instant::now();
    let out = spec
        .command(&queue, free_port())
        .stderr(Stdio::piped())
        .output()
        .expect("run edge-agent");
    let took = started.elapsed();
    let log = String::from_utf8_lossy(&out.stderr);
    println!("refuse: exit {} after {} ms", out.status, took.as_millis());
    assert!(!out.status.success(), "{log}");
    assert!(took <= BACK_WITHIN, "took {took:?} to give up:\n{log}");
    assert!(
        log.contains("sled") && log.contains("move the directory aside"),
        "the error says what and what to do:\n{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
    let after: HashSet<String> = std::fs::read_dir(&queue)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(before, after, "nothing added or removed");

    let broker = Mosquitto::start();
    let client = TestClient::connect(broker.port, "t-sled", &["edge/cam-sled/status", "app/sled"]).await;
    let spec = AgentSpec::new("cam-sled", &efficientnet_bundle(), Some(broker.url()))
        .env("EDGE_AGENT_QUEUE__ON_DAMAGE", "quarantine");
    let started = Instant::now();
    let agent = block(|| Agent::start_in(spec, &queue));
    let took = started.elapsed();
    println!("quarantine: ready after {} ms", took.as_millis());
    assert!(took <= BACK_WITHIN, "took {took:?} to serve:\n{}", agent.log());
    assert_eq!(agent.metric("edge_agent_queue_quarantined_total"), 1.0);
    let moved: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("queue.damaged-")
        })
        .collect();
    assert_eq!(moved.len(), 1, "{moved:?}");
    assert!(
        moved[0].join("db").exists() && moved[0].join("conf").exists(),
        "kept for inspection"
    );
    let status = client
        .wait_for("edge/cam-sled/status", Duration::from_secs(10), |r| {
            r.iter()
                .any(|m| m.json()["last_error"]["code"] == "queue_quarantined")
        })
        .await;
    let last: Value = status.last().unwrap().json();
    assert_eq!(last["last_error"]["code"], "queue_quarantined", "{last}");
    assert!(
        last["last_error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("damaged"),
        "{last}"
    );
    assert!(
        agent.log().contains("moved aside"),
        "the log says so:\n{}",
        agent.log()
    );
    // And it serves.
    client
        .request(
            "edge/cam-sled/classify",
            &small_coffee(),
            "app/sled",
            "after",
            &[("id", "after")],
        )
        .await;
    let replies = client
        .wait_for("app/sled", Duration::from_secs(30), |r| !r.is_empty())
        .await;
    assert!(replies[0].json()["top"].is_array(), "{}", replies[0].json());
}
