//! The agent's offload path against real `edge-agent serve` pools: cascade on low
//! confidence, overflow on load, both protocols and payloads, endpoint ejection with retry
//! on another endpoint, circuit breaker open and recovery, local fallback. Real Mosquitto,
//! real agent and pool processes; EfficientNet-Lite0 on both sides.

use std::time::{Duration, Instant};

use edge_e2e::daemon::{Agent, AgentSpec, Mosquitto, TestClient, free_port};
use serde_json::Value;

use crate::classify_photos::efficientnet_bundle;
use crate::pool::Server;

pub(crate) fn coffee() -> Vec<u8> {
    std::fs::read(edge_e2e::shared_models().join("coffee.jpg")).unwrap()
}

fn agent_with_pool(device: &str, broker: &Mosquitto, endpoints: &[u16], extra: &[(&str, &str)]) -> Agent {
    let list: Vec<String> = endpoints.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    agent_with_endpoints(device, broker, &list, extra)
}

/// An EfficientNet-Lite0 agent offloading to `endpoints` (`host:port`): see [`agent_of`].
pub(crate) fn agent_with_endpoints(
    device: &str,
    broker: &Mosquitto,
    endpoints: &[String],
    extra: &[(&str, &str)],
) -> Agent {
    agent_of(&efficientnet_bundle(), device, broker, endpoints, extra)
}

/// An agent running `bundle`, offloading to `endpoints` (`host:port`), deadline 5 s, breaker
/// open 2 s, ejection 1 s; `extra` adds or overrides `EDGE_AGENT_*` variables.
pub(crate) fn agent_of(
    bundle: &std::path::Path,
    device: &str,
    broker: &Mosquitto,
    endpoints: &[String],
    extra: &[(&str, &str)],
) -> Agent {
    let list: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
    let mut spec = AgentSpec::new(device, bundle, Some(broker.url()))
        .env("EDGE_AGENT_OFFLOAD__ENDPOINTS", format!("[{}]", list.join(",")))
        .env("EDGE_AGENT_OFFLOAD__TIMEOUT_MS", 5000)
        .env("EDGE_AGENT_OFFLOAD__OPEN_SECS", 2)
        .env("EDGE_AGENT_OFFLOAD__EJECT_SECS", 1);
    for (k, v) in extra {
        spec = spec.env(k, v);
    }
    tokio::task::block_in_place(|| Agent::start(spec))
}

/// Sends one request and returns its reply.
pub(crate) async fn ask(client: &TestClient, device: &str, id: &str) -> Value {
    let topic = format!("app/{device}");
    client
        .request(
            &format!("edge/{device}/classify"),
            &coffee(),
            &topic,
            id,
            &[("id", id)],
        )
        .await;
    let got = client
        .wait_for(&topic, Duration::from_secs(60), |r| {
            r.iter().any(|m| m.json()["id"] == id)
        })
        .await;
    got.into_iter()
        .map(|m| m.json())
        .find(|v| v["id"] == id)
        .unwrap_or_else(|| panic!("no reply for {id}"))
}

