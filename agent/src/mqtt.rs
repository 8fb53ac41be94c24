//! One MQTT connection over rumqttc, MQTT 5 or 3.1.1 behind one interface, and the tracking
//! that ties the broker's acknowledgements back to queue items.
//!
//! Settings that the durability contract rests on: manual acknowledgements (a request is
//! PUBACKed by the caller after it is on disk), a persistent session (clean start off, a
//! session expiry) so the broker redelivers what was not acknowledged, a maximum packet size
//! large enough for images, a Receive Maximum that bounds the requests held in memory, and a
//! retained last will.
//!
//! # Which reply did the broker acknowledge?
//!
//! rumqttc reports a PUBACK by packet id only, and assigns packet ids itself when a publish
//! leaves. `PublishTracker` follows its rules: a tag is queued just before each publish is
//! handed to the client (one task publishes, so tags and publishes keep one order); every
//! `Outgoing::Publish(pkid)` event whose id is not already in flight takes the oldest queued
//! tag (one in flight is a retransmission after a reconnect); a PUBACK returns the tag.
//! When a connection fails, rumqttc keeps every publish not yet acknowledged and sends the
//! in-flight ones again (same ids) and then the others in order if the broker still has the
//! session. If it has not (`session_present` false), rumqttc drops them: the tracker is then
//! reset, every reply still in the outbox is published again, and events from before the
//! reset are ignored until the resubscription (sent after the reset) leaves, so a stale
//! publish can never be taken for a new one; tags queued between the reset and the
//! resubscription are dropped at that barrier (their publishes leave before it; their replies
//! are in the outbox that is published again). A reply is removed from the outbox only for its
//! own PUBACK; the worst case of a mix-up is a duplicate, never a loss. Should the tracker
//! still lose step with the client (a tag that never meets its publish pairs every later
//! PUBACK with the reply before it and leaves the last one in the outbox), its oldest entry
//! grows old on a live connection: the daemon's housekeeping then resets it and publishes the
//! outbox again.
//!
//! # A message larger than `mqtt.max_packet_bytes`
//!
//! MQTT 5 tells the broker the limit in CONNECT and the broker drops larger messages. MQTT
//! 3.1.1 cannot: the broker sends it, rumqttc refuses the packet and closes the connection,
//! and as the message is not acknowledged the persistent session redelivers it at every
//! connection. So the error says how large the packet was (`MqttError::Oversized`), and
//! `Connection::read_once_up_to` lets the next connection read a packet that large (up to
//! `oversize_ceiling`): the daemon then answers it `too_large` and acknowledges it like any
//! other refused request, and the limit goes back to `mqtt.max_packet_bytes` for the
//! connections after. A packet beyond the ceiling cannot be read without holding it in memory;
//! the broker must be told to refuse it (Mosquitto: `message_size_limit`).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttc::v5::mqttbytes::QoS as QoSV5;
use rumqttc::v5::mqttbytes::v5::{LastWill as LastWillV5, Packet as PacketV5, PublishProperties};
use rumqttc::{Outgoing, QoS};

use crate::config::MqttProtocol;
use crate::queue::Protocol;
use crate::request::Inbound;

#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error("MQTT connection: {0}")]
    Connection(String),
    /// The broker sent a packet larger than the limit; the connection was closed.
    #[error("MQTT connection: the broker sent a packet of {bytes} bytes, over the limit of {limit}")]
    Oversized { bytes: usize, limit: usize },
    #[error("MQTT client: {0}")]
    Client(String),
}

/// What a connection needs.
#[derive(Debug, Clone)]
pub struct Settings {
    pub host: String,
    pub port: u16,
    pub client_id: String,
    pub protocol: MqttProtocol,
    pub username: String,
    pub password: String,
    pub keep_alive: Duration,
    pub session_expiry_secs: u32,
    pub max_packet_bytes: u32,
    pub receive_maximum: u16,
    /// Retained last will: topic and payload.
    pub will: (String, Vec<u8>),
    /// TLS (`mqtts://`): the CA's PEM, and the client certificate and key PEMs for mTLS.
    pub tls: Option<Tls>,
}

