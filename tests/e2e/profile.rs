//! `edge-convert profile` and the runtime-settings tuner: the per-node profile of a real
//! bundle, the tuning cache beside it (written once, read back, invalidated by new bytes),
//! the agent's status naming the settings, and clean refusals.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use edge_e2e::daemon::{Agent, AgentSpec, Mosquitto, TestClient};
use edge_e2e::{assert_clean_failure, bin, run, stderr, stdout};
use serde_json::Value;

use crate::classify_photos::efficientnet_bundle;
use crate::daemon::{block, inception_bundle};

fn profile(bundle: &Path, args: &[&str]) -> Value {
    let out = run(Command::new(bin("edge-convert"))
        .arg("profile")
        .arg(bundle)
        .args(args)
        .arg("--json"));
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_str(&stdout(&out)).expect("profile --json prints JSON")
}

/// Whether this CPU has AVX-512 (the tuner then compares tract's kernels with its AVX2 ones).
fn has_avx512() -> bool {
    std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| {
        c.lines()
            .any(|l| l.starts_with("flags") && l.split_whitespace().any(|f| f == "avx512f"))
    })
}

/// The EfficientNet-Lite0 bundle copied into a directory of its own (the tuning cache goes
/// beside it).
fn private_efficientnet(dir: &Path) -> PathBuf {
    let bundle = dir.join("effnet.bundle");
    std::fs::copy(efficientnet_bundle(), &bundle).unwrap();
    bundle
}

#[test]
fn profile_times_every_node_of_inception_and_accounts_for_all_the_time() {
    let v = profile(
        &inception_bundle(),
        &["--tuning", "off", "--runs", "2", "--threads", "1"],
    );
    assert_eq!(v["settings"]["origin"], "default", "{}", v["settings"]);
    assert_eq!(v["threads"], 1);
    let p = &v["profile"];
    assert_eq!(p["runs"], 2);
    let nodes = p["nodes"].as_array().unwrap();
    let ops = p["ops"].as_array().unwrap();
    // Inception V3 optimised: hundreds of nodes, matrix products among the kinds.
    assert!(nodes.len() > 300, "{} nodes", nodes.len());
    assert!(ops.iter().any(|o| o["op"] == "OptMatMul"), "{ops:?}");
    // Every node is in exactly one kind, and shares add up to the whole.
    let in_kinds: u64 = ops.iter().map(|o| o["nodes"].as_u64().unwrap()).sum();
    assert_eq!(in_kinds as usize, nodes.len());
    let shares: f64 = nodes.iter().map(|n| n["share"].as_f64().unwrap()).sum();
    assert!((shares - 1.0).abs() < 1e-6, "shares sum to {shares}");
    let kind_shares: f64 = ops.iter().map(|o| o["share"].as_f64().unwrap()).sum();
    assert!(
        (kind_shares - 1.0).abs() < 1e-6,
        "kind shares sum to {kind_shares}"
    );
    let node_ms: f64 = nodes.iter().map(|n| n["ms"].as_f64().unwrap()).sum();
    assert!((node_ms - p["nodes_ms"].as_f64().unwrap()).abs() < 1e-6);
    // tract's cost model: 5.7 G multiply-adds for Inception V3 at 299x299, all in nodes
    // that report GFLOP/s.
    let macs = p["multiply_adds"].as_u64().unwrap() as f64;
    assert!((5.0e9..6.5e9).contains(&macs), "{macs}");
    for n in nodes {
        assert!(n["ms"].as_f64().unwrap() >= 0.0, "{n}");
        let has_cost = n["multiply_adds"].as_u64().unwrap() > 0;
        assert_eq!(
            has_cost,
            n["gflops"].as_f64().unwrap() > 0.0 || n["ms"] == 0.0,
            "{n}"
        );
    }
    // Matrix products say what they multiply (tract's OptMatMul: its kernel and sizes).
    assert!(
        nodes
            .iter()
            .any(|n| n["op"] == "OptMatMul" && n["info"].as_str().unwrap().contains("k:")),
        "no OptMatMul tells its sizes"
    );
    // Ops are listed slowest first.
    let ms: Vec<f64> = ops.iter().map(|o| o["ms"].as_f64().unwrap()).collect();
    assert!(ms.windows(2).all(|w| w[0] >= w[1]), "{ms:?}");

    // The text form names the settings and the slowest nodes.
    let out = run(Command::new(bin("edge-convert"))
        .arg("profile")
        .arg(inception_bundle())
        .args(["--tuning", "off", "--runs", "1", "--top", "3"]));
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("runtime settings: tract defaults"), "{text}");
    assert!(
        text.contains("slowest nodes:") && text.contains("OptMatMul"),
        "{text}"
    );
}

