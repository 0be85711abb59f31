//! `GET /ws`: the socket loop. The token is checked before the upgrade
//! (401 otherwise). After the upgrade a writer task drains the socket's
//! bounded outbound queue and a reader loop parses client frames, answering
//! every mistake with an `error` frame and keeping the socket open.

use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::request::Parts;
use axum::response::Response;
use futures_util::{SinkExt, StreamExt};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{AppState, Error, ErrorBody};
use crate::actors::room::{Replier, RoomMsg};
use crate::actors::session::SessionMsg;
use crate::actors::{ActorError, CALL_TIMEOUT};
use crate::auth::AuthUser;
use crate::domain::{ClientMsgId, MessageBody, ParseError, RoomId};
use crate::protocol::{error_frame, message_frame, ClientFrame, Frame, ServerFrame};
use crate::socket::{SocketHandle, SocketInbox, CLOSE_GOING_AWAY};
use crate::store::{CursorKind, HistoryQuery};

/// The socket route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(upgrade))
}

/// Opens the WebSocket; frames are described in docs/protocol.md.
#[utoipa::path(get, path = "/ws", tag = "socket",
    params(("access_token" = Option<String>, Query,
        description = "the access token, for browsers that cannot set `Authorization`")),
    security(("bearer" = []), ("access_token" = [])),
    responses(
        (status = 101, description = "switched to the WebSocket protocol; the first frame is `ready`"),
        (status = 400, description = "not a WebSocket upgrade request (plain text)", body = String),
        (status = 401, description = "`unauthorized`: missing, invalid or expired token", body = ErrorBody),
    ))]
#[tracing::instrument(skip_all)]
async fn upgrade(
    State(st): State<AppState>,
    parts: Parts,
    ws: WebSocketUpgrade,
) -> Result<Response, Error> {
    let token = super::bearer(&parts)
        .ok_or_else(|| Error::Unauthorized("unauthorized", "missing access token".into()))?;
    let user = st.auth.verify_access(&token).map_err(|_| {
        Error::Unauthorized("unauthorized", "invalid or expired access token".into())
    })?;
    let cfg = &st.hub.settings.ws;
    Ok(ws
        .read_buffer_size(cfg.read_buffer_bytes)
        .write_buffer_size(cfg.write_buffer_bytes)
        .max_write_buffer_size(cfg.write_buffer_bytes.max(cfg.max_frame_bytes) * 4)
        .max_message_size(cfg.max_frame_bytes)
        .max_frame_size(cfg.max_frame_bytes)
        .on_upgrade(move |socket| run(st, user, socket)))
}

pub(crate) async fn attach(st: &AppState, handle: &SocketHandle) -> Result<(), ActorError> {
    // A session that is just stopping drops the request: retry on a new one.
    for _ in 0..3 {
        let s = st.hub.session(&handle.user_id).await?;
        match s
            .call(
                |p| SessionMsg::Attach(handle.clone(), p),
                Some(CALL_TIMEOUT * 6),
            )
            .await
        {
            Ok(ractor::rpc::CallResult::Success(())) => return Ok(()),
            _ => {
                st.hub.sessions.remove_if(&handle.user_id, |_, v| {
                    v.get_id() == s.get_id() && !is_alive(v)
                });
                continue;
            }
        }
    }
    Err(ActorError::Unavailable("session did not start".into()))
}

fn is_alive(a: &ractor::ActorRef<SessionMsg>) -> bool {
    matches!(
        a.get_status(),
        ractor::ActorStatus::Running
            | ractor::ActorStatus::Starting
            | ractor::ActorStatus::Upgrading
    )
}

async fn run(st: AppState, user: AuthUser, socket: WebSocket) {
    let (handle, inbox) = SocketHandle::new(user.id.clone(), st.hub.settings.ws.outbound_queue);
    let (sink, mut stream) = socket.split();
    let writer = tokio::spawn(write_loop(sink, inbox));
    if let Err(e) = attach(&st, &handle).await {
        tracing::warn!(error = %e, "could not attach socket");
        handle.close(1011, "server busy; reconnect");
    } else if read_loop(&st, &user, &handle, &mut stream).await == End::Shutdown {
        // Sends already accepted are stored and acked before the close.
        let drained = tokio::time::timeout(Duration::from_secs(30), st.hub.pipelines.wait()).await;
        if drained.is_err() {
            tracing::warn!("pipelines did not drain before closing a socket");
        }
        handle.close(CLOSE_GOING_AWAY, "server shutting down");
    }
    // Tell the session (whichever actor holds the user now) and stop writing.
    if let Some(s) = st.hub.sessions.get(&user.id).map(|s| s.clone()) {
        let _ = s.cast(SessionMsg::Detach(handle.id.clone()));
    }
    if !handle.is_closed() {
        handle.close(1000, "bye");
    }
    let _ = writer.await;
    // Finish the closing handshake: read (and discard) until the client's
    // Close, so unread client data does not turn our close into a reset
    // that would destroy the frames we just flushed.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Some(Ok(_)) = stream.next().await {}
    })
    .await;
}

