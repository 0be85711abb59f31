//! The transport half of a socket, shared by `/ws` and Socket.IO and
//! generic over where frames go, so it can be tested with channels (as in
//! axum's `examples/testing-websockets`):
//!
//! - [`pump`] drains a socket's bounded outbound queue into an [`Outlet`]
//!   (a WebSocket `Sink`, or socketioxide's emitter), batching what is
//!   queued into one flush. Every write is bounded by `ws.write_timeout_ms`
//!   and the close by `ws.close_timeout_ms`: a client that does not take
//!   its frames in time ends the pump with [`WriteEnd::Stalled`] and the
//!   caller drops the connection instead of queueing a close frame behind
//!   megabytes.
//! - [`read_loop`] reads a WebSocket `Stream` until the client leaves, the
//!   server closes the socket, the node shuts down or the client is idle.

use std::future::Future;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message as WsMessage, Utf8Bytes};
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::WsConfig;
use crate::protocol::{error_frame, Frame};
use crate::socket::{CloseReason, SocketHandle, SocketInbox, CLOSE_SLOW_CONSUMER};

/// Time bounds on a socket's writes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WriteLimits {
    /// Longest a single write may wait for the client to take data.
    pub write: Duration,
    /// Longest sending the close (frame or event) may take.
    pub close: Duration,
}

impl WriteLimits {
    /// The bounds configured under `[ws]`.
    pub fn of(cfg: &WsConfig) -> Self {
        Self {
            write: Duration::from_millis(cfg.write_timeout_ms.max(1)),
            close: Duration::from_millis(cfg.close_timeout_ms.max(1)),
        }
    }
}

/// The transport went away (the client left or the connection broke).
#[derive(Debug)]
pub(crate) struct Gone;

/// Where a socket's outbound frames go.
pub(crate) trait Outlet {
    /// Hands one frame to the transport, waiting while it has no room.
    fn feed(&mut self, frame: Frame) -> impl Future<Output = Result<(), Gone>> + Send;
    /// Pushes what was fed to the client.
    fn flush(&mut self) -> impl Future<Output = Result<(), Gone>> + Send;
    /// Tells the client that the server closes, and why.
    fn close(&mut self, reason: &CloseReason) -> impl Future<Output = Result<(), Gone>> + Send;
}

/// How [`pump`] ended.
#[derive(Debug)]
pub(crate) enum WriteEnd {
    /// The transport went away, or the queue's sender side is gone.
    Gone,
    /// The server closed the socket: queued frames and the close were sent.
    Closed,
    /// The client did not take its frames (or the close) in time; the
    /// socket is marked closed as a slow consumer and the caller must drop
    /// the connection.
    Stalled,
}

/// The reason a stalled socket is closed with.
pub(crate) fn stalled_reason() -> CloseReason {
    CloseReason {
        code: CLOSE_SLOW_CONSUMER,
        reason: "write timed out; resync",
    }
}

/// Drains `inbox` into `out` until the transport goes away, the server
/// closes the socket or the client stops taking frames.
pub(crate) async fn pump<O: Outlet>(
    out: &mut O,
    inbox: &mut SocketInbox,
    handle: &SocketHandle,
    limits: WriteLimits,
) -> WriteEnd {
    let end = pump_inner(out, inbox, limits).await;
    if let WriteEnd::Stalled = end {
        metrics::counter!("chatd_slow_consumer_closed_total").increment(1);
        tracing::info!(user = %handle.user_id, "client does not take its frames; dropping the connection");
        let r = stalled_reason();
        handle.close(r.code, r.reason);
    }
    end
}

async fn pump_inner<O: Outlet>(
    out: &mut O,
    inbox: &mut SocketInbox,
    limits: WriteLimits,
) -> WriteEnd {
    loop {
        tokio::select! {
            biased;
            f = inbox.rx.recv() => {
                let Some(f) = f else { return WriteEnd::Gone };
                if let Err(e) = write_batch(out, f, &mut inbox.rx, limits.write).await {
                    return e;
                }
            }
            reason = inbox.closer.closed() => {
                // Flush what is queued, then say why we close.
                while let Ok(f) = inbox.rx.try_recv() {
                    if let Err(e) = bounded(limits.write, out.feed(f)).await {
                        return e;
                    }
                }
                return match bounded(limits.close, async {
                    out.flush().await?;
                    out.close(&reason).await
                })
                .await
                {
                    Ok(()) => WriteEnd::Closed,
                    Err(e) => e,
                };
            }
        }
    }
}

