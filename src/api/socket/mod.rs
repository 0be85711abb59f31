//! The socket layer shared by `/ws` ([`super::ws`]) and Socket.IO
//! ([`super::socketio`]): decoding a client frame and the dispatcher that
//! applies it, one file per frame kind ([`send`], [`receipts`] for
//! `delivered`/`read`, [`typing`], [`sync`], [`ping`]), attaching a socket
//! to its user's session, the transport loops ([`transport`]) and the
//! write-bounded Socket.IO WebSocket upgrade ([`bounded_io`]).
//!
//! The outbound queue itself ([`crate::socket::SocketHandle`]) and the
//! close codes live in the lower module `crate::socket`, which the actors
//! use too.

pub(crate) mod bounded_io;
pub(crate) mod lifecycle;
pub(crate) mod ping;
pub(crate) mod receipts;
pub(crate) mod send;
pub(crate) mod sync;
pub(crate) mod transport;
pub(crate) mod typing;

use serde::Deserialize;
use serde_json::Value as Json;

use super::AppState;
use crate::actors::session::SessionMsg;
use crate::actors::{ActorError, CALL_TIMEOUT};
use crate::auth::AuthUser;
use crate::domain::ParseError;
use crate::protocol::{error_frame, ClientFrame, Frame};
use crate::socket::SocketHandle;

/// What applying a client frame needs: the node, the user and the socket
/// its answers go to.
#[derive(Clone, Copy)]
pub(crate) struct Ctx<'a> {
    pub st: &'a AppState,
    pub user: &'a AuthUser,
    pub handle: &'a SocketHandle,
}

impl Ctx<'_> {
    /// Queues an `error` frame answering `reference`.
    pub fn error(&self, code: &str, message: &str, reference: Option<&str>) {
        self.handle.push(error_frame(code, message, reference));
    }

    /// Queues the `error` frame for a field that did not parse.
    pub fn parse_error(&self, e: ParseError, reference: Option<&str>) {
        self.error(e.code, &e.message, reference);
    }

    /// Queues the `error` frame for a room call that failed.
    pub fn room_error(&self, e: ActorError, reference: &str) {
        match e {
            ActorError::NotFound => self.error("not_found", "no such room", Some(reference)),
            ActorError::Unavailable(_) => self.error(
                "unavailable",
                "room temporarily unavailable; retry",
                Some(reference),
            ),
        }
    }
}

/// The frame types a client may send.
const KINDS: [&str; 9] = [
    "send",
    "delivered",
    "read",
    "typing",
    "sync",
    "ping",
    "edit",
    "delete",
    "react",
];

/// Handles one text frame of a `/ws` client.
pub(crate) async fn on_text(ctx: Ctx<'_>, text: &str) {
    // The common case parses once, straight into the frame.
    match serde_json::from_str::<ClientFrame>(text) {
        Ok(frame) => dispatch(ctx, frame).await,
        Err(e) => {
            let v: Option<Json> = serde_json::from_str(text).ok();
            ctx.handle.push(invalid_frame(v.as_ref(), &e));
        }
    }
}

/// Decodes a client frame given as a JSON value (Socket.IO events); the
/// `Err` is the `error` frame to answer with.
pub(crate) fn decode(v: &Json) -> Result<ClientFrame, Frame> {
    ClientFrame::deserialize(v).map_err(|e| invalid_frame(Some(v), &e))
}

/// The `error` frame for a client frame that did not parse as a
/// [`ClientFrame`]; `v` is the frame as JSON, if it was JSON at all. It
/// says which frame it was if we can tell (`ref`).
fn invalid_frame(v: Option<&Json>, e: &serde_json::Error) -> Frame {
    let reference = v.and_then(|v| {
        v.get("client_msg_id")
            .and_then(|c| c.as_str())
            .or_else(|| v.get("type").and_then(|t| t.as_str()))
    });
    let (code, message) = match v {
        None => ("invalid_request", "frame is not valid JSON".to_owned()),
        Some(v) => match v.get("type").and_then(Json::as_str) {
            None => ("invalid_request", "frame has no \"type\"".to_owned()),
            Some(t) if KINDS.contains(&t) => ("invalid_request", format!("invalid frame: {e}")),
            // The unknown arm: a type no client frame has.
            Some(_) => ("unknown_type", format!("unknown frame type {}", v["type"])),
        },
    };
    error_frame(code, &message, reference)
}

