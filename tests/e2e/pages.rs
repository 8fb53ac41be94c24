//! The read-only pages in a real browser (headless Debian `chromium`): the device page of
//! `edge-agent run` and the fleet dashboard of `edge-agent fleet-status --serve`, against a
//! real Mosquitto broker and real agents. Assertions are on the DOM the browser built
//! (`--dump-dom`); screenshots are written to `<target>/e2e-artefacts/pages/` (see
//! `edge_e2e::browser`).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use edge_e2e::browser::{dump_dom, screenshot};
use edge_e2e::daemon::{Agent, AgentSpec, Mosquitto, TestClient, free_port, http_get, wait_for_port};
use edge_e2e::{bin, efficientnet_bundle, rewrite_manifest};
use rumqttc::v5::mqttbytes::QoS;
use serde_json::{Value, json};

use crate::daemon::{block, coffee};
use crate::reload::efficientnet_version;

/// The text of the element with `id` in a dumped DOM (`<tag id="...">text<`).
fn text_of(dom: &str, id: &str) -> Option<String> {
    let start = dom.find(&format!("id=\"{id}\""))?;
    let rest = &dom[start..];
    let open = rest.find('>')? + 1;
    let close = rest[open..].find('<')?;
    Some(rest[open..open + close].to_owned())
}

