//! Socket.IO (protocol v5, socket.io-client 4.x) at `/socket.io/`, beside
//! `/ws` and on the same session and room actors (socketioxide).
//!
//! Each Socket.IO socket is one device, exactly like a `/ws` socket: it gets
//! a [`SocketHandle`] that the user's session actor attaches (`ready`,
//! catch-up, live frames), and a pump task that drains the handle's queue
//! and emits every frame as the event named by its `type`, with the frame
//! object as payload. Client events (`send`, `delivered`, `read`, `typing`,
//! `sync`, `ping`) carry the `/ws` frames' fields and go through the same
//! parsing and routing as `/ws` (`ws::on_frame`).
//!
//! - Order: socketioxide runs each event handler in a task of its own, so
//!   events would race. The handler here only queues the event (in arrival
//!   order) and one task per socket handles the queue in order, as the
//!   `/ws` read loop does; it starts once `ready` and catch-up are queued.
//!   An event that will not be handled is refused, never dropped: more than
//!   256 waiting get `rate_limited`; on shutdown, queued and
//!   late ones get `unavailable` (resend after reconnecting).
//! - Acknowledgements: `emit("send", payload, callback)` registers the
//!   callback under the `client_msg_id`; the pump hands the `ack` (or the
//!   `error` whose `ref` is that id) to the callback instead of emitting it
//!   as an event. A `send` without a callback gets `ack`/`error` events.
//!   `emit("ping", payload, callback)` is answered with the `pong` payload.
//! - Authentication: a connect middleware checks `auth: {token}` (or the
//!   `Authorization: Bearer` header, or `?access_token=`) and refuses the
//!   connection (the client gets `connect_error`) when it is bad.
//! - Emit errors: socketioxide's per-socket buffer is bounded; the pump
//!   (the transport pump shared with `/ws`) waits for room at most
//!   `ws.write_timeout_ms`, then closes the socket as a slow consumer
//!   (4008) so the client resyncs: a frame is never dropped silently.
//! - Per-user cap: a connect beyond `ws.max_sockets_per_user` (counting
//!   `/ws` sockets too) is refused with `connect_error`
//!   `too_many_sockets: ...`.
//! - Timers: `[socketio]` sets the Engine.IO ping interval and timeout,
//!   the connect timeout and the largest payload. socketioxide gives a
//!   Socket.IO socket the id of its Engine.IO session (the protocol v5 asks
//!   for distinct ids; socketioxide 0.18 routes packets by that one id, so
//!   they cannot differ here).
//! - Server-side closes (operator, slow consumer, store trouble) emit a
//!   `close` event `{code, reason}` with the `/ws` close code, then
//!   disconnect the socket. On shutdown the frames accepted before are
//!   flushed, `close` (1001) is emitted and the transports are closed, so
//!   clients reconnect by themselves (to another node).
//! - Across nodes nothing Socket.IO-specific is needed: the session and
//!   room actors route through the broker, as for `/ws`.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Map, Value as Json};
use socketioxide::adapter::LocalAdapter;
use socketioxide::extract::{AckSender, Event, Extension, SocketRef, State, TryData};
use socketioxide::handler::{
    ConnectHandler, FromConnectParts, FromMessageParts, MessageHandler, Value,
};
use socketioxide::socket::Socket;
use socketioxide::{SendError, SocketError, SocketIo};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use super::socket::bounded_io::SioLayer;
use super::socket::transport::{pump, stalled_reason, Gone, Outlet, WriteEnd, WriteLimits};
use super::socket::{self, ping, Ctx};
use super::AppState;
use crate::auth::AuthUser;
use crate::domain::ClientMsgId;
use crate::protocol::{error_frame, ClientFrame, Frame};
use crate::socket::{
    CloseReason, SocketGuard, SocketHandle, SocketInbox, SocketRegistry, CLOSE_GOING_AWAY,
    CLOSE_SLOW_CONSUMER,
};

/// Client events queued per socket before further ones are refused
/// (`rate_limited`).
const INBOUND_QUEUE: usize = 256;

type Sock = Arc<Socket<LocalAdapter>>;

