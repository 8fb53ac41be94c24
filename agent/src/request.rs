//! The MQTT request and reply formats (DESIGN.md section 4), independent of any connection:
//! an inbound message becomes a `StoredRequest` or a rejection with its error reply (the
//! reply documents are `reply`'s).
//!
//! Requests
//! - MQTT 5: the payload is the image (JPEG or PNG). Properties: Response Topic (where to
//!   reply; default `<prefix>/<device>/result`), Correlation Data (echoed on the reply),
//!   user properties `id`, `top_k`, `deadline_ms` (all optional).
//! - MQTT 3.1.1: the payload is a JSON envelope
//!   `{"id", "image_b64", "reply_to", "top_k", "deadline_ms"}`; only `image_b64` is required.
//!
//! `deadline_ms` counts from arrival; 0 means no deadline (as `limits.default_deadline_ms = 0`
//! does), and lifts the configured default for that request. Reply topics starting with `$`
//! are refused (`invalid_request`): brokers reserve them (`$SYS`, `$share/...`).
//!
//! The request id is the one the client gave (`id`), else the correlation data when it is
//! short UTF-8, else one made up from the device, the arrival time and a counter. Replies
//! always carry it so clients can drop duplicates (delivery is at-least-once).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine;

use crate::queue::{Protocol, StoredReply, StoredRequest, UnixMillis};
use crate::reply::{ErrorCode, error_document};

/// What parsing needs to know about this agent.
#[derive(Debug, Clone)]
pub struct RequestPolicy {
    pub device_id: String,
    /// Reply topic when the request names none.
    pub default_reply_topic: String,
    pub max_image_bytes: usize,
    pub max_top_k: u32,
    pub default_deadline: Option<Duration>,
}

/// An MQTT message as received, protocol details already unpacked.
#[derive(Debug, Clone, Copy)]
pub struct Inbound<'a> {
    pub protocol: Protocol,
    pub payload: &'a [u8],
    pub response_topic: Option<&'a str>,
    pub correlation_data: Option<&'a [u8]>,
    pub user_properties: &'a [(String, String)],
}

/// A request refused before it was queued, with the reply to send instead.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejected {
    pub code: ErrorCode,
    pub message: String,
    pub reply: StoredReply,
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

fn generated_id(device: &str, now: UnixMillis) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{device}-{}-{n}", now.0)
}

/// Longest client-given request id kept, in bytes.
const MAX_ID_BYTES: usize = 256;

/// A valid topic to publish a reply to: non-empty, no wildcards, no NUL, within MQTT's
/// 65,535 bytes, and not one of the topics starting with `$` that brokers reserve (`$SYS`,
/// `$share/...`): a reply there is refused or never reaches the client.
pub fn valid_reply_topic(topic: &str) -> bool {
    reply_topic_problem(topic).is_none()
}

/// Why `topic` cannot take a reply, if it cannot.
pub fn reply_topic_problem(topic: &str) -> Option<&'static str> {
    if topic.is_empty() || topic.len() > 65_535 || topic.contains('\0') {
        Some("is not a valid topic name")
    } else if topic.contains(['+', '#']) {
        Some("is not a valid topic name: it holds a wildcard ('+' or '#')")
    } else if topic.starts_with('$') {
        Some("is not a valid reply topic: topics starting with '$' are reserved by the broker ($SYS, $share)")
    } else {
        None
    }
}

/// The largest 3.1.1 envelope a valid request can make: the base64 of the largest image
/// accepted, plus 64 KiB for the other fields.
fn max_envelope_bytes(max_image_bytes: usize) -> usize {
    max_image_bytes
        .div_ceil(3)
        .saturating_mul(4)
        .saturating_add(64 * 1024)
}

impl RequestPolicy {
    /// Turns a message into a request to queue, or a rejection with its error reply.
    pub fn parse(&self, msg: &Inbound<'_>, now: UnixMillis) -> Result<StoredRequest, Box<Rejected>> {
        match msg.protocol {
            Protocol::V5 => self.parse_v5(msg, now),
            Protocol::V311 => self.parse_v311(msg, now),
        }
    }

