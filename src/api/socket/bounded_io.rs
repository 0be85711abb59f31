//! Socket.IO's WebSocket connections with bounded writes.
//!
//! socketioxide (engineioxide 0.17) writes each packet to the WebSocket
//! inside a task that does not watch its session's cancellation while a
//! write waits, so a client that stops reading holds its TCP connection
//! (and megabytes of buffers) forever, even after the Engine.IO session
//! ended. [`SioLayer`] therefore performs Socket.IO's WebSocket upgrades
//! itself and hands socketioxide the upgraded connection wrapped in
//! [`Bounded`]: a write that makes no progress for `ws.write_timeout_ms`
//! fails, and so does every later read and write on that connection, so
//! socketioxide's tasks end and the connection is dropped. Every other
//! request (long polling, anything else) goes to socketioxide unchanged.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::IntoResponse;
use socketioxide::layer::SocketIoLayer;
use socketioxide::service::SocketIoService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;
use tower::{Layer, Service};

/// An IO whose writes fail once one of them made no progress for `limit`;
/// from then on, every read and write fails at once.
pub(crate) struct Bounded<T> {
    io: T,
    limit: Duration,
    stalled_since: Option<Pin<Box<Sleep>>>,
    broken: bool,
    /// The reader, woken when a write breaks the connection.
    reader: Option<Waker>,
}

impl<T> Bounded<T> {
    /// Wraps `io`.
    pub fn new(io: T, limit: Duration) -> Self {
        Self {
            io,
            limit,
            stalled_since: None,
            broken: false,
            reader: None,
        }
    }

    fn broken_err() -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::TimedOut, "write timed out")
    }

    /// Maps a write-side poll: progress clears the stall timer; waiting
    /// starts it; waiting past the limit breaks the connection.
    fn bound<R>(
        &mut self,
        cx: &mut Context<'_>,
        r: Poll<std::io::Result<R>>,
    ) -> Poll<std::io::Result<R>> {
        match r {
            Poll::Ready(r) => {
                self.stalled_since = None;
                Poll::Ready(r)
            }
            Poll::Pending => {
                let limit = self.limit;
                let timer = self
                    .stalled_since
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
                if timer.as_mut().poll(cx).is_ready() {
                    self.broken = true;
                    if let Some(w) = self.reader.take() {
                        w.wake();
                    }
                    Poll::Ready(Err(Self::broken_err()))
                } else {
                    Poll::Pending
                }
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Bounded<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.broken {
            return Poll::Ready(Err(Self::broken_err()));
        }
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if r.is_pending() {
            self.reader = Some(cx.waker().clone());
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Bounded<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.broken {
            return Poll::Ready(Err(Self::broken_err()));
        }
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        self.bound(cx, r)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.broken {
            return Poll::Ready(Err(Self::broken_err()));
        }
        let r = Pin::new(&mut self.io).poll_flush(cx);
        self.bound(cx, r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.broken {
            return Poll::Ready(Err(Self::broken_err()));
        }
        let r = Pin::new(&mut self.io).poll_shutdown(cx);
        self.bound(cx, r)
    }
}

/// socketioxide's layer, with its WebSocket upgrades done here (see the
/// module doc).
#[derive(Clone)]
pub struct SioLayer {
    inner: SocketIoLayer,
    path: &'static str,
    write_timeout: Duration,
}

impl SioLayer {
    /// Wraps socketioxide's `layer`, mounted at `path` (its `req_path`).
    pub(crate) fn new(inner: SocketIoLayer, path: &'static str, write_timeout: Duration) -> Self {
        Self {
            inner,
            path,
            write_timeout,
        }
    }
}

impl<S: Clone> Layer<S> for SioLayer {
    type Service = SioService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        SioService {
            sio: self.inner.layer(inner),
            path: self.path,
            write_timeout: self.write_timeout,
        }
    }
}

/// The service of [`SioLayer`].
#[derive(Clone)]
pub struct SioService<S: Clone> {
    sio: SocketIoService<S>,
    path: &'static str,
    write_timeout: Duration,
}

type BoxFuture = Pin<Box<dyn Future<Output = Result<axum::response::Response, Infallible>> + Send>>;

impl<S> Service<Request> for SioService<S>
where
    S: Service<Request, Response = axum::response::Response, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = axum::response::Response;
    type Error = Infallible;
    type Future = BoxFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Service::<Request>::poll_ready(&mut self.sio, cx)
    }

    fn call(&mut self, mut req: Request) -> BoxFuture {
        let Some(key) = self.websocket_key(&req) else {
            let f = Service::<Request>::call(&mut self.sio, req);
            return Box::pin(async move { f.await.map(|r| r.map(Body::new)) });
        };
        let upgrade = hyper::upgrade::on(&mut req);
        let (parts, _) = req.into_parts();
        let head = Request::from_parts(parts, ());
        let mut sio = self.sio.clone();
        let limit = self.write_timeout;
        tokio::spawn(async move {
            let Ok(conn) = upgrade.await else { return };
            let io = Bounded::new(hyper_util::rt::TokioIo::new(conn), limit);
            if let Err(e) = Service::<(_, _)>::call(&mut sio, (io, head)).await {
                tracing::debug!(error = ?e, "Socket.IO WebSocket refused");
            }
        });
        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
        Box::pin(async move {
            let mut r = StatusCode::SWITCHING_PROTOCOLS.into_response();
            let h = r.headers_mut();
            h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
            if let Ok(v) = HeaderValue::from_str(&accept) {
                h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
            }
            Ok::<_, Infallible>(r)
        })
    }
}

impl<S: Clone> SioService<S> {
    /// The `Sec-WebSocket-Key` of a Socket.IO WebSocket upgrade request.
    fn websocket_key(&self, req: &Request) -> Option<HeaderValue> {
        let path = req.uri().path();
        let ours = path
            .strip_prefix(self.path)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'));
        let websocket = req
            .uri()
            .query()
            .is_some_and(|q| q.split('&').any(|kv| kv == "transport=websocket"));
        let upgrade = req
            .headers()
            .get(header::UPGRADE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
        if !(ours && websocket && upgrade && req.method() == axum::http::Method::GET) {
            return None;
        }
        req.headers().get(header::SEC_WEBSOCKET_KEY).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_write_without_progress_breaks_the_connection() {
        // A peer that never reads: the pipe fills, then writes wait.
        let (a, mut b) = tokio::io::duplex(64);
        let mut io = Bounded::new(a, Duration::from_millis(100));
        let started = tokio::time::Instant::now();
        let r = async {
            loop {
                io.write_all(&[0u8; 64]).await?;
            }
            #[allow(unreachable_code)]
            Ok::<(), std::io::Error>(())
        }
        .await;
        assert_eq!(r.unwrap_err().kind(), std::io::ErrorKind::TimedOut);
        assert!(started.elapsed() < Duration::from_secs(2));
        let mut buf = [0u8; 8];
        assert!(io.read(&mut buf).await.is_err(), "reads fail too");
        // What was written before is intact.
        assert_eq!(b.read(&mut buf).await.unwrap(), 8);
    }
}
