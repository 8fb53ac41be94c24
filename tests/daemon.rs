//! Real processes for the daemon tests: a Mosquitto broker on a free port with its own config,
//! `edge-agent run` processes, and an MQTT test client (rumqttc, MQTT 5 or 3.1.1).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use serde_json::Value;

use crate::bin;

/// A TCP port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Whether something listens on 127.0.0.1:`port` within `timeout`.
pub fn wait_for_port(port: u16, timeout: Duration) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

pub fn signal(child: &Child, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill {sig} {} failed", child.id());
}

/// The child's exit status, if it exits within `timeout`.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

fn mosquitto_binary() -> PathBuf {
    for dir in ["/usr/sbin", "/usr/bin", "/usr/local/sbin"] {
        let p = Path::new(dir).join("mosquitto");
        if p.exists() {
            return p;
        }
    }
    panic!("mosquitto not found: install the Debian package `mosquitto` (.ci/run does)")
}

/// A Mosquitto broker with persistence in its own temp dir, on a free port.
pub struct Mosquitto {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    verbose: bool,
    persistence: bool,
    /// `autosave_on_changes true` with `autosave_interval 1`: the persistence file is written
    /// after every change (each loop of the broker that stored something), not every second.
    save_on_changes: bool,
    /// Log lines go to stderr, which Mosquitto flushes after every line, redirected to the log
    /// file: nothing is lost when the broker is SIGKILLed (its `log_dest file` is flushed at
    /// most every 2 s).
    log_unbuffered: bool,
    /// Appended to the generated configuration (e.g. a TLS listener).
    extra: String,
}

impl Mosquitto {
    pub fn start() -> Self {
        Self::start_with(false, true)
    }

    /// Logs every packet (`log_type all`), so tests can count the agent's PUBACKs.
    pub fn start_verbose() -> Self {
        Self::start_with(true, true)
    }

    /// Without persistence, as Mosquitto runs by default (the benchmarks: the tests' broker
    /// saves its database every second, and each save stalls it).
    pub fn start_ephemeral() -> Self {
        Self::start_with(false, false)
    }

    /// With `extra` appended to the configuration (more listeners, TLS, an ACL); the files it
    /// names must be readable by the `mosquitto` user.
    pub fn start_with_config(extra: &str) -> Self {
        let mut m = Self::start_with(false, true);
        m.extra = extra.to_owned();
        m.restart(Duration::ZERO);
        m
    }

    /// For SIGKILL tests: verbose, its persistence file written after every change (the
    /// narrowest window Mosquitto offers for losing what it acknowledged), and a log that
    /// survives SIGKILL.
    pub fn start_for_kill9() -> Self {
        let mut m = Self::start_with(true, true);
        m.save_on_changes = true;
        m.log_unbuffered = true;
        m.restart(Duration::ZERO);
        m
    }