async fn write_loop(
    mut sink: futures_util::stream::SplitSink<WebSocket, WsMessage>,
    mut inbox: SocketInbox,
) {
    loop {
        tokio::select! {
            biased;
            f = inbox.rx.recv() => {
                let Some(f) = f else { break };
                if sink.feed(WsMessage::Text(f)).await.is_err() {
                    return;
                }
                // Batch what is already queued into one flush.
                while let Ok(f) = inbox.rx.try_recv() {
                    if sink.feed(WsMessage::Text(f)).await.is_err() {
                        return;
                    }
                }
                if sink.flush().await.is_err() {
                    return;
                }
            }
            reason = inbox.closer.closed() => {
                // Flush what is queued, then say why we close.
                while let Ok(f) = inbox.rx.try_recv() {
                    if sink.feed(WsMessage::Text(f)).await.is_err() {
                        return;
                    }
                }
                let _ = sink
                    .send(WsMessage::Close(Some(CloseFrame {
                        code: reason.code,
                        reason: reason.reason.into(),
                    })))
                    .await;
                return;
            }
        }
    }
}

/// Why the read loop ended.
#[derive(PartialEq, Eq)]
enum End {
    Client,
    Shutdown,
}

async fn read_loop(
    st: &AppState,
    user: &AuthUser,
    handle: &SocketHandle,
    stream: &mut futures_util::stream::SplitStream<WebSocket>,
) -> End {
    let idle = Duration::from_secs(st.hub.settings.ws.idle_timeout_secs.max(5));
    loop {
        let next = tokio::select! {
            _ = st.hub.shutdown.cancelled() => return End::Shutdown,
            // The server closed it (operator, slow consumer): stop reading
            // now rather than at the idle timeout.
            _ = handle.closing() => return End::Client,
            n = tokio::time::timeout(idle, stream.next()) => n,
        };
        let msg = match next {
            Err(_) => {
                handle.close(1001, "idle timeout");
                return End::Client;
            }
            Ok(None) => return End::Client,
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
                return End::Client;
            }
            Ok(Some(Ok(m))) => m,
        };
        match msg {
            WsMessage::Text(t) => on_text(st, user, handle, t.as_str()).await,
            WsMessage::Binary(_) => {
                handle.push(error_frame(
                    "invalid_request",
                    "frames must be JSON text",
                    None,
                ));
            }
            WsMessage::Close(_) => return End::Client,
            WsMessage::Ping(_) | WsMessage::Pong(_) => {}
        }
        if handle.is_closed() {
            return End::Client;
        }
    }
}

fn parse_error(handle: &SocketHandle, e: ParseError, reference: Option<&str>) {
    handle.push(error_frame(e.code, &e.message, reference));
}

async fn on_text(st: &AppState, user: &AuthUser, handle: &SocketHandle, text: &str) {
    match serde_json::from_str::<ClientFrame>(text) {
        Ok(frame) => on_frame(st, user, handle, frame).await,
        Err(e) => {
            let v: Option<serde_json::Value> = serde_json::from_str(text).ok();
            handle.push(invalid_frame(v.as_ref(), &e));
        }
    }
}

/// The `error` frame for a client frame that did not parse as a
/// [`ClientFrame`]; `v` is the frame as JSON, if it was JSON at all. It
/// says which frame it was if we can tell (`ref`).
pub(crate) fn invalid_frame(v: Option<&serde_json::Value>, e: &serde_json::Error) -> Frame {
    let reference = v.and_then(|v| {
        v.get("client_msg_id")
            .and_then(|c| c.as_str())
            .or_else(|| v.get("type").and_then(|t| t.as_str()))
    });
    let (code, message) = match v {
        None => ("invalid_request", "frame is not valid JSON".to_owned()),
        Some(v) if !v.get("type").is_some_and(|t| t.is_string()) => {
            ("invalid_request", "frame has no \"type\"".to_owned())
        }
        Some(v)
            if !matches!(
                v["type"].as_str(),
                Some("send" | "delivered" | "read" | "typing" | "sync" | "ping")
            ) =>
        {
            ("unknown_type", format!("unknown frame type {}", v["type"]))
        }
        Some(_) => ("invalid_request", format!("invalid frame: {e}")),
    };
    error_frame(code, &message, reference)
}