#[derive(Clone)]
pub struct Tls {
    pub ca: Vec<u8>,
    pub client: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for Tls {
    /// Never prints the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("ca_bytes", &self.ca.len())
            .field("client_certificate", &self.client.is_some())
            .finish()
    }
}

impl Tls {
    pub fn transport(&self) -> rumqttc::Transport {
        rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Simple {
            ca: self.ca.clone(),
            alpn: None,
            client_auth: self.client.clone(),
        })
    }
}

/// Replies and the status we publish at once; bounds rumqttc's outgoing state.
const OUTGOING_INFLIGHT: u16 = 64;

/// Sends requests to the connection; cheap to clone.
#[derive(Clone)]
pub enum Client {
    V5(rumqttc::v5::AsyncClient),
    V311(rumqttc::AsyncClient),
}

/// Polls the connection; owned by one task.
pub struct Connection {
    inner: Inner,
    /// `mqtt.max_packet_bytes`: the incoming limit outside of `read_once_up_to`.
    max_packet_bytes: u32,
}

enum Inner {
    V5(Box<rumqttc::v5::EventLoop>),
    V311(Box<rumqttc::EventLoop>),
}

/// The largest packet `read_once_up_to` lets in: 4 x `mqtt.max_packet_bytes` (64 MiB by
/// default), at most MQTT's own maximum.
pub fn oversize_ceiling(max_packet_bytes: u32) -> usize {
    const MQTT_MAX: usize = 268_435_455 + 5;
    (max_packet_bytes as usize).saturating_mul(4).min(MQTT_MAX)
}

/// What acknowledging a message needs.
#[derive(Debug, Clone)]
pub enum AckToken {
    V5(rumqttc::v5::mqttbytes::v5::Publish),
    V311(rumqttc::Publish),
}

/// An inbound message.
#[derive(Debug)]
pub struct Message {
    pub protocol: Protocol,
    pub topic: String,
    pub payload: Bytes,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    pub user_properties: Vec<(String, String)>,
    /// `None` for QoS 0 messages, which are not acknowledged.
    pub ack: Option<AckToken>,
}

impl Message {
    pub fn inbound(&self) -> Inbound<'_> {
        Inbound {
            protocol: self.protocol,
            payload: &self.payload,
            response_topic: self.response_topic.as_deref(),
            correlation_data: self.correlation_data.as_deref(),
            user_properties: &self.user_properties,
        }
    }
}

/// Connection events the daemon acts on.
#[derive(Debug)]
pub enum Event {
    Connected {
        session_present: bool,
    },
    Message(Box<Message>),
    /// A publish left with this packet id.
    Published(u16),
    /// The broker acknowledged our publish with this packet id; `refused` holds the reason
    /// code when it refused it (MQTT 5 only: e.g. `NotAuthorized` from an ACL).
    PubAck {
        pkid: u16,
        refused: Option<String>,
    },
    /// A subscribe request left (the resynchronisation barrier).
    Subscribed,
    /// The broker refused one or more topic filters of a subscription (e.g. its ACL): the
    /// reason codes.
    SubscriptionRefused(String),
    Other,
}

