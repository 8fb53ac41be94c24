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

    /// The database could not be opened for an I/O reason (permissions, disk, or another
    /// process holding its lock).
    #[error("cannot open the request queue at {}: {source}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },

    /// Another process (or another `Queue` in this one) has the database open.
    #[error("the request queue at {} is in use by another process", path.display())]
    Locked { path: PathBuf },

    /// A read, write or flush failed while running (e.g. the disk is full).
    #[error("request queue storage failed: {0}")]
    Storage(#[from] sled::Error),

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
            Self::Open { source, .. } | Self::Storage(source) => matches!(source, sled::Error::Io(_)),
            Self::Locked { .. } => true,
            Self::Damaged { .. } | Self::NotLeased { .. } | Self::RecordTooLarge { .. } => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_failures_are_retryable_and_damage_is_not() {
        let io = || sled::Error::Io(std::io::Error::other("disk full"));
        assert!(QueueError::Storage(io()).is_retryable());
        assert!(
            QueueError::Open {
                path: "q".into(),
                source: io()
            }
            .is_retryable()
        );
        let corrupt = sled::Error::Unsupported("x".into());
        assert!(!QueueError::Storage(corrupt).is_retryable());
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