/// The Socket.IO layer; mount it on the application router. `registry`
/// counts this node's sockets (with `/ws`) under the per-user cap.
pub fn layer(st: AppState, registry: Arc<SocketRegistry>) -> SioLayer {
    let ws = &st.settings.ws;
    let sio = &st.settings.socketio;
    let pumps = TaskTracker::new();
    let (layer, io) = SocketIo::builder()
        .ping_interval(Duration::from_millis(sio.ping_interval_ms.max(1)))
        .ping_timeout(Duration::from_millis(sio.ping_timeout_ms.max(1)))
        .connect_timeout(Duration::from_millis(sio.connect_timeout_ms.max(1)))
        .max_payload(sio.max_payload_bytes.max(1))
        .max_buffer_size(ws.outbound_queue.max(16))
        .ws_max_message_size(ws.max_frame_bytes)
        .ws_max_frame_size(ws.max_frame_bytes)
        .ws_read_buffer_size(ws.read_buffer_bytes)
        .with_state(st.clone())
        .with_state(Pumps(pumps.clone()))
        .with_state(registry)
        .build_layer();
    io.ns("/", on_connect.with(authenticate));
    let write_timeout = WriteLimits::of(ws).write;
    tokio::spawn(close_on_shutdown(st, io, pumps));
    SioLayer::new(layer, "/socket.io", write_timeout)
}

/// The pump tasks of this node's Socket.IO sockets (for shutdown).
#[derive(Clone)]
struct Pumps(TaskTracker);

/// What the connect handler takes over from the middleware.
struct Start {
    inbox: SocketInbox,
    events: mpsc::Receiver<Inbound>,
    guard: SocketGuard,
}

/// One connected Socket.IO socket (in the socket's extensions).
struct Conn {
    user: AuthUser,
    handle: SocketHandle,
    /// Callbacks of acknowledged sends waiting for their answer, by
    /// `client_msg_id` (ack ids, oldest first).
    pending: Mutex<HashMap<String, VecDeque<i64>>>,
    /// Cancelled when the socket is gone.
    ended: CancellationToken,
    /// Taken by the connect handler.
    start: Mutex<Option<Start>>,
}

/// A client event, queued in arrival order.
struct Inbound {
    event: String,
    data: Result<Json, String>,
    ack_id: Option<i64>,
}

