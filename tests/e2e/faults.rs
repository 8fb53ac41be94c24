//! Faults around the broker connection (issue 7): the broker SIGKILLed under load, packets
//! with invalid UTF-8 that no MQTT library would send (a raw-socket client), and a broker that
//! requires a username and password. Real Mosquitto, real `edge-agent run` processes.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use edge_e2e::daemon::{
    Agent, AgentSpec, Mosquitto, RawMqtt, RawOutcome, RawProperty, TestClient, run_briefly,
};
use edge_e2e::efficientnet_bundle;
use serde_json::Value;

use crate::daemon::{agent_pubacks, block, coffee, summarize};

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// coffee.jpg at 128 pixels a side at most (a few KB): the SIGKILL test's broker writes its
/// whole database after every change, so small requests keep that affordable.
fn small_coffee() -> Vec<u8> {
    let img = image::load_from_memory(&coffee()).expect("coffee.jpg decodes");
    let mut out = std::io::Cursor::new(Vec::new());
    img.thumbnail(128, 128)
        .write_to(&mut out, image::ImageFormat::Jpeg)
        .expect("encode JPEG");
    out.into_inner()
}

/// Request ids the agent stored and acknowledged (its `queued` debug lines, JSON logs).
pub(crate) fn queued_ids(log: &str) -> HashSet<String> {
    log.lines()
        .filter_map(|l| l.split_once("] ").map(|(_, json)| json))
        .filter_map(|json| serde_json::from_str::<Value>(json).ok())
        .filter(|v| v["message"] == "queued")
        .filter_map(|v| v["id"].as_str().map(str::to_owned))
        .collect()
}

/// Reply topics `app/<x>/<id>` the broker received a PUBLISH on from `client_id`, by id.
fn replies_published(broker_log: &str, client_id: &str, prefix: &str) -> HashSet<String> {
    let from = format!("Received PUBLISH from {client_id} (");
    let topic = format!("'{prefix}");
    broker_log
        .lines()
        .filter(|l| l.contains(&from))
        .filter_map(|l| l.split_once(&topic).map(|(_, rest)| rest))
        .filter_map(|rest| rest.split_once('\'').map(|(id, _)| id.to_owned()))
        .collect()
}

fn queue_items(agent: &Agent) -> f64 {
    ["pending", "leased", "outbox"]
        .iter()
        .map(|s| {
            let (_, body) = agent.http_get("/metrics").unwrap_or_default();
            body.lines()
                .find(|l| l.starts_with(&format!("edge_agent_queue_items{{state=\"{s}\"}}")))
                .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .unwrap_or(0.0)
        })
        .sum()
}