pub fn connect(s: &Settings) -> (Client, Connection) {
    let cap = 256;
    match s.protocol {
        MqttProtocol::V5 => {
            let mut o = rumqttc::v5::MqttOptions::new(&s.client_id, &s.host, s.port);
            o.set_keep_alive(s.keep_alive)
                .set_clean_start(false)
                .set_session_expiry_interval(Some(s.session_expiry_secs))
                .set_max_packet_size(Some(s.max_packet_bytes))
                .set_receive_maximum(Some(s.receive_maximum))
                .set_manual_acks(true)
                .set_outgoing_inflight_upper_limit(OUTGOING_INFLIGHT)
                .set_connection_timeout(10)
                .set_last_will(LastWillV5::new(
                    &s.will.0,
                    s.will.1.clone(),
                    QoSV5::AtLeastOnce,
                    true,
                    None,
                ));
            if !s.username.is_empty() {
                o.set_credentials(&s.username, &s.password);
            }
            // Small packets (PUBACKs, replies) go out at once: with Nagle's algorithm a
            // PUBACK behind an unacknowledged segment waits for the peer's delayed ACK (40 ms).
            let mut net = o.network_options();
            net.set_tcp_nodelay(true);
            o.set_network_options(net);
            if let Some(tls) = &s.tls {
                o.set_transport(tls.transport());
            }
            let (c, l) = rumqttc::v5::AsyncClient::new(o, cap);
            let connection = Connection {
                inner: Inner::V5(Box::new(l)),
                max_packet_bytes: s.max_packet_bytes,
            };
            (Client::V5(c), connection)
        }
        MqttProtocol::V311 => {
            let mut o = rumqttc::MqttOptions::new(&s.client_id, &s.host, s.port);
            let max = s.max_packet_bytes as usize;
            o.set_keep_alive(s.keep_alive)
                .set_clean_session(false)
                .set_max_packet_size(max, max)
                .set_manual_acks(true)
                .set_inflight(OUTGOING_INFLIGHT)
                .set_last_will(rumqttc::LastWill::new(
                    &s.will.0,
                    s.will.1.clone(),
                    QoS::AtLeastOnce,
                    true,
                ));
            if !s.username.is_empty() {
                o.set_credentials(&s.username, &s.password);
            }
            if let Some(tls) = &s.tls {
                o.set_transport(tls.transport());
            }
            let (c, mut l) = rumqttc::AsyncClient::new(o, cap);
            let mut net = l.network_options();
            net.set_tcp_nodelay(true);
            l.set_network_options(net);
            let connection = Connection {
                inner: Inner::V311(Box::new(l)),
                max_packet_bytes: s.max_packet_bytes,
            };
            (Client::V311(c), connection)
        }
    }
}

fn client_err(e: impl std::fmt::Display) -> MqttError {
    MqttError::Client(e.to_string())
}

impl Client {
    /// Publishes at QoS 1; MQTT 5 replies carry the correlation data and a JSON content type.
    pub async fn publish(
        &self,
        topic: &str,
        payload: Vec<u8>,
        retain: bool,
        correlation_data: Option<Vec<u8>>,
    ) -> Result<(), MqttError> {
        match self {
            Self::V5(c) => {
                let props = PublishProperties {
                    correlation_data: correlation_data.map(Bytes::from),
                    content_type: Some("application/json".into()),
                    payload_format_indicator: Some(1),
                    ..PublishProperties::default()
                };
                c.publish_with_properties(topic, QoSV5::AtLeastOnce, retain, payload, props)
                    .await
                    .map_err(client_err)
            }
            Self::V311(c) => c
                .publish(topic, QoS::AtLeastOnce, retain, payload)
                .await
                .map_err(client_err),
        }
    }

    pub async fn subscribe(&self, filters: &[String]) -> Result<(), MqttError> {
        match self {
            Self::V5(c) => {
                let subs = filters
                    .iter()
                    .map(|f| rumqttc::v5::mqttbytes::v5::Filter::new(f.clone(), QoSV5::AtLeastOnce));
                c.subscribe_many(subs).await.map_err(client_err)
            }
            Self::V311(c) => {
                let subs = filters
                    .iter()
                    .map(|f| rumqttc::SubscribeFilter::new(f.clone(), QoS::AtLeastOnce));
                c.subscribe_many(subs).await.map_err(client_err)
            }
        }
    }

    pub async fn unsubscribe(&self, filters: &[String]) -> Result<(), MqttError> {
        for f in filters {
            match self {
                Self::V5(c) => c.unsubscribe(f.clone()).await.map_err(client_err)?,
                Self::V311(c) => c.unsubscribe(f.clone()).await.map_err(client_err)?,
            }
        }
        Ok(())
    }

    pub async fn ack(&self, token: &AckToken) -> Result<(), MqttError> {
        match (self, token) {
            (Self::V5(c), AckToken::V5(p)) => c.ack(p).await.map_err(client_err),
            (Self::V311(c), AckToken::V311(p)) => c.ack(p).await.map_err(client_err),
            _ => Err(MqttError::Client("acknowledgement of another protocol".into())),
        }
    }

