//! The publisher task: the only sender of publishes, so that the `PublishTracker` sees them
//! in the order the client sends them (see `mqtt`): replies, the status, the control
//! subscriptions, and after each connection the subscriptions, the status and the outbox
//! (replies not yet acknowledged) again.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::mpsc;
use tracing::{debug, error, info};

use super::{Shared, lock};
use crate::mqtt::Client;
use crate::queue::{Seq, StoredReply};

/// What the tracker tags publishes with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Tag {
    Reply(Seq),
    Status,
    /// The final `offline` status at shutdown: its PUBACK is waited for.
    Offline,
}

/// Work for the publisher task.
pub(super) enum PubCmd {
    Publish {
        tag: Tag,
        topic: String,
        payload: Vec<u8>,
        retain: bool,
        correlation_data: Option<Vec<u8>>,
    },
    /// The connection is up: subscribe (again), republish the outbox if needed.
    Connected { session_present: bool, first: bool },
    /// Disconnect cleanly after every command before it; answered once handed to the client.
    Disconnect(tokio::sync::oneshot::Sender<()>),
    /// Drain (`false`: unsubscribe from requests) or resume (`true`: subscribe again).
    Requests(bool),
}

impl Shared {
    pub(super) fn publish_reply(&self, seq: Seq, reply: StoredReply) {
        self.send(PubCmd::Publish {
            tag: Tag::Reply(seq),
            topic: reply.topic,
            payload: reply.payload,
            retain: false,
            correlation_data: reply.correlation_data,
        });
    }

    pub(super) fn send(&self, cmd: PubCmd) {
        // The publisher lives as long as the daemon; after it is gone nothing is sent, and
        // the outbox keeps the replies for the next start.
        let _ = self.publish.send(cmd);
    }
}

/// The retained status is the last one the broker receives: once the final `offline` status
/// has been handed to the client, no other status may follow it (the broker would keep that
/// one, and a stopped agent would look alive or stuck to the fleet).
#[derive(Debug, Default)]
struct StatusGate {
    offline_sent: bool,
}

impl StatusGate {
    /// Whether a publish with this tag may be handed to the client now.
    fn admits(&mut self, tag: Tag) -> bool {
        match tag {
            Tag::Reply(_) => true,
            Tag::Status => !self.offline_sent,
            Tag::Offline => {
                self.offline_sent = true;
                true
            }
        }
    }
}

pub(super) async fn publisher_task(
    client: Client,
    shared: Arc<Shared>,
    mut rx: mpsc::UnboundedReceiver<PubCmd>,
) {
    let mut gate = StatusGate::default();
    while let Some(cmd) = rx.recv().await {
        match cmd {
            PubCmd::Publish {
                tag,
                topic,
                payload,
                retain,
                correlation_data,
            } => {
                if !gate.admits(tag) {
                    debug!("a status queued after the offline one: not published");
                    continue;
                }
                lock(&shared.tracker).queued(tag);
                if let Err(e) = client.publish(&topic, payload, retain, correlation_data).await {
                    error!("cannot publish to {topic}: {e}");
                }
            }
            PubCmd::Disconnect(done) => {
                if let Err(e) = client.disconnect().await {
                    debug!("cannot disconnect: {e}");
                }
                let _ = done.send(());
            }
            PubCmd::Requests(take) => {
                let result = if take {
                    client.subscribe(&shared.topics.requests).await
                } else {
                    client.unsubscribe(&shared.topics.requests).await
                };
                if let Err(e) = result {
                    error!("cannot change the request subscriptions: {e}");
                }
            }
            PubCmd::Connected {
                session_present,
                first,
            } => {
                // The subscription also marks the end of a tracker reset (see `mqtt`).
                lock(&shared.tracker).barrier();
                let mut filters = vec![shared.topics.control.clone()];
                if !shared.draining.load(Ordering::Relaxed) {
                    filters.extend(shared.topics.requests.iter().cloned());
                }
                if let Err(e) = client.subscribe(&filters).await {
                    error!("cannot subscribe: {e}");
                }
                // After the offline status (a reconnection during shutdown), the session
                // resends it or, without a session, the last will says `offline`.
                if gate.admits(Tag::Status) {
                    let state = shared.state();
                    lock(&shared.tracker).queued(Tag::Status);
                    if let Err(e) = client
                        .publish(
                            &shared.topics.status,
                            shared.status_document(state.as_str()),
                            true,
                            None,
                        )
                        .await
                    {
                        error!("cannot publish the status: {e}");
                    }
                }
                if first || !session_present {
                    match shared.queue.outbox_async().await {
                        Ok(replies) => {
                            if !replies.is_empty() {
                                let seqs: Vec<u64> = replies.iter().map(|(seq, _)| seq.get()).collect();
                                info!(
                                    replies = replies.len(),
                                    ?seqs,
                                    "publishing replies not yet acknowledged"
                                );
                            }
                            for (seq, reply) in replies {
                                lock(&shared.tracker).queued(Tag::Reply(seq));
                                if let Err(e) = client
                                    .publish(&reply.topic, reply.payload, false, reply.correlation_data)
                                    .await
                                {
                                    error!("cannot publish to {}: {e}", reply.topic);
                                }
                            }
                        }
                        Err(e) => error!("cannot read the outbox: {e}"),
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_status_follows_the_offline_one() {
        let mut gate = StatusGate::default();
        let reply = Tag::Reply(Seq::new(7));
        assert!(gate.admits(Tag::Status));
        assert!(gate.admits(reply));
        assert!(gate.admits(Tag::Offline));
        assert!(!gate.admits(Tag::Status), "a full status after the offline one");
        assert!(gate.admits(reply), "replies still leave after the offline status");
        assert!(gate.admits(Tag::Offline), "the offline status may be sent again");
        assert!(!gate.admits(Tag::Status));
    }
}