    fn start_with(verbose: bool, persistence: bool) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        // Started as root, mosquitto drops to the `mosquitto` user: let it write its log and
        // persistence file.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).expect("chmod");
        }
        let mut m = Mosquitto {
            port: free_port(),
            dir,
            child: None,
            verbose,
            persistence,
            save_on_changes: false,
            log_unbuffered: false,
            extra: String::new(),
        };
        m.spawn();
        m
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }

    fn spawn(&mut self) {
        let conf = self.dir.path().join("mosquitto.conf");
        let d = self.dir.path().display();
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\n\
                 allow_anonymous true\n\
                 {persistence}\
                 max_queued_messages 100000\n\
                 max_inflight_messages 20\n\
                 set_tcp_nodelay true\n\
                 {log_dest}\n\
                 {types}{extra}",
                port = self.port,
                extra = self.extra,
                log_dest = if self.log_unbuffered {
                    "log_dest stderr".to_owned()
                } else {
                    format!("log_dest file {d}/mosquitto.log")
                },
                persistence = if self.persistence {
                    format!(
                        "persistence true\npersistence_location {d}/\nautosave_interval 1\n{}",
                        if self.save_on_changes {
                            "autosave_on_changes true\n"
                        } else {
                            ""
                        }
                    )
                } else {
                    String::new()
                },
                types = if self.verbose {
                    "log_type all\n"
                } else {
                    "log_type error\nlog_type warning\nlog_type notice\nlog_type information\n"
                }
            ),
        )
        .expect("write mosquitto.conf");
        let stderr = if self.log_unbuffered {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.dir.path().join("mosquitto.log"))
                .map(Stdio::from)
                .expect("open mosquitto.log")
        } else {
            Stdio::null()
        };
        let child = Command::new(mosquitto_binary())
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start mosquitto");
        self.child = Some(child);
        assert!(
            wait_for_port(self.port, Duration::from_secs(10)),
            "mosquitto did not listen on {}",
            self.port
        );
    }

    /// Stops the broker cleanly (it saves its persistence file) and starts it again.
    pub fn restart(&mut self, down_for: Duration) {
        self.stop_and_start("-TERM", down_for);
    }

    /// SIGKILLs the broker (no final save: whatever changed since its last autosave is lost,
    /// acknowledged messages included), waits `down_for`, and starts it again on the same
    /// port, configuration and persistence directory.
    pub fn kill9_and_restart(&mut self, down_for: Duration) {
        self.stop_and_start("-KILL", down_for);
    }

    fn stop_and_start(&mut self, sig: &str, down_for: Duration) {
        if let Some(mut child) = self.child.take() {
            signal(&child, sig);
            wait_timeout(&mut child, Duration::from_secs(10))
                .unwrap_or_else(|| panic!("mosquitto does not stop on {sig}"));
        }
        std::thread::sleep(down_for);
        self.spawn();
    }

    /// Freezes the broker (SIGSTOP): connections stay open, nothing is read or answered.
    pub fn pause(&self) {
        signal(self.child.as_ref().expect("mosquitto running"), "-STOP");
    }

    /// Lets a paused broker go on (SIGCONT).
    pub fn resume(&self) {
        signal(self.child.as_ref().expect("mosquitto running"), "-CONT");
    }

    /// The configuration file's directory (for files the configuration names).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// How to run one agent.
#[derive(Clone, Debug)]
pub struct AgentSpec {
    pub device_id: String,
    pub bundle: PathBuf,
    /// `None`: the embedded broker, listening on `embedded_port`.
    pub broker: Option<String>,
    pub embedded_port: u16,
    pub protocol: &'static str,
    /// Extra `EDGE_AGENT_*` variables.
    pub env: Vec<(String, String)>,
}

impl AgentSpec {
    pub fn new(device_id: &str, bundle: &Path, broker: Option<String>) -> Self {
        Self {
            device_id: device_id.into(),
            bundle: bundle.into(),
            broker,
            embedded_port: 0,
            protocol: "v5",
            env: Vec::new(),
        }
    }

    pub fn env(mut self, key: &str, value: impl ToString) -> Self {
        self.env.push((key.into(), value.to_string()));
        self
    }

    /// `edge-agent run` for this spec with its queue in `queue_dir` and HTTP on `http_port`
    /// (stdout discarded; the caller decides about stderr).
    pub fn command(&self, queue_dir: &Path, http_port: u16) -> Command {
        let mut cmd = Command::new(bin("edge-agent"));
        cmd.arg("run")
            .arg("--bundle")
            .arg(&self.bundle)
            .arg("--queue-dir")
            .arg(queue_dir)
            .args(["--device-id", &self.device_id])
            .args(["--http-listen", &format!("127.0.0.1:{http_port}")])
            .args(["--protocol", self.protocol])
            .env_remove("RUST_LOG")
            .env("EDGE_AGENT_LOG__LEVEL", "info")
            // Runtime-settings tuning times the model for seconds at each first start; the
            // tests that are about it turn it on (`.env("EDGE_AGENT_MODEL__TUNING", "true")`).
            .env("EDGE_AGENT_MODEL__TUNING", "false")
            .stdout(Stdio::null());
        match &self.broker {
            Some(url) => {
                cmd.args(["--broker", url]);
            }
            None => {
                cmd.env(
                    "EDGE_AGENT_EMBEDDED_BROKER__LISTEN",
                    format!("127.0.0.1:{}", self.embedded_port),
                );
            }
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }
}

/// A running `edge-agent run`, its queue directory and HTTP port kept across restarts.
pub struct Agent {
    pub spec: AgentSpec,
    pub queue_dir: PathBuf,
    pub http_port: u16,
    _dir: Arc<tempfile::TempDir>,
    child: Option<Child>,
    log: Arc<Mutex<String>>,
    pub starts: usize,
}

impl Agent {
    /// Starts the agent and waits until `/readyz` says ready.
    pub fn start(spec: AgentSpec) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let queue_dir = dir.path().join("queue");
        Self::start_with_queue(spec, dir, queue_dir)
    }