#[test]
fn tuning_is_cached_beside_the_bundle_and_redone_for_new_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = private_efficientnet(dir.path());
    let cache = dir.path().join("edge-tuning.json");

    let first = profile(&bundle, &["--runs", "1", "--tuning-budget-secs", "60"]);
    let s = &first["settings"];
    assert_eq!(s["origin"], "tuned", "{s}");
    assert!(s["tuning_ms"].as_f64().unwrap() > 0.0, "{s}");
    let m = &s["measured"];
    assert_eq!(m["threads"], 1);
    assert!(m["default_ms"].as_f64().unwrap() > 0.0, "{m}");
    assert!(
        m["chosen_ms"].as_f64().unwrap() <= m["default_ms"].as_f64().unwrap(),
        "{m}"
    );
    assert!(!m["trials"].as_array().unwrap().is_empty(), "{m}");
    assert!(cache.is_file(), "the choice is cached beside the bundle");
    // On an AVX-512 CPU, tract's detection was timed against its AVX2 kernels, each in child
    // processes of edge-convert (tract fixes its instruction set once per process).
    let isa = &s["isa"];
    if has_avx512() {
        assert_eq!(isa["candidate"], "-avx512f", "{s}");
        assert!(isa["native_ms"].as_f64().unwrap() > 0.0, "{isa}");
        assert!(isa["candidate_ms"].as_f64().unwrap() > 0.0, "{isa}");
        let cached: Value = serde_json::from_str(&std::fs::read_to_string(&cache).unwrap()).unwrap();
        assert_eq!(&cached["entries"][0]["isa"], isa, "{cached}");
    } else {
        assert!(isa.is_null(), "nothing to compare without AVX-512: {s}");
    }

    // Same bytes, same CPU: read from the cache, no tuning.
    let second = profile(&bundle, &["--runs", "1"]);
    assert_eq!(second["settings"]["origin"], "cached", "{}", second["settings"]);
    assert_eq!(second["settings"]["tuning_ms"], 0.0);
    assert_eq!(second["settings"]["settings"], s["settings"]);
    assert_eq!(
        second["settings"]["isa"], s["isa"],
        "the cached comparison is reported"
    );

    // The same bytes under another name (a copy: new inode and mtime) are found by sha256.
    let copy = dir.path().join("copy.bundle");
    std::fs::copy(&bundle, &copy).unwrap();
    let third = profile(&copy, &["--runs", "1"]);
    assert_eq!(third["settings"]["origin"], "cached", "{}", third["settings"]);

    // New bytes (another model version): tuned again.
    let changed = dir.path().join("changed.bundle");
    edge_e2e::rewrite_manifest(&bundle, &changed, |m| m["model"]["version"] = "2".into());
    let fourth = profile(&changed, &["--runs", "1", "--tuning-budget-secs", "60"]);
    assert_eq!(fourth["settings"]["origin"], "tuned", "{}", fourth["settings"]);

    // A damaged cache is not an error: the bundle is tuned again and the cache rewritten.
    std::fs::write(&cache, "{ not json").unwrap();
    let fifth = profile(&bundle, &["--runs", "1", "--tuning-budget-secs", "60"]);
    assert_eq!(fifth["settings"]["origin"], "tuned", "{}", fifth["settings"]);
    let text = std::fs::read_to_string(&cache).unwrap();
    assert!(serde_json::from_str::<Value>(&text).is_ok(), "{text}");
}

