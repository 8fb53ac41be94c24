//! `edge-agent fleet-status`: every device's retained status from the broker, as a table or
//! JSON, or (`--serve ADDR`) live as the fleet dashboard (`edge_agent::web::fleet`).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use serde_json::Value;

use edge_agent::config::{broker_address, broker_tls};
use edge_agent::queue::UnixMillis;
use edge_agent::web::Fleet;

#[derive(Args, Debug)]
pub struct FleetArgs {
    /// The fleet's broker, e.g. mqtt://broker:1883.
    #[arg(
        long,
        env = "EDGE_AGENT_MQTT__BROKER",
        default_value = "mqtt://127.0.0.1:1883"
    )]
    broker: String,
    /// Topic prefix of the agents (their mqtt.topic_prefix).
    #[arg(long, default_value = "edge")]
    prefix: String,
    /// Stop once no status arrived for this long, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    quiet_ms: u64,
    /// Give up after this long, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
    /// Print the status documents as one JSON array.
    #[arg(long)]
    json: bool,
    /// Serve the live fleet dashboard on this address (e.g. 127.0.0.1:9465: `/` and
    /// `/api/fleet`) until SIGTERM or SIGINT, instead of printing once.
    #[arg(long, value_name = "ADDR", conflicts_with = "json")]
    serve: Option<String>,
    #[arg(long, env = "EDGE_AGENT_MQTT__USERNAME", default_value = "")]
    username: String,
    #[arg(
        long,
        env = "EDGE_AGENT_MQTT__PASSWORD",
        default_value = "",
        hide_env_values = true
    )]
    password: String,
    /// PEM of the CA that signed the broker's certificate (mqtts:// brokers).
    #[arg(long, env = "EDGE_AGENT_MQTT__TLS_CA", value_name = "FILE")]
    tls_ca: Option<std::path::PathBuf>,
    /// Client certificate (PEM) for brokers that require one, with --tls-key.
    #[arg(
        long,
        env = "EDGE_AGENT_MQTT__TLS_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    tls_cert: Option<std::path::PathBuf>,
    /// Client key (PEM), with --tls-cert.
    #[arg(
        long,
        env = "EDGE_AGENT_MQTT__TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    tls_key: Option<std::path::PathBuf>,
}