    /// `start` with the queue in `queue_dir` (its models beside it, in `../models`), e.g. on
    /// a LazyFS mount.
    pub fn start_in(spec: AgentSpec, queue_dir: &Path) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        Self::start_with_queue(spec, dir, queue_dir.to_owned())
    }

    fn start_with_queue(spec: AgentSpec, dir: tempfile::TempDir, queue_dir: PathBuf) -> Self {
        let mut a = Agent {
            spec,
            queue_dir,
            http_port: free_port(),
            _dir: Arc::new(dir),
            child: None,
            log: Arc::new(Mutex::new(String::new())),
            starts: 0,
        };
        a.spawn();
        a.wait_ready(Duration::from_secs(60));
        a
    }

    fn spawn(&mut self) {
        let mut cmd = self.spec.command(&self.queue_dir, self.http_port);
        cmd.stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("start edge-agent");
        let stderr = child.stderr.take().expect("piped stderr");
        let log = self.log.clone();
        let n = self.starts;
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut l = log.lock().unwrap_or_else(|e| e.into_inner());
                l.push_str(&format!("[{n}] {line}\n"));
            }
        });
        self.starts += 1;
        self.child = Some(child);
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The agent process's peak resident memory so far (VmHWM), in bytes.
    pub fn peak_rss(&self) -> Option<u64> {
        let pid = self.child.as_ref()?.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let kb = status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))?
            .split_whitespace()
            .nth(1)?
            .parse::<u64>()
            .ok()?;
        Some(kb * 1024)
    }

    /// `GET path` on the agent's HTTP port: (status, body).
    pub fn http_get(&self, path: &str) -> Option<(u16, String)> {
        http_get(self.http_port, path)
    }

    pub fn wait_ready(&mut self, timeout: Duration) {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Some((200, _)) = self.http_get("/readyz") {
                return;
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!("edge-agent exited with {status} before ready:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("edge-agent not ready after {timeout:?}:\n{}", self.log());
    }

    /// A metric's value (summed over its label sets), from `/metrics`.
    pub fn metric(&self, name: &str) -> f64 {
        let (_, body) = self.http_get("/metrics").unwrap_or_default();
        body.lines()
            .filter(|l| {
                l.starts_with(name) && (l[name.len()..].starts_with(' ') || l[name.len()..].starts_with('{'))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Freezes the process (SIGSTOP): it writes nothing more until killed, as at a power cut.
    pub fn freeze(&self) {
        let child = self.child.as_ref().expect("agent running");
        signal(child, "-STOP");
    }

    /// After `freeze` and the power cut: SIGKILL, start again on the same directories, and
    /// return how long the new process took to be ready.
    pub fn restart_after_cut(&mut self, timeout: Duration) -> Duration {
        self.kill9();
        let started = Instant::now();
        self.spawn();
        self.wait_ready(timeout);
        started.elapsed()
    }

    /// Sends SIGHUP (reload the configured bundle).
    pub fn sighup(&self) {
        let child = self.child.as_ref().expect("agent running");
        signal(child, "-HUP");
    }

    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("agent running");
        signal(&child, "-TERM");
        wait_timeout(&mut child, Duration::from_secs(60)).expect("edge-agent exits after SIGTERM")
    }

    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
        self.wait_ready(Duration::from_secs(60));
    }

    /// Starts again after `kill9` or `terminate`.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none());
        self.spawn();
        self.wait_ready(Duration::from_secs(60));
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Runs `edge-agent run` for `spec` during `window` (a fresh queue) and kills it: (was it
/// ever ready, everything it logged). For agents that must never get in.
pub fn run_briefly(spec: &AgentSpec, window: Duration) -> (bool, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let http = free_port();
    let mut cmd = spec.command(&dir.path().join("queue"), http);
    cmd.stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("start edge-agent");
    let mut ready = false;
    let end = Instant::now() + window;
    while Instant::now() < end {
        std::thread::sleep(Duration::from_millis(100));
        ready |= matches!(http_get(http, "/readyz"), Some((200, _)));
    }
    let _ = child.kill();
    let out = child.wait_with_output().expect("edge-agent output");
    (ready, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// A minimal HTTP/1.0 GET (no client dependency needed for three endpoints).
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.split(' ').nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((status, body))
}

/// A message the test client received.
#[derive(Debug, Clone)]
pub struct Received {
    pub topic: String,
    pub payload: Bytes,
    pub correlation_data: Option<Bytes>,
    pub retain: bool,
    /// When the client's event loop read it.
    pub at: Instant,
}

impl Received {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.payload).unwrap_or_else(|e| {
            panic!(
                "reply on {} is not JSON ({e}): {:?}",
                self.topic,
                String::from_utf8_lossy(&self.payload)
            )
        })
    }
}

/// An MQTT 5 test client with a persistent session that records everything it receives.
pub struct TestClient {
    pub client: AsyncClient,
    received: Arc<Mutex<Vec<Received>>>,
    connects: Arc<Mutex<usize>>,
    _task: tokio::task::JoinHandle<()>,
}

impl TestClient {
    /// Connects to `port` and subscribes to `filters` (QoS 1).
    pub async fn connect(port: u16, id: &str, filters: &[&str]) -> Self {
        Self::connect_with(port, id, filters, None).await
    }

    /// As `connect`, logging in with a username and password.
    pub async fn connect_with(port: u16, id: &str, filters: &[&str], login: Option<(&str, &str)>) -> Self {
        let mut o = MqttOptions::new(id, "127.0.0.1", port);
        if let Some((user, password)) = login {
            o.set_credentials(user, password);
        }
        o.set_keep_alive(Duration::from_secs(5))
            .set_clean_start(false)
            .set_session_expiry_interval(Some(3600))
            .set_max_packet_size(Some(64 * 1024 * 1024))
            .set_outgoing_inflight_upper_limit(1000);
        let mut net = o.network_options();
        net.set_tcp_nodelay(true);
        o.set_network_options(net);
        let (client, mut eventloop) = AsyncClient::new(o, 10_000);
        let received = Arc::new(Mutex::new(Vec::new()));
        let connects = Arc::new(Mutex::new(0));
        let (r, c) = (received.clone(), connects.clone());
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        r.lock().unwrap().push(Received {
                            topic: String::from_utf8_lossy(&p.topic).into_owned(),
                            payload: p.payload.clone(),
                            correlation_data: p.properties.as_ref().and_then(|p| p.correlation_data.clone()),
                            retain: p.retain,
                            at: Instant::now(),
                        });
                    }
                    Ok(Event::Incoming(Packet::ConnAck(_))) => *c.lock().unwrap() += 1,
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        let me = TestClient {
            client,
            received,
            connects,
            _task: task,
        };
        let end = Instant::now() + Duration::from_secs(10);
        while *me.connects.lock().unwrap() == 0 {
            assert!(Instant::now() < end, "test client cannot connect to port {port}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for f in filters {
            me.client
                .subscribe(*f, QoS::AtLeastOnce)
                .await
                .expect("subscribe");
        }
        // Let the subscriptions reach the broker before anything is published.
        tokio::time::sleep(Duration::from_millis(200)).await;
        me
    }

    /// An MQTT 5 request: raw image, Response Topic, Correlation Data, user properties.
    pub async fn request(
        &self,
        topic: &str,
        image: &[u8],
        reply_to: &str,
        correlation: &str,
        props: &[(&str, &str)],
    ) {
        let properties = PublishProperties {
            response_topic: Some(reply_to.into()),
            correlation_data: Some(Bytes::copy_from_slice(correlation.as_bytes())),
            user_properties: props
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..PublishProperties::default()
        };
        self.client
            .publish_with_properties(topic, QoS::AtLeastOnce, false, image.to_vec(), properties)
            .await
            .expect("publish");
    }

    pub async fn publish(&self, topic: &str, payload: Vec<u8>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .expect("publish");
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// Everything received since the last `take` (or the start), removed from the record.
    pub fn take(&self) -> Vec<Received> {
        std::mem::take(&mut *self.received.lock().unwrap())
    }

    pub fn on(&self, topic: &str) -> Vec<Received> {
        self.received().into_iter().filter(|r| r.topic == topic).collect()
    }

    /// Waits until `done` holds for the messages on `topic` or `timeout` passes.
    pub async fn wait_for(
        &self,
        topic: &str,
        timeout: Duration,
        done: impl Fn(&[Received]) -> bool,
    ) -> Vec<Received> {
        let end = Instant::now() + timeout;
        loop {
            let got = self.on(topic);
            if done(&got) || Instant::now() > end {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Replies on `topic` counted by request id.
    pub fn replies_by_id(&self, topic: &str) -> HashMap<String, Vec<Value>> {
        let mut by_id: HashMap<String, Vec<Value>> = HashMap::new();
        for r in self.on(topic) {
            let v = r.json();
            let id = v["id"].as_str().unwrap_or_default().to_owned();
            by_id.entry(id).or_default().push(v);
        }
        by_id
    }
}

/// A property of a hand-encoded MQTT 5 PUBLISH: raw bytes, so that strings can be what no
/// Rust `String` (and so no rumqttc client) can hold, invalid UTF-8 included.
#[derive(Debug, Clone, Copy)]
pub enum RawProperty<'a> {
    /// 0x01, a byte.
    PayloadFormat(u8),
    /// 0x03, a UTF-8 string.
    ContentType(&'a [u8]),
    /// 0x08, a UTF-8 string.
    ResponseTopic(&'a [u8]),
    /// 0x09, binary data.
    CorrelationData(&'a [u8]),
    /// 0x26, a UTF-8 string pair.
    User(&'a [u8], &'a [u8]),
}

/// What the broker answered to a raw packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawOutcome {
    /// PUBACK with this reason code (0: success).
    PubAck(u8),
    /// DISCONNECT with this reason code (0x81: malformed packet, ...).
    Disconnect(u8),
    /// The broker closed the connection without a word.
    Closed,
}

/// A tiny MQTT 5 client on a plain `TcpStream` that writes its packets byte by byte (CONNECT,
/// PUBLISH QoS 1), for what a well-behaved library refuses to send.
pub struct RawMqtt {
    stream: TcpStream,
}

fn put_vbi(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            return;
        }
    }
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(
        &u16::try_from(b.len())
            .expect("an MQTT string fits 64 KB")
            .to_be_bytes(),
    );
    out.extend_from_slice(b);
}

fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut p = vec![first];
    put_vbi(&mut p, body.len());
    p.extend_from_slice(body);
    p
}

impl RawMqtt {
    /// Connects with a clean start and returns the client once the broker's CONNACK says
    /// success.
    pub fn connect(port: u16, client_id: &str) -> std::io::Result<Self> {
        let stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.set_nodelay(true)?;
        let mut me = RawMqtt { stream };
        let mut body = Vec::new();
        put_bytes(&mut body, b"MQTT");
        body.push(5); // protocol level
        body.push(0x02); // clean start
        body.extend_from_slice(&60u16.to_be_bytes()); // keep alive
        put_vbi(&mut body, 0); // no properties
        put_bytes(&mut body, client_id.as_bytes());
        me.stream.write_all(&packet(0x10, &body))?;
        match me.read_packet()? {
            Some((0x20, b)) if b.get(1) == Some(&0) => Ok(me),
            other => Err(std::io::Error::other(format!("no successful CONNACK: {other:?}"))),
        }
    }

    /// One packet: (first byte, body); `None` when the broker closed the connection.
    pub fn read_packet(&mut self) -> std::io::Result<Option<(u8, Vec<u8>)>> {
        let mut first = [0u8; 1];
        match self.stream.read_exact(&mut first) {
            Ok(()) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
                ) =>
            {
                return Ok(None);
            }
            Err(e) => return Err(e),
        }
        let (mut len, mut shift) = (0usize, 0);
        loop {
            let mut b = [0u8; 1];
            self.stream.read_exact(&mut b)?;
            len |= usize::from(b[0] & 0x7f) << shift;
            shift += 7;
            if b[0] & 0x80 == 0 {
                break;
            }
        }
        let mut body = vec![0u8; len];
        self.stream.read_exact(&mut body)?;
        Ok(Some((first[0], body)))
    }

    /// Sends a QoS 1 PUBLISH (packet id 1) with `topic` and `properties` exactly as given and
    /// returns what the broker answered.
    pub fn publish(
        &mut self,
        topic: &[u8],
        properties: &[RawProperty],
        payload: &[u8],
    ) -> std::io::Result<RawOutcome> {
        let mut props = Vec::new();
        for p in properties {
            match *p {
                RawProperty::PayloadFormat(b) => props.extend_from_slice(&[0x01, b]),
                RawProperty::ContentType(s) => {
                    props.push(0x03);
                    put_bytes(&mut props, s);
                }
                RawProperty::ResponseTopic(s) => {
                    props.push(0x08);
                    put_bytes(&mut props, s);
                }
                RawProperty::CorrelationData(s) => {
                    props.push(0x09);
                    put_bytes(&mut props, s);
                }
                RawProperty::User(k, v) => {
                    props.push(0x26);
                    put_bytes(&mut props, k);
                    put_bytes(&mut props, v);
                }
            }
        }
        let mut body = Vec::new();
        put_bytes(&mut body, topic);
        body.extend_from_slice(&1u16.to_be_bytes());
        put_vbi(&mut body, props.len());
        body.extend_from_slice(&props);
        body.extend_from_slice(payload);
        if let Err(e) = self.stream.write_all(&packet(0x32, &body)) {
            // The broker may close the connection while the packet is still being written.
            if matches!(
                e.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            ) {
                return Ok(RawOutcome::Closed);
            }
            return Err(e);
        }
        loop {
            match self.read_packet()? {
                None => return Ok(RawOutcome::Closed),
                // PUBACK: packet id, then the reason code (absent: success).
                Some((0x40, b)) => return Ok(RawOutcome::PubAck(b.get(2).copied().unwrap_or(0))),
                Some((0xE0, b)) => return Ok(RawOutcome::Disconnect(b.first().copied().unwrap_or(0))),
                Some(_) => continue,
            }
        }
    }
}

/// Eclipse Paho (Python, MQTT 5) as a third-party application: `tests/conformance/paho_requests.py`
/// run by `python` (a Python with paho-mqtt: `EDGE_MQTT_PYTHON` from scripts/clients.sh),
/// sending requests when told to and recording every reply it receives.
pub struct PahoClient {
    child: Child,
    stdin: Option<std::process::ChildStdin>,
    lines: Arc<Mutex<Vec<Value>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl PahoClient {
    /// Connects to the broker on `port`, subscribed to `reply_topic`; requests go to `device`
    /// with `image` as payload and correlation data `<prefix>-<n>`.
    pub fn start(
        python: &Path,
        port: u16,
        device: &str,
        reply_topic: &str,
        image: &Path,
        prefix: &str,
    ) -> Self {
        let script = crate::workspace().join("tests/conformance/paho_requests.py");
        let mut child = Command::new(python)
            .arg(script)
            .args([&port.to_string(), device, reply_topic])
            .arg(image)
            .arg(prefix)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("piped stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let l = lines.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let v = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("paho client printed {line:?}: {e}"));
                l.lock().unwrap_or_else(|e| e.into_inner()).push(v);
            }
        });
        let me = PahoClient {
            child,
            stdin,
            lines,
            reader: Some(reader),
        };
        let end = Instant::now() + Duration::from_secs(20);
        while !me.lines().iter().any(|v| v["ready"] == true) {
            assert!(
                Instant::now() < end,
                "the paho client did not connect and subscribe within 20 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        me
    }

    fn lines(&self) -> Vec<Value> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Publishes `n` more requests.
    pub fn send(&mut self, n: usize) {
        let stdin = self.stdin.as_mut().expect("paho client running");
        writeln!(stdin, "send {n}")
            .and_then(|()| stdin.flush())
            .expect("paho client takes commands");
    }

    /// Replies received so far (correlation data, request id, error), duplicates included.
    pub fn replies(&self) -> Vec<Value> {
        self.lines()
            .into_iter()
            .filter(|v| v.get("correlation").is_some())
            .collect()
    }

    /// Replies received so far, by correlation data.
    pub fn replies_by_correlation(&self) -> HashMap<String, usize> {
        let mut by = HashMap::new();
        for r in self.replies() {
            *by.entry(r["correlation"].as_str().unwrap_or_default().to_owned())
                .or_default() += 1;
        }
        by
    }

    /// Waits until `n` distinct requests have replies or `timeout` passes; returns how many have.
    pub fn wait_answered(&self, n: usize, timeout: Duration) -> usize {
        let end = Instant::now() + timeout;
        loop {
            let got = self.replies_by_correlation().len();
            if got >= n || Instant::now() > end {
                return got;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Disconnects (standard input closed) and waits for the client to exit.
    pub fn finish(mut self) -> Vec<Value> {
        drop(self.stdin.take());
        let status = wait_timeout(&mut self.child, Duration::from_secs(20)).expect("paho client exits");
        assert!(status.success(), "paho client exited with {status}");
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        self.replies()
    }
}

impl Drop for PahoClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