/// Why a connection is refused (the client's `connect_error` message).
#[derive(Debug)]
struct Refused(&'static str);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

/// The connect middleware: checks the token, admits the socket under the
/// per-user cap and prepares it. It runs before the client is told it is
/// connected, so the event handler is in place before any event can arrive.
async fn authenticate(
    s: SocketRef,
    State(st): State<AppState>,
    State(registry): State<Arc<SocketRegistry>>,
    TryData(auth): TryData<Json>,
) -> Result<(), Refused> {
    let from_auth = auth.ok().and_then(|a| {
        let t = a.get("token")?.as_str()?.trim();
        let t = t
            .strip_prefix("Bearer ")
            .or_else(|| t.strip_prefix("bearer "))
            .unwrap_or(t);
        (!t.is_empty()).then(|| t.to_owned())
    });
    let Some(token) = from_auth.or_else(|| super::bearer(s.req_parts())) else {
        return Err(Refused(
            "unauthorized: missing access token (pass auth: {token})",
        ));
    };
    let user = st
        .auth
        .verify_access(&token)
        .map_err(|_| Refused("unauthorized: invalid or expired access token"))?;
    let guard = registry
        .admit(&user.id, st.settings.ws.max_sockets_per_user)
        .map_err(|_| {
            Refused("too_many_sockets: this user holds the most sockets allowed on this node")
        })?;
    let (handle, inbox) = SocketHandle::new(user.id.clone(), st.settings.ws.outbound_queue);
    let (tx, events) = mpsc::channel(INBOUND_QUEUE);
    s.on_fallback(Enqueue {
        tx,
        handle: handle.clone(),
    });
    s.on_disconnect(on_disconnect);
    s.extensions.insert(Arc::new(Conn {
        user,
        handle,
        pending: Mutex::new(HashMap::new()),
        ended: CancellationToken::new(),
        start: Mutex::new(Some(Start {
            inbox,
            events,
            guard,
        })),
    }));
    Ok(())
}

/// The socket itself, as socketioxide shares it (for acks).
struct SocketArc(Sock);

impl FromConnectParts<LocalAdapter> for SocketArc {
    type Error = Infallible;
    fn from_connect_parts(s: &Sock, _: &Option<Value>) -> Result<Self, Infallible> {
        Ok(SocketArc(s.clone()))
    }
}

/// The socket is connected: start the pump, attach to the session (which
/// queues `ready` and catch-up), then handle the client's events in order
/// until the socket ends.
async fn on_connect(
    SocketArc(s): SocketArc,
    State(st): State<AppState>,
    State(Pumps(pumps)): State<Pumps>,
    Extension(conn): Extension<Arc<Conn>>,
) {
    let Some(Start {
        inbox,
        events: mut rx,
        guard: _guard,
    }) = conn.start.lock().unwrap_or_else(|e| e.into_inner()).take()
    else {
        return;
    };
    let limits = WriteLimits::of(&st.settings.ws);
    let pump = pumps.spawn(run_pump(s.clone(), conn.clone(), inbox, limits));
    if let Err(e) = socket::attach(&st, &conn.handle).await {
        tracing::warn!(error = %e, "could not attach Socket.IO socket");
        conn.handle.close(1011, "server busy; reconnect");
    } else {
        loop {
            let m = tokio::select! {
                biased;
                _ = st.hub.shutdown.cancelled() => {
                    // As /ws: stop reading; what was accepted is stored
                    // and acked before the close. Events queued but not
                    // handled are refused (`unavailable`: resend after
                    // reconnecting), as are those that still arrive.
                    rx.close();
                    while let Ok(m) = rx.try_recv() {
                        let (ack, f) = refusal(&m, "unavailable", CLOSING);
                        reply(&s, &conn.handle, limits, ack, f).await;
                    }
                    crate::socket::drain(&st.hub.pipelines, "a Socket.IO socket").await;
                    conn.handle.close(CLOSE_GOING_AWAY, "server shutting down");
                    break;
                }
                _ = conn.ended.cancelled() => break,
                m = rx.recv() => m,
            };
            let Some(m) = m else { break };
            on_event(&st, &s, &conn, limits, m).await;
            if conn.handle.is_closed() {
                break;
            }
        }
    }
    socket::detach(&st, &conn.handle);
    if !conn.handle.is_closed() {
        conn.handle.close(1000, "bye");
    }
    let _ = pump.await;
}

async fn on_disconnect(Extension(conn): Extension<Arc<Conn>>) {
    conn.ended.cancel();
}

/// Queues every client event of one socket, in arrival order (socketioxide
/// calls this synchronously for each event packet).
struct Enqueue {
    tx: mpsc::Sender<Inbound>,
    handle: SocketHandle,
}

/// Marker for [`Enqueue`]'s handler impl.
struct Queued;

impl MessageHandler<LocalAdapter, Queued> for Enqueue {
    fn call(&self, s: Sock, mut v: Value, ack_id: Option<i64>) {
        let event = match Event::from_message_parts(&s, &mut v, &ack_id) {
            Ok(Event(e)) => e,
            Err(_) => return, // not an event packet socketioxide would route either
        };
        let data = match TryData::<Json>::from_message_parts(&s, &mut v, &ack_id) {
            Ok(TryData(d)) => d.map_err(|e| e.to_string()),
            Err(never) => match never {},
        };
        let m = Inbound {
            event,
            data,
            ack_id,
        };
        // Never drop an event silently: refuse it.
        let (m, code, message) = match self.tx.try_send(m) {
            Ok(()) => return,
            Err(mpsc::error::TrySendError::Full(m)) => (
                m,
                "rate_limited",
                "too many events in flight; slow down and retry",
            ),
            Err(mpsc::error::TrySendError::Closed(m)) => (m, "unavailable", CLOSING),
        };
        match refusal(&m, code, message) {
            (Some(id), f) => {
                // No waiting here: if even this answer does not fit, the
                // client is not reading; close it.
                if let Err(SendError::Socket(SocketError::InternalChannelFull)) =
                    ack_sender(&s, id).send(&frame_object(&f))
                {
                    slow_consumer(&self.handle);
                }
            }
            (None, f) => {
                self.handle.push(f);
            }
        }
    }
}

/// Why events that arrive while the socket closes are refused.
const CLOSING: &str = "the socket is closing; resend after reconnecting";

/// The answer to an event that will not be handled: an `error` with
/// `code`, through the callback of a `send` or `ping` if it has one.
fn refusal(m: &Inbound, code: &str, message: &str) -> (Option<i64>, Frame) {
    let reference = m
        .data
        .as_ref()
        .ok()
        .and_then(payload_ref)
        .unwrap_or_else(|| m.event.clone());
    let ack = m.ack_id.filter(|_| m.event == "send" || m.event == "ping");
    (ack, error_frame(code, message, Some(&reference)))
}

/// The `ref` an error about this payload carries: its `client_msg_id`.
fn payload_ref(d: &Json) -> Option<String> {
    let o = match d {
        Json::Array(a) => a.first()?,
        o => o,
    };
    o.get("client_msg_id")?.as_str().map(str::to_owned)
}

/// An [`AckSender`] for the callback `id` of the client's event.
fn ack_sender(s: &Sock, id: i64) -> AckSender<LocalAdapter> {
    match AckSender::from_message_parts(s, &mut Value::Bytes(bytes::Bytes::new()), &Some(id)) {
        Ok(a) => a,
        Err(never) => match never {},
    }
}

/// Handles one client event: the payload (one JSON object; none for
/// `ping`) plus `type` = the event name is a `/ws` frame, applied by the
/// same dispatcher.
async fn on_event(st: &AppState, s: &Sock, conn: &Conn, limits: WriteLimits, m: Inbound) {
    let Inbound {
        event,
        data,
        ack_id,
    } = m;
    // Only `send` and `ping` answer through the callback.
    let ack_id = ack_id.filter(|_| event == "send" || event == "ping");
    let answer = |f: Frame| reply(s, &conn.handle, limits, ack_id, f);
    let mut obj = match data {
        Ok(Json::Object(o)) => o,
        Ok(Json::Null) => Map::new(),
        Ok(Json::Array(a)) if a.is_empty() => Map::new(),
        Ok(Json::Array(mut a)) if a[0].is_object() => match a.swap_remove(0) {
            Json::Object(o) => o,
            _ => Map::new(),
        },
        Ok(_) | Err(_) => {
            return answer(error_frame(
                "invalid_request",
                "the event's payload must be one JSON object",
                Some(&event),
            ))
            .await;
        }
    };
    obj.insert("type".into(), Json::String(event));
    let frame = match socket::decode(&Json::Object(obj)) {
        Ok(f) => f,
        Err(e) => return answer(e).await,
    };
    match (&frame, ack_id) {
        (ClientFrame::Send { client_msg_id, .. }, Some(id)) => {
            match ClientMsgId::parse(client_msg_id, &st.settings.limits) {
                Ok(c) => {
                    conn.pending
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .entry(c.as_str().to_owned())
                        .or_default()
                        .push_back(id);
                }
                Err(e) => return answer(error_frame(e.code, &e.message, Some("send"))).await,
            }
        }
        (ClientFrame::Ping { nonce }, Some(_)) => {
            return answer(ping::pong(nonce.as_ref())).await;
        }
        _ => {}
    }
    let ctx = Ctx {
        st,
        user: &conn.user,
        handle: &conn.handle,
    };
    socket::dispatch(ctx, frame).await;
}

/// Answers the client's callback `ack_id` with `f`, or queues `f` as an
/// event when there is no callback. A client that does not read its
/// answers is closed as a slow consumer.
async fn reply(
    s: &Sock,
    handle: &SocketHandle,
    limits: WriteLimits,
    ack_id: Option<i64>,
    f: Frame,
) {
    match ack_id {
        Some(id) => {
            let sent =
                tokio::time::timeout(limits.write, emit(s, "", &frame_object(&f), Some(id))).await;
            if sent.is_err() {
                slow_consumer(handle);
            }
        }
        None => {
            handle.push(f);
        }
    }
}

/// A frame as the JSON object it is.
fn frame_object(f: &Frame) -> Map<String, Json> {
    serde_json::from_str(f.as_str()).unwrap_or_default()
}

/// Emits `payload` as event `event`, or answers the callback `ack`,
/// waiting while socketioxide's buffer is full (callers bound the wait).
async fn emit(
    s: &Sock,
    event: &str,
    payload: &Map<String, Json>,
    ack: Option<i64>,
) -> Result<(), Gone> {
    let mut pause = Duration::from_millis(1);
    loop {
        let r = match ack {
            Some(id) => ack_sender(s, id).send(payload),
            None => s.emit(event, payload),
        };
        match r {
            Ok(()) => return Ok(()),
            Err(SendError::Socket(SocketError::InternalChannelFull)) => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            Err(SendError::Socket(SocketError::Closed)) => return Err(Gone),
            Err(SendError::Serialize(e)) => {
                // Cannot happen for a JSON object; say so loudly if it does.
                tracing::error!(error = %e, event, "could not encode a Socket.IO frame");
                return Ok(());
            }
        }
    }
}

/// A Socket.IO socket as the pump's [`Outlet`]: each frame is emitted as
/// the event named by its `type`, or answers the waiting callback of an
/// acknowledged send.
struct SioOutlet {
    s: Sock,
    conn: Arc<Conn>,
}

impl Outlet for SioOutlet {
    async fn feed(&mut self, f: Frame) -> Result<(), Gone> {
        let payload = frame_object(&f);
        let ty = payload.get("type").and_then(Json::as_str).unwrap_or("");
        let key = match ty {
            "ack" => payload.get("client_msg_id").and_then(Json::as_str),
            "error" => payload.get("ref").and_then(Json::as_str),
            _ => None,
        };
        let ack = key.and_then(|k| {
            let mut pending = self.conn.pending.lock().unwrap_or_else(|e| e.into_inner());
            let q = pending.get_mut(k)?;
            let id = q.pop_front();
            if q.is_empty() {
                pending.remove(k);
            }
            id
        });
        emit(&self.s, ty, &payload, ack).await
    }

    async fn flush(&mut self) -> Result<(), Gone> {
        // socketioxide's transport writes its buffer by itself.
        Ok(())
    }

    /// Tells the client why (a `close` event with the `/ws` close code) and
    /// disconnects it. On shutdown (1001) the socket stays:
    /// [`close_on_shutdown`] closes the transports, so clients reconnect by
    /// themselves.
    async fn close(&mut self, reason: &CloseReason) -> Result<(), Gone> {
        if !self.s.connected() || self.conn.ended.is_cancelled() {
            return Err(Gone);
        }
        emit(&self.s, "close", &close_payload(reason), None).await?;
        if reason.code == CLOSE_GOING_AWAY {
            return Ok(());
        }
        // The disconnect packet needs room in the buffer too.
        loop {
            match SocketRef::from(self.s.clone()).disconnect() {
                Err(SocketError::InternalChannelFull) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                _ => return Ok(()),
            }
        }
    }
}

fn close_payload(reason: &CloseReason) -> Map<String, Json> {
    let mut payload = Map::new();
    payload.insert("type".into(), "close".into());
    payload.insert("code".into(), reason.code.into());
    payload.insert("reason".into(), reason.reason.into());
    payload
}

/// Pumps the socket's queue into socketioxide until the socket ends or the
/// server closes it. A client that takes nothing is closed as a slow
/// consumer: one attempt each to say so and to disconnect, without waiting;
/// on a WebSocket whose writes are stuck, [`SioLayer`]'s bounded
/// connection fails and socketioxide drops it.
async fn run_pump(s: Sock, conn: Arc<Conn>, mut inbox: SocketInbox, limits: WriteLimits) {
    let handle = conn.handle.clone();
    let mut out = SioOutlet { s, conn };
    if let WriteEnd::Stalled = pump(&mut out, &mut inbox, &handle, limits).await {
        if out.s.connected() && !out.conn.ended.is_cancelled() {
            let _ = out.s.emit("close", &close_payload(&stalled_reason()));
            let _ = SocketRef::from(out.s.clone()).disconnect();
        }
    }
}

fn slow_consumer(handle: &SocketHandle) {
    metrics::counter!("chatd_slow_consumer_closed_total").increment(1);
    tracing::info!(user = %handle.user_id, "Socket.IO client does not keep up; closing");
    handle.close(CLOSE_SLOW_CONSUMER, "outbound queue full; resync");
}

/// On shutdown: once the room pipelines drained (every accepted message is
/// acked) and the pumps flushed, close every transport (clients see a
/// transport close and reconnect, to another node behind the balancer).
async fn close_on_shutdown(st: AppState, io: SocketIo, pumps: TaskTracker) {
    st.hub.shutdown.cancelled().await;
    crate::socket::drain(&st.hub.pipelines, "Socket.IO").await;
    pumps.close();
    if tokio::time::timeout(crate::socket::DRAIN_TIMEOUT, pumps.wait())
        .await
        .is_err()
    {
        tracing::warn!("Socket.IO sockets did not flush before closing their transports");
    }
    io.close().await;
}
