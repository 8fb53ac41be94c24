//! The pool reached the way devices outside the cluster reach it (issue 18): through a real L7
//! gRPC proxy, Debian's nginx, that terminates TLS (a certificate made for this run, for
//! `localhost`) and balances every call over `edge-agent serve` pools (`grpc_pass`, HTTP/2),
//! as an ingress controller or a Gateway does in the cluster. The agent has the proxy as its
//! one endpoint, `localhost:<port>` with `tls_ca`, as a fleet has `pool.example.com:443`.
//! Real Mosquitto, agents, nginx and pools; EfficientNet-Lite0 on both sides.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use edge_e2e::daemon::{Agent, Mosquitto, TestClient};
use edge_e2e::nginx::Nginx;
use edge_e2e::{run, stderr, stdout};
use serde_json::Value;

use crate::conformance::{assert_same_top5, local_top5, photos, script, var};
use crate::offload::{agent_with_endpoints, ask, ask_until_cluster, coffee, pool_images, wait_pool};
use crate::pool::Server;

/// The agents' deadline for one cluster call.
const TIMEOUT_MS: u64 = 1000;

/// An agent whose one cluster endpoint is the proxy, TLS checked against `ca` (and the name
/// `localhost`, or `tls_domain` in `extra`); every request asks the cluster (cascade at 0.99).
fn agent_through(
    device: &str,
    broker: &Mosquitto,
    proxy: &Nginx,
    ca: &Path,
    extra: &[(&str, &str)],
) -> Agent {
    let ca = ca.display().to_string();
    let timeout = TIMEOUT_MS.to_string();
    let mut env = vec![
        ("EDGE_AGENT_OFFLOAD__TLS_CA", ca.as_str()),
        ("EDGE_AGENT_OFFLOAD__TIMEOUT_MS", timeout.as_str()),
        ("EDGE_AGENT_OFFLOAD__MIN_CONFIDENCE", "0.99"),
        ("EDGE_AGENT_OFFLOAD__MAX_LOCAL_WAIT_MS", "0"),
    ];
    env.extend_from_slice(extra);
    agent_with_endpoints(device, broker, &[format!("localhost:{}", proxy.port)], &env)
}

/// Time a reply spent beyond local work (preprocessing and inference): queueing and the
/// cluster attempt.
fn beyond_local_ms(v: &Value) -> f64 {
    let t = &v["timings_ms"];
    let num = |k: &str| t[k].as_f64().unwrap_or_else(|| panic!("no timings_ms.{k}: {v}"));
    num("total") - num("preprocess") - num("inference")
}

