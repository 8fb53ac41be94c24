//! Model rollout end to end: `edge-agent run` reloading and rolling back over its control
//! topic and on SIGHUP, `edge-agent serve` reloading on SIGHUP, with requests streaming
//! through; bundles served by a small HTTP server started here (good, truncated, silent).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use edge_e2e::daemon::{Agent, AgentSpec, Mosquitto, TestClient, free_port};
use edge_e2e::rewrite_entries;
use edge_e2e::rewrite_manifest;
use edge_proto::tensorflow::serving::model_spec::VersionChoice;
use edge_proto::tensorflow::serving::prediction_service_client::PredictionServiceClient;
use serde_json::{Value, json};
use sha2::Digest;

use crate::daemon::{block, coffee, inception_bundle};
use crate::pool::photo;
use edge_e2e::efficientnet_bundle;
use edge_e2e::pool::{Server, images_request};

pub(crate) fn sha256(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap();
    sha2::Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// EfficientNet-Lite0 whose manifest says `version`.
pub(crate) fn efficientnet_version(dir: &Path, version: &str) -> PathBuf {
    let path = dir.join(format!("efficientnet_v{version}.bundle"));
    rewrite_manifest(&efficientnet_bundle(), &path, |m| {
        m["model"]["version"] = json!(version)
    });
    path
}

enum Route {
    /// 200 with the whole body.
    Body(Vec<u8>),
    /// 200 announcing the whole length, then half the body and the connection closed.
    Truncated(Vec<u8>),
    /// Takes the connection and never answers.
    Silent,
}

/// A tiny HTTP/1.1 server on loopback, one thread per connection.
struct HttpServer {
    port: u16,
    stop: Arc<AtomicBool>,
}

impl HttpServer {
    fn start(routes: HashMap<&'static str, Route>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let routes = Arc::new(routes);
        let s = stop.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().map_while(Result::ok) {
                let (routes, stop) = (routes.clone(), s.clone());
                std::thread::spawn(move || answer(stream, &routes, &stop));
            }
        });
        Self { port, stop }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn answer(mut stream: TcpStream, routes: &HashMap<&'static str, Route>, stop: &AtomicBool) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut first = String::new();
    if reader.read_line(&mut first).is_err() {
        return;
    }
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) if line == "\r\n" => break,
            Ok(_) => {}
        }
    }
    let path = first.split(' ').nth(1).unwrap_or_default();
    let head = |len: usize| format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n");
    let _ = match routes.get(path) {
        Some(Route::Body(b)) => stream
            .write_all(head(b.len()).as_bytes())
            .and_then(|_| stream.write_all(b)),
        Some(Route::Truncated(b)) => stream
            .write_all(head(b.len()).as_bytes())
            .and_then(|_| stream.write_all(&b[..b.len() / 2])),
        Some(Route::Silent) => {
            let end = Instant::now() + Duration::from_secs(120);
            while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(100));
            }
            Ok(())
        }
        None => stream.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
    };
}

/// Publishes a control command with a fresh `id` and waits for the status that reports its
/// outcome (`model_reload` with that id in state ok or failed); returns that status.
async fn command(client: &TestClient, device: &str, mut doc: Value, timeout: Duration) -> Value {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let id = format!("cmd-{}", NEXT.fetch_add(1, Ordering::Relaxed));
    doc["id"] = json!(id);
    client
        .publish(
            &format!("edge/{device}/control"),
            serde_json::to_vec(&doc).unwrap(),
        )
        .await;
    wait_reload_outcome(client, device, &id, timeout).await
}

/// Waits for the status reporting the outcome of the reload or rollback `id`.
async fn wait_reload_outcome(client: &TestClient, device: &str, id: &str, timeout: Duration) -> Value {
    let status = format!("edge/{device}/status");
    let done = |m: &edge_e2e::daemon::Received| {
        let r = &m.json()["model_reload"];
        r["id"] == id && (r["state"] == "ok" || r["state"] == "failed")
    };
    let got = client.wait_for(&status, timeout, |r| r.iter().any(done)).await;
    got.iter()
        .find(|m| done(m))
        .unwrap_or_else(|| {
            panic!(
                "no outcome of {id} on {status} within {timeout:?}: {:?}",
                got.last()
            )
        })
        .json()
}

