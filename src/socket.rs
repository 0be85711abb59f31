//! A socket's outbound side, shared by the actors (which queue frames and
//! close sockets) and the api (whose socket tasks drain the queue and obey
//! the close): [`SocketHandle`] for the server, [`SocketInbox`] and
//! [`Closer`] for the socket task, the close codes of the protocol, the
//! node's [`SocketRegistry`] (per-user cap and the `chatd_connections`
//! gauge, both held by one guard per socket) and the shared pipeline
//! [`drain`].

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::domain::{SessionId, UserId};
use crate::protocol::Frame;

/// Close code for a slow consumer (client resyncs): its outbound queue
/// overflowed, or it could not take its frames within `ws.write_timeout_ms`
/// (then the server drops the connection without waiting for this close
/// frame to get through, so the client may only see the connection end).
pub const CLOSE_SLOW_CONSUMER: u16 = 4008;
/// Close code when an operator disconnects the user.
pub const CLOSE_KICKED: u16 = 4001;
/// Close code on server shutdown.
pub const CLOSE_GOING_AWAY: u16 = 1001;
/// Close code for a socket refused because its user already holds
/// `ws.max_sockets_per_user` sockets on this node (the newest is refused,
/// right after the upgrade, before `ready`).
pub const CLOSE_TOO_MANY_SOCKETS: u16 = 4009;

/// How long a shutdown waits for the room pipelines to store and ack what
/// they accepted.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Waits (up to [`DRAIN_TIMEOUT`]) until every room pipeline tracked by
/// `pipelines` has stored and acked what it accepted; false, with a
/// warning naming `who`, if they did not finish in time.
pub async fn drain(pipelines: &TaskTracker, who: &str) -> bool {
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, pipelines.wait())
        .await
        .is_ok();
    if !drained {
        tracing::warn!(
            who,
            secs = DRAIN_TIMEOUT.as_secs(),
            "room pipelines did not drain in time"
        );
    }
    drained
}

/// Why a socket is being closed by the server.
#[derive(Debug, Clone)]
pub struct CloseReason {
    pub code: u16,
    pub reason: &'static str,
}

/// The server's handle on one socket (one device): its bounded outbound
/// queue and a way to close it.
#[derive(Clone)]
pub struct SocketHandle {
    pub id: SessionId,
    pub user_id: UserId,
    pub connected_at: String,
    tx: mpsc::Sender<Frame>,
    close: Arc<CloseSignal>,
}

struct CloseSignal {
    token: CancellationToken,
    reason: OnceLock<CloseReason>,
}

/// The socket task's side of a [`SocketHandle`].
pub struct SocketInbox {
    pub rx: mpsc::Receiver<Frame>,
    pub closer: Closer,
}

/// Tells the socket task that the server closes the socket, and why.
pub struct Closer(Arc<CloseSignal>);

impl Closer {
    /// Resolves when the server decided to close the socket.
    pub async fn closed(&self) -> CloseReason {
        self.0.token.cancelled().await;
        self.0.reason.get().cloned().unwrap_or(CloseReason {
            code: CLOSE_GOING_AWAY,
            reason: "closing",
        })
    }
}

impl SocketHandle {
    /// A handle and its inbox with room for `capacity` frames.
    pub fn new(user_id: UserId, capacity: usize) -> (Self, SocketInbox) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let close = Arc::new(CloseSignal {
            token: CancellationToken::new(),
            reason: OnceLock::new(),
        });
        (
            Self {
                id: SessionId::generate(),
                user_id,
                connected_at: crate::domain::now_rfc3339(),
                tx,
                close: close.clone(),
            },
            SocketInbox {
                rx,
                closer: Closer(close),
            },
        )
    }

    /// Queues a frame without waiting. A full queue means the client cannot
    /// keep up: the socket is closed with 4008 and the client resyncs from
    /// its cursors, so nothing is lost silently. Returns false if not queued.
    pub fn push(&self, frame: Frame) -> bool {
        match self.tx.try_send(frame) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                metrics::counter!("chatd_slow_consumer_closed_total").increment(1);
                self.close(CLOSE_SLOW_CONSUMER, "outbound queue full; resync");
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Queues a frame, waiting for room (used for catch-up, where the
    /// session may wait on its own socket).
    pub async fn push_wait(&self, frame: Frame) -> bool {
        tokio::select! {
            r = self.tx.send(frame) => r.is_ok(),
            _ = self.close.token.cancelled() => false,
        }
    }

    /// Asks the socket task to close with `code`.
    pub fn close(&self, code: u16, reason: &'static str) {
        let _ = self.close.reason.set(CloseReason { code, reason });
        self.close.token.cancel();
    }

    /// Resolves once the server decided to close this socket.
    pub async fn closing(&self) {
        self.close.token.cancelled().await;
    }

    /// The socket task has ended or is closing.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed() || self.close.token.is_cancelled()
    }

    /// Frames waiting in the outbound queue.
    pub fn queued(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }
}

/// The live sockets of one node, per user: admits a socket under the
/// per-user cap and keeps the `chatd_connections` gauge. Both are held by
/// the [`SocketGuard`] the socket task owns, so they cannot drift: however
/// the task ends (client close, reset, kill, slow consumer, kick, session
/// restart, shutdown), dropping the guard releases the socket.
#[derive(Default)]
pub struct SocketRegistry {
    per_user: DashMap<UserId, usize>,
}

/// A socket refused because its user holds the maximum already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooManySockets {
    pub limit: usize,
}

impl SocketRegistry {
    /// A registry shared by a node's `/ws` and Socket.IO sockets.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Counts a new socket of `user` unless it already holds `limit` (0:
    /// no limit); the guard releases it when dropped.
    pub fn admit(
        self: &Arc<Self>,
        user: &UserId,
        limit: usize,
    ) -> Result<SocketGuard, TooManySockets> {
        {
            let mut n = self.per_user.entry(user.clone()).or_insert(0);
            if limit > 0 && *n >= limit {
                return Err(TooManySockets { limit });
            }
            *n += 1;
        }
        metrics::gauge!("chatd_connections").increment(1.0);
        Ok(SocketGuard {
            registry: self.clone(),
            user: user.clone(),
        })
    }

    /// Live sockets of `user` on this node.
    pub fn count(&self, user: &UserId) -> usize {
        self.per_user.get(user).map(|n| *n).unwrap_or(0)
    }

    /// Live sockets on this node.
    pub fn total(&self) -> usize {
        self.per_user.iter().map(|e| *e.value()).sum()
    }
}

/// One admitted socket; dropping it releases the socket's place under the
/// cap and in the gauge.
pub struct SocketGuard {
    registry: Arc<SocketRegistry>,
    user: UserId,
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        self.registry.per_user.remove_if_mut(&self.user, |_, n| {
            *n = n.saturating_sub(1);
            *n == 0
        });
        metrics::gauge!("chatd_connections").decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_caps_per_user_and_releases_on_drop() {
        let r = SocketRegistry::new();
        let a = UserId::generate();
        let b = UserId::generate();
        let g1 = r.admit(&a, 2).unwrap();
        let g2 = r.admit(&a, 2).unwrap();
        assert_eq!(r.admit(&a, 2).err(), Some(TooManySockets { limit: 2 }));
        let _g3 = r.admit(&b, 2).unwrap();
        assert_eq!((r.count(&a), r.total()), (2, 3));
        drop(g1);
        let _g4 = r.admit(&a, 2).unwrap();
        drop(g2);
        assert_eq!((r.count(&a), r.total()), (1, 2));
        assert!(r.admit(&a, 0).is_ok(), "0 means no limit");
    }
}