/// Feeds `first` and whatever else is queued already, then flushes once.
async fn write_batch<O: Outlet>(
    out: &mut O,
    first: Frame,
    rx: &mut mpsc::Receiver<Frame>,
    limit: Duration,
) -> Result<(), WriteEnd> {
    bounded(limit, out.feed(first)).await?;
    while let Ok(f) = rx.try_recv() {
        bounded(limit, out.feed(f)).await?;
    }
    bounded(limit, out.flush()).await
}

/// One transport operation, bounded by `limit`.
async fn bounded(
    limit: Duration,
    op: impl Future<Output = Result<(), Gone>>,
) -> Result<(), WriteEnd> {
    match tokio::time::timeout(limit, op).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(Gone)) => Err(WriteEnd::Gone),
        Err(_) => Err(WriteEnd::Stalled),
    }
}

/// A WebSocket `Sink` as an [`Outlet`]: frames go out as text messages.
pub(crate) struct WsOutlet<S>(pub S);

impl<S> Outlet for WsOutlet<S>
where
    S: Sink<WsMessage> + Unpin + Send,
{
    async fn feed(&mut self, frame: Frame) -> Result<(), Gone> {
        self.0.feed(WsMessage::Text(frame)).await.map_err(|_| Gone)
    }

    async fn flush(&mut self) -> Result<(), Gone> {
        self.0.flush().await.map_err(|_| Gone)
    }

    async fn close(&mut self, reason: &CloseReason) -> Result<(), Gone> {
        let frame = CloseFrame {
            code: reason.code,
            reason: reason.reason.into(),
        };
        self.0
            .send(WsMessage::Close(Some(frame)))
            .await
            .map_err(|_| Gone)
    }
}

/// Why [`read_loop`] ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ReadEnd {
    /// The client left, went idle, or the server closed the socket.
    Client,
    /// The node is shutting down.
    Shutdown,
}