/// Mosquitto SIGKILLed 4 times while 300 requests go through an agent.
///
/// What can be asserted honestly. A SIGKILLed Mosquitto loses every change since its last
/// save of the persistence file, acknowledged messages included: a request it has PUBACKed
/// to the publisher but not yet delivered, and a reply it has PUBACKed to the agent but not
/// yet delivered (the agent has then removed it from its outbox, as it must: the broker took
/// it). The broker here saves after every change (`autosave_on_changes true`,
/// `autosave_interval 1`), which narrows that window to one loop of the broker but does not
/// close it. So the test asserts, strictly:
///
/// - the agent's guarantee, by request id: every request the agent stored and acknowledged
///   (its own `queued` log lines) was answered by it: the broker logged the agent's reply
///   PUBLISH on that request's own reply topic (or the test client got the reply), and at
///   the end the agent's queue is empty (no pending, leased or unacknowledged reply);
/// - end to end, with the application's at-least-once: requests without a reply once the
///   agent is idle are published again (same id), at most 3 rounds, and then every request
///   has a reply, none of them an error;
/// - the agent process survived every kill (one start, no panic) and reconnected each time.
///
/// The numbers printed say how many requests the broker itself lost (re-published), split by
/// whether the agent had acknowledged them (a lost reply) or never saw them (a lost request).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_kill_9_under_load_loses_no_request_the_agent_acknowledged() {
    const DEVICE: &str = "cam-k9b";
    const REQUESTS: usize = 300;
    const KILLS: usize = 4;
    let agent_id = format!("edge-agent-{DEVICE}");
    let mut broker = Mosquitto::start_for_kill9();
    let spec = AgentSpec::new(DEVICE, &efficientnet_bundle(), Some(broker.url()))
        .env("EDGE_AGENT_LOG__FORMAT", "json")
        .env("EDGE_AGENT_LOG__LEVEL", "info,edge_agent::daemon=debug");
    let agent = block(|| Agent::start(spec));
    let client = TestClient::connect(broker.port, "t-k9b", &["app/k9b/#"]).await;
    let image = small_coffee();
    let topic = format!("edge/{DEVICE}/classify");
    let reply_topic = |id: &str| format!("app/k9b/{id}");
    let replied = |client: &TestClient| -> HashMap<String, Vec<Value>> {
        let mut by: HashMap<String, Vec<Value>> = HashMap::new();
        for r in client.received() {
            if let Some(id) = r.topic.strip_prefix("app/k9b/") {
                by.entry(id.to_owned()).or_default().push(r.json());
            }
        }
        by
    };
    let ids: Vec<String> = (0..REQUESTS).map(|i| format!("kb-{i}")).collect();
    for id in &ids {
        client
            .request(&topic, &image, &reply_topic(id), id, &[("id", id)])
            .await;
    }

    let mut kills = 0;
    let mut seed: u64 = 0x6b39_b0c3;
    for k in 0..KILLS {
        let threshold = (k + 1) * REQUESTS / (KILLS + 2);
        let end = Instant::now() + Duration::from_secs(120);
        while replied(&client).len() < threshold && Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            replied(&client).len() >= threshold,
            "stalled at {} replies before kill {kills}\nagent:\n{}\nbroker:\n{}",
            replied(&client).len(),
            tail(&agent.log(), 30),
            tail(&broker.log(), 40)
        );
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        tokio::time::sleep(Duration::from_millis((seed >> 33) % 200)).await;
        block(|| broker.kill9_and_restart(Duration::from_millis(300)));
        kills += 1;
    }

    // Wait for everything to settle: all answered, or the agent idle (connected, empty
    // queue) with no new reply for 5 s; then publish the unanswered again.
    let mut republished: Vec<String> = Vec::new();
    let mut rounds = 0;
    let mut first_acknowledged = HashSet::new();
    loop {
        let end = Instant::now() + Duration::from_secs(180);
        let (mut last_count, mut last_change) = (0, Instant::now());
        loop {
            let n = replied(&client).len();
            if n != last_count {
                (last_count, last_change) = (n, Instant::now());
            }
            let idle = agent.metric("edge_agent_mqtt_connected") == 1.0 && queue_items(&agent) == 0.0;
            if n == REQUESTS
                || (idle && last_change.elapsed() > Duration::from_secs(5))
                || Instant::now() > end
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let by = replied(&client);
        let missing: Vec<String> = ids.iter().filter(|id| !by.contains_key(*id)).cloned().collect();
        if rounds == 0 {
            first_acknowledged = queued_ids(&agent.log());
            let lost_replies = missing
                .iter()
                .filter(|id| first_acknowledged.contains(*id))
                .count();
            println!(
                "broker kill -9: after {kills} kills, {} of {REQUESTS} unanswered: {lost_replies} acknowledged by the agent \
                 (reply lost by the broker), {} never acknowledged (request lost by the broker): {:?}",
                missing.len(),
                missing.len() - lost_replies,
                &missing[..missing.len().min(10)]
            );
        }
        if missing.is_empty() || rounds == 3 {
            break;
        }
        rounds += 1;
        for id in &missing {
            client
                .request(&topic, &image, &reply_topic(id), id, &[("id", id)])
                .await;
        }
        republished.extend(missing);
    }

    let log = agent.log();
    let broker_log = broker.log();
    let by = replied(&client);
    let acknowledged = queued_ids(&log);
    let published = replies_published(&broker_log, &agent_id, "app/k9b/");
    let pubacks = agent_pubacks(&broker, &agent_id);
    println!(
        "broker kill -9: {kills} kills / acknowledged by the agent {} ids ({} before re-publishing; \
         {pubacks} PUBACKs in the broker log, {} counted by the agent) / re-published {} in {rounds} rounds / \
         agent connections {}",
        acknowledged.len(),
        first_acknowledged.len(),
        agent.metric("edge_agent_requests_acknowledged_total"),
        republished.len(),
        agent.metric("edge_agent_mqtt_connections_total"),
    );

    // The agent's guarantee, by id.
    let unanswered: Vec<&String> = acknowledged
        .iter()
        .filter(|id| !published.contains(*id) && !by.contains_key(*id))
        .collect();
    assert!(
        unanswered.is_empty(),
        "requests the agent acknowledged and never answered: {unanswered:?}"
    );
    assert_eq!(queue_items(&agent), 0.0, "the agent's queue is not empty");
    assert_eq!(agent.starts, 1);
    assert!(!log.contains("panicked"), "{}", tail(&log, 40));
    assert!(
        agent.metric("edge_agent_mqtt_connections_total") >= (KILLS + 1) as f64,
        "the agent did not reconnect after every kill"
    );
    // End to end: every request answered, none with an error (sent/replied/duplicates printed).
    summarize("broker kill -9", &ids, &by, pubacks);
    assert_eq!(kills, KILLS);
}