    pub async fn disconnect(&self) -> Result<(), MqttError> {
        match self {
            Self::V5(c) => c.disconnect().await.map_err(client_err),
            Self::V311(c) => c.disconnect().await.map_err(client_err),
        }
    }
}

impl Connection {
    /// The next connection (made by the next `poll` after an error) accepts packets up to
    /// `bytes`; `restore_limit` goes back to `mqtt.max_packet_bytes` for the ones after.
    pub fn read_once_up_to(&mut self, bytes: usize) {
        let bytes = bytes.max(self.max_packet_bytes as usize);
        match &mut self.inner {
            Inner::V5(l) => {
                l.options
                    .set_max_packet_size(Some(u32::try_from(bytes).unwrap_or(u32::MAX)));
            }
            Inner::V311(l) => {
                l.mqtt_options.set_max_packet_size(bytes, bytes);
            }
        }
    }

    /// Back to `mqtt.max_packet_bytes` for the next connection.
    pub fn restore_limit(&mut self) {
        self.read_once_up_to(self.max_packet_bytes as usize);
    }

    /// The next event; an error means the connection is down (the next poll reconnects).
    pub async fn poll(&mut self) -> Result<Event, MqttError> {
        match &mut self.inner {
            Inner::V5(l) => {
                let event = l.poll().await.map_err(|e| {
                    use rumqttc::v5::mqttbytes::Error as E;
                    use rumqttc::v5::{ConnectionError as C, StateError as S};
                    match e {
                        C::MqttState(S::Deserialization(E::PayloadSizeLimitExceeded { pkt_size, max })) => {
                            MqttError::Oversized {
                                bytes: pkt_size,
                                limit: max as usize,
                            }
                        }
                        e => MqttError::Connection(e.to_string()),
                    }
                })?;
                Ok(match event {
                    rumqttc::v5::Event::Incoming(p) => match p {
                        PacketV5::ConnAck(c) => Event::Connected {
                            session_present: c.session_present,
                        },
                        PacketV5::Publish(p) => Event::Message(Box::new(Message::from_v5(p))),
                        PacketV5::PubAck(a) => {
                            use rumqttc::v5::mqttbytes::v5::PubAckReason as R;
                            let refused = (!matches!(a.reason, R::Success | R::NoMatchingSubscribers))
                                .then(|| format!("{:?}", a.reason));
                            Event::PubAck {
                                pkid: a.pkid,
                                refused,
                            }
                        }
                        PacketV5::SubAck(a) => {
                            use rumqttc::v5::mqttbytes::v5::SubscribeReasonCode as Code;
                            let refused: Vec<String> = a
                                .return_codes
                                .iter()
                                .filter(|c| !matches!(c, Code::Success(_)))
                                .map(|c| format!("{c:?}"))
                                .collect();
                            if refused.is_empty() {
                                Event::Other
                            } else {
                                Event::SubscriptionRefused(refused.join(", "))
                            }
                        }
                        _ => Event::Other,
                    },
                    rumqttc::v5::Event::Outgoing(o) => outgoing(o),
                })
            }
            Inner::V311(l) => {
                let limit = l.mqtt_options.max_packet_size();
                let event = l.poll().await.map_err(|e| match e {
                    rumqttc::ConnectionError::MqttState(rumqttc::StateError::Deserialization(
                        rumqttc::Error::PayloadSizeLimitExceeded(bytes),
                    )) => MqttError::Oversized { bytes, limit },
                    e => MqttError::Connection(e.to_string()),
                })?;
                Ok(match event {
                    rumqttc::Event::Incoming(p) => match p {
                        rumqttc::Packet::ConnAck(c) => Event::Connected {
                            session_present: c.session_present,
                        },
                        rumqttc::Packet::Publish(p) => Event::Message(Box::new(Message::from_v311(p))),
                        rumqttc::Packet::PubAck(a) => Event::PubAck {
                            pkid: a.pkid,
                            refused: None,
                        },
                        rumqttc::Packet::SubAck(a)
                            if a.return_codes.contains(&rumqttc::SubscribeReasonCode::Failure) =>
                        {
                            Event::SubscriptionRefused("Failure".into())
                        }
                        _ => Event::Other,
                    },
                    rumqttc::Event::Outgoing(o) => outgoing(o),
                })
            }
        }
    }
}