/// Applies one decoded client frame (shared by `/ws` and Socket.IO): each
/// kind goes to its own module; answers (`ack`, `error`, `pong`, `sync`
/// results) go to the socket's queue.
pub(crate) async fn dispatch(ctx: Ctx<'_>, frame: ClientFrame) {
    match frame {
        ClientFrame::Ping { nonce } => ping::apply(ctx, nonce.as_ref()),
        ClientFrame::Send {
            room_id,
            client_msg_id,
            body,
            reply_to,
            attachments,
        } => {
            let Some(body) = body.or_else(|| (!attachments.is_empty()).then(String::new)) else {
                let reference = Some(client_msg_id.as_str()).filter(|c| !c.is_empty());
                return ctx.error(
                    "invalid_request",
                    "invalid frame: missing field `body`",
                    Some(reference.unwrap_or("send")),
                );
            };
            send::apply(
                ctx,
                &room_id,
                &client_msg_id,
                &body,
                reply_to.as_deref(),
                &attachments,
            )
            .await
        }
        ClientFrame::Edit {
            room_id,
            message_id,
            body,
            reference,
        } => {
            let kind = lifecycle::Kind::Edit(&body);
            lifecycle::apply(ctx, &room_id, &message_id, kind, reference.as_deref()).await
        }
        ClientFrame::Delete {
            room_id,
            message_id,
            reference,
        } => {
            let kind = lifecycle::Kind::Delete;
            lifecycle::apply(ctx, &room_id, &message_id, kind, reference.as_deref()).await
        }
        ClientFrame::React {
            room_id,
            message_id,
            emoji,
            on,
            reference,
        } => {
            let kind = lifecycle::Kind::React(&emoji, on);
            lifecycle::apply(ctx, &room_id, &message_id, kind, reference.as_deref()).await
        }
        ClientFrame::Delivered { room_id, up_to_seq } => {
            receipts::apply(ctx, &room_id, up_to_seq, receipts::Kind::Delivered).await
        }
        ClientFrame::Read { room_id, up_to_seq } => {
            receipts::apply(ctx, &room_id, up_to_seq, receipts::Kind::Read).await
        }
        ClientFrame::Typing { room_id, state } => typing::apply(ctx, &room_id, state).await,
        ClientFrame::Sync {
            room_id,
            after_seq,
            limit,
        } => sync::apply(ctx, &room_id, after_seq, limit).await,
    }
}

/// Attaches a socket to its user's session actor, which queues `ready` and
/// the catch-up, then live frames.
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
                if !is_alive(&s) {
                    st.hub.sessions.retire(handle.user_id.clone(), s.get_id());
                }
                continue;
            }
        }
    }
    Err(ActorError::Unavailable("session did not start".into()))
}

/// Tells the user's session (whichever actor holds it now) that the socket
/// ended.
pub(crate) fn detach(st: &AppState, handle: &SocketHandle) {
    if let Some(s) = st.hub.sessions.get(&handle.user_id).map(|s| s.clone()) {
        let _ = s.cast(SessionMsg::Detach(handle.id.clone()));
    }
}

fn is_alive(a: &ractor::ActorRef<SessionMsg>) -> bool {
    matches!(
        a.get_status(),
        ractor::ActorStatus::Running
            | ractor::ActorStatus::Starting
            | ractor::ActorStatus::Upgrading
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decoded(v: Json) -> Json {
        let e = decode(&v).unwrap_err();
        serde_json::from_str(e.as_str()).unwrap()
    }

    #[test]
    fn undecodable_frames_get_precise_errors() {
        let e = decoded(serde_json::json!({"type": "shout", "client_msg_id": "c1"}));
        assert_eq!(
            (e["code"].as_str(), e["ref"].as_str()),
            (Some("unknown_type"), Some("c1"))
        );
        let e = decoded(serde_json::json!({"room_id": "r"}));
        assert_eq!(e["code"], "invalid_request");
        let e = decoded(serde_json::json!({"type": "read", "room_id": "r"}));
        assert_eq!(
            (e["code"].as_str(), e["ref"].as_str()),
            (Some("invalid_request"), Some("read"))
        );
        assert!(decode(&serde_json::json!({"type": "ping"})).is_ok());
    }
}