/// One hand-made PUBLISH: its name (also its correlation data unless it sets its own), the
/// topic, the properties, and the reply the agent must give if the broker lets it through
/// (`None`: the broker must refuse it, as the MQTT 5 specification requires of a server
/// receiving a malformed UTF-8 string).
struct Hostile {
    name: &'static str,
    topic: Vec<u8>,
    props: Vec<(u8, Vec<u8>, Vec<u8>)>,
    if_delivered: Option<&'static str>,
}

fn hostile_catalogue(device: &str) -> Vec<Hostile> {
    let topic = format!("edge/{device}/classify").into_bytes();
    let with = |extra: &[u8]| [topic.as_slice(), extra].concat();
    // (property id, key or value, value of a user property)
    let user = |k: &[u8], v: &[u8]| (0x26u8, k.to_vec(), v.to_vec());
    let response = |t: &[u8]| (0x08u8, t.to_vec(), Vec::new());
    let h = |name, topic: Vec<u8>, props, if_delivered| Hostile {
        name,
        topic,
        props,
        if_delivered,
    };
    vec![
        h("topic-c3-28", with(b"\xC3\x28"), vec![], None),
        h("topic-nul", with(b"\x00"), vec![], None),
        h("topic-overlong-slash", with(b"\xC0\xAF"), vec![], None),
        h("user-key-ff", topic.clone(), vec![user(b"id\xff", b"x")], None),
        h(
            "user-value-c3-28",
            topic.clone(),
            vec![user(b"id", b"\xC3\x28")],
            None,
        ),
        h(
            "user-value-surrogate",
            topic.clone(),
            vec![user(b"id", b"\xED\xA0\x80")],
            None,
        ),
        h(
            "user-value-nul",
            topic.clone(),
            vec![user(b"id", b"a\x00b")],
            None,
        ),
        h(
            "response-topic-c3-28",
            topic.clone(),
            vec![response(b"app/u8/\xC3\x28")],
            None,
        ),
        h(
            "response-topic-nul",
            topic.clone(),
            vec![response(b"app/u8\x00x")],
            None,
        ),
        h(
            "content-type-ff",
            topic.clone(),
            vec![(0x03, b"image/\xff".to_vec(), Vec::new())],
            None,
        ),
        // Control characters are valid UTF-8 (the specification says SHOULD NOT, not MUST NOT):
        // a broker may pass them on; the agent then refuses the value or echoes it escaped.
        h(
            "user-top-k-control",
            topic.clone(),
            vec![user(b"top_k", b"\x01\x1b[2J")],
            Some("invalid_request"),
        ),
        h(
            "user-id-control",
            topic.clone(),
            vec![user(b"id", b"id\x07\x1b[31m\x7f")],
            Some("ok"),
        ),
        // Correlation data is binary: any byte is fine and must come back as it was.
        h(
            "correlation-binary",
            topic.clone(),
            vec![(0x09, b"cb\x00\x01\x1f\x7f\xff\xfe".to_vec(), Vec::new())],
            Some("ok"),
        ),
        // A payload format indicator saying UTF-8 on a JPEG payload.
        h(
            "payload-format-utf8",
            topic.clone(),
            vec![(0x01, vec![1], Vec::new())],
            Some("ok"),
        ),
    ]
}