/// An operator's own `TRACT_CPU_ISA` is respected: no comparison, and the cache keys it.
#[test]
fn an_operators_tract_cpu_isa_is_not_second_guessed() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = private_efficientnet(dir.path());
    let out = run(Command::new(bin("edge-convert"))
        .env("TRACT_CPU_ISA", "-avx512f")
        .args(["profile", "--runs", "1", "--tuning-budget-secs", "60", "--json"])
        .arg(&bundle));
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["settings"]["origin"], "tuned", "{}", v["settings"]);
    assert!(v["settings"]["isa"].is_null(), "{}", v["settings"]);
    let cache = std::fs::read_to_string(dir.path().join("edge-tuning.json")).unwrap();
    assert!(cache.contains("TRACT_CPU_ISA=-avx512f"), "{cache}");
}

#[test]
fn profile_refuses_bad_bundles_and_settings_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let convert = || {
        let mut c = Command::new(bin("edge-convert"));
        c.arg("profile");
        c
    };
    let out = run(convert().arg(dir.path().join("missing.bundle")));
    let err = assert_clean_failure(&out, "missing bundle");
    assert!(err.contains("missing.bundle"), "{err}");

    let garbage = dir.path().join("garbage.bundle");
    std::fs::write(&garbage, b"not a tar at all").unwrap();
    let err = assert_clean_failure(&run(convert().arg(&garbage)), "garbage bundle");
    assert!(err.contains("garbage.bundle"), "{err}");

    let bundle = efficientnet_bundle();
    for (setting, named) in [
        ("TRACT_AVGPOOL_SEPARABLE=1", "TRACT_AVGPOOL_SEPARABLE"),
        ("TRACT_NO_SUCH_KNOB=1", "TRACT_NO_SUCH_KNOB"),
        ("TRACT_LAZY_IM2COL_MIN_KERNEL=lots", "lots"),
        ("TRACT_DISABLE_DIRECT_SPATIAL", "NAME=VALUE"),
    ] {
        let out = run(convert().arg(&bundle).args(["--setting", setting]));
        let err = assert_clean_failure(&out, setting);
        assert!(err.contains(named), "{setting}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_tunes_once_and_reports_its_settings_in_the_status() {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let bundle = private_efficientnet(dir.path());
    let spec = AgentSpec::new("cam-tune", &bundle, Some(broker.url()))
        .env("EDGE_AGENT_MODEL__TUNING", "true")
        .env("EDGE_AGENT_MODEL__TUNING_BUDGET_SECS", "20")
        .env("EDGE_AGENT_WORKERS__THREADS", "1");
    let mut agent = block(|| Agent::start(spec));
    let status = |origin: &'static str| {
        let port = broker.port;
        async move {
            let client =
                TestClient::connect(port, &format!("t-tune-{origin}"), &["edge/cam-tune/status"]).await;
            let got = client
                .wait_for("edge/cam-tune/status", Duration::from_secs(30), |r| {
                    r.iter().any(|m| m.json()["runtime_settings"]["origin"] == origin)
                })
                .await;
            got.iter()
                .map(|m| m.json())
                .find(|s| s["runtime_settings"]["origin"] == origin)
                .unwrap_or_else(|| panic!("no status with origin {origin}: {got:?}"))
        }
    };
    let s = status("tuned").await;
    let rs = &s["runtime_settings"];
    assert_eq!(rs["threads"], 1, "{rs}");
    assert!(rs["default_ms"].as_f64().unwrap() > 0.0, "{rs}");
    assert!(rs["knobs"].is_object(), "{rs}");
    // edge-agent answers the tuner's instruction-set children too (see `tune::isa`).
    if has_avx512() {
        assert_eq!(rs["instruction_sets"]["candidate"], "-avx512f", "{rs}");
        assert!(
            rs["instruction_sets"]["native_ms"].as_f64().unwrap() > 0.0,
            "{rs}"
        );
        // Installed before tract first looked at the CPU (else the note says it could not be).
        assert!(rs["note"].is_null(), "{rs}");
    } else {
        assert!(rs["instruction_sets"].is_null(), "{rs}");
    }
    // The cache is in the agent's model directory (its state), not beside the bundle.
    let cache = agent
        .queue_dir
        .parent()
        .unwrap()
        .join("models")
        .join("edge-tuning.json");
    assert!(cache.is_file(), "{} missing:\n{}", cache.display(), agent.log());
    assert!(!dir.path().join("edge-tuning.json").exists());

    block(|| agent.restart());
    let s = status("cached").await;
    assert_eq!(s["runtime_settings"]["knobs"], rs["knobs"], "{s}");
}
