//! The HTTP accept loop: hyper's HTTP/1.1 server (upgrades included, for
//! `/ws` and Socket.IO) with the bounds a public server needs and
//! `axum::serve` does not give:
//!
//! - a header read timeout (hyper's; it also bounds the wait for the next
//!   request on a kept-alive connection), after which the connection closes;
//! - a body read timeout: a body whose next bytes do not arrive in time
//!   fails, the handler answers 408 `request_timeout` and the connection
//!   closes;
//! - an idle timeout: a connection with no request in progress and no bytes
//!   moving is closed;
//! - a cap on open connections (a permit per connection, held by its socket,
//!   so upgraded sockets count until they close): past it a new connection
//!   gets a canned 503 `unavailable` and is closed;
//! - graceful shutdown like `axum::serve`'s: stop accepting, let each
//!   connection finish its request in progress, wait for them.

use std::io;
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::config::HttpConfig;

/// Connections being refused at once; past this, refused ones are just closed.
const MAX_REFUSING: usize = 64;
/// How long a refused connection is given to read its 503.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);
/// How long shutdown waits for connections to finish their requests.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The bounds of the loop, from `[http]`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Bounds {
    header_read: Duration,
    body_read: Duration,
    idle: Duration,
    max_connections: usize,
}

impl Bounds {
    pub(super) fn from_config(c: &HttpConfig) -> Self {
        Self {
            header_read: Duration::from_secs(c.header_read_timeout_secs.max(1)),
            body_read: Duration::from_secs(c.body_read_timeout_secs.max(1)),
            idle: Duration::from_secs(c.idle_timeout_secs.max(1)),
            max_connections: c.max_connections.max(1),
        }
    }
}

/// Serves `app` on `listener` until `stop` is cancelled, then drains.
pub(super) async fn serve(
    listener: TcpListener,
    app: Router,
    bounds: Bounds,
    stop: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(bounds.max_connections));
    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
    let tracker = TaskTracker::new();
    loop {
        let (tcp, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors and the like: back off, do not spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                    }
                }
            },
        };
        // Small frames must not wait ~40 ms for the peer's delayed ACK (Nagle).
        let _ = tcp.set_nodelay(true);
        match permits.clone().try_acquire_owned() {
            Ok(permit) => {
                tracker.spawn(connection(
                    tcp,
                    peer,
                    permit,
                    app.clone(),
                    bounds,
                    stop.clone(),
                ));
            }
            Err(_) => {
                metrics::counter!("chatd_http_connections_refused_total").increment(1);
                if let Ok(r) = refusing.clone().try_acquire_owned() {
                    tokio::spawn(async move {
                        refuse(tcp).await;
                        drop(r);
                    });
                }
            }
        }
    }
    drop(listener);
    tracker.close();
    if tokio::time::timeout(DRAIN_TIMEOUT, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            left = tracker.len(),
            "HTTP connections did not finish in time"
        );
    }
}

/// Answers a connection over the cap with 503 and closes it.
async fn refuse(mut tcp: TcpStream) {
    const BODY: &str =
        r#"{"error":{"code":"unavailable","message":"too many open connections; retry later"}}"#;
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n",
        BODY.len()
    );
    let _ = tokio::time::timeout(REFUSAL_LINGER, async {
        tcp.write_all(head.as_bytes()).await?;
        tcp.write_all(BODY.as_bytes()).await?;
        tcp.shutdown().await?;
        // Read what the client sent until it closes: closing with unread
        // bytes would reset the connection and could destroy the answer.
        let mut sink = [0u8; 1024];
        while tcp.read(&mut sink).await? > 0 {}
        io::Result::Ok(())
    })
    .await;
}

/// Serves one connection with the bounds.
async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    permit: OwnedSemaphorePermit,
    app: Router,
    bounds: Bounds,
    stop: CancellationToken,
) {
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Tracked {
        tcp,
        activity: activity.clone(),
        _permit: permit,
    });
    let service = hyper::service::service_fn({
        let activity = activity.clone();
        move |req: hyper::Request<Incoming>| {
            let busy = Busy::new(&activity);
            let mut req =
                req.map(|b| Body::new(tower_http::timeout::TimeoutBody::new(bounds.body_read, b)));
            req.extensions_mut().insert(ConnectInfo(peer));
            let app = app.clone();
            async move {
                let resp = app.oneshot(req).await;
                drop(busy);
                resp
            }
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(bounds.header_read)
        .keep_alive(true);
    let mut conn = pin!(builder.serve_connection(io, service).with_upgrades());
    let mut closing = false;
    let mut give_up: Option<Instant> = None;
    loop {
        let idle_check = activity.idle_deadline(bounds.idle);
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "HTTP connection ended");
                }
                return;
            }
            _ = stop.cancelled(), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = tokio::time::sleep_until(idle_check), if give_up.is_none() => {
                if activity.is_idle(bounds.idle) {
                    tracing::debug!(%peer, "closing idle HTTP connection");
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                    // A response the client does not read never finishes.
                    give_up = Some(Instant::now() + bounds.idle.min(Duration::from_secs(5)));
                }
            }
            _ = tokio::time::sleep_until(give_up.unwrap_or_else(Instant::now)), if give_up.is_some() => {
                return;
            }
        }
    }
}

/// When the connection last moved bytes, and how many requests it has in
/// progress.
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
    busy: AtomicUsize,
}

impl Activity {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            busy: AtomicUsize::new(0),
        }
    }

    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }

    /// When to look again: `idle` after the last bytes moved, or (when that
    /// is past, with a request in progress) `idle` from now.
    fn idle_deadline(&self, idle: Duration) -> Instant {
        let at = self.last() + idle;
        let now = Instant::now();
        if at <= now {
            now + idle
        } else {
            at
        }
    }

    fn is_idle(&self, idle: Duration) -> bool {
        self.busy.load(Ordering::Relaxed) == 0 && self.last().elapsed() >= idle
    }
}

/// A request in progress (the idle timeout does not apply while one is).
struct Busy(Arc<Activity>);

impl Busy {
    fn new(a: &Arc<Activity>) -> Self {
        a.busy.fetch_add(1, Ordering::Relaxed);
        Self(a.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

/// The TCP stream of a connection: records activity and holds the
/// connection's permit until it is dropped (after an upgrade, when the
/// socket closes).
struct Tracked {
    tcp: TcpStream,
    activity: Arc<Activity>,
    _permit: OwnedSemaphorePermit,
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.tcp).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.tcp).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}
