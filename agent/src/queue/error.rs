//! The queue's error type, which says whether retrying can help.

use std::path::PathBuf;

use super::ledger::Seq;

/// What went wrong in the durable queue.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QueueError {
    /// The database could not be read at open (damaged files, records missing, an unknown
    /// layout, or a directory that is not a queue). The agent neither repairs nor deletes it.
    #[error(
        "cannot open the request queue at {}: {reason}. The agent will not repair or delete it: \
         stop the agent, move the directory aside for inspection (e.g. `mv {0} {0}.damaged`) and \
         start the agent again with an empty queue",
        path.display()
    )]
    Damaged { path: PathBuf, reason: String },

    /// The database could not be opened for an I/O reason (permissions, disk).
    #[error("cannot open the request queue at {}: {source}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },

    /// A file-system operation on the queue's directory failed, or a write did not reach the
    /// disk in time.
    #[error("request queue I/O failed at {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// Another process (or another `Queue` in this one) has the database open.
    #[error("the request queue at {} is in use by another process", path.display())]
    Locked { path: PathBuf },

    /// A read, write or flush failed while running (e.g. the disk is full).
    #[error("request queue storage failed: {0}")]
    Storage(#[from] rusqlite::Error),

    /// The item is not leased: its lease expired and it went back to pending, or it was
    /// already completed or released. Its result must be dropped.
    #[error("queue item {seq} is not leased (lease expired, or already completed or released)")]
    NotLeased { seq: Seq },

    /// A field of the record is longer than the format allows (over 4 GiB).
    #[error("{record} record for request {request_id:?} has a field longer than 4 GiB")]
    RecordTooLarge {
        record: &'static str,
        request_id: String,
    },
}

impl QueueError {
    /// Whether the same call may succeed later without anyone intervening.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Open { source, .. } | Self::Storage(source) => io_code(source),
            Self::Io { .. } | Self::Locked { .. } => true,
            Self::Damaged { .. } | Self::NotLeased { .. } | Self::RecordTooLarge { .. } => false,
        }
    }

    /// Whether the disk failed under the queue (an I/O error, a full disk, a write that did
    /// not complete in time), as opposed to a refusal or a damaged record.
    pub fn is_io(&self) -> bool {
        match self {
            Self::Io { .. } => true,
            Self::Open { source, .. } | Self::Storage(source) => io_code(source),
            _ => false,
        }
    }
}

/// SQLite result codes that mean the disk (or memory) failed, not the data.
fn io_code(e: &rusqlite::Error) -> bool {
    use rusqlite::ErrorCode::*;
    matches!(
        e.sqlite_error_code(),
        Some(SystemIoFailure | DiskFull | CannotOpen | DatabaseBusy | DatabaseLocked | OutOfMemory)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_failures_are_retryable_and_damage_is_not() {
        let sqlite = |code| rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(code), None);
        let full = || sqlite(rusqlite::ffi::SQLITE_FULL);
        assert!(QueueError::Storage(full()).is_retryable());
        assert!(QueueError::Storage(full()).is_io());
        assert!(
            QueueError::Open {
                path: "q".into(),
                source: full()
            }
            .is_retryable()
        );
        let corrupt = sqlite(rusqlite::ffi::SQLITE_CORRUPT);
        assert!(!QueueError::Storage(corrupt).is_retryable());
        let timeout = QueueError::Io {
            path: "q".into(),
            source: std::io::Error::from(std::io::ErrorKind::TimedOut),
        };
        assert!(timeout.is_retryable() && timeout.is_io());
        assert!(
            !QueueError::Damaged {
                path: "q".into(),
                reason: "r".into()
            }
            .is_retryable()
        );
        assert!(!QueueError::NotLeased { seq: Seq::new(1) }.is_retryable());
    }

    #[test]
    fn damaged_error_names_the_path_and_the_recovery() {
        let e = QueueError::Damaged {
            path: "/var/lib/edge/queue".into(),
            reason: "bad".into(),
        };
        let msg = e.to_string();
        assert!(msg.contains("/var/lib/edge/queue: bad"), "{msg}");
        assert!(
            msg.contains("mv /var/lib/edge/queue /var/lib/edge/queue.damaged"),
            "{msg}"
        );
    }
}