fn outgoing(o: Outgoing) -> Event {
    match o {
        Outgoing::Publish(pkid) if pkid != 0 => Event::Published(pkid),
        Outgoing::Subscribe(_) => Event::Subscribed,
        _ => Event::Other,
    }
}

impl Message {
    /// An MQTT 5 PUBLISH as the broker delivered it (rumqttc decoded the packet). Public for
    /// the fuzz harness (`fuzz/`), which feeds it packets decoded from arbitrary bytes.
    pub fn from_v5(p: rumqttc::v5::mqttbytes::v5::Publish) -> Message {
        let topic = String::from_utf8_lossy(&p.topic).into_owned();
        let (response_topic, correlation_data, user_properties) = match &p.properties {
            Some(props) => (
                props.response_topic.clone(),
                props.correlation_data.clone(),
                props.user_properties.clone(),
            ),
            None => (None, None, Vec::new()),
        };
        let payload = p.payload.clone();
        let ack = (p.qos != QoSV5::AtMostOnce).then_some(AckToken::V5(p));
        Message {
            protocol: Protocol::V5,
            topic,
            payload,
            response_topic,
            correlation_data,
            user_properties,
            ack,
        }
    }

    /// An MQTT 3.1.1 PUBLISH as the broker delivered it.
    pub fn from_v311(p: rumqttc::Publish) -> Message {
        let topic = p.topic.clone();
        let payload = p.payload.clone();
        let ack = (p.qos != QoS::AtMostOnce).then_some(AckToken::V311(p));
        Message {
            protocol: Protocol::V311,
            topic,
            payload,
            response_topic: None,
            correlation_data: None,
            user_properties: Vec::new(),
            ack,
        }
    }
}

/// Ties PUBACKs to what was published (see the module doc). `T` is the caller's tag; each
/// entry keeps when it was queued, so that a tracker out of step with the client (a tag that
/// never met its publish or its PUBACK) shows as an old entry: see `oldest`.
#[derive(Debug)]
pub struct PublishTracker<T> {
    queued: VecDeque<(T, Instant)>,
    in_flight: HashMap<u16, (T, Instant)>,
    resyncing: bool,
}

impl<T> Default for PublishTracker<T> {
    fn default() -> Self {
        Self {
            queued: VecDeque::new(),
            in_flight: HashMap::new(),
            resyncing: false,
        }
    }
}

impl<T> PublishTracker<T> {
    /// Call just before handing a publish to the client.
    pub fn queued(&mut self, tag: T) {
        self.queued.push_back((tag, Instant::now()));
    }

    /// A publish left with `pkid`.
    pub fn published(&mut self, pkid: u16) {
        if self.resyncing || self.in_flight.contains_key(&pkid) {
            return;
        }
        if let Some(entry) = self.queued.pop_front() {
            self.in_flight.insert(pkid, entry);
        }
    }

    /// The broker acknowledged `pkid`: the tag it belongs to, if known.
    pub fn acked(&mut self, pkid: u16) -> Option<T> {
        self.in_flight.remove(&pkid).map(|(tag, _)| tag)
    }

    /// The broker lost the session, or the tracker is out of step with the client: forget
    /// everything until `subscribed`.
    pub fn reset(&mut self) {
        self.queued.clear();
        self.in_flight.clear();
        self.resyncing = true;
    }

    /// Call just before handing the resubscription that ends a reset to the client. Tags
    /// queued since the reset belong to publishes handed over before it, whose events are
    /// ignored until it leaves: they are dropped here, or each would be paired with the
    /// publish after its own (their replies are still in the outbox, published again after
    /// the resubscription). Without a reset in progress it does nothing.
    pub fn barrier(&mut self) {
        if self.resyncing {
            self.queued.clear();
        }
    }