fn counts(pools: &[Option<Server>], before: &[f64]) -> Vec<f64> {
    pools
        .iter()
        .zip(before)
        .map(|(p, b)| p.as_ref().map_or(*b, pool_images))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_nginx_calls_spread_over_the_pools_a_killed_pool_costs_nothing_and_a_stopped_proxy_means_local_then_recovery()
 {
    let dir = tempfile::tempdir().expect("temp dir");
    let [ca, cert, key, _, _] = edge_e2e::test_pki(dir.path(), "edge-agent-client");
    let mut pools: Vec<Option<Server>> = (0..3).map(|_| Some(Server::start(&["--workers", "1"]))).collect();
    for p in pools.iter().flatten() {
        wait_pool(p).await;
    }
    let ports: Vec<u16> = pools.iter().flatten().map(|p| p.port).collect();
    let mut proxy = Nginx::start(&cert, &key, &ports);
    let broker = Mosquitto::start();
    let device = "cam-ingress";
    let agent = agent_through(
        device,
        &broker,
        &proxy,
        &ca,
        &[
            ("EDGE_AGENT_OFFLOAD__OPEN_SECS", "2"),
            ("EDGE_AGENT_WORKERS__COUNT", "2"),
        ],
    );
    let topic = format!("app/{device}");
    let client = TestClient::connect(broker.port, "t-ingress", &[topic.as_str()]).await;

    // 1. Every offloaded request answered through the proxy, spread over the pools by it.
    let n = 12;
    for i in 0..n {
        let v = ask(&client, device, &format!("s{i}")).await;
        assert_eq!(
            (v["source"].as_str(), v["reason"].as_str()),
            (Some("cluster"), Some("low_confidence")),
            "request {i} through nginx: {v}\nagent log:\n{}",
            agent.log()
        );
        assert_eq!(v["top"][0]["label"], "espresso", "{v}");
    }
    let spread = counts(&pools, &[0.0; 3]);
    println!("through nginx: {n} requests, per pool {spread:?}");
    assert_eq!(spread.iter().sum::<f64>(), n as f64, "{spread:?}");
    assert!(
        spread.iter().all(|&c| c >= 2.0),
        "the proxy did not spread the calls: {spread:?}"
    );
    // The deadline travels with each call (grpc-timeout) through the proxy to the pools.
    let log = proxy.access_log();
    let timeouts: Vec<&str> = log
        .lines()
        .filter_map(|l| l.split(' ').find_map(|f| f.strip_prefix("grpc_timeout=")))
        .collect();
    assert_eq!(timeouts.len(), n, "one access log line per call:\n{log}");
    for t in &timeouts {
        let (num, unit) = t.split_at(t.len().saturating_sub(1));
        let ms = match (num.parse::<f64>(), unit) {
            (Ok(v), "n") => v / 1e6,
            (Ok(v), "u") => v / 1e3,
            (Ok(v), "m") => v,
            (Ok(v), "S") => v * 1e3,
            _ => panic!("no grpc-timeout reached the proxy: `{t}`\n{log}"),
        };
        assert!(
            ms > 0.0 && ms <= TIMEOUT_MS as f64,
            "grpc-timeout {t} is not the agent's deadline"
        );
    }

    // 2. A pool SIGKILLed in the middle of a stream of requests costs none of them.
    let image = coffee();
    let m = 30;
    for i in 0..m {
        let id = format!("k{i}");
        client
            .request(
                &format!("edge/{device}/classify"),
                &image,
                &topic,
                &id,
                &[("id", &id)],
            )
            .await;
    }
    let killed_at = client
        .wait_for(&topic, Duration::from_secs(120), |r| {
            r.iter()
                .filter(|x| x.json()["id"].as_str().unwrap_or("").starts_with('k'))
                .count()
                >= 8
        })
        .await
        .len();
    let before_kill = counts(&pools, &[0.0; 3]);
    pools[1] = None;
    let got = client
        .wait_for(&topic, Duration::from_secs(180), |r| {
            r.iter()
                .filter(|x| x.json()["id"].as_str().unwrap_or("").starts_with('k'))
                .count()
                >= m
        })
        .await;
    let stream: Vec<Value> = got
        .iter()
        .map(|x| x.json())
        .filter(|v| v["id"].as_str().unwrap_or("").starts_with('k'))
        .collect();
    assert_eq!(stream.len(), m);
    let lost: Vec<&Value> = stream.iter().filter(|v| v["source"] != "cluster").collect();
    let after_kill = counts(&pools, &before_kill);
    let log = proxy.access_log();
    // Lines naming more than one upstream status: nginx tried another pool.
    let proxy_retried = log
        .lines()
        .filter_map(|l| l.split("upstream_status=").nth(1)?.split(" grpc_status").next())
        .filter(|statuses| statuses.contains(','))
        .count();
    let agent_retried = agent.log().matches("call failed, endpoint kept").count();
    // A cluster reply's `inference` time is the cluster call, retries included.
    let slowest_call = stream
        .iter()
        .filter_map(|v| v["timings_ms"]["inference"].as_f64())
        .fold(0.0, f64::max);
    println!(
        "pool 1 SIGKILLed after {} of {m} replies: {} requests not answered by the cluster; per pool before {before_kill:?}, after {after_kill:?}; calls nginx retried on another pool: {proxy_retried}, calls the agent retried: {agent_retried}; slowest cluster call {slowest_call:.0} ms (deadline {TIMEOUT_MS} ms per try)",
        killed_at.saturating_sub(n),
        lost.len()
    );
    assert!(
        slowest_call <= 2.0 * TIMEOUT_MS as f64,
        "a call took {slowest_call} ms, more than two tries' deadlines"
    );
    assert!(lost.is_empty(), "killing a pool cost requests: {lost:?}");
    assert!(
        after_kill[0] > before_kill[0] && after_kill[2] > before_kill[2],
        "the live pools took the rest: {before_kill:?} -> {after_kill:?}"
    );

    // 3. The proxy stops: local answers, flagged, each within the deadline; the breaker opens.
    proxy.stop();
    let mut reasons = Vec::new();
    let mut worst = 0.0f64;
    for i in 0..6 {
        let v = ask(&client, device, &format!("down{i}")).await;
        assert_eq!(v["source"], "local", "{v}");
        assert_eq!(v["low_confidence"], true, "{v}");
        assert_eq!(v["top"][0]["label"], "espresso", "{v}");
        let waited = beyond_local_ms(&v);
        worst = worst.max(waited);
        assert!(
            waited <= TIMEOUT_MS as f64,
            "waited {waited:.0} ms beyond local work, deadline {TIMEOUT_MS} ms: {v}"
        );
        reasons.push(v["reason"].as_str().unwrap_or_default().to_owned());
    }
    println!(
        "proxy stopped: 6 of 6 answered locally, worst wait beyond local work {worst:.0} ms (deadline {TIMEOUT_MS} ms), reasons {reasons:?}"
    );
    assert_eq!(reasons[0], "low_confidence_cluster_failed", "{reasons:?}");
    assert_eq!(
        reasons.last().map(String::as_str),
        Some("low_confidence_cluster_unavailable"),
        "the breaker should have opened after 3 failed requests: {reasons:?}"
    );
    assert_eq!(agent.metric("edge_agent_cluster_breaker"), 1.0, "breaker open");
    assert_eq!(
        agent.metric("edge_agent_cluster_endpoints_healthy"),
        1.0,
        "the proxy, the only endpoint, stays in rotation: the breaker guards the pool"
    );

    // 4. The proxy is back: after open_secs (2 s) a probe closes the breaker.
    proxy.start_again();
    let back = Instant::now();
    ask_until_cluster(
        &client,
        device,
        Duration::from_secs(30),
        "the breaker never closed after the proxy came back",
    )
    .await;
    println!(
        "proxy back: the cluster answered again after {:?}",
        back.elapsed()
    );
    assert_eq!(agent.metric("edge_agent_cluster_breaker"), 0.0, "breaker closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_nginx_an_agent_trusting_another_ca_or_expecting_another_name_fails_clearly() {
    let dir = tempfile::tempdir().expect("temp dir");
    let [ca, cert, key, _, _] = edge_e2e::test_pki(dir.path(), "edge-agent-client");
    let other = tempfile::tempdir().expect("temp dir");
    let [other_ca, ..] = edge_e2e::test_pki(other.path(), "edge-agent-client");
    let pool = Server::start(&[]);
    wait_pool(&pool).await;
    let proxy = Nginx::start(&cert, &key, &[pool.port]);
    let broker = Mosquitto::start();
    let good = agent_through("cam-goodca", &broker, &proxy, &ca, &[]);
    let wrong_ca = agent_through("cam-wrongca", &broker, &proxy, &other_ca, &[]);
    let wrong_name = agent_through(
        "cam-wrongname",
        &broker,
        &proxy,
        &ca,
        &[("EDGE_AGENT_OFFLOAD__TLS_DOMAIN", "pool.example.com")],
    );
    let client = TestClient::connect(
        broker.port,
        "t-ingress-ca",
        &["app/cam-goodca", "app/cam-wrongca", "app/cam-wrongname"],
    )
    .await;

    let v = ask(&client, "cam-goodca", "g1").await;
    assert_eq!(
        v["source"],
        "cluster",
        "the right CA gets through: {v}\n{}",
        good.log()
    );

    // Both test CAs are named "edge test CA": rustls finds the issuer by name and then the
    // signature does not verify (BadSignature); a CA of another name gives UnknownIssuer.
    for (agent, device, expect) in [
        (&wrong_ca, "cam-wrongca", &["BadSignature", "UnknownIssuer"][..]),
        (
            &wrong_name,
            "cam-wrongname",
            &["not valid for name \"pool.example.com\""][..],
        ),
    ] {
        let v = ask(&client, device, &format!("{device}-1")).await;
        assert_eq!(
            (v["source"].as_str(), v["reason"].as_str()),
            (Some("local"), Some("low_confidence_cluster_failed")),
            "{device}: {v}"
        );
        let log = agent.log();
        let line = log
            .lines()
            .find(|l| l.contains("cluster failed"))
            .unwrap_or_else(|| panic!("{device}: no cluster failure logged:\n{log}"));
        println!("{device}: {line}");
        assert!(
            line.contains("invalid peer certificate") && expect.iter().any(|e| line.contains(e)),
            "{device}: the log should say the pool's certificate was refused ({expect:?}): {line}"
        );
    }
    let calls = proxy.access_log().lines().count();
    assert_eq!(
        calls, 1,
        "only the agent with the right CA and name made a call through the proxy"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tritonclient_reaches_the_pool_through_nginx_with_tls_as_from_a_laptop() {
    let python = var("EDGE_TRITON_PYTHON");
    let dir = tempfile::tempdir().expect("temp dir");
    let [ca, cert, key, _, _] = edge_e2e::test_pki(dir.path(), "edge-agent-client");
    let pool = Server::start(&[]);
    wait_pool(&pool).await;
    let proxy = Nginx::start(&cert, &key, &[pool.port]);
    let out = tokio::task::block_in_place(|| {
        run(Command::new(&python)
            .arg(script("triton_client.py"))
            .arg("--ca")
            .arg(&ca)
            .arg(format!("localhost:{}", proxy.port))
            .arg("inception")
            .args(photos()))
    });
    assert!(
        out.status.success(),
        "triton_client.py through nginx failed:\n{}\nnginx:\n{}",
        stderr(&out),
        proxy.error_log()
    );
    let answer: Value = serde_json::from_str(stdout(&out).lines().last().unwrap_or("")).expect("JSON answer");
    assert_eq!(answer["ready"], true, "{answer}");
    assert_eq!(answer["model_ready"], true, "{answer}");
    assert_same_top5(
        &answer["images"],
        &local_top5(),
        "tritonclient through nginx (TLS)",
    );
    let log = proxy.access_log();
    assert!(
        log.contains("/inference.GRPCInferenceService/ModelInfer"),
        "the calls went through the proxy:\n{log}"
    );
}