/// Asks again every 300 ms until the cluster answers; fails with `why` after `timeout`.
pub(crate) async fn ask_until_cluster(client: &TestClient, device: &str, timeout: Duration, why: &str) {
    let end = Instant::now() + timeout;
    for n in 0.. {
        let v = ask(client, device, &format!("retry{n}")).await;
        if v["source"] == "cluster" {
            return;
        }
        assert!(Instant::now() < end, "{why}: {v}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

pub(crate) async fn wait_pool(server: &Server) {
    let _ = server.channel().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn low_confidence_goes_to_the_cluster_falls_back_when_it_dies_and_the_breaker_recovers() {
    let broker = Mosquitto::start();
    let port = free_port();
    let pool = Server::start_on(port, &[]);
    wait_pool(&pool).await;
    let agent = agent_with_pool(
        "cam-cascade",
        &broker,
        &[port],
        &[
            ("EDGE_AGENT_OFFLOAD__MIN_CONFIDENCE", "0.99"),
            ("EDGE_AGENT_OFFLOAD__MAX_LOCAL_WAIT_MS", "0"),
        ],
    );
    let client = TestClient::connect(broker.port, "t-cascade", &["app/cam-cascade"]).await;

    // espresso scores 0.95 locally, under 0.99: the cluster answers.
    let v = ask(&client, "cam-cascade", "c1").await;
    assert_eq!(
        (v["source"].as_str(), v["reason"].as_str()),
        (Some("cluster"), Some("low_confidence")),
        "{v}"
    );
    assert_eq!(v["top"][0]["label"], "espresso");
    assert_eq!(
        v["top"][0]["index"], 967,
        "cluster labels are mapped to local indices: {v}"
    );

    // The pool dies: local answers, flagged. The dead endpoint is ejected for eject_secs (1 s)
    // after each failure; asking once it is back in makes each request a real attempt, and
    // the third consecutive failure opens the breaker.
    drop(pool);
    let mut reasons = Vec::new();
    for i in 0..4 {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(1100)).await;
        }
        let v = ask(&client, "cam-cascade", &format!("d{i}")).await;
        assert_eq!(v["source"], "local", "{v}");
        assert_eq!(v["low_confidence"], true, "{v}");
        assert_eq!(v["top"][0]["label"], "espresso");
        reasons.push(v["reason"].as_str().unwrap().to_owned());
    }
    println!("reasons while the pool is down: {reasons:?}");
    assert!(
        reasons.iter().any(|r| r == "low_confidence_cluster_failed"),
        "{reasons:?}"
    );
    assert_eq!(
        reasons.last().unwrap(),
        "low_confidence_cluster_unavailable",
        "{reasons:?}"
    );
    assert_eq!(agent.metric("edge_agent_cluster_breaker"), 1.0, "breaker open");

    // The pool comes back on the same port: after open_secs a probe closes the breaker.
    let pool = Server::start_on(port, &[]);
    wait_pool(&pool).await;
    ask_until_cluster(
        &client,
        "cam-cascade",
        Duration::from_secs(30),
        "the breaker never closed",
    )
    .await;
    assert_eq!(
        agent.metric("edge_agent_cluster_breaker"),
        0.0,
        "breaker closed again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kserve_with_tensors_and_a_dead_endpoint_is_retried_on_the_live_one() {
    let broker = Mosquitto::start();
    let pool = Server::start(&[]);
    wait_pool(&pool).await;
    let dead = free_port();
    let _agent = agent_with_pool(
        "cam-ks",
        &broker,
        &[dead, pool.port],
        &[
            ("EDGE_AGENT_OFFLOAD__PROTOCOL", "kserve"),
            ("EDGE_AGENT_OFFLOAD__SEND", "tensor"),
            ("EDGE_AGENT_OFFLOAD__MIN_CONFIDENCE", "0.99"),
            ("EDGE_AGENT_OFFLOAD__MAX_LOCAL_WAIT_MS", "0"),
        ],
    );
    let client = TestClient::connect(broker.port, "t-ks", &["app/cam-ks"]).await;
    for i in 0..6 {
        let v = ask(&client, "cam-ks", &format!("k{i}")).await;
        assert_eq!(
            v["source"], "cluster",
            "request {i} should reach the live endpoint: {v}"
        );
        assert_eq!(v["top"][0]["label"], "espresso");
        let score = v["top"][0]["score"].as_f64().unwrap();
        assert!((score - 0.9547).abs() < 1e-3, "{v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_local_queue_overflows_to_the_cluster() {
    let broker = Mosquitto::start();
    let pool = Server::start(&[]);
    wait_pool(&pool).await;
    let _agent = agent_with_pool(
        "cam-load",
        &broker,
        &[pool.port],
        &[("EDGE_AGENT_OFFLOAD__MAX_LOCAL_WAIT_MS", "1")],
    );
    let client = TestClient::connect(broker.port, "t-load", &["app/cam-load"]).await;
    let image = coffee();
    let n = 30;
    for i in 0..n {
        let id = format!("l{i}");
        client
            .request(
                "edge/cam-load/classify",
                &image,
                "app/cam-load",
                &id,
                &[("id", &id)],
            )
            .await;
    }
    let got = client
        .wait_for("app/cam-load", Duration::from_secs(120), |r| r.len() >= n)
        .await;
    let replies: Vec<Value> = got.iter().map(|m| m.json()).collect();
    let load = replies.iter().filter(|v| v["reason"] == "load").count();
    let local = replies.iter().filter(|v| v["source"] == "local").count();
    println!("overflow: {load} of {n} by the cluster for load, {local} local");
    assert!(load > 0, "nothing overflowed: {replies:?}");
    assert!(replies.iter().all(|v| v["top"][0]["label"] == "espresso"));
    // Once the queue has drained, requests stay local again.
    for i in 0..3 {
        let v = ask(&client, "cam-load", &format!("after{i}")).await;
        assert_eq!(
            v["source"], "local",
            "the queue is empty, no reason to offload: {v}"
        );
    }
}

/// A CA, a server certificate for `localhost` and a client certificate, as PEM files in `dir`:
/// (ca, server cert, server key, client cert, client key).
fn certificates(dir: &std::path::Path) -> [std::path::PathBuf; 5] {
    edge_e2e::test_pki(dir, "edge-agent-client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_pool_answers_an_agent_with_a_client_certificate_and_refuses_one_without() {
    let dir = tempfile::tempdir().unwrap();
    let [ca, server_cert, server_key, client_cert, client_key] = certificates(dir.path());
    let s = |p: &std::path::PathBuf| p.display().to_string();
    let pool = Server::start(&[
        "--tls-cert",
        &s(&server_cert),
        "--tls-key",
        &s(&server_key),
        "--tls-client-ca",
        &s(&ca),
    ]);
    // Wait until it listens (the plaintext health check cannot pass on a TLS port).
    let end = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", pool.port)).is_err() {
        assert!(Instant::now() < end, "TLS pool did not listen");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let broker = Mosquitto::start();
    let tls = [
        ("EDGE_AGENT_OFFLOAD__MIN_CONFIDENCE", "0.99"),
        ("EDGE_AGENT_OFFLOAD__MAX_LOCAL_WAIT_MS", "0"),
        ("EDGE_AGENT_OFFLOAD__TLS_DOMAIN", "localhost"),
    ];
    let ca_s = s(&ca);
    let (cert_s, key_s) = (s(&client_cert), s(&client_key));
    let mut with_cert = tls.to_vec();
    with_cert.extend([
        ("EDGE_AGENT_OFFLOAD__TLS_CA", ca_s.as_str()),
        ("EDGE_AGENT_OFFLOAD__TLS_CERT", cert_s.as_str()),
        ("EDGE_AGENT_OFFLOAD__TLS_KEY", key_s.as_str()),
    ]);
    let _good = agent_with_pool("cam-mtls", &broker, &[pool.port], &with_cert);
    let mut without_cert = tls.to_vec();
    without_cert.push(("EDGE_AGENT_OFFLOAD__TLS_CA", ca_s.as_str()));
    let _bad = agent_with_pool("cam-nocert", &broker, &[pool.port], &without_cert);
    let client = TestClient::connect(broker.port, "t-mtls", &["app/cam-mtls", "app/cam-nocert"]).await;

    let v = ask(&client, "cam-mtls", "m1").await;
    assert_eq!(
        (v["source"].as_str(), v["reason"].as_str()),
        (Some("cluster"), Some("low_confidence")),
        "{v}"
    );
    let v = ask(&client, "cam-nocert", "n1").await;
    assert_eq!(
        v["source"], "local",
        "a pool requiring client certificates must refuse: {v}"
    );
    assert_eq!(v["reason"], "low_confidence_cluster_failed", "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_found_through_dns_are_used() {
    let broker = Mosquitto::start();
    let pool = Server::start(&[]);
    wait_pool(&pool).await;
    let dns = format!("localhost:{}", pool.port);
    let spec = AgentSpec::new("cam-dns", &efficientnet_bundle(), Some(broker.url()))
        .env("EDGE_AGENT_OFFLOAD__DNS", &dns)
        .env("EDGE_AGENT_OFFLOAD__DNS_REFRESH_SECS", 1)
        .env("EDGE_AGENT_OFFLOAD__MIN_CONFIDENCE", "0.99")
        .env("EDGE_AGENT_OFFLOAD__MAX_LOCAL_WAIT_MS", 0);
    let agent = tokio::task::block_in_place(|| Agent::start(spec));
    let client = TestClient::connect(broker.port, "t-dns", &["app/cam-dns"]).await;
    // The first resolution happens in the background; `localhost` may also give ::1, where
    // nothing listens: that endpoint is ejected and the request retried on 127.0.0.1.
    let why = format!("never reached the pool through {dns}");
    ask_until_cluster(&client, "cam-dns", Duration::from_secs(20), &why).await;
    assert!(agent.metric("edge_agent_cluster_endpoints_healthy") >= 1.0);
}

/// Images the pool has scored (its `edge_pool_images_total`).
pub(crate) fn pool_images(pool: &Server) -> f64 {
    let (_, m) = edge_e2e::daemon::http_get(pool.http_port, "/metrics").unwrap_or_default();
    m.lines()
        .find(|l| l.starts_with("edge_pool_images_total"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_pools_share_the_load_survive_one_dying_and_all_down_means_local_within_the_deadline() {
    let broker = Mosquitto::start();
    let mut pools: Vec<Option<Server>> = (0..3).map(|_| Some(Server::start(&["--workers", "1"]))).collect();
    for p in pools.iter().flatten() {
        wait_pool(p).await;
    }
    let ports: Vec<u16> = pools.iter().flatten().map(|p| p.port).collect();
    let agent = agent_with_pool(
        "cam-three",
        &broker,
        &ports,
        &[
            ("EDGE_AGENT_OFFLOAD__MIN_CONFIDENCE", "0.99"),
            ("EDGE_AGENT_OFFLOAD__MAX_LOCAL_WAIT_MS", "0"),
            ("EDGE_AGENT_OFFLOAD__TIMEOUT_MS", "1000"),
            ("EDGE_AGENT_OFFLOAD__EJECT_SECS", "30"),
            ("EDGE_AGENT_WORKERS__COUNT", "2"),
        ],
    );
    let client = TestClient::connect(broker.port, "t-three", &["app/cam-three"]).await;
    let image = coffee();
    let n = 60;
    for i in 0..n {
        let id = format!("t{i}");
        client
            .request(
                "edge/cam-three/classify",
                &image,
                "app/cam-three",
                &id,
                &[("id", &id)],
            )
            .await;
    }
    client
        .wait_for("app/cam-three", Duration::from_secs(120), |r| r.len() >= 20)
        .await;
    // Kill pool 1 mid-run.
    let mut counts = vec![0.0; 3];
    counts[1] = pool_images(pools[1].as_ref().unwrap());
    pools[1] = None;
    let got = client
        .wait_for("app/cam-three", Duration::from_secs(180), |r| r.len() >= n)
        .await;
    counts[0] = pool_images(pools[0].as_ref().unwrap());
    counts[2] = pool_images(pools[2].as_ref().unwrap());
    println!(
        "per-endpoint requests (pool 1 killed after its {}): {counts:?}",
        counts[1]
    );
    let replies: Vec<Value> = got.iter().map(|m| m.json()).collect();
    assert_eq!(replies.len(), n);
    let not_cluster: Vec<&Value> = replies.iter().filter(|v| v["source"] != "cluster").collect();
    assert!(
        not_cluster.is_empty(),
        "killing one pool failed requests: {not_cluster:?}"
    );
    assert!(counts.iter().all(|&c| c > 0.0), "load did not spread: {counts:?}");

    // All three down: every request answered locally, within deadline + local inference.
    pools.clear();
    let deadline_ms = 3000.0;
    for i in 0..8 {
        let id = format!("down{i}");
        client
            .request(
                "edge/cam-three/classify",
                &image,
                "app/cam-three",
                &id,
                &[("id", &id), ("deadline_ms", "3000")],
            )
            .await;
    }
    let got = client
        .wait_for("app/cam-three", Duration::from_secs(120), |r| r.len() >= n + 8)
        .await;
    let down: Vec<Value> = got
        .iter()
        .map(|m| m.json())
        .filter(|v| v["id"].as_str().unwrap_or("").starts_with("down"))
        .collect();
    assert_eq!(down.len(), 8);
    let mut worst = 0.0f64;
    for v in &down {
        assert_eq!(v["source"], "local", "{v}");
        assert_eq!(v["low_confidence"], true, "{v}");
        let t = &v["timings_ms"];
        let local = t["preprocess"].as_f64().unwrap() + t["inference"].as_f64().unwrap();
        let total = t["total"].as_f64().unwrap();
        worst = worst.max(total - local);
        assert!(
            total <= deadline_ms + local,
            "waited {total} ms (local {local} ms): {v}"
        );
    }
    println!("pool down: worst wait beyond local inference {worst:.0} ms (deadline {deadline_ms} ms)");
    assert!(agent.metric("edge_agent_cluster_endpoints_healthy") < 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confident_answer_stays_local() {
    let broker = Mosquitto::start();
    let pool = Server::start(&[]);
    wait_pool(&pool).await;
    let _agent = agent_with_pool(
        "cam-sure",
        &broker,
        &[pool.port],
        &[
            ("EDGE_AGENT_OFFLOAD__MIN_CONFIDENCE", "0.5"),
            ("EDGE_AGENT_OFFLOAD__MAX_LOCAL_WAIT_MS", "0"),
        ],
    );
    let client = TestClient::connect(broker.port, "t-sure", &["app/cam-sure"]).await;
    for i in 0..3 {
        let v = ask(&client, "cam-sure", &format!("s{i}")).await;
        assert_eq!(
            (v["source"].as_str(), v["reason"].as_str()),
            (Some("local"), Some("local")),
            "{v}"
        );
    }
    assert_eq!(pool_images(&pool), 0.0, "nothing reached the pool");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_behind_a_fault_proxy_that_drops_stalls_and_slows_never_costs_a_request_or_its_deadline() {
    use edge_e2e::proxy::{Fault, FaultProxy};
    let broker = Mosquitto::start();
    let pool = Server::start(&[]);
    wait_pool(&pool).await;
    let proxy = FaultProxy::start(pool.port).await;
    let agent = agent_with_pool(
        "cam-proxy",
        &broker,
        &[proxy.port],
        &[
            ("EDGE_AGENT_OFFLOAD__MIN_CONFIDENCE", "0.99"),
            ("EDGE_AGENT_OFFLOAD__MAX_LOCAL_WAIT_MS", "0"),
            ("EDGE_AGENT_OFFLOAD__TIMEOUT_MS", "1000"),
        ],
    );
    let client = TestClient::connect(broker.port, "t-proxy", &["app/cam-proxy"]).await;
    let timed = |id: String| {
        let client = &client;
        async move {
            let start = Instant::now();
            let v = ask(client, "cam-proxy", &id).await;
            (v, start.elapsed())
        }
    };
    let (v, _) = timed("pass".into()).await;
    assert_eq!(v["source"], "cluster", "{v}");

    // Slow but within the deadline: still the cluster.
    proxy.set_latency(300);
    let (v, took) = timed("slow".into()).await;
    assert_eq!(v["source"], "cluster", "{v}");
    println!("slow link (300 ms per chunk): answered by the cluster in {took:?}");

    // Dropped connections, then a blackhole: every request answered locally, each within the
    // offload deadline (1 s) plus local work, never hanging on the dead link.
    let mut worst = Duration::ZERO;
    let mut reasons = Vec::new();
    for (i, fault) in [
        Fault::Drop,
        Fault::Drop,
        Fault::Blackhole,
        Fault::Blackhole,
        Fault::Blackhole,
    ]
    .into_iter()
    .enumerate()
    {
        proxy.set(fault);
        tokio::time::sleep(Duration::from_millis(1100)).await; // past eject_secs
        let (v, took) = timed(format!("fault{i}")).await;
        assert_eq!(v["source"], "local", "{fault:?}: {v}");
        assert_eq!(v["low_confidence"], true, "{v}");
        assert_eq!(v["top"][0]["label"], "espresso");
        reasons.push(v["reason"].as_str().unwrap_or_default().to_owned());
        worst = worst.max(took);
    }
    println!("faulty link: reasons {reasons:?}, slowest answer {worst:?}");
    assert!(worst < Duration::from_millis(2500), "an answer waited {worst:?}");
    assert_eq!(
        agent.metric("edge_agent_cluster_breaker"),
        1.0,
        "breaker open: {reasons:?}"
    );

    // The link heals: after open_secs a probe closes the breaker and the cluster answers.
    proxy.set(Fault::Pass);
    ask_until_cluster(
        &client,
        "cam-proxy",
        Duration::from_secs(30),
        "the breaker never closed",
    )
    .await;
    assert_eq!(agent.metric("edge_agent_cluster_breaker"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_agent_serve_s_scores_reach_the_reply_with_their_labels_over_both_protocols_and_payloads() {
    // The pool serves the agent's own bundle: its answers are the local top 5
    // (tests/e2e/conformance.rs checks the pool against the local runtime).
    let want = crate::conformance::local_top5();
    let broker = Mosquitto::start();
    let pool = Server::start(&[]);
    wait_pool(&pool).await;
    // (protocol, payload, what the pool answers)
    let cases = [
        ("tfserving", "jpeg", "classes [1,5] + scores [1,5]"),
        ("tfserving", "tensor", "scores [1,1000]"),
        ("kserve", "jpeg", "classes [1,5] + scores [1,5]"),
        ("kserve", "tensor", "classes [1,5] + scores [1,5] (top_k asked)"),
    ];
    let agents: Vec<Agent> = cases
        .iter()
        .enumerate()
        .map(|(i, (protocol, send, _))| {
            let signature = if *send == "tensor" {
                "predict_tensor"
            } else {
                "predict_images"
            };
            agent_with_pool(
                &format!("cam-shape{i}"),
                &broker,
                &[pool.port],
                &[
                    ("EDGE_AGENT_OFFLOAD__PROTOCOL", protocol),
                    ("EDGE_AGENT_OFFLOAD__SEND", send),
                    ("EDGE_AGENT_OFFLOAD__SIGNATURE", signature),
                    ("EDGE_AGENT_OFFLOAD__MIN_CONFIDENCE", "0.99"),
                    ("EDGE_AGENT_OFFLOAD__MAX_LOCAL_WAIT_MS", "0"),
                ],
            )
        })
        .collect();
    let topics: Vec<String> = (0..cases.len()).map(|i| format!("app/cam-shape{i}")).collect();
    let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
    let client = TestClient::connect(broker.port, "t-shape", &topics).await;
    for (i, (protocol, send, shape)) in cases.iter().enumerate() {
        let v = ask(&client, &format!("cam-shape{i}"), &format!("s{i}")).await;
        assert_eq!(v["source"], "cluster", "{protocol}/{send}: {v}");
        let got: Vec<Value> = v["top"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| serde_json::json!([t["label"], t["score"]]))
            .collect();
        let shown: Vec<String> = got.iter().map(|p| format!("{} {}", p[0], p[1])).collect();
        println!(
            "{protocol}, {send} ({shape}): reply {shown:?}, pool {:?}",
            want[0]
        );
        let who = format!("{protocol}/{send}");
        crate::conformance::assert_same_top5(&Value::Array(vec![Value::Array(got)]), &want[..1], &who);
    }
    drop(agents);
}