/// Sends the coffee photo and waits for its reply.
async fn ask(client: &TestClient, device: &str, id: &str) -> Value {
    let reply_to = format!("app/{device}");
    client
        .request(
            &format!("edge/{device}/classify"),
            &coffee(),
            &reply_to,
            id,
            &[("id", id)],
        )
        .await;
    let got = client
        .wait_for(&reply_to, Duration::from_secs(120), |r| {
            r.iter().any(|m| m.json()["id"] == id)
        })
        .await;
    got.iter()
        .map(|m| m.json())
        .find(|v| v["id"] == id)
        .unwrap_or_else(|| panic!("no reply to {id}"))
}

fn model_of(reply: &Value) -> (String, String) {
    assert!(reply.get("error").is_none(), "error reply: {reply}");
    (
        reply["model"]["name"].as_str().unwrap().to_owned(),
        reply["model"]["version"].as_str().unwrap().to_owned(),
    )
}

fn effnet(version: &str) -> (String, String) {
    ("efficientnet_lite0".into(), version.into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_a_steady_request_stream_switches_version_once_and_fails_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let v2 = efficientnet_version(dir.path(), "2");
    let broker = Mosquitto::start();
    let device = "cam-rl";
    // One worker: requests are classified in the order they were sent, so "the replies
    // switch version once" is exact by request order (with several workers two requests
    // leased at the same instant may start in either order).
    let spec = AgentSpec::new(device, &efficientnet_bundle(), Some(broker.url()))
        .env("EDGE_AGENT_WORKERS__COUNT", 1);
    let mut agent = block(|| Agent::start(spec));
    let status = format!("edge/{device}/status");
    let client = TestClient::connect(broker.port, "t-rl", &["app/rl", "app/cam-rl", &status]).await;

    // 100 requests, one every 50 ms; the reload command goes out after the 20th.
    let (n, command_after) = (100, 20);
    let image = coffee();
    let mut ticker = tokio::time::interval(Duration::from_millis(50));
    for i in 0..n {
        ticker.tick().await;
        let id = format!("rl-{i}");
        client
            .request(
                &format!("edge/{device}/classify"),
                &image,
                "app/rl",
                &id,
                &[("id", &id)],
            )
            .await;
        if i + 1 == command_after {
            let doc = json!({"command": "reload", "source": v2, "sha256": sha256(&v2), "id": "to-v2"});
            client
                .publish(
                    &format!("edge/{device}/control"),
                    serde_json::to_vec(&doc).unwrap(),
                )
                .await;
        }
    }
    let ids: Vec<String> = (0..n).map(|i| format!("rl-{i}")).collect();
    client
        .wait_for("app/rl", Duration::from_secs(180), |_| {
            let by = client.replies_by_id("app/rl");
            ids.iter().all(|id| by.contains_key(id))
        })
        .await;
    let by = client.replies_by_id("app/rl");
    let mut versions = Vec::new();
    let mut failed = 0;
    for id in &ids {
        let reply = by
            .get(id)
            .and_then(|v| v.first())
            .unwrap_or_else(|| panic!("{id} never answered"));
        if reply.get("error").is_some() {
            failed += 1;
            continue;
        }
        assert_eq!(reply["top"][0]["label"], "espresso", "{reply}");
        versions.push(model_of(reply));
    }
    let switch = versions
        .iter()
        .position(|m| *m == effnet("2"))
        .unwrap_or(versions.len());
    println!(
        "reload under a steady stream: sent {n}, failed {failed}, answered by version 1: {switch}, by version 2: {} (reload command sent after request {command_after})",
        versions.len() - switch
    );
    assert_eq!(failed, 0, "no request fails during a reload");
    assert!(
        versions[..switch].iter().all(|m| *m == effnet("1"))
            && versions[switch..].iter().all(|m| *m == effnet("2")),
        "replies switch version once and never go back: {versions:?}"
    );
    // Requests queued before the command but classified after the swap get the new model,
    // so the switch may come before request `command_after`; it must come inside the stream.
    assert!(
        switch > 0 && switch < n,
        "the reload happened during the stream: {switch}"
    );

    // The status and the metrics name the new model.
    let outcome = wait_reload_outcome(&client, device, "to-v2", Duration::from_secs(10)).await;
    assert_eq!(outcome["model_reload"]["state"], "ok", "{outcome}");
    assert_eq!(outcome["model"]["version"], "2", "{outcome}");
    let metrics = agent.http_get("/metrics").unwrap().1;
    assert!(
        metrics.contains(r#"edge_agent_model{name="efficientnet_lite0",version="2"} 1"#),
        "{metrics}"
    );
    assert!(
        !metrics.contains(r#"version="1""#),
        "the replaced model is gone from the gauge"
    );
    assert!(
        metrics.contains(r#"edge_agent_model_reloads_total{command="reload",outcome="ok"} 1"#),
        "{metrics}"
    );

    // A restart serves the model rolled out last, not the configured one.
    block(|| agent.restart());
    assert_eq!(
        model_of(&ask(&client, device, "after-restart").await),
        effnet("2")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_reloads_keep_the_old_model_serving_and_the_status_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let v2 = efficientnet_version(dir.path(), "2");
    let v2_bytes = std::fs::read(&v2).unwrap();
    let newer = dir.path().join("newer.bundle");
    rewrite_manifest(&efficientnet_bundle(), &newer, |m| m["format_version"] = json!(2));
    // NaN classifier bias: loads fine, every score is NaN.
    let nan = dir.path().join("nan.bundle");
    rewrite_entries(&efficientnet_bundle(), &nan, |name, data| {
        if name == "fc.beta_c.dat" {
            data[128..].fill(0xFF);
        }
    });
    let http = HttpServer::start(HashMap::from([
        ("/v2.bundle", Route::Body(v2_bytes.clone())),
        ("/truncated.bundle", Route::Truncated(v2_bytes)),
        ("/silent.bundle", Route::Silent),
    ]));

    let broker = Mosquitto::start();
    let device = "cam-bad";
    let timeout_secs = 3;
    let agent = block(|| {
        Agent::start(
            AgentSpec::new(device, &efficientnet_bundle(), Some(broker.url()))
                .env("EDGE_AGENT_MODEL__FETCH_TIMEOUT_SECS", timeout_secs),
        )
    });
    let client = TestClient::connect(
        broker.port,
        "t-bad",
        &[&format!("app/{device}"), &format!("edge/{device}/status")],
    )
    .await;
    let v2_sha = sha256(&v2);
    let cases = [
        (
            "wrong sha256",
            json!({"command": "reload", "source": http.url("/v2.bundle"), "sha256": "0".repeat(64)}),
            "checksum_mismatch",
            "sha256 mismatch",
        ),
        (
            "URL without sha256",
            json!({"command": "reload", "source": http.url("/v2.bundle")}),
            "missing_checksum",
            "needs its sha256",
        ),
        (
            "truncated download",
            json!({"command": "reload", "source": http.url("/truncated.bundle"), "sha256": v2_sha}),
            "fetch_failed",
            "cannot fetch",
        ),
        (
            "newer bundle format",
            json!({"command": "reload", "source": newer, "sha256": sha256(&newer)}),
            "unsupported_bundle",
            "format version 2",
        ),
        (
            "failed smoke inference",
            json!({"command": "reload", "source": nan}),
            "smoke_failed",
            "non-finite",
        ),
        (
            "missing file",
            json!({"command": "reload", "source": dir.path().join("nothing.bundle")}),
            "fetch_failed",
            "nothing.bundle",
        ),
        (
            "rollback with no previous model",
            json!({"command": "rollback"}),
            "no_previous",
            "no previous model",
        ),
    ];
    for (i, (what, doc, kind, reason)) in cases.iter().enumerate() {
        let s = command(&client, device, doc.clone(), Duration::from_secs(60)).await;
        let r = &s["model_reload"];
        println!("{what}: refused, {}: {}", r["kind"], r["reason"]);
        assert_eq!(r["state"], "failed", "{what}: {s}");
        assert_eq!(r["kind"], *kind, "{what}: {s}");
        assert!(r["reason"].as_str().unwrap().contains(reason), "{what}: {s}");
        assert_eq!(s["last_error"]["code"], "model_reload_failed", "{what}: {s}");
        assert_eq!(s["model"]["version"], "1", "{what}: {s}");
        let reply = ask(&client, device, &format!("bad-{i}")).await;
        assert_eq!(
            model_of(&reply),
            effnet("1"),
            "{what}: the old model keeps serving"
        );
        assert_eq!(reply["top"][0]["label"], "espresso");
    }

    // A URL that never answers times out within the configured deadline.
    let start = Instant::now();
    let doc = json!({"command": "reload", "source": http.url("/silent.bundle"), "sha256": v2_sha});
    let s = command(&client, device, doc, Duration::from_secs(60)).await;
    let took = start.elapsed();
    println!(
        "silent URL: refused after {took:?}: {}",
        s["model_reload"]["reason"]
    );
    assert_eq!(s["model_reload"]["kind"], "timeout", "{s}");
    assert!(
        took >= Duration::from_secs(timeout_secs) - Duration::from_millis(500)
            && took < Duration::from_secs(timeout_secs + 5),
        "timed out after {took:?}, configured {timeout_secs} s"
    );
    assert_eq!(
        model_of(&ask(&client, device, "after-timeout").await),
        effnet("1")
    );

    // The same URL with the right sha256 is rolled out; rollback brings version 1 back.
    let doc = json!({"command": "reload", "source": http.url("/v2.bundle"), "sha256": v2_sha.to_uppercase()});
    let s = command(&client, device, doc, Duration::from_secs(60)).await;
    assert_eq!(s["model_reload"]["state"], "ok", "{s}");
    assert_eq!(model_of(&ask(&client, device, "from-url").await), effnet("2"));
    let s = command(
        &client,
        device,
        json!({"command": "rollback"}),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(s["model_reload"]["state"], "ok", "{s}");
    assert_eq!(s["model"]["version"], "1", "{s}");
    assert_eq!(model_of(&ask(&client, device, "rolled-back").await), effnet("1"));

    let metrics = agent.http_get("/metrics").unwrap().1;
    for line in [
        r#"edge_agent_model_reloads_total{command="reload",outcome="checksum_mismatch"} 1"#,
        r#"edge_agent_model_reloads_total{command="reload",outcome="timeout"} 1"#,
        r#"edge_agent_model_reloads_total{command="rollback",outcome="ok"} 1"#,
        r#"edge_agent_model{name="efficientnet_lite0",version="1"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line} missing from\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_restores_the_previous_model_and_sighup_reloads_the_configured_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let configured = dir.path().join("model.bundle");
    std::fs::copy(efficientnet_bundle(), &configured).unwrap();
    let broker = Mosquitto::start();
    let device = "cam-rb";
    let agent = block(|| Agent::start(AgentSpec::new(device, &configured, Some(broker.url()))));
    let client = TestClient::connect(
        broker.port,
        "t-rb",
        &[&format!("app/{device}"), &format!("edge/{device}/status")],
    )
    .await;
    assert_eq!(model_of(&ask(&client, device, "first").await), effnet("1"));

    // Another model altogether, from a path.
    let inception = inception_bundle();
    let doc = json!({"command": "reload", "source": inception, "sha256": sha256(&inception)});
    let s = command(&client, device, doc, Duration::from_secs(120)).await;
    assert_eq!(s["model_reload"]["state"], "ok", "{s}");
    assert_eq!(s["model"]["name"], "inception_v3_seeded_nhwc", "{s}");
    let reply = ask(&client, device, "inception").await;
    assert_eq!(model_of(&reply).0, "inception_v3_seeded_nhwc");

    // Rollback: EfficientNet-Lite0 again, same answer as before.
    let s = command(
        &client,
        device,
        json!({"command": "rollback"}),
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(s["model_reload"]["state"], "ok", "{s}");
    assert_eq!(s["model"]["name"], "efficientnet_lite0", "{s}");
    let reply = ask(&client, device, "rolled-back").await;
    assert_eq!(model_of(&reply), effnet("1"));
    assert_eq!(reply["top"][0]["label"], "espresso");

    // SIGHUP reloads the configured file, which now holds version 2.
    let v2 = efficientnet_version(dir.path(), "2");
    std::fs::rename(&v2, &configured).unwrap();
    agent.sighup();
    let s = wait_reload_outcome(&client, device, "sighup", Duration::from_secs(60)).await;
    assert_eq!(s["model_reload"]["state"], "ok", "{s}");
    assert_eq!(
        s["model_reload"]["source"],
        configured.display().to_string(),
        "{s}"
    );
    assert_eq!(model_of(&ask(&client, device, "after-sighup").await), effnet("2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_reloads_on_sighup_while_requests_stream_and_none_fails() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("pool.bundle");
    std::fs::copy(efficientnet_bundle(), &bundle).unwrap();
    let v2 = efficientnet_version(dir.path(), "2");
    let server = Server::start_bundle(&bundle, free_port(), &[]);
    let channel = server.channel().await;

    // Two clients, 40 requests each, one every 40 ms; the bundle changes and SIGHUP arrives
    // about a quarter of the way in.
    let per_client = 40;
    let image = photo("coffee.jpg");
    let clients: Vec<_> = (0..2)
        .map(|_| {
            let mut tf = PredictionServiceClient::new(channel.clone());
            let image = image.clone();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut ticker = tokio::time::interval(Duration::from_millis(40));
                for _ in 0..per_client {
                    ticker.tick().await;
                    let r = tf.predict(images_request(vec![image.clone()])).await;
                    seen.push(r.map(|r| {
                        let r = r.into_inner();
                        let version = match r.model_spec.and_then(|s| s.version_choice) {
                            Some(VersionChoice::Version(v)) => v,
                            other => panic!("no numeric version in the response: {other:?}"),
                        };
                        (version, r.outputs["classes"].string_val[0].clone())
                    }));
                }
                seen
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(400)).await;
    std::fs::rename(&v2, &bundle).unwrap();
    server.sighup();
    let mut failed = 0;
    let mut sent = 0;
    let mut by_version: HashMap<i64, usize> = HashMap::new();
    for c in clients {
        let seen = c.await.unwrap();
        sent += seen.len();
        let mut versions = Vec::new();
        for r in seen {
            match r {
                Ok((v, top)) => {
                    assert_eq!(top, b"espresso");
                    *by_version.entry(v).or_default() += 1;
                    versions.push(v);
                }
                Err(e) => {
                    failed += 1;
                    eprintln!("failed: {e}");
                }
            }
        }
        let switch = versions.iter().position(|&v| v == 2).unwrap_or(versions.len());
        assert!(
            versions[..switch].iter().all(|&v| v == 1) && versions[switch..].iter().all(|&v| v == 2),
            "one client's replies switch version once: {versions:?}"
        );
    }
    println!("pool reload under a stream: sent {sent}, failed {failed}, by version {by_version:?}");
    assert_eq!(failed, 0);
    assert!(
        by_version.get(&1).is_some_and(|&n| n > 0) && by_version.get(&2).is_some_and(|&n| n > 0),
        "{by_version:?}"
    );
    let (_, metrics) = edge_e2e::daemon::http_get(server.http_port, "/metrics").unwrap();
    assert!(
        metrics.contains(r#"edge_pool_model{name="efficientnet_lite0",version="2"} 1"#)
            && metrics.contains(r#"edge_pool_model_reloads_total{outcome="ok"} 1"#),
        "{metrics}"
    );
}