/// Reads client messages, handing each text frame to `on_text` in order,
/// until the client leaves, the server closes the socket (`handle`), the
/// node shuts down or nothing arrives for `idle`. A binary frame gets an
/// `error` frame; a frame over the size limit closes with 1009.
pub(crate) async fn read_loop<S, F, Fut>(
    stream: &mut S,
    handle: &SocketHandle,
    shutdown: &CancellationToken,
    idle: Duration,
    mut on_text: F,
) -> ReadEnd
where
    S: Stream<Item = Result<WsMessage, axum::Error>> + Unpin,
    F: FnMut(Utf8Bytes) -> Fut,
    Fut: Future<Output = ()>,
{
    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => return ReadEnd::Shutdown,
            // The server closed it (operator, slow consumer): stop reading
            // now rather than at the idle timeout.
            _ = handle.closing() => return ReadEnd::Client,
            n = tokio::time::timeout(idle, stream.next()) => n,
        };
        let msg = match next {
            Err(_) => {
                handle.close(1001, "idle timeout");
                return ReadEnd::Client;
            }
            Ok(None) => return ReadEnd::Client,
            Ok(Some(Err(e))) => {
                let too_big = e
                    .into_inner()
                    .downcast_ref::<tokio_tungstenite::tungstenite::Error>()
                    .is_some_and(|t| {
                        matches!(t, tokio_tungstenite::tungstenite::Error::Capacity(_))
                    });
                if too_big {
                    handle.close(1009, "frame too large");
                }
                return ReadEnd::Client;
            }
            Ok(Some(Ok(m))) => m,
        };
        match msg {
            WsMessage::Text(t) => on_text(t).await,
            WsMessage::Binary(_) => {
                handle.push(error_frame(
                    "invalid_request",
                    "frames must be JSON text",
                    None,
                ));
            }
            WsMessage::Close(_) => return ReadEnd::Client,
            WsMessage::Ping(_) | WsMessage::Pong(_) => {}
        }
        if handle.is_closed() {
            return ReadEnd::Client;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use futures_util::stream;
    use tokio_util::sync::PollSender;

    use super::*;
    use crate::domain::UserId;
    use crate::socket::CLOSE_KICKED;

    const LIMITS: WriteLimits = WriteLimits {
        write: Duration::from_millis(200),
        close: Duration::from_millis(200),
    };

    fn text(m: WsMessage) -> String {
        match m {
            WsMessage::Text(t) => t.as_str().to_owned(),
            other => panic!("expected text, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn pump_writes_queued_frames_then_the_close() {
        let (handle, mut inbox) = SocketHandle::new(UserId::generate(), 8);
        let (tx, mut rx) = mpsc::channel::<WsMessage>(16);
        let h = handle.clone();
        let task = tokio::spawn(async move {
            pump(&mut WsOutlet(PollSender::new(tx)), &mut inbox, &h, LIMITS).await
        });
        assert!(handle.push(Frame::from("one")));
        assert_eq!(text(rx.recv().await.unwrap()), "one");
        assert!(handle.push(Frame::from("two")));
        handle.close(CLOSE_KICKED, "kicked");
        assert_eq!(text(rx.recv().await.unwrap()), "two");
        match rx.recv().await.unwrap() {
            WsMessage::Close(Some(c)) => assert_eq!((c.code, c.reason.as_str()), (4001, "kicked")),
            other => panic!("expected close, got {other:?}"),
        }
        assert!(matches!(task.await.unwrap(), WriteEnd::Closed));
    }

    /// A sink whose client never reads: it never has room.
    struct Stuck;

    impl Sink<WsMessage> for Stuck {
        type Error = axum::Error;
        fn poll_ready(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Pending
        }
        fn start_send(self: Pin<&mut Self>, _: WsMessage) -> Result<(), Self::Error> {
            Ok(())
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Pending
        }
        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Pending
        }
    }

    #[tokio::test]
    async fn pump_gives_up_on_a_client_that_takes_nothing() {
        let (handle, mut inbox) = SocketHandle::new(UserId::generate(), 8);
        assert!(handle.push(Frame::from("never read")));
        let started = tokio::time::Instant::now();
        let end = pump(&mut WsOutlet(Stuck), &mut inbox, &handle, LIMITS).await;
        assert!(matches!(end, WriteEnd::Stalled), "{end:?}");
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(
            handle.is_closed(),
            "a stalled socket is closed as a slow consumer"
        );
    }

    #[tokio::test]
    async fn the_close_itself_is_bounded() {
        let (handle, mut inbox) = SocketHandle::new(UserId::generate(), 8);
        handle.close(CLOSE_KICKED, "kicked");
        let started = tokio::time::Instant::now();
        let end = pump(&mut WsOutlet(Stuck), &mut inbox, &handle, LIMITS).await;
        assert!(matches!(end, WriteEnd::Stalled), "{end:?}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn read_loop_hands_text_in_order_and_answers_binary() {
        let (handle, mut inbox) = SocketHandle::new(UserId::generate(), 8);
        let mut rx = stream::iter([
            Ok(WsMessage::Text("a".into())),
            Ok(WsMessage::Binary(vec![1u8].into())),
            Ok(WsMessage::Text("b".into())),
        ]);
        let mut seen = Vec::new();
        let end = read_loop(
            &mut rx,
            &handle,
            &CancellationToken::new(),
            Duration::from_secs(5),
            |t| {
                seen.push(t.as_str().to_owned());
                async {}
            },
        )
        .await;
        assert_eq!(end, ReadEnd::Client);
        assert_eq!(seen, ["a", "b"]);
        let err: serde_json::Value =
            serde_json::from_str(inbox.rx.try_recv().unwrap().as_str()).unwrap();
        assert_eq!(err["code"], "invalid_request");
    }

    #[tokio::test]
    async fn read_loop_ends_on_idle_and_on_shutdown() {
        let (handle, _inbox) = SocketHandle::new(UserId::generate(), 8);
        let mut rx = stream::pending::<Result<WsMessage, axum::Error>>();
        let end = read_loop(
            &mut rx,
            &handle,
            &CancellationToken::new(),
            Duration::from_millis(50),
            |_| async {},
        )
        .await;
        assert_eq!(end, ReadEnd::Client);
        assert!(handle.is_closed(), "idle sockets are closed");

        let (handle, _inbox) = SocketHandle::new(UserId::generate(), 8);
        let stop = CancellationToken::new();
        stop.cancel();
        let end = read_loop(&mut rx, &handle, &stop, Duration::from_secs(5), |_| async {
        })
        .await;
        assert_eq!(end, ReadEnd::Shutdown);
    }
}