    fn parse_v5(&self, msg: &Inbound<'_>, now: UnixMillis) -> Result<StoredRequest, Box<Rejected>> {
        let prop = |name: &str| {
            msg.user_properties
                .iter()
                .rev()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        let correlation = msg.correlation_data.map(<[u8]>::to_vec);
        let id = prop("id")
            .filter(|id| !id.is_empty() && id.len() <= MAX_ID_BYTES)
            .map(str::to_owned)
            .or_else(|| {
                msg.correlation_data
                    .filter(|c| !c.is_empty() && c.len() <= MAX_ID_BYTES)
                    .and_then(|c| std::str::from_utf8(c).ok())
                    .filter(|s| s.chars().all(|c| !c.is_control()))
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| generated_id(&self.device_id, now));
        let topic_given = msg.response_topic.filter(|t| !t.is_empty());
        let reply_topic = topic_given.unwrap_or(&self.default_reply_topic).to_owned();
        let reject = |code, message: String, topic: &str| {
            self.rejection(&id, topic, correlation.clone(), Protocol::V5, code, message)
        };
        if let Some(problem) = reply_topic_problem(&reply_topic) {
            return Err(reject(
                ErrorCode::InvalidRequest,
                format!("the Response Topic {problem}"),
                &self.default_reply_topic,
            ));
        }
        let parse_num = |name: &str| -> Result<Option<u64>, Box<Rejected>> {
            prop(name)
                .map(|v| {
                    v.trim().parse::<u64>().map_err(|_| {
                        reject(
                            ErrorCode::InvalidRequest,
                            format!("user property `{name}` must be a non-negative integer"),
                            &reply_topic,
                        )
                    })
                })
                .transpose()
        };
        let top_k = parse_num("top_k")?;
        let deadline_ms = parse_num("deadline_ms")?;
        self.build(
            id,
            reply_topic,
            correlation,
            Protocol::V5,
            msg.payload.to_vec(),
            top_k,
            deadline_ms,
            now,
        )
    }

    /// The envelope is read in two steps: `id` and `reply_to` first, so that a mistake in
    /// any other field is answered where the client waits for it, under its id; then the
    /// rest. Unknown fields are ignored so clients can add their own.
    fn parse_v311(&self, msg: &Inbound<'_>, now: UnixMillis) -> Result<StoredRequest, Box<Rejected>> {
        let fallback_id = || generated_id(&self.device_id, now);
        let reject_default = |id: &str, message: String| {
            self.rejection(
                id,
                &self.default_reply_topic,
                None,
                Protocol::V311,
                ErrorCode::InvalidRequest,
                message,
            )
        };
        let mut envelope = match serde_json::from_slice::<serde_json::Value>(msg.payload) {
            Ok(serde_json::Value::Object(fields)) => fields,
            Ok(_) => {
                return Err(reject_default(
                    &fallback_id(),
                    "the payload is not a JSON request envelope: not an object".into(),
                ));
            }
            Err(_) if msg.payload.len() > max_envelope_bytes(self.max_image_bytes) => {
                let message = format!(
                    "the request is {} bytes and not a JSON request envelope; an envelope for the \
                     largest image accepted ({} bytes) is at most {} bytes",
                    msg.payload.len(),
                    self.max_image_bytes,
                    max_envelope_bytes(self.max_image_bytes)
                );
                return Err(self.rejection(
                    &fallback_id(),
                    &self.default_reply_topic,
                    None,
                    Protocol::V311,
                    ErrorCode::TooLarge,
                    message,
                ));
            }
            Err(e) => {
                return Err(reject_default(
                    &fallback_id(),
                    format!("the payload is not a JSON request envelope: {e}"),
                ));
            }
        };
        // The id as the client will look for it: a number is echoed as its JSON text.
        let given_id = match envelope.get("id") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Number(n)) => Some(n.to_string()),
            _ => None,
        };
        let id = given_id
            .clone()
            .filter(|id| !id.is_empty() && id.len() <= MAX_ID_BYTES)
            .unwrap_or_else(fallback_id);
        let reply_topic = match envelope.get("reply_to") {
            None | Some(serde_json::Value::Null) => self.default_reply_topic.clone(),
            Some(serde_json::Value::String(t)) if t.is_empty() => self.default_reply_topic.clone(),
            Some(serde_json::Value::String(t)) => t.clone(),
            Some(_) => return Err(reject_default(&id, "`reply_to` must be a string".into())),
        };
        if let Some(problem) = reply_topic_problem(&reply_topic) {
            return Err(reject_default(&id, format!("`reply_to` {problem}")));
        }
        let reject =
            |code, message: String| self.rejection(&id, &reply_topic, None, Protocol::V311, code, message);
        if !matches!(
            envelope.get("id"),
            None | Some(serde_json::Value::Null | serde_json::Value::String(_))
        ) {
            return Err(reject(ErrorCode::InvalidRequest, "`id` must be a string".into()));
        }
        let number = |name: &str| -> Result<Option<u64>, Box<Rejected>> {
            match envelope.get(name) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                    reject(
                        ErrorCode::InvalidRequest,
                        format!("`{name}` must be a non-negative integer, got {v}"),
                    )
                }),
            }
        };
        let top_k = number("top_k")?;
        let deadline_ms = number("deadline_ms")?;
        let b64 = match envelope.remove("image_b64") {
            Some(serde_json::Value::String(b64)) => b64,
            None | Some(serde_json::Value::Null) => {
                return Err(reject(
                    ErrorCode::InvalidRequest,
                    "the envelope has no `image_b64`".into(),
                ));
            }
            Some(_) => {
                return Err(reject(
                    ErrorCode::InvalidRequest,
                    "`image_b64` must be a base64 string".into(),
                ));
            }
        };
        // Refuse before decoding: base64 is 4/3 of the bytes it carries.
        let decoded_len = b64.len() / 4 * 3;
        if decoded_len > self.max_image_bytes + 3 {
            return Err(reject(
                ErrorCode::TooLarge,
                format!(
                    "the image is about {decoded_len} bytes, the limit is {}",
                    self.max_image_bytes
                ),
            ));
        }
        let image = match base64::engine::general_purpose::STANDARD.decode(b64.as_bytes()) {
            Ok(image) => image,
            Err(e) => {
                return Err(reject(
                    ErrorCode::InvalidRequest,
                    format!("`image_b64` is not valid base64: {e}"),
                ));
            }
        };
        self.build(
            id,
            reply_topic,
            None,
            Protocol::V311,
            image,
            top_k,
            deadline_ms,
            now,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn build(
        &self,
        id: String,
        reply_topic: String,
        correlation_data: Option<Vec<u8>>,
        protocol: Protocol,
        payload: Vec<u8>,
        top_k: Option<u64>,
        deadline_ms: Option<u64>,
        now: UnixMillis,
    ) -> Result<StoredRequest, Box<Rejected>> {
        let reject = |code, message: String| {
            self.rejection(
                &id,
                &reply_topic,
                correlation_data.clone(),
                protocol,
                code,
                message,
            )
        };
        if payload.len() > self.max_image_bytes {
            return Err(reject(
                ErrorCode::TooLarge,
                format!(
                    "the image is {} bytes, the limit is {}",
                    payload.len(),
                    self.max_image_bytes
                ),
            ));
        }
        if payload.is_empty() {
            return Err(reject(ErrorCode::InvalidImage, "the image is empty".into()));
        }
        let top_k = match top_k {
            None => None,
            Some(k) if k >= 1 && k <= u64::from(self.max_top_k) => Some(k as u32),
            Some(k) => {
                return Err(reject(
                    ErrorCode::InvalidRequest,
                    format!("top_k {k} is outside 1..={}", self.max_top_k),
                ));
            }
        };
        // 0 means no deadline, as for `limits.default_deadline_ms`; it also lifts the default.
        let deadline = match deadline_ms {
            Some(0) => None,
            Some(ms) => Some(Duration::from_millis(ms)),
            None => self.default_deadline,
        }
        .map(|d| now.saturating_add(d));
        Ok(StoredRequest {
            request_id: id,
            received_at: now,
            deadline,
            reply_topic,
            correlation_data,
            top_k,
            protocol,
            payload,
        })
    }

    fn rejection(
        &self,
        id: &str,
        topic: &str,
        correlation_data: Option<Vec<u8>>,
        protocol: Protocol,
        code: ErrorCode,
        message: String,
    ) -> Box<Rejected> {
        let reply = StoredReply {
            request_id: id.to_owned(),
            topic: topic.to_owned(),
            correlation_data,
            protocol,
            payload: error_document(id, &self.device_id, None, code, &message),
        };
        Box::new(Rejected { code, message, reply })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RequestPolicy {
        RequestPolicy {
            device_id: "cam1".into(),
            default_reply_topic: "edge/cam1/result".into(),
            max_image_bytes: 100,
            max_top_k: 10,
            default_deadline: None,
        }
    }

    fn v5<'a>(payload: &'a [u8], props: &'a [(String, String)]) -> Inbound<'a> {
        Inbound {
            protocol: Protocol::V5,
            payload,
            response_topic: Some("app/replies"),
            correlation_data: Some(b"corr-7"),
            user_properties: props,
        }
    }

    fn props(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn error_code(r: &Rejected) -> String {
        let v: serde_json::Value = serde_json::from_slice(&r.reply.payload).unwrap();
        v["error"]["code"].as_str().unwrap().to_owned()
    }

    const NOW: UnixMillis = UnixMillis(1_000_000);

    #[test]
    fn v5_request_takes_properties() {
        let p = props(&[("id", "r1"), ("top_k", "3"), ("deadline_ms", "500")]);
        let r = policy().parse(&v5(b"\xFF\xD8img", &p), NOW).unwrap();
        assert_eq!(r.request_id, "r1");
        assert_eq!(r.reply_topic, "app/replies");
        assert_eq!(r.correlation_data.as_deref(), Some(&b"corr-7"[..]));
        assert_eq!(r.top_k, Some(3));
        assert_eq!(r.deadline, Some(UnixMillis(1_000_500)));
        assert_eq!(r.payload, b"\xFF\xD8img");
    }

    #[test]
    fn v5_id_falls_back_to_correlation_then_generated() {
        let r = policy().parse(&v5(b"x", &[]), NOW).unwrap();
        assert_eq!(r.request_id, "corr-7");
        let binary = Inbound {
            correlation_data: Some(&[0xFF, 0x00]),
            response_topic: None,
            ..v5(b"x", &[])
        };
        let r = policy().parse(&binary, NOW).unwrap();
        assert!(r.request_id.starts_with("cam1-1000000-"), "{}", r.request_id);
        assert_eq!(r.reply_topic, "edge/cam1/result");
    }

    #[test]
    fn v5_rejections_have_codes_and_keep_correlation() {
        let big = vec![0u8; 101];
        let r = policy().parse(&v5(&big, &[]), NOW).unwrap_err();
        assert_eq!(
            (r.code, error_code(&r).as_str()),
            (ErrorCode::TooLarge, "too_large")
        );
        assert_eq!(r.reply.topic, "app/replies");
        assert_eq!(r.reply.correlation_data.as_deref(), Some(&b"corr-7"[..]));

        let p = props(&[("top_k", "lots")]);
        let r = policy().parse(&v5(b"x", &p), NOW).unwrap_err();
        assert_eq!(error_code(&r), "invalid_request");
        let p = props(&[("top_k", "11")]);
        assert_eq!(
            policy().parse(&v5(b"x", &p), NOW).unwrap_err().code,
            ErrorCode::InvalidRequest
        );

        let r = policy().parse(&v5(b"", &[]), NOW).unwrap_err();
        assert_eq!(error_code(&r), "invalid_image");

        let wild = Inbound {
            response_topic: Some("a/#"),
            ..v5(b"x", &[])
        };
        let r = policy().parse(&wild, NOW).unwrap_err();
        assert_eq!(r.code, ErrorCode::InvalidRequest);
        assert_eq!(r.reply.topic, "edge/cam1/result");
    }

    fn v311(payload: &[u8]) -> Inbound<'_> {
        Inbound {
            protocol: Protocol::V311,
            payload,
            response_topic: None,
            correlation_data: None,
            user_properties: &[],
        }
    }

    #[test]
    fn v311_envelope() {
        let body =
            br#"{"id":"e1","image_b64":"/9j/","reply_to":"app/r","top_k":2,"deadline_ms":10,"extra":1}"#;
        let r = policy().parse(&v311(body), NOW).unwrap();
        assert_eq!(r.request_id, "e1");
        assert_eq!(r.payload, [0xFF, 0xD8, 0xFF]);
        assert_eq!(r.reply_topic, "app/r");
        assert_eq!(r.top_k, Some(2));
        assert_eq!(r.deadline, Some(UnixMillis(1_000_010)));
        assert_eq!(r.protocol, Protocol::V311);
    }

    #[test]
    fn v311_rejections() {
        for (body, code) in [
            (&b"not json"[..], "invalid_request"),
            (br#"{"id":"e1"}"#, "invalid_request"),
            (br#"{"id":"e1","image_b64":"!!!"}"#, "invalid_request"),
            (br#"{"id":"e1","image_b64":""}"#, "invalid_image"),
            (br#"{"id":"e1","image_b64":3}"#, "invalid_request"),
        ] {
            let r = policy().parse(&v311(body), NOW).unwrap_err();
            assert_eq!(error_code(&r), code, "{}", String::from_utf8_lossy(body));
        }
        let big = format!(r#"{{"id":"e2","image_b64":"{}"}}"#, "A".repeat(200));
        let r = policy().parse(&v311(big.as_bytes()), NOW).unwrap_err();
        assert_eq!(error_code(&r), "too_large");
        assert_eq!(r.reply.request_id, "e2");
        let deep = format!("{}{}", "[".repeat(40), "]".repeat(40));
        let r = policy().parse(&v311(deep.as_bytes()), NOW).unwrap_err();
        assert_eq!(error_code(&r), "invalid_request", "JSON, but not an envelope");
        // Not an envelope and larger than any image could be: too large, whatever it holds.
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let r = policy().parse(&v311(deep.as_bytes()), NOW).unwrap_err();
        assert_eq!(error_code(&r), "too_large");
        assert_eq!(r.reply.topic, "edge/cam1/result");
    }

    #[test]
    fn v311_mistakes_are_answered_where_the_client_waits_under_its_id() {
        for body in [
            r#"{"id":"r2","image_b64":"/9j/","reply_to":"app/r311","top_k":"3"}"#,
            r#"{"id":"r2","image_b64":"/9j/","reply_to":"app/r311","top_k":5000000000}"#,
            r#"{"id":"r2","image_b64":"/9j/","reply_to":"app/r311","deadline_ms":-1}"#,
            r#"{"id":"r2","image_b64":7,"reply_to":"app/r311"}"#,
            r#"{"image_b64":"/9j/","reply_to":"app/r311","id":"r2","top_k":1.5}"#,
        ] {
            let r = policy().parse(&v311(body.as_bytes()), NOW).unwrap_err();
            assert_eq!(r.code, ErrorCode::InvalidRequest, "{body}");
            assert_eq!(
                (r.reply.request_id.as_str(), r.reply.topic.as_str()),
                ("r2", "app/r311"),
                "{body}"
            );
        }
        // A numeric id is echoed as its text, so the client can match the refusal.
        let body = br#"{"id":12345,"image_b64":"/9j/","reply_to":"app/r311"}"#;
        let r = policy().parse(&v311(body), NOW).unwrap_err();
        assert_eq!(
            (r.code, r.reply.request_id.as_str(), r.reply.topic.as_str()),
            (ErrorCode::InvalidRequest, "12345", "app/r311")
        );
        // A `reply_to` that cannot take the reply: the default topic, still with the id.
        for reply_to in ["3", "\"a/#\"", "\"$SYS/app/r\"", "\"$share/g/app/r\""] {
            let body = format!(r#"{{"id":"r3","image_b64":"/9j/","reply_to":{reply_to}}}"#);
            let r = policy().parse(&v311(body.as_bytes()), NOW).unwrap_err();
            assert_eq!(
                (r.code, r.reply.request_id.as_str(), r.reply.topic.as_str()),
                (ErrorCode::InvalidRequest, "r3", "edge/cam1/result"),
                "{body}"
            );
        }
    }

    #[test]
    fn dollar_reply_topics_are_refused() {
        for topic in ["$SYS/app/r", "$share/g/app/r", "$anything"] {
            assert!(!valid_reply_topic(topic), "{topic}");
            let msg = Inbound {
                response_topic: Some(topic),
                ..v5(b"x", &[])
            };
            let r = policy().parse(&msg, NOW).unwrap_err();
            assert_eq!(r.code, ErrorCode::InvalidRequest);
            assert_eq!(r.reply.topic, "edge/cam1/result");
            assert_eq!(r.reply.request_id, "corr-7");
            assert!(r.message.contains("reserved"), "{}", r.message);
        }
        assert!(valid_reply_topic("app/$x") && valid_reply_topic("a"));
    }

    #[test]
    fn a_zero_deadline_means_none_and_lifts_the_default() {
        let mut with_default = policy();
        with_default.default_deadline = Some(Duration::from_millis(300));
        let p = props(&[("deadline_ms", "0")]);
        assert_eq!(with_default.parse(&v5(b"x", &p), NOW).unwrap().deadline, None);
        assert_eq!(
            with_default.parse(&v5(b"x", &[]), NOW).unwrap().deadline,
            Some(UnixMillis(1_000_300))
        );
        let body = br#"{"image_b64":"/9j/","deadline_ms":0}"#;
        assert_eq!(with_default.parse(&v311(body), NOW).unwrap().deadline, None);
    }
}
