//! `delivered {room_id, up_to_seq}` and `read {room_id, up_to_seq}`: move
//! the user's cursor in a room forward (the room actor stores it and sends
//! `receipt` frames to the members).

use super::Ctx;
use crate::actors::room::RoomMsg;
use crate::domain::RoomId;
use crate::store::CursorKind;

/// Which cursor a receipt frame moves.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Kind {
    Delivered,
    Read,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Delivered => "delivered",
            Kind::Read => "read",
        }
    }

    fn cursor(self) -> CursorKind {
        match self {
            Kind::Delivered => CursorKind::Delivered,
            Kind::Read => CursorKind::Read,
        }
    }
}

/// Parses and routes one `delivered` or `read`.
pub(crate) async fn apply(ctx: Ctx<'_>, room_id: &str, up_to: i64, kind: Kind) {
    let name = kind.name();
    let Ok(room) = RoomId::parse(room_id) else {
        return ctx.error("not_found", "no such room", Some(name));
    };
    if up_to < 0 {
        return ctx.error("invalid_request", "up_to_seq must be ≥ 0", Some(name));
    }
    if let Err(e) = ctx
        .st
        .hub
        .send_to_room(
            &room,
            RoomMsg::Cursor {
                user: ctx.user.id.clone(),
                kind: kind.cursor(),
                up_to,
                socket: Some(ctx.handle.clone()),
            },
        )
        .await
    {
        ctx.room_error(e, name);
    }
}
