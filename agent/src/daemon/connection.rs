//! The connection task: polls the MQTT client, reconnects with backoff, and routes what the
//! broker sends: messages to ingress, PUBACKs to the outbox (a reply acknowledged leaves the
//! queue) and to the final `offline` status's waiter, connection changes to the publisher.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::publisher::{PubCmd, Tag};
use super::{Shared, lock};
use crate::config::Config;
use crate::mqtt::{self, Event, Message};

pub(super) async fn connection_task(
    mut connection: mqtt::Connection,
    shared: Arc<Shared>,
    ingress: mpsc::UnboundedSender<(u64, Message)>,
    stop: CancellationToken,
) {
    let min = Duration::from_millis(shared.config.mqtt.reconnect_min_ms);
    let max = Duration::from_millis(shared.config.mqtt.reconnect_max_ms);
    let mut backoff = crate::reconnect::Backoff::new(min, max);
    let max_packet = shared.config.mqtt.max_packet_bytes;
    // The connection was allowed one packet over the limit (see `mqtt`).
    let mut oversize_allowed = false;
    let mut first = true;
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => return,
            e = connection.poll() => e,
        };
        match event {
            Ok(Event::Connected { session_present }) => {
                info!(session_present, "connected to the broker");
                backoff.connected(Instant::now());
                if oversize_allowed {
                    // This connection reads the oversized message; the next ones need not.
                    connection.restore_limit();
                    oversize_allowed = false;
                }
                shared.connected.store(true, Ordering::Relaxed);
                *lock(&shared.connected_since) = Some(Instant::now());
                shared.metrics.mqtt_connected.set(1);
                shared.metrics.mqtt_connections.inc();
                if !session_present {
                    lock(&shared.tracker).reset();
                }
                shared.send(PubCmd::Connected {
                    session_present,
                    first,
                });
                first = false;
                shared.epoch.fetch_add(1, Ordering::SeqCst);
            }
            Ok(Event::Message(m)) => {
                if ingress.send((shared.epoch.load(Ordering::SeqCst), *m)).is_err() {
                    debug!("ingress stopped; message left unacknowledged");
                }
            }
            Ok(Event::Published(pkid)) => lock(&shared.tracker).published(pkid),
            Ok(Event::PubAck {
                pkid,
                refused: Some(reason),
            }) => {
                let tag = lock(&shared.tracker).acked(pkid);
                if let Some(Tag::Reply(seq)) = tag {
                    // Not delivered, and publishing it again would be refused again: counted,
                    // logged, and dropped from the outbox (it is not retried).
                    let message = format!(
                        "the broker refused a reply (PUBACK {reason}): check its ACL for this \
                         agent's identity and the reply topics clients give"
                    );
                    warn!(seq = seq.get(), "{message}");
                    shared.metrics.replies_refused.inc();
                    *lock(&shared.last_error) = Some(("reply_refused", message));
                    shared.status_changed.notify_one();
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        if let Err(e) = shared.queue.reply_acked_async(seq).await {
                            warn!(seq = seq.get(), "cannot remove a refused reply: {e}");
                        }
                        shared.space.notify_waiters();
                    });
                } else if let Some(Tag::Status) = tag {
                    warn!("the broker refused the status (PUBACK {reason}): check its ACL");
                } else if let Some(Tag::Offline) = tag
                    && let Some(tx) = lock(&shared.offline_acked).take()
                {
                    let _ = tx.send(Err(reason));
                }
            }
            Ok(Event::PubAck { pkid, refused: None }) => {
                let tag = lock(&shared.tracker).acked(pkid);
                if let Some(Tag::Offline) = tag
                    && let Some(tx) = lock(&shared.offline_acked).take()
                {
                    let _ = tx.send(Ok(()));
                }
                if let Some(Tag::Reply(seq)) = tag {
                    // On a blocking thread: the database may be busy with another fsync.
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        match shared.queue.reply_acked_async(seq).await {
                            Ok(true) => {
                                debug!(
                                    seq = seq.get(),
                                    pkid, "reply acknowledged by the broker: out of the outbox"
                                );
                                shared.metrics.replies_acked.inc();
                                shared.space.notify_waiters();
                            }
                            Ok(false) => {}
                            Err(e) => warn!(seq = seq.get(), "cannot remove an acknowledged reply: {e}"),
                        }
                    });
                }
            }
            Ok(Event::Subscribed) => lock(&shared.tracker).subscribed(),
            Ok(Event::SubscriptionRefused(codes)) => {
                let message = format!(
                    "the broker refused a subscription ({codes}): check its ACL for this agent's \
                     identity and the topics {:?}",
                    shared.topics.request_topics
                );
                error!("{message}");
                *lock(&shared.last_error) = Some(("internal", message));
                shared.status_changed.notify_one();
            }
            Ok(Event::Other) => {}
            Err(e) => {
                let delay = backoff.failed(
                    Instant::now(),
                    u64::from(
                        SystemTime::now()
                            .duration_since(UNIX_EPOCH)
                            .map(|d| d.subsec_millis())
                            .unwrap_or(0),
                    ),
                );
                if let mqtt::MqttError::Oversized { bytes, .. } = &e {
                    shared.metrics.mqtt_oversized.inc();
                    let ceiling = mqtt::oversize_ceiling(max_packet);
                    if *bytes <= ceiling {
                        warn!(
                            bytes,
                            max_packet_bytes = max_packet,
                            "the broker sent a message larger than mqtt.max_packet_bytes; the next \
                             connection reads it once to answer it too_large and acknowledge it"
                        );
                        // MQTT 5 counts the fixed header in its limit too.
                        connection.read_once_up_to(bytes.saturating_add(8));
                        oversize_allowed = true;
                    } else {
                        let message = format!(
                            "the broker keeps sending a message of {bytes} bytes, more than the agent \
                             reads ({ceiling}, 4 x mqtt.max_packet_bytes): each connection ends at it. \
                             Make the broker refuse such messages (Mosquitto: message_size_limit \
                             {max_packet}), or remove the message from this agent's session"
                        );
                        error!("{message}");
                        *lock(&shared.last_error) = Some(("message_too_large", message));
                    }
                }
                *lock(&shared.connected_since) = None;
                if shared.stopping.is_cancelled() {
                    shared.connected.store(false, Ordering::Relaxed);
                    debug!("connection closed: {e}");
                } else if shared.connected.swap(false, Ordering::Relaxed) {
                    warn!("lost the broker: {e}");
                    shared.metrics.mqtt_connected.set(0);
                } else if let Some(why) = refusal(&e.to_string()) {
                    warn!("{why}; retrying in {} ms", delay.as_millis());
                } else {
                    warn!(
                        "cannot reach the broker: {e}; retrying in {} ms",
                        delay.as_millis()
                    );
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// What a connection error means when the broker answered the CONNECT with a refusal
/// (rumqttc's "Connection refused, return code: `BadUserNamePassword`"), said for an
/// operator; `None` for other errors (the broker was not reached).
fn refusal(error: &str) -> Option<String> {
    let (_, rest) = error.split_once("Connection refused, return code: `")?;
    let code = rest.split('`').next().unwrap_or(rest);
    let advice = match code {
        "BadUserNamePassword" => "bad username or password: check mqtt.username and mqtt.password",
        // Mosquitto answers a wrong password with this code too, not BadUserNamePassword.
        "NotAuthorized" => {
            "not authorized: check mqtt.username and mqtt.password (the broker refuses this login, \
             or requires one) and whether the broker lets this identity connect"
        }
        "BadClientId" | "ClientIdentifierNotValid" => "client id not accepted: check the device id",
        "Banned" => "this client is banned",
        _ => "",
    };
    Some(if advice.is_empty() {
        format!("the broker refused the connection (CONNACK {code})")
    } else {
        format!("the broker refused the connection (CONNACK {code}): {advice}")
    })
}

/// The MQTT client's settings from `mqtt.*`; `will` is the last will (topic, payload).
pub(super) fn settings(
    config: &Config,
    device: &str,
    (host, port): (String, u16),
    will: (String, Vec<u8>),
) -> Result<mqtt::Settings> {
    let client_id = if config.mqtt.client_id.is_empty() {
        format!("edge-agent-{device}")
    } else {
        config.mqtt.client_id.clone()
    };
    Ok(mqtt::Settings {
        host,
        port,
        client_id,
        protocol: config.mqtt.protocol,
        username: config.mqtt.username.clone(),
        password: config.mqtt.password.clone(),
        keep_alive: Duration::from_secs(config.mqtt.keep_alive_secs),
        session_expiry_secs: config.mqtt.session_expiry_secs,
        max_packet_bytes: config.mqtt.max_packet_bytes,
        receive_maximum: config.mqtt.receive_maximum,
        will,
        tls: mqtt_tls(&config.mqtt)?,
    })
}

/// The PEM files of `mqtt.tls_*`, read at start (`None` for a plain `mqtt://` broker).
fn mqtt_tls(c: &crate::config::MqttConfig) -> Result<Option<mqtt::Tls>> {
    if !crate::config::broker_tls(&c.broker) {
        return Ok(None);
    }
    let read = |key: &str, path: &str| {
        std::fs::read(path).with_context(|| format!("cannot read mqtt.{key} `{path}`"))
    };
    let client = if c.tls_cert.is_empty() {
        None
    } else {
        Some((read("tls_cert", &c.tls_cert)?, read("tls_key", &c.tls_key)?))
    };
    Ok(Some(mqtt::Tls {
        ca: read("tls_ca", &c.tls_ca)?,
        client,
    }))
}

#[cfg(test)]
#[cfg(test)]
mod refusal_tests {
    use super::refusal;

    #[test]
    fn a_refused_connack_is_named_and_other_errors_are_not() {
        let e = "MQTT connection: Connection refused, return code: `BadUserNamePassword`";
        let said = refusal(e).unwrap_or_default();
        assert!(
            said.contains("refused the connection") && said.contains("mqtt.password"),
            "{said}"
        );
        let said =
            refusal("MQTT connection: Connection refused, return code: `NotAuthorized`").unwrap_or_default();
        assert!(said.contains("not authorized"), "{said}");
        assert_eq!(
            refusal("MQTT connection: I/O: Connection refused (os error 111)"),
            None
        );
    }
}
