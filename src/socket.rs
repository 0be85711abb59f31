//! A socket's outbound side, shared by the actors (which queue frames and
//! close sockets) and the api (whose socket tasks drain the queue and obey
//! the close): [`SocketHandle`] for the server, [`SocketInbox`] and
//! [`Closer`] for the socket task, and the close codes of the protocol.

use std::sync::{Arc, OnceLock};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::domain::{SessionId, UserId};
use crate::protocol::Frame;

/// Close code for a socket whose outbound queue overflowed (client resyncs).
pub const CLOSE_SLOW_CONSUMER: u16 = 4008;
/// Close code when an operator disconnects the user.
pub const CLOSE_KICKED: u16 = 4001;
/// Close code on server shutdown.
pub const CLOSE_GOING_AWAY: u16 = 1001;

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