pub fn run(args: FleetArgs) -> Result<ExitCode> {
    let (host, port) = broker_address(&args.broker).map_err(|e| anyhow::anyhow!("--broker: {e}"))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    if let Some(addr) = &args.serve {
        runtime.block_on(serve(&args, host, port, addr))?;
        return Ok(ExitCode::SUCCESS);
    }
    let statuses = runtime.block_on(collect(&args, host, port))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&statuses)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<20} {:<13} {:<24} {:<8} {:>7} {:>8} {:>8} {:>8}  LAST ERROR",
        "DEVICE", "STATE", "MODEL", "AGENT", "QUEUED", "LOCAL", "CLUSTER", "UPTIME"
    );
    for s in &statuses {
        let text = |v: &Value| v.as_str().map(str::to_owned).unwrap_or_else(|| "-".into());
        let num = |v: &Value| v.as_u64().map(|n| n.to_string()).unwrap_or_else(|| "-".into());
        let model = format!("{} {}", text(&s["model"]["name"]), text(&s["model"]["version"]));
        let queued = s["queue"]["pending"].as_u64().unwrap_or(0) + s["queue"]["leased"].as_u64().unwrap_or(0);
        println!(
            "{:<20} {:<13} {:<24} {:<8} {:>7} {:>8} {:>8} {:>7}s  {}",
            text(&s["device"]),
            text(&s["state"]),
            model,
            text(&s["agent_version"]),
            queued,
            num(&s["answered"]["local"]),
            num(&s["answered"]["cluster"]),
            num(&s["uptime_s"]),
            s["last_error"]["code"].as_str().unwrap_or(""),
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The connection options of both modes: a clean session under a fresh client id, statuses up
/// to 1 MiB, login and TLS as given.
fn options(args: &FleetArgs, host: String, port: u16) -> Result<MqttOptions> {
    let id = format!("edge-fleet-status-{}", std::process::id());
    let mut o = MqttOptions::new(id, host, port);
    o.set_keep_alive(Duration::from_secs(10))
        .set_clean_start(true)
        .set_max_packet_size(Some(1024 * 1024));
    if !args.username.is_empty() {
        o.set_credentials(&args.username, &args.password);
    }
    if broker_tls(&args.broker) {
        let read = |flag: &str, path: &std::path::Path| {
            std::fs::read(path).with_context(|| format!("cannot read {flag} {}", path.display()))
        };
        let ca = args
            .tls_ca
            .as_deref()
            .context("--broker is mqtts://: --tls-ca names the CA of the broker's certificate")?;
        let client = match (&args.tls_cert, &args.tls_key) {
            (Some(cert), Some(key)) => Some((read("--tls-cert", cert)?, read("--tls-key", key)?)),
            _ => None,
        };
        let tls = edge_agent::mqtt::Tls {
            ca: read("--tls-ca", ca)?,
            client,
        };
        o.set_transport(tls.transport());
    }
    Ok(o)
}

async fn collect(args: &FleetArgs, host: String, port: u16) -> Result<Vec<Value>> {
    let (client, mut events) = AsyncClient::new(options(args, host, port)?, 16);
    let filter = format!("{}/+/status", args.prefix);
    let mut by_device = std::collections::BTreeMap::new();
    let start = Instant::now();
    let mut last = Instant::now();
    let mut subscribed = false;
    loop {
        let quiet = Duration::from_millis(args.quiet_ms);
        let wait = if subscribed {
            quiet.saturating_sub(last.elapsed())
        } else {
            Duration::from_millis(args.timeout_ms)
        };
        if start.elapsed() > Duration::from_millis(args.timeout_ms) || (subscribed && wait.is_zero()) {
            break;
        }
        match tokio::time::timeout(wait, events.poll()).await {
            Err(_) => break,
            Ok(Err(e)) => anyhow::bail!("cannot read statuses from {}: {e}", args.broker),
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => {
                client.subscribe(filter.as_str(), QoS::AtLeastOnce).await?;
            }
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => {
                subscribed = true;
                last = Instant::now();
            }
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                last = Instant::now();
                let topic = String::from_utf8_lossy(&p.topic).into_owned();
                match serde_json::from_slice::<Value>(&p.payload) {
                    Ok(v) => {
                        by_device.insert(topic, v);
                    }
                    Err(e) => eprintln!("warning: {topic}: not a status document ({e})"),
                }
            }
            Ok(Ok(_)) => {}
        }
    }
    let _ = client.disconnect().await;
    Ok(by_device.into_values().collect())
}

/// The dashboard: follows `<prefix>/+/status` (reconnecting after a lost connection) and
/// serves what it saw, until SIGTERM or SIGINT.
async fn serve(args: &FleetArgs, host: String, port: u16, addr: &str) -> Result<()> {
    let fleet = std::sync::Arc::new(Fleet::new(&args.broker));
    let http = edge_agent::http::serve_fleet(addr, fleet.clone()).await?;
    eprintln!(
        "fleet dashboard on http://{addr}/ (statuses from {})",
        args.broker
    );
    let (client, mut events) = AsyncClient::new(options(args, host, port)?, 64);
    let filter = format!("{}/+/status", args.prefix);
    let follow = async {
        let mut warned = false;
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    fleet.set_connected(true);
                    warned = false;
                    if let Err(e) = client.subscribe(filter.as_str(), QoS::AtLeastOnce).await {
                        eprintln!("warning: cannot subscribe to {filter}: {e}");
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let topic = String::from_utf8_lossy(&p.topic);
                    let device = device_of(&topic, &args.prefix);
                    if let Some(device) = device
                        && let Err(e) = fleet.update(device, &p.payload, p.retain, UnixMillis::now().0)
                    {
                        eprintln!("warning: {topic}: {e}");
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    fleet.set_connected(false);
                    if !warned {
                        eprintln!("warning: lost the broker {} ({e}); reconnecting", args.broker);
                        warned = true;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    };
    let result = tokio::select! {
        signal = edge_agent::signal::wait_for_signal() => signal,
        () = follow => Ok(()),
    };
    let _ = client.disconnect().await;
    http.abort();
    result
}

/// `<device>` of `<prefix>/<device>/status`.
fn device_of<'a>(topic: &'a str, prefix: &str) -> Option<&'a str> {
    topic
        .strip_prefix(prefix)?
        .strip_prefix('/')?
        .strip_suffix("/status")
        .filter(|d| !d.is_empty() && !d.contains('/'))
}

#[cfg(test)]
mod tests {
    use super::device_of;

    #[test]
    fn the_device_is_the_topic_segment_before_status() {
        assert_eq!(device_of("edge/cam1/status", "edge"), Some("cam1"));
        assert_eq!(device_of("edge/<script>/status", "edge"), Some("<script>"));
        assert_eq!(device_of("edge//status", "edge"), None);
        assert_eq!(device_of("other/cam1/status", "edge"), None);
    }
}