/// `<script` elements in a DOM: the page's own refresh script only.
fn scripts(dom: &str) -> usize {
    dom.matches("<script").count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_page_shows_the_serving_model_and_counts_a_request_sent_over_mqtt() {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    // Labels that are markup: the page must show them as text.
    let bundle = dir.path().join("script_labels.bundle");
    rewrite_manifest(&efficientnet_bundle(), &bundle, |m| {
        m["model"]["version"] = json!("7");
        if let Some(labels) = m["labels"].as_array_mut() {
            for l in labels {
                *l = json!(format!("<script>alert('{}')</script>", l.as_str().unwrap_or("")));
            }
        }
    });
    let device = "cam<script>alert(1)";
    let agent = Agent::start(
        AgentSpec::new(device, &bundle, Some(broker.url())).env("EDGE_AGENT_HTTP__RECENT_IMAGES", 4),
    );
    let url = format!("http://127.0.0.1:{}/", agent.http_port);

    let before = block(|| dump_dom(&url));
    assert_eq!(
        text_of(&before, "model").as_deref(),
        Some("efficientnet_lite0 7"),
        "{before}"
    );
    assert_eq!(text_of(&before, "answered-local").as_deref(), Some("0"));
    assert_eq!(text_of(&before, "state").as_deref(), Some("online"));
    assert!(
        before.contains("cam&lt;script&gt;alert(1)"),
        "device id as text: {before}"
    );
    assert_eq!(scripts(&before), 1, "{before}");

    let client = TestClient::connect(broker.port, "pages-app", &["app/pages"]).await;
    let id = "<script>alert('id')</script>";
    let topic = format!("edge/{device}/classify");
    client
        .request(&topic, &coffee(), "app/pages", "c1", &[("id", id)])
        .await;
    let replies = client
        .wait_for("app/pages", Duration::from_secs(30), |r| !r.is_empty())
        .await;
    let reply = replies.first().map(|r| r.json()).expect("a reply");
    assert_eq!(
        reply["top"][0]["label"], "<script>alert('espresso')</script>",
        "{reply}"
    );

    // The thumbnail is made after the reply: wait for it on the page.
    let end = Instant::now() + Duration::from_secs(20);
    let after = loop {
        let dom = block(|| dump_dom(&url));
        if dom.contains("class=\"thumb\"") || Instant::now() > end {
            break dom;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(text_of(&after, "answered-local").as_deref(), Some("1"), "{after}");
    assert_eq!(text_of(&after, "model").as_deref(), Some("efficientnet_lite0 7"));
    assert!(
        after.contains("&lt;script&gt;alert('espresso')&lt;/script&gt;"),
        "the label as text: {after}"
    );
    assert!(
        after.contains("&lt;script&gt;alert('id')&lt;/script&gt;"),
        "the request id as text"
    );
    assert_eq!(scripts(&after), 1, "no element from the network: {after}");
    assert!(
        after.contains("src=\"data:image/png;base64,"),
        "a thumbnail: {after}"
    );
    assert!(after.contains("<svg"), "charts");
    // Without JavaScript: the served HTML has the figures, and a <meta> refresh.
    let (_, html) = agent.http_get("/").expect("GET /");
    assert_eq!(text_of(&html, "answered-local").as_deref(), Some("1"));
    assert!(html.contains("<noscript><meta http-equiv=\"refresh\""), "{html}");
    let shot = block(|| screenshot(&url, "device-page", 1200, 1500));
    eprintln!("device page screenshot: {}", shot.display());

    let (code, body) = agent.http_get("/api/status").expect("/api/status");
    assert_eq!(code, 200);
    let doc: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["status"]["answered"]["local"], 1, "{doc}");
    assert_eq!(doc["status"]["mqtt_connected"], true);
    assert_eq!(doc["history"]["recent"][0]["id"], id);
    for path in ["/nope", "/api/nope", "/index.html", "/api/status/x"] {
        assert_eq!(agent.http_get(path).map(|r| r.0), Some(404), "{path}");
    }
    assert!(
        !agent.log().contains("thumbnails of the camera"),
        "no warning on loopback"
    );
}

struct Dashboard(Child);

impl Dashboard {
    /// `edge-agent fleet-status --serve` on a free port, `--broker url` and `extra` flags;
    /// returns once it listens.
    fn start(url: &str, extra: &[&std::ffi::OsStr]) -> (Dashboard, u16) {
        let port = free_port();
        let child = Command::new(bin("edge-agent"))
            .args([
                "fleet-status",
                "--serve",
                &format!("127.0.0.1:{port}"),
                "--broker",
                url,
            ])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start fleet-status --serve");
        let dashboard = Dashboard(child);
        assert!(
            wait_for_port(port, Duration::from_secs(10)),
            "the dashboard does not listen"
        );
        (dashboard, port)
    }

    /// Publishes a retained status document for `device` on the plain listener of `port`.
    async fn retained_status(port: u16, device: &str, status: &Value) {
        let client = TestClient::connect(port, &format!("pages-{}", free_port()), &[]).await;
        client
            .client
            .publish(
                format!("edge/{device}/status"),
                QoS::AtLeastOnce,
                true,
                serde_json::to_vec(status).unwrap(),
            )
            .await
            .unwrap();
        // Let it reach the broker before the client goes.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

impl Drop for Dashboard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls the dashboard's DOM until `done` holds (or 30 s pass) and returns the last DOM.
async fn dom_until(url: &str, done: impl Fn(&str) -> bool) -> String {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let dom = block(|| dump_dom(url));
        if done(&dom) || Instant::now() > end {
            return dom;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The row of `device` (its `<tr>` up to `</tr>`), by its first cell (escaped).
fn row<'a>(dom: &'a str, device: &str) -> Option<&'a str> {
    let start = dom.find(&format!("><td>{device}</td>"))?;
    let begin = dom[..start].rfind("<tr")?;
    let end = dom[start..].find("</tr>")? + start;
    Some(&dom[begin..end])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_dashboard_lists_running_agents_and_shows_a_killed_one_offline() {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let v2 = efficientnet_version(dir.path(), "2");
    let a = Agent::start(AgentSpec::new(
        "cam-a",
        &efficientnet_bundle(),
        Some(broker.url()),
    ));
    let mut b = Agent::start(AgentSpec::new("cam-b", &v2, Some(broker.url())));
    // A status from the network whose device id and error are markup.
    let hostile = json!({"device": "x", "state": "<script>alert('state')</script>",
        "model": {"name": "<img src=x onerror=alert(1)>", "version": "1"},
        "last_error": {"code": "internal", "message": "<script>alert('error')</script>"}});
    Dashboard::retained_status(broker.port, "<script>alert('dev')<\\script>", &hostile).await;
    let (_dashboard, port) = Dashboard::start(&broker.url(), &[]);
    let url = format!("http://127.0.0.1:{port}/");

    let online = |dom: &str, d: &str| row(dom, d).is_some_and(|r| r.contains("class=\"online\""));
    let dom = dom_until(&url, |d| online(d, "cam-a") && online(d, "cam-b")).await;
    let (ra, rb) = (
        row(&dom, "cam-a").expect("cam-a row"),
        row(&dom, "cam-b").expect("cam-b row"),
    );
    assert!(
        ra.contains("class=\"online\"") && ra.contains("efficientnet_lite0 1"),
        "{ra}"
    );
    assert!(
        rb.contains("class=\"online\"") && rb.contains("efficientnet_lite0 2"),
        "{rb}"
    );
    assert!(
        dom.contains("<b>efficientnet_lite0 1</b> 1") && dom.contains("<b>efficientnet_lite0 2</b> 1"),
        "{dom}"
    );
    let hostile_row = row(&dom, "&lt;script&gt;alert('dev')&lt;\\script&gt;").expect("the hostile row");
    assert!(
        hostile_row.contains("&lt;script&gt;alert('error')&lt;/script&gt;"),
        "{hostile_row}"
    );
    assert!(hostile_row.starts_with("<tr class=\"unknown\""), "{hostile_row}");
    assert!(dom.contains("&lt;img src=x onerror=alert(1)&gt;"));
    assert_eq!(scripts(&dom), 1, "no element from the network: {dom}");
    let shot = block(|| screenshot(&url, "fleet-online", 1300, 500));
    eprintln!("fleet dashboard screenshot: {}", shot.display());

    // Killed: the broker publishes cam-b's last will, and the row turns offline (greyed).
    b.kill9();
    let dom = dom_until(&url, |d| {
        row(d, "cam-b").is_some_and(|r| r.starts_with("<tr class=\"offline\""))
    })
    .await;
    let rb = row(&dom, "cam-b").expect("cam-b row");
    assert!(rb.starts_with("<tr class=\"offline\""), "cam-b offline: {rb}");
    assert!(
        rb.contains("efficientnet_lite0 2"),
        "the will names the model: {rb}"
    );
    assert!(online(&dom, "cam-a"), "cam-a still online");
    let shot = block(|| screenshot(&url, "fleet-offline", 1300, 500));
    eprintln!("fleet dashboard screenshot: {}", shot.display());

    // Filter and sort through the query string (works without JavaScript).
    let filtered = block(|| dump_dom(&format!("{url}?q=offline&sort=device")));
    assert!(
        row(&filtered, "cam-b").is_some() && row(&filtered, "cam-a").is_none(),
        "{filtered}"
    );
    let (code, body) = http_get(port, "/api/fleet").expect("/api/fleet");
    assert_eq!(code, 200);
    let doc: Value = serde_json::from_str(&body).unwrap();
    let states: Vec<(String, String)> = doc["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["device"].as_str().unwrap().to_owned(),
                d["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert!(states.contains(&("cam-a".into(), "online".into())), "{doc}");
    assert!(states.contains(&("cam-b".into(), "offline".into())), "{doc}");
    assert_eq!(doc["by_state"]["offline"], 1);
    for path in ["/nope", "/api/status", "/api/fleet/x"] {
        assert_eq!(http_get(port, path).map(|r| r.0), Some(404), "{path}");
    }
    drop(a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_dashboard_reads_statuses_from_a_broker_that_requires_client_certificates() {
    use std::os::unix::fs::PermissionsExt;
    let pki = tempfile::tempdir().unwrap();
    std::fs::set_permissions(pki.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let [ca, server, server_key, cert, key] = edge_e2e::test_pki(pki.path(), "fleet-viewer");
    let tls_port = free_port();
    let broker = Mosquitto::start_with_config(&format!(
        "listener {tls_port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n",
        ca.display(),
        server.display(),
        server_key.display(),
    ));
    // A retained status, published on the plain listener.
    let status = json!({"device": "cam-tls", "state": "online", "model": {"name": "m", "version": "3"}});
    Dashboard::retained_status(broker.port, "cam-tls", &status).await;
    let url = format!("mqtts://localhost:{tls_port}");
    let flag = std::ffi::OsStr::new;
    let flags = [
        flag("--tls-ca"),
        ca.as_os_str(),
        flag("--tls-cert"),
        cert.as_os_str(),
        flag("--tls-key"),
        key.as_os_str(),
    ];
    let (_dashboard, port) = Dashboard::start(&url, &flags);
    let end = Instant::now() + Duration::from_secs(20);
    let doc = loop {
        let doc: Value = http_get(port, "/api/fleet")
            .and_then(|(_, body)| serde_json::from_str(&body).ok())
            .unwrap_or(Value::Null);
        if doc["devices"][0]["device"] == "cam-tls" || Instant::now() > end {
            break doc;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(doc["devices"][0]["device"], "cam-tls", "{doc}");
    assert_eq!(doc["devices"][0]["version"], "3");
    assert_eq!(doc["connected"], true);
}

#[test]
fn thumbnails_on_an_address_other_hosts_can_reach_are_warned_about_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let http = free_port();
    let mut child = Command::new(bin("edge-agent"))
        .arg("run")
        .arg("--bundle")
        .arg(efficientnet_bundle())
        .arg("--queue-dir")
        .arg(dir.path().join("queue"))
        .args([
            "--device-id",
            "cam-open",
            "--http-listen",
            &format!("0.0.0.0:{http}"),
        ])
        .env(
            "EDGE_AGENT_EMBEDDED_BROKER__LISTEN",
            format!("127.0.0.1:{}", free_port()),
        )
        .env("EDGE_AGENT_MODEL__TUNING", "false")
        .env("EDGE_AGENT_HTTP__RECENT_IMAGES", "3")
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start edge-agent");
    let listening = wait_for_port(http, Duration::from_secs(60));
    let _ = child.kill();
    let out = child.wait_with_output().expect("edge-agent output");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(listening, "the agent never listened:\n{log}");
    assert!(
        log.contains("http.recent_images > 0 on an address other hosts can reach"),
        "no warning:\n{log}"
    );
}
