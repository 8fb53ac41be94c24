//! `edge-agent fleet-status`: every device's retained status from the broker, as a table or
//! JSON.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use serde_json::Value;

use edge_agent::config::broker_address;

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
    #[arg(long, env = "EDGE_AGENT_MQTT__USERNAME", default_value = "")]
    username: String,
    #[arg(
        long,
        env = "EDGE_AGENT_MQTT__PASSWORD",
        default_value = "",
        hide_env_values = true
    )]
    password: String,
}

pub fn run(args: FleetArgs) -> Result<ExitCode> {
    let (host, port) = broker_address(&args.broker).map_err(|e| anyhow::anyhow!("--broker: {e}"))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
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

async fn collect(args: &FleetArgs, host: String, port: u16) -> Result<Vec<Value>> {
    let id = format!("edge-fleet-status-{}", std::process::id());
    let mut o = MqttOptions::new(id, host, port);
    o.set_keep_alive(Duration::from_secs(10))
        .set_clean_start(true)
        .set_max_packet_size(Some(1024 * 1024));
    if !args.username.is_empty() {
        o.set_credentials(&args.username, &args.password);
    }
    let (client, mut events) = AsyncClient::new(o, 16);
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
