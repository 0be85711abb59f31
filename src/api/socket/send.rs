//! `send {room_id, client_msg_id, body}`: parsed into domain values, then
//! handed to the room actor, which answers with `ack` once stored (or an
//! `error` whose `ref` is the `client_msg_id`).

use super::Ctx;
use crate::actors::room::{Replier, RoomMsg};
use crate::domain::{ClientMsgId, MessageBody, RoomId};

/// Parses and routes one `send`.
pub(crate) async fn apply(ctx: Ctx<'_>, room_id: &str, client_msg_id: &str, body: &str) {
    let limits = &ctx.st.hub.settings.limits;
    let cmid = match ClientMsgId::parse(client_msg_id, limits) {
        Ok(c) => c,
        Err(e) => return ctx.parse_error(e, Some("send")),
    };
    let Ok(room) = RoomId::parse(room_id) else {
        return ctx.error("not_found", "no such room", Some(cmid.as_str()));
    };
    let body = match MessageBody::parse(body, limits) {
        Ok(b) => b,
        Err(e) => return ctx.parse_error(e, Some(cmid.as_str())),
    };
    let r = ctx
        .st
        .hub
        .send_to_room(
            &room,
            RoomMsg::Send {
                sender: ctx.user.id.clone(),
                client_msg_id: cmid.clone(),
                body,
                reply: Replier::Socket(ctx.handle.clone()),
            },
        )
        .await;
    if let Err(e) = r {
        ctx.room_error(e, cmid.as_str());
    }
}
