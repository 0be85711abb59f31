//! `sync {room_id, after_seq, limit?}`: the stored messages of a room after
//! `after_seq` (members only, blocks applied), queued as `message` frames.

use super::Ctx;
use crate::domain::RoomId;
use crate::protocol::message_frame;
use crate::store::HistoryQuery;

const UNAVAILABLE: &str = "store unavailable; retry";

/// Parses and answers one `sync`.
pub(crate) async fn apply(ctx: Ctx<'_>, room_id: &str, after: i64, limit: Option<u32>) {
    let Ok(room) = RoomId::parse(room_id) else {
        return ctx.error("not_found", "no such room", Some("sync"));
    };
    let limit = limit.unwrap_or(100).clamp(1, 1000);
    let st = ctx.st;
    let r = match st.stores.rooms.room(&room).await {
        Ok(r) => r,
        Err(_) => return ctx.error("unavailable", UNAVAILABLE, Some("sync")),
    };
    match r {
        None => ctx.error("not_found", "no such room", Some("sync")),
        Some(r) if r.member(&ctx.user.id).is_none() => ctx.error(
            "forbidden",
            "you are not a member of this room",
            Some("sync"),
        ),
        Some(_) => {
            let q = HistoryQuery {
                before: None,
                after: Some(after.max(0)),
                limit,
            };
            let Ok(msgs) = st.stores.messages.history(&room, q).await else {
                return ctx.error("unavailable", UNAVAILABLE, Some("sync"));
            };
            let Ok(msgs) = crate::api::rooms::visible(st, &ctx.user.id, msgs).await else {
                return ctx.error("unavailable", UNAVAILABLE, Some("sync"));
            };
            for m in &msgs {
                if !ctx.handle.push_wait(message_frame(m)).await {
                    return;
                }
            }
        }
    }
}