/// Sends the catalogue to the broker on `port` the agent is subscribed to, then a valid
/// request; checks the agent's answers and returns what the broker did with each packet.
async fn send_hostile_utf8(
    port: u16,
    device: &str,
    agent: &Agent,
    strict: bool,
    broker_log: impl Fn() -> String,
) -> Vec<String> {
    let replies = format!("app/u8-{device}");
    let default_replies = format!("edge/{device}/result");
    let client = TestClient::connect(port, &format!("t-{device}"), &[&replies, &default_replies]).await;
    let jpeg = coffee();
    let catalogue = hostile_catalogue(device);
    // The raw client itself, on a valid request: the broker takes it and the agent answers.
    let outcome = block(|| {
        RawMqtt::connect(port, &format!("raw-{device}-valid"))
            .and_then(|mut raw| {
                raw.publish(
                    format!("edge/{device}/classify").as_bytes(),
                    &[
                        RawProperty::ResponseTopic(replies.as_bytes()),
                        RawProperty::CorrelationData(b"raw-valid"),
                        RawProperty::User(b"id", "raw-valid-\u{fc}\u{1F600}".as_bytes()),
                    ],
                    &jpeg,
                )
            })
            .expect("raw client")
    });
    assert_eq!(outcome, RawOutcome::PubAck(0), "the raw client's valid request");

    let mut seen = Vec::new();
    let mut delivered: Vec<(Vec<u8>, &'static str, &'static str)> = Vec::new();
    let mut refused: Vec<Vec<u8>> = Vec::new();
    let mut tolerated: Vec<(Vec<u8>, &'static str)> = Vec::new();
    for (i, case) in catalogue.iter().enumerate() {
        let client_id = format!("raw-{device}-{i}");
        let own_corr = case.props.iter().find(|p| p.0 == 0x09).map(|p| p.1.clone());
        let corr = own_corr.unwrap_or_else(|| case.name.as_bytes().to_vec());
        let mut props: Vec<RawProperty> = case
            .props
            .iter()
            .map(|(id, a, b)| match id {
                0x01 => RawProperty::PayloadFormat(a[0]),
                0x03 => RawProperty::ContentType(a),
                0x08 => RawProperty::ResponseTopic(a),
                0x09 => RawProperty::CorrelationData(a),
                _ => RawProperty::User(a, b),
            })
            .collect();
        if !case.props.iter().any(|p| p.0 == 0x08) {
            props.push(RawProperty::ResponseTopic(replies.as_bytes()));
        }
        if !case.props.iter().any(|p| p.0 == 0x09) {
            props.push(RawProperty::CorrelationData(&corr));
        }
        let outcome = block(|| {
            RawMqtt::connect(port, &client_id)
                .and_then(|mut raw| raw.publish(&case.topic, &props, &jpeg))
                .expect("raw client")
        });
        let said: Vec<String> = broker_log()
            .lines()
            .filter(|l| l.contains(&client_id) && !l.contains("PUBLISH") && !l.contains("CONNECT"))
            .map(|l| l.split_once(": ").map_or(l, |(_, rest)| rest).to_owned())
            .collect();
        let line = format!("{}: {outcome:?} {said:?}", case.name);
        println!("  {line}");
        seen.push(line);
        match (outcome, case.if_delivered) {
            (RawOutcome::PubAck(0), Some(code)) => delivered.push((corr, case.name, code)),
            // Mosquitto refuses every malformed string; rumqttd takes a topic name with a
            // NUL (the specification forbids it), which matches no subscription of the agent.
            (RawOutcome::PubAck(0), None) if strict => {
                panic!("the broker accepted {} (malformed UTF-8)", case.name)
            }
            // Accepted by a lax broker: the agent may answer it (any reply is fine), and
            // must not break (checked below for everything).
            (RawOutcome::PubAck(0), None) => tolerated.push((corr, case.name)),
            _ => refused.push(corr),
        }
    }
    // A valid request after all that is served.
    client
        .request(
            &format!("edge/{device}/classify"),
            &jpeg,
            &replies,
            "after",
            &[("id", "after")],
        )
        .await;
    let want: Vec<Vec<u8>> = delivered
        .iter()
        .map(|d| d.0.clone())
        .chain([b"raw-valid".to_vec(), b"after".to_vec()])
        .collect();
    let end = Instant::now() + Duration::from_secs(90);
    let by_corr = loop {
        let got: HashMap<Vec<u8>, Value> = client
            .received()
            .into_iter()
            .filter(|r| !r.retain)
            .map(|r| (r.correlation_data.clone().unwrap_or_default().to_vec(), r.json()))
            .collect();
        if want.iter().all(|c| got.contains_key(c)) || Instant::now() > end {
            break got;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for corr in &want {
        assert!(
            by_corr.contains_key(corr),
            "no reply for {:?}; got {by_corr:?}\n{}",
            String::from_utf8_lossy(corr),
            tail(&agent.log(), 30)
        );
    }
    assert_eq!(by_corr[&b"after".to_vec()]["top"][0]["label"], "espresso");
    assert_eq!(by_corr[&b"raw-valid".to_vec()]["id"], "raw-valid-\u{fc}\u{1F600}");
    for (corr, name, code) in &delivered {
        let v = &by_corr[corr];
        let got = v["error"]["code"].as_str().unwrap_or("ok");
        assert_eq!(got, *code, "{name}: {v}");
        if *code == "ok" {
            assert_eq!(v["top"][0]["label"], "espresso", "{name}: {v}");
        }
        if *name == "user-id-control" {
            assert_eq!(v["id"], "id\x07\x1b[31m\x7f", "{v}");
        }
    }
    for corr in &refused {
        assert!(
            !by_corr.contains_key(corr),
            "a reply to a refused packet {:?}",
            String::from_utf8_lossy(corr)
        );
    }
    for (corr, name) in &tolerated {
        let line = format!(
            "{name}: accepted by the broker; the agent's reply: {:?}",
            by_corr.get(corr)
        );
        println!("  {line}");
        seen.push(line);
    }
    // Nothing broke the agent's connection or the agent.
    assert_eq!(
        agent.metric("edge_agent_mqtt_connections_total"),
        1.0,
        "the agent reconnected"
    );
    assert_eq!(agent.metric("edge_agent_mqtt_connected"), 1.0);
    assert_eq!(agent.http_get("/healthz").map(|r| r.0), Some(200));
    let log = agent.log();
    assert!(!log.contains("panicked"), "{}", tail(&log, 40));
    seen
}

/// Invalid UTF-8 where MQTT requires UTF-8 (topic name, user property key and value,
/// Response Topic, Content Type), NUL and control characters, binary correlation data: sent
/// with a raw-socket client, first to Mosquitto, then to the agent's embedded broker. Malformed
/// UTF-8 must be refused by the broker and never reach the agent; what does reach it (control
/// characters, binary correlation data) gets the right reply; the agent never loses its
/// connection, never panics, and serves the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_in_topics_and_properties_never_reaches_or_breaks_the_agent() {
    let broker = Mosquitto::start_verbose();
    let agent = block(|| {
        Agent::start(AgentSpec::new(
            "cam-u8",
            &efficientnet_bundle(),
            Some(broker.url()),
        ))
    });
    println!("Mosquitto:");
    let seen = send_hostile_utf8(broker.port, "cam-u8", &agent, true, || broker.log()).await;
    assert!(!seen.is_empty());

    let mut spec = AgentSpec::new("cam-u8e", &efficientnet_bundle(), None);
    spec.embedded_port = edge_e2e::daemon::free_port();
    let port = spec.embedded_port;
    let embedded = block(|| Agent::start(spec));
    println!("embedded broker (rumqttd):");
    send_hostile_utf8(port, "cam-u8e", &embedded, false, || embedded.log()).await;
}

/// Mosquitto with a `password_file` and `allow_anonymous false`: the agent with the right
/// username and password is served; a wrong password, a username without a password and no
/// login at all never get in (never ready) and the agent says why (the broker's refusal, in
/// words an operator can act on), without ever logging the password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_requiring_a_password_serves_the_right_login_and_refusals_are_logged_clearly() {
    use std::os::unix::fs::PermissionsExt;
    const PASSWORD: &str = "pw-k3y-Fz9";
    const WRONG: &str = "pw-wrong-Qx2";
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let passwords = dir.path().join("passwords");
    for (user, password, create) in [("cam-pw", PASSWORD, true), ("app", "app-pw", false)] {
        let mut cmd = std::process::Command::new("mosquitto_passwd");
        cmd.arg("-b");
        if create {
            cmd.arg("-c");
        }
        let status = cmd
            .arg(&passwords)
            .args([user, password])
            .status()
            .expect("mosquitto_passwd runs (Debian package mosquitto)");
        assert!(status.success(), "mosquitto_passwd {user}");
    }
    std::fs::set_permissions(&passwords, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let broker = Mosquitto::start_with_config(&format!(
        "allow_anonymous false\npassword_file {}\n",
        passwords.display()
    ));

    let spec = |device: &str| AgentSpec::new(device, &efficientnet_bundle(), Some(broker.url()));
    let _agent = block(|| {
        Agent::start(
            spec("cam-pw")
                .env("EDGE_AGENT_MQTT__USERNAME", "cam-pw")
                .env("EDGE_AGENT_MQTT__PASSWORD", PASSWORD),
        )
    });
    let client = TestClient::connect_with(broker.port, "t-pw", &["app/pw"], Some(("app", "app-pw"))).await;
    client
        .request("edge/cam-pw/classify", &coffee(), "app/pw", "p1", &[("id", "p1")])
        .await;
    let got = client
        .wait_for("app/pw", Duration::from_secs(60), |r| !r.is_empty())
        .await;
    let v = got
        .first()
        .expect("a reply through the password-protected broker")
        .json();
    assert_eq!(v["top"][0]["label"], "espresso", "{v}");

    // (case, login, what the log must say). Mosquitto 2.0 answers all three with CONNACK
    // "not authorized" (0x87), a wrong password included, never "bad username or password".
    type Login<'a> = Vec<(&'a str, &'a str)>;
    let cases: [(&str, Login, &str); 3] = [
        (
            "wrong password",
            vec![
                ("EDGE_AGENT_MQTT__USERNAME", "cam-pw"),
                ("EDGE_AGENT_MQTT__PASSWORD", WRONG),
            ],
            "check mqtt.username and mqtt.password",
        ),
        (
            "username without a password",
            vec![("EDGE_AGENT_MQTT__USERNAME", "cam-pw")],
            "check mqtt.username and mqtt.password",
        ),
        ("no login", vec![], "check mqtt.username and mqtt.password"),
    ];
    for (n, (case, login, reason)) in cases.into_iter().enumerate() {
        let mut s = spec(&format!("cam-pw{n}"));
        for (k, v) in login {
            s = s.env(k, v);
        }
        let (ready, log) = block(|| run_briefly(&s, Duration::from_secs(6)));
        let said: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("refused the connection"))
            .collect();
        println!("{case}: ready {ready}; {}", said.first().unwrap_or(&"(nothing)"));
        assert!(!ready, "{case}: the agent got in:\n{log}");
        assert!(
            said.iter().any(|l| l.contains(reason)),
            "{case}: no clear refusal ({reason}) in the log:\n{log}"
        );
        assert!(
            !log.contains(WRONG) && !log.contains(PASSWORD),
            "{case}: a password in the log"
        );
    }
    let broker_log = broker.log();
    assert!(
        broker_log.contains("not authorised") || broker_log.contains("not authorized"),
        "{}",
        tail(&broker_log, 20)
    );
}
