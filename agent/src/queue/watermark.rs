//! A sidecar file beside the sled files holding a lower bound of the next sequence number
//! known durable, so `open` can tell when sled's recovery silently dropped flushed records.
//!
//! sled 0.34 treats any unreadable part of its log as a torn tail: it keeps what comes before
//! and starts writing over the rest, without an error (a wholly garbage `db` file opens as an
//! empty database). The watermark is written after each enqueue's flush has returned, so it
//! never exceeds what is on disk; it is not itself fsynced, since a stale (lower) value only
//! weakens the check and never causes a false alarm.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::{Mutex, PoisonError};

pub(crate) const FILE_NAME: &str = "edge-queue.watermark";
const MAGIC: [u8; 4] = *b"EQW\x01";

/// Reads the watermark, if there is a readable one.
pub(crate) fn read(dir: &Path) -> Option<u64> {
    let mut buf = Vec::new();
    let mut file = File::open(dir.join(FILE_NAME)).ok()?;
    file.read_to_end(&mut buf).ok()?;
    if buf.is_empty() {
        return None; // created, never raised
    }
    match buf.split_first_chunk::<4>() {
        Some((magic, rest)) if *magic == MAGIC => <[u8; 8]>::try_from(rest).ok().map(u64::from_be_bytes),
        _ => {
            tracing::warn!(path = %dir.join(FILE_NAME).display(), "ignoring an unreadable queue watermark");
            None
        }
    }
}

pub(crate) struct Watermark {
    /// The file and the value last written to it.
    state: Mutex<(File, u64)>,
}

impl Watermark {
    pub(crate) fn open(dir: &Path, current: u64) -> io::Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(dir.join(FILE_NAME))?;
        let watermark = Self {
            state: Mutex::new((file, 0)),
        };
        watermark.raise(current);
        Ok(watermark)
    }

    /// Records that every sequence number below `next_seq` has been flushed. Best effort: a
    /// failure is logged and only weakens the check at the next open.
    pub(crate) fn raise(&self, next_seq: u64) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let (file, written) = &mut *state;
        if next_seq <= *written {
            return;
        }
        let mut record = [0u8; 12];
        record[..4].copy_from_slice(&MAGIC);
        record[4..].copy_from_slice(&next_seq.to_be_bytes());
        match file
            .seek(SeekFrom::Start(0))
            .and_then(|_| file.write_all(&record))
        {
            Ok(()) => *written = next_seq,
            Err(e) => tracing::warn!(error = %e, "could not update the queue watermark"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watermark_only_rises_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path()), None);
        let w = Watermark::open(dir.path(), 5).unwrap();
        assert_eq!(read(dir.path()), Some(5));
        w.raise(9);
        w.raise(7);
        assert_eq!(read(dir.path()), Some(9));
        std::fs::write(dir.path().join(FILE_NAME), b"junk").unwrap();
        assert_eq!(read(dir.path()), None);
    }
}
