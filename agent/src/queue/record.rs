//! What the queue stores for callers: an accepted request and the reply awaiting the broker's
//! ack, with their versioned binary encodings.

use super::codec::{DecodeError, FieldTooLong, Reader, Writer};
use super::ledger::UnixMillis;

/// The current format byte of request and reply records.
const FORMAT_V1: u8 = 1;

/// The MQTT protocol a request arrived on, which decides the shape of its reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// MQTT 5: raw image payload, Response Topic and Correlation Data properties.
    V5,
    /// MQTT 3.1.1: JSON envelope.
    V311,
}

impl Protocol {
    /// Stored as the MQTT protocol level (4 for 3.1.1, 5 for 5).
    fn level(self) -> u8 {
        match self {
            Self::V5 => 5,
            Self::V311 => 4,
        }
    }

    fn from_level(level: u8, record: &'static str) -> Result<Self, DecodeError> {
        match level {
            5 => Ok(Self::V5),
            4 => Ok(Self::V311),
            other => Err(DecodeError::new(
                record,
                format!("unknown protocol level {other}"),
            )),
        }
    }
}

/// An accepted classification request, as persisted before it is acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRequest {
    pub request_id: String,
    pub received_at: UnixMillis,
    /// Past this instant the request is answered `deadline_exceeded` instead of classified.
    pub deadline: Option<UnixMillis>,
    pub reply_topic: String,
    pub correlation_data: Option<Vec<u8>>,
    /// Requested number of labels; `None` means the configured default.
    pub top_k: Option<u32>,
    pub protocol: Protocol,
    /// The image bytes (JPEG or PNG); what the queue's byte bound counts.
    pub payload: Vec<u8>,
}

impl StoredRequest {
    pub fn payload_len(&self) -> u64 {
        self.payload.len() as u64
    }

    pub(crate) fn encode(&self) -> Result<Vec<u8>, FieldTooLong> {
        let extra = self.request_id.len() + self.reply_topic.len();
        let mut w = Writer::with_capacity(self.payload.len() + extra + 64);
        w.u8(FORMAT_V1)
            .u8(self.protocol.level())
            .u64(self.received_at.0)
            .opt_u64(self.deadline.map(|d| d.0))
            .opt_u32(self.top_k)
            .bytes(self.request_id.as_bytes())
            .bytes(self.reply_topic.as_bytes())
            .opt_bytes(self.correlation_data.as_deref())
            .bytes(&self.payload);
        w.finish()
    }

    pub(crate) fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        const RECORD: &str = "request";
        let mut r = Reader::new(RECORD, buf);
        r.version(FORMAT_V1)?;
        let protocol = Protocol::from_level(r.u8("protocol")?, RECORD)?;
        let received_at = UnixMillis(r.u64("received_at")?);
        let deadline = r.opt_u64("deadline")?.map(UnixMillis);
        let top_k = r.opt_u32("top_k")?;
        let request_id = r.string("request_id")?;
        let reply_topic = r.string("reply_topic")?;
        let correlation_data = r.opt_bytes("correlation_data")?.map(<[u8]>::to_vec);
        let payload = r.bytes("payload")?.to_vec();
        r.end()?;
        Ok(Self {
            request_id,
            received_at,
            deadline,
            reply_topic,
            correlation_data,
            top_k,
            protocol,
            payload,
        })
    }
}

/// A reply ready to publish, kept in the outbox until the broker acknowledges it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredReply {
    pub request_id: String,
    pub topic: String,
    pub correlation_data: Option<Vec<u8>>,
    pub protocol: Protocol,
    /// The reply body (JSON).
    pub payload: Vec<u8>,
}

impl StoredReply {
    pub(crate) fn encode(&self) -> Result<Vec<u8>, FieldTooLong> {
        let mut w = Writer::with_capacity(self.payload.len() + self.topic.len() + 64);
        w.u8(FORMAT_V1)
            .u8(self.protocol.level())
            .bytes(self.request_id.as_bytes())
            .bytes(self.topic.as_bytes())
            .opt_bytes(self.correlation_data.as_deref())
            .bytes(&self.payload);
        w.finish()
    }

    pub(crate) fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        const RECORD: &str = "reply";
        let mut r = Reader::new(RECORD, buf);
        r.version(FORMAT_V1)?;
        let protocol = Protocol::from_level(r.u8("protocol")?, RECORD)?;
        let request_id = r.string("request_id")?;
        let topic = r.string("topic")?;
        let correlation_data = r.opt_bytes("correlation_data")?.map(<[u8]>::to_vec);
        let payload = r.bytes("payload")?.to_vec();
        r.end()?;
        Ok(Self {
            request_id,
            topic,
            correlation_data,
            protocol,
            payload,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> StoredRequest {
        StoredRequest {
            request_id: "req-1".into(),
            received_at: UnixMillis(1_700_000_000_000),
            deadline: Some(UnixMillis(1_700_000_005_000)),
            reply_topic: "edge/dev/result".into(),
            correlation_data: Some(vec![0, 1, 2]),
            top_k: Some(5),
            protocol: Protocol::V5,
            payload: vec![0xFF, 0xD8, 0xFF],
        }
    }

    #[test]
    fn request_round_trips_with_and_without_optionals() {
        let r = request();
        assert_eq!(StoredRequest::decode(&r.encode().unwrap()).unwrap(), r);
        let bare = StoredRequest {
            deadline: None,
            correlation_data: None,
            top_k: None,
            protocol: Protocol::V311,
            ..request()
        };
        assert_eq!(StoredRequest::decode(&bare.encode().unwrap()).unwrap(), bare);
    }

    #[test]
    fn reply_round_trips() {
        let reply = StoredReply {
            request_id: "req-1".into(),
            topic: "t".into(),
            correlation_data: None,
            protocol: Protocol::V311,
            payload: br#"{"id":"req-1"}"#.to_vec(),
        };
        assert_eq!(StoredReply::decode(&reply.encode().unwrap()).unwrap(), reply);
    }

    #[test]
    fn every_truncation_of_a_record_is_an_error() {
        let buf = request().encode().unwrap();
        for n in 0..buf.len() {
            assert!(
                StoredRequest::decode(&buf[..n]).is_err(),
                "prefix of {n} bytes decoded"
            );
        }
    }

    #[test]
    fn unknown_version_or_protocol_is_an_error() {
        let mut buf = request().encode().unwrap();
        buf[0] = 2;
        assert!(
            StoredRequest::decode(&buf)
                .unwrap_err()
                .to_string()
                .contains("format version 2")
        );
        buf[0] = FORMAT_V1;
        buf[1] = 3;
        assert!(
            StoredRequest::decode(&buf)
                .unwrap_err()
                .to_string()
                .contains("protocol level 3")
        );
    }
}
