//! The byte-level codec shared by every queue record: big-endian integers, u32-length-prefixed
//! byte strings, one-byte presence flags; decoding never panics and rejects trailing bytes.

use std::fmt;

/// Why a stored record could not be read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    record: &'static str,
    problem: String,
}

impl DecodeError {
    pub(crate) fn new(record: &'static str, problem: impl Into<String>) -> Self {
        Self {
            record,
            problem: problem.into(),
        }
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "undecodable {} record: {}", self.record, self.problem)
    }
}

impl std::error::Error for DecodeError {}

/// A field longer than the format's u32 length prefix (MQTT caps packets at 256 MiB, so only a
/// caller bug gets here).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FieldTooLong;

/// Appends fields to a record.
#[derive(Debug, Default)]
pub(crate) struct Writer {
    buf: Vec<u8>,
    too_long: bool,
}

impl Writer {
    pub(crate) fn with_capacity(n: usize) -> Self {
        Self {
            buf: Vec::with_capacity(n),
            too_long: false,
        }
    }

    pub(crate) fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }

    pub(crate) fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub(crate) fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub(crate) fn opt_u32(&mut self, v: Option<u32>) -> &mut Self {
        match v {
            Some(v) => self.u8(1).u32(v),
            None => self.u8(0),
        }
    }

    pub(crate) fn opt_u64(&mut self, v: Option<u64>) -> &mut Self {
        match v {
            Some(v) => self.u8(1).u64(v),
            None => self.u8(0),
        }
    }

    /// A length-prefixed byte string; one longer than `u32::MAX` makes `finish` fail.
    pub(crate) fn bytes(&mut self, v: &[u8]) -> &mut Self {
        match u32::try_from(v.len()) {
            Ok(len) => {
                self.u32(len);
                self.buf.extend_from_slice(v);
            }
            Err(_) => self.too_long = true,
        }
        self
    }

    pub(crate) fn opt_bytes(&mut self, v: Option<&[u8]>) -> &mut Self {
        match v {
            Some(v) => self.u8(1).bytes(v),
            None => self.u8(0),
        }
    }

    pub(crate) fn finish(self) -> Result<Vec<u8>, FieldTooLong> {
        if self.too_long {
            Err(FieldTooLong)
        } else {
            Ok(self.buf)
        }
    }
}

/// Reads fields of one record, in order.
pub(crate) struct Reader<'a> {
    record: &'static str,
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(record: &'static str, buf: &'a [u8]) -> Self {
        Self { record, buf }
    }

    fn err(&self, problem: impl Into<String>) -> DecodeError {
        DecodeError::new(self.record, problem)
    }

    fn take(&mut self, n: usize, field: &str) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(self.err(format!("truncated in {field}")));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, field: &str) -> Result<[u8; N], DecodeError> {
        let bytes = self.take(N, field)?;
        <[u8; N]>::try_from(bytes).map_err(|_| self.err(format!("truncated in {field}")))
    }

    pub(crate) fn u8(&mut self, field: &str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(field)?[0])
    }

    pub(crate) fn u32(&mut self, field: &str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array(field)?))
    }

    pub(crate) fn u64(&mut self, field: &str) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array(field)?))
    }

    fn flag(&mut self, field: &str) -> Result<bool, DecodeError> {
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(self.err(format!("bad presence flag {other} in {field}"))),
        }
    }

    pub(crate) fn opt_u32(&mut self, field: &str) -> Result<Option<u32>, DecodeError> {
        if self.flag(field)? {
            self.u32(field).map(Some)
        } else {
            Ok(None)
        }
    }

    pub(crate) fn opt_u64(&mut self, field: &str) -> Result<Option<u64>, DecodeError> {
        if self.flag(field)? {
            self.u64(field).map(Some)
        } else {
            Ok(None)
        }
    }

    pub(crate) fn bytes(&mut self, field: &str) -> Result<&'a [u8], DecodeError> {
        let len = self.u32(field)? as usize;
        self.take(len, field)
    }

    pub(crate) fn opt_bytes(&mut self, field: &str) -> Result<Option<&'a [u8]>, DecodeError> {
        if self.flag(field)? {
            self.bytes(field).map(Some)
        } else {
            Ok(None)
        }
    }

    pub(crate) fn string(&mut self, field: &str) -> Result<String, DecodeError> {
        let bytes = self.bytes(field)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| self.err(format!("{field} is not UTF-8")))
    }

    /// Checks the record's leading format byte.
    pub(crate) fn version(&mut self, supported: u8) -> Result<(), DecodeError> {
        match self.u8("version")? {
            v if v == supported => Ok(()),
            v => Err(self.err(format!("format version {v}, this agent reads {supported}"))),
        }
    }

    pub(crate) fn end(self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(self.err(format!("{} trailing bytes", self.buf.len())))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_round_trip() {
        let mut w = Writer::default();
        w.u8(1)
            .u32(7)
            .u64(9)
            .opt_u32(None)
            .opt_u64(Some(3))
            .bytes(b"ab")
            .opt_bytes(Some(b""));
        let buf = w.finish().unwrap();
        let mut r = Reader::new("test", &buf);
        r.version(1).unwrap();
        assert_eq!(r.u32("a").unwrap(), 7);
        assert_eq!(r.u64("b").unwrap(), 9);
        assert_eq!(r.opt_u32("c").unwrap(), None);
        assert_eq!(r.opt_u64("d").unwrap(), Some(3));
        assert_eq!(r.bytes("e").unwrap(), b"ab");
        assert_eq!(r.opt_bytes("f").unwrap(), Some(&b""[..]));
        r.end().unwrap();
    }

    #[test]
    fn truncation_and_garbage_are_errors_not_panics() {
        let mut r = Reader::new("test", &[0, 0, 0, 9, 1]);
        assert!(
            r.bytes("payload")
                .unwrap_err()
                .to_string()
                .contains("truncated in payload")
        );
        let mut r = Reader::new("test", &[2]);
        assert!(r.opt_u32("top_k").is_err());
        let mut r = Reader::new("test", &[1, 0]);
        r.version(1).unwrap();
        assert!(r.end().unwrap_err().to_string().contains("1 trailing bytes"));
        assert!(Reader::new("test", &[2]).version(1).is_err());
    }
}
