//! The on-disk layout: tree names, meta keys, and the small index and dead-letter records
//! (the module doc of `queue` describes how they fit together).

use super::codec::{DecodeError, FieldTooLong, Reader, Writer};
use super::ledger::{ItemMeta, Seq, UnixMillis};
use super::record::StoredRequest;

/// `seq → StoredRequest`: request bodies, written once at enqueue, removed at completion.
pub(crate) const ITEMS: &str = "items";
/// `seq → IndexEntry`: items waiting for a worker, FIFO by key.
pub(crate) const PENDING: &str = "pending";
/// `seq → IndexEntry`: items a worker holds (void after a restart: they go back to pending).
pub(crate) const LEASED: &str = "leased";
/// `seq → StoredReply`: replies not yet acknowledged by the broker.
pub(crate) const OUTBOX: &str = "outbox";
/// `seq → DeadRecord`: items that used up their attempts or could not be read.
pub(crate) const DEAD: &str = "dead";

/// The SQLite database file in the queue directory (beside it, while open, SQLite's
/// write-ahead log `queue.sqlite3-wal`).
pub(crate) const DB_FILE: &str = "queue.sqlite3";
/// `PRAGMA application_id` of a queue database ("EdgQ"), so a foreign SQLite file is refused.
pub(crate) const APPLICATION_ID: i64 = 0x4564_6751;
/// `PRAGMA user_version`: the layout version this code writes and reads (1 was sled's).
pub(crate) const LAYOUT_VERSION: i64 = 2;

/// `meta` key holding the next sequence number to assign (u64, big-endian).
pub(crate) const META_NEXT_SEQ: &str = "next_seq";
/// `meta` key a flush rewrites, so that it always has something to commit (u64 counter).
pub(crate) const META_FLUSHES: &str = "flushes";
const INDEX_V1: u8 = 1;
const DEAD_V1: u8 = 1;

/// A `pending` or `leased` value: `[1][attempts u32][payload_len u64]`.
pub(crate) fn encode_index(meta: ItemMeta) -> [u8; 13] {
    let mut out = [0u8; 13];
    out[0] = INDEX_V1;
    out[1..5].copy_from_slice(&meta.attempts.to_be_bytes());
    out[5..].copy_from_slice(&meta.payload_len.to_be_bytes());
    out
}

pub(crate) fn decode_index(buf: &[u8]) -> Result<ItemMeta, DecodeError> {
    let mut r = Reader::new("index", buf);
    r.version(INDEX_V1)?;
    let meta = ItemMeta {
        attempts: r.u32("attempts")?,
        payload_len: r.u64("payload_len")?,
    };
    r.end()?;
    Ok(meta)
}

pub(crate) fn decode_u64(buf: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(buf).ok().map(u64::from_be_bytes)
}

/// Why an item became a dead letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DeadReason {
    /// It was leased `max_attempts` times without completing (it keeps crashing the worker
    /// or outliving its lease). The caller was handed it for an `internal` error reply.
    MaxAttempts,
    /// One of its records could not be decoded; nobody could be answered.
    Undecodable,
}

impl DeadReason {
    fn code(self) -> u8 {
        match self {
            Self::MaxAttempts => 1,
            Self::Undecodable => 2,
        }
    }

    fn from_code(code: u8) -> Result<Self, DecodeError> {
        match code {
            1 => Ok(Self::MaxAttempts),
            2 => Ok(Self::Undecodable),
            other => Err(DecodeError::new("dead letter", format!("unknown reason {other}"))),
        }
    }
}

/// A dead letter, kept for an operator to inspect.
/// Record: `[1][reason u8][attempts u32][at u64][note bytes][raw request opt_bytes]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub seq: Seq,
    pub reason: DeadReason,
    pub attempts: u32,
    /// When it was dead-lettered.
    pub at: UnixMillis,
    /// What went wrong, for a human.
    pub note: String,
    /// The stored request record as found (possibly the undecodable bytes), if any was.
    pub raw_request: Option<Vec<u8>>,
}

impl DeadLetter {
    /// Decodes the kept request, if there is one.
    pub fn request(&self) -> Option<Result<StoredRequest, DecodeError>> {
        self.raw_request.as_deref().map(StoredRequest::decode)
    }

    pub(crate) fn encode(&self) -> Result<Vec<u8>, FieldTooLong> {
        let raw_len = self.raw_request.as_ref().map_or(0, Vec::len);
        let mut w = Writer::with_capacity(raw_len + self.note.len() + 32);
        w.u8(DEAD_V1)
            .u8(self.reason.code())
            .u32(self.attempts)
            .u64(self.at.0)
            .bytes(self.note.as_bytes())
            .opt_bytes(self.raw_request.as_deref());
        w.finish()
    }

    pub(crate) fn decode(seq: Seq, buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new("dead letter", buf);
        r.version(DEAD_V1)?;
        let reason = DeadReason::from_code(r.u8("reason")?)?;
        let attempts = r.u32("attempts")?;
        let at = UnixMillis(r.u64("at")?);
        let note = r.string("note")?;
        let raw_request = r.opt_bytes("raw_request")?.map(<[u8]>::to_vec);
        r.end()?;
        Ok(Self {
            seq,
            reason,
            attempts,
            at,
            note,
            raw_request,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_entry_round_trips_and_rejects_garbage() {
        let meta = ItemMeta {
            attempts: 3,
            payload_len: 1 << 40,
        };
        assert_eq!(decode_index(&encode_index(meta)).unwrap(), meta);
        assert!(decode_index(b"garbage").is_err());
        assert!(decode_index(&[]).is_err());
    }

    #[test]
    fn dead_letter_round_trips() {
        let d = DeadLetter {
            seq: Seq::new(4),
            reason: DeadReason::Undecodable,
            attempts: 0,
            at: UnixMillis(9),
            note: "bad".into(),
            raw_request: Some(vec![1, 2]),
        };
        assert_eq!(DeadLetter::decode(Seq::new(4), &d.encode().unwrap()).unwrap(), d);
        let none = DeadLetter {
            raw_request: None,
            reason: DeadReason::MaxAttempts,
            ..d
        };
        assert_eq!(
            DeadLetter::decode(Seq::new(4), &none.encode().unwrap()).unwrap(),
            none
        );
        assert!(none.request().is_none());
    }
}