/// Handles one parsed client frame (shared by `/ws` and Socket.IO):
/// routes it to the room actors; answers (`ack`, `error`, `pong`, `sync`
/// results) go to the socket's queue.
pub(crate) async fn on_frame(
    st: &AppState,
    user: &AuthUser,
    handle: &SocketHandle,
    frame: ClientFrame,
) {
    let limits = &st.hub.settings.limits;
    match frame {
        ClientFrame::Ping { nonce } => {
            handle.push(
                ServerFrame::Pong {
                    nonce: nonce.as_ref(),
                }
                .encode(),
            );
        }
        ClientFrame::Send {
            room_id,
            client_msg_id,
            body,
        } => {
            let cmid = match ClientMsgId::parse(&client_msg_id, limits) {
                Ok(c) => c,
                Err(e) => return parse_error(handle, e, Some("send")),
            };
            let room = match RoomId::parse(&room_id) {
                Ok(r) => r,
                Err(_) => {
                    handle.push(error_frame(
                        "not_found",
                        "no such room",
                        Some(cmid.as_str()),
                    ));
                    return;
                }
            };
            let body = match MessageBody::parse(&body, limits) {
                Ok(b) => b,
                Err(e) => return parse_error(handle, e, Some(cmid.as_str())),
            };
            let r = st
                .hub
                .send_to_room(
                    &room,
                    RoomMsg::Send {
                        sender: user.id.clone(),
                        client_msg_id: cmid.clone(),
                        body,
                        reply: Replier::Socket(handle.clone()),
                    },
                )
                .await;
            if let Err(e) = r {
                room_error(handle, e, cmid.as_str());
            }
        }
        ClientFrame::Delivered { room_id, up_to_seq } => {
            cursor(
                st,
                user,
                handle,
                &room_id,
                up_to_seq,
                CursorKind::Delivered,
                "delivered",
            )
            .await
        }
        ClientFrame::Read { room_id, up_to_seq } => {
            cursor(
                st,
                user,
                handle,
                &room_id,
                up_to_seq,
                CursorKind::Read,
                "read",
            )
            .await
        }
        ClientFrame::Typing { room_id, state } => {
            let Ok(room) = RoomId::parse(&room_id) else {
                handle.push(error_frame("not_found", "no such room", Some("typing")));
                return;
            };
            if let Err(e) = st
                .hub
                .send_to_room(
                    &room,
                    RoomMsg::Typing {
                        user: user.id.clone(),
                        state,
                    },
                )
                .await
            {
                room_error(handle, e, "typing");
            }
        }
        ClientFrame::Sync {
            room_id,
            after_seq,
            limit,
        } => sync(st, user, handle, &room_id, after_seq, limit).await,
    }
}

fn room_error(handle: &SocketHandle, e: ActorError, reference: &str) {
    match e {
        ActorError::NotFound => {
            handle.push(error_frame("not_found", "no such room", Some(reference)))
        }
        ActorError::Unavailable(_) => handle.push(error_frame(
            "unavailable",
            "room temporarily unavailable; retry",
            Some(reference),
        )),
    };
}

async fn cursor(
    st: &AppState,
    user: &AuthUser,
    handle: &SocketHandle,
    room_id: &str,
    up_to: i64,
    kind: CursorKind,
    name: &str,
) {
    let Ok(room) = RoomId::parse(room_id) else {
        handle.push(error_frame("not_found", "no such room", Some(name)));
        return;
    };
    if up_to < 0 {
        handle.push(error_frame(
            "invalid_request",
            "up_to_seq must be ≥ 0",
            Some(name),
        ));
        return;
    }
    if let Err(e) = st
        .hub
        .send_to_room(
            &room,
            RoomMsg::Cursor {
                user: user.id.clone(),
                kind,
                up_to,
                socket: Some(handle.clone()),
            },
        )
        .await
    {
        room_error(handle, e, name);
    }
}

async fn sync(
    st: &AppState,
    user: &AuthUser,
    handle: &SocketHandle,
    room_id: &str,
    after: i64,
    limit: Option<u32>,
) {
    let Ok(room) = RoomId::parse(room_id) else {
        handle.push(error_frame("not_found", "no such room", Some("sync")));
        return;
    };
    let limit = limit.unwrap_or(100).clamp(1, 1000);
    let r = match st.hub.stores.rooms.room(&room).await {
        Ok(r) => r,
        Err(_) => {
            handle.push(error_frame(
                "unavailable",
                "store unavailable; retry",
                Some("sync"),
            ));
            return;
        }
    };
    match r {
        None => {
            handle.push(error_frame("not_found", "no such room", Some("sync")));
        }
        Some(r) if r.member(&user.id).is_none() => {
            handle.push(error_frame(
                "forbidden",
                "you are not a member of this room",
                Some("sync"),
            ));
        }
        Some(_) => {
            let q = HistoryQuery {
                before: None,
                after: Some(after.max(0)),
                limit,
            };
            let msgs = match st.hub.stores.messages.history(&room, q).await {
                Ok(m) => m,
                Err(_) => {
                    handle.push(error_frame(
                        "unavailable",
                        "store unavailable; retry",
                        Some("sync"),
                    ));
                    return;
                }
            };
            let Ok(msgs) = super::rooms::visible(st, &user.id, msgs).await else {
                handle.push(error_frame(
                    "unavailable",
                    "store unavailable; retry",
                    Some("sync"),
                ));
                return;
            };
            for m in &msgs {
                if !handle.push_wait(message_frame(m)).await {
                    return;
                }
            }
        }
    }
}