    /// The subscription sent after `reset` left: events from now on are current.
    pub fn subscribed(&mut self) {
        self.resyncing = false;
    }

    /// When the oldest entry, queued or in flight, was queued. On a live connection a publish
    /// leaves and is acknowledged within moments; an entry much older than that means the
    /// tracker lost step with the client.
    pub fn oldest(&self) -> Option<Instant> {
        let queued = self.queued.front().map(|(_, at)| *at);
        let in_flight = self.in_flight.values().map(|(_, at)| *at).min();
        queued.into_iter().chain(in_flight).min()
    }

    pub fn len(&self) -> usize {
        self.queued.len() + self.in_flight.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oversize_ceiling_is_four_times_the_limit_within_mqtt_s_maximum() {
        assert_eq!(oversize_ceiling(16 * 1024 * 1024), 64 * 1024 * 1024);
        assert_eq!(oversize_ceiling(u32::MAX), 268_435_460);
    }

    #[test]
    fn tags_follow_publishes_and_acks() {
        let mut t = PublishTracker::default();
        t.queued("a");
        t.queued("b");
        t.published(1);
        t.published(2);
        assert_eq!(t.acked(2), Some("b"));
        assert_eq!(t.acked(1), Some("a"));
        assert_eq!(t.acked(1), None);
        assert!(t.is_empty());
    }

    #[test]
    fn retransmission_does_not_take_a_new_tag() {
        let mut t = PublishTracker::default();
        t.queued("a");
        t.published(7);
        t.queued("b");
        // Reconnect with the session present: 7 goes out again, then b.
        t.published(7);
        t.published(8);
        assert_eq!(t.acked(7), Some("a"));
        assert_eq!(t.acked(8), Some("b"));
    }

    #[test]
    fn reused_packet_id_after_ack_is_a_new_publish() {
        let mut t = PublishTracker::default();
        t.queued("a");
        t.published(1);
        assert_eq!(t.acked(1), Some("a"));
        t.queued("b");
        t.published(1);
        assert_eq!(t.acked(1), Some("b"));
    }

    #[test]
    fn after_reset_stale_events_are_ignored_until_subscribed() {
        let mut t = PublishTracker::default();
        t.queued("old");
        t.published(1);
        t.reset();
        t.queued("new");
        // A stale publish from before the reset leaves, then the barrier, then ours.
        t.published(2);
        assert_eq!(t.acked(2), None);
        t.subscribed();
        t.published(3);
        assert_eq!(t.acked(1), None);
        assert_eq!(t.acked(3), Some("new"));
    }

    #[test]
    fn tags_queued_during_a_reset_are_dropped_at_the_barrier() {
        let mut t = PublishTracker::default();
        t.queued("old");
        t.published(1);
        // The session is lost; a reply is handed over before the resubscription.
        t.reset();
        t.queued("handed over before the barrier");
        t.barrier();
        t.queued("status");
        t.queued("outbox reply");
        // Its publish leaves before the barrier and is ignored; then the barrier, then ours.
        t.published(2);
        t.subscribed();
        t.published(3);
        t.published(4);
        assert_eq!(t.acked(2), None);
        assert_eq!(t.acked(3), Some("status"));
        assert_eq!(t.acked(4), Some("outbox reply"));
        assert!(t.is_empty());
    }

    #[test]
    fn without_a_reset_the_barrier_keeps_every_tag() {
        let mut t = PublishTracker::default();
        t.queued("a");
        t.barrier();
        t.published(1);
        assert_eq!(t.acked(1), Some("a"));
    }

    #[test]
    fn oldest_covers_queued_and_in_flight_entries() {
        let mut t = PublishTracker::default();
        assert_eq!(t.oldest(), None);
        t.queued("a");
        let first = t.oldest().expect("one entry");
        t.published(1);
        t.queued("b");
        assert_eq!(t.oldest(), Some(first), "the in-flight entry is the oldest");
        assert_eq!(t.acked(1), Some("a"));
        assert!(t.oldest().is_some_and(|at| at >= first));
        t.reset();
        assert_eq!(t.oldest(), None);
    }
}
