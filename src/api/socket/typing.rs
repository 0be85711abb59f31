//! `typing {room_id, state}`: relayed by the room actor to the other
//! members' sockets (not stored).

use super::Ctx;
use crate::actors::room::RoomMsg;
use crate::domain::RoomId;

/// Parses and routes one `typing`.
pub(crate) async fn apply(ctx: Ctx<'_>, room_id: &str, state: bool) {
    let Ok(room) = RoomId::parse(room_id) else {
        return ctx.error("not_found", "no such room", Some("typing"));
    };
    if let Err(e) = ctx
        .st
        .hub
        .send_to_room(
            &room,
            RoomMsg::Typing {
                user: ctx.user.id.clone(),
                state,
            },
        )
        .await
    {
        ctx.room_error(e, "typing");
    }
}
