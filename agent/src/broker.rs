//! The embedded MQTT broker (rumqttd) that `edge-agent run` starts when no broker is
//! configured, so one device, or someone trying the project, needs no other service.
//!
//! It listens on one loopback address with the protocol the agent uses (MQTT 5 by default).
//! Sessions live in memory: a restart of the agent restarts the broker, so requests that
//! were never acknowledged are lost with it, unlike with an external broker. Fleets use an
//! external broker (Mosquitto, EMQX, HiveMQ).

use std::net::{SocketAddr, TcpListener};

use crate::config::MqttProtocol;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("the embedded broker cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("embedded broker configuration: {0}")]
    Config(String),
}

/// Starts the broker on its own threads; it runs until the process exits.
pub fn start(listen: SocketAddr, protocol: MqttProtocol, max_packet_bytes: u32) -> Result<(), BrokerError> {
    // rumqttd reports a bind failure only in its logs; check first to fail with a clear error.
    drop(TcpListener::bind(listen).map_err(|source| BrokerError::Bind { addr: listen, source })?);
    let server = serde_json::json!({
        "1": {
            "name": "embedded",
            "listen": listen.to_string(),
            "next_connection_delay_ms": 1,
            "connections": {
                "connection_timeout_ms": 60000,
                "max_payload_size": max_packet_bytes,
                "max_inflight_count": 100,
                "dynamic_filters": true,
            }
        }
    });
    let protocol_key = match protocol {
        MqttProtocol::V5 => "v5",
        MqttProtocol::V311 => "v4",
    };
    let config = serde_json::json!({
        "id": 0,
        "router": {
            "id": 0,
            "max_connections": 1000,
            "max_outgoing_packet_count": 200,
            "max_segment_size": 104_857_600,
            "max_segment_count": 10,
        },
        protocol_key: server,
    });
    let config: rumqttd::Config =
        serde_json::from_value(config).map_err(|e| BrokerError::Config(e.to_string()))?;
    std::thread::Builder::new()
        .name("embedded-broker".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!("embedded broker stopped: {e}");
            }
        })
        .map_err(|e| BrokerError::Config(format!("cannot start the broker thread: {e}")))?;
    Ok(())
}
