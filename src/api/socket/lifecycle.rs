//! `edit {room_id, message_id, body, ref?}`, `delete {room_id, message_id,
//! ref?}` and `react {room_id, message_id, emoji, on, ref?}`: each goes to
//! the room actor ([`crate::api::lifecycle::change`], the same path as the
//! HTTP calls) and is answered by `done {ref}` or `error {code, message,
//! ref}`. Every member's devices get the `message_updated` that follows.

use super::Ctx;
use crate::actors::lifecycle::ChangeRequest;
use crate::domain::{Emoji, MessageBody};
use crate::protocol::done_frame;

/// Which lifecycle frame.
pub(crate) enum Kind<'a> {
    Edit(&'a str),
    Delete,
    React(&'a str, bool),
}

/// Parses and applies one `edit`, `delete` or `react`.
pub(crate) async fn apply(
    ctx: Ctx<'_>,
    room_id: &str,
    message_id: &str,
    kind: Kind<'_>,
    reference: Option<&str>,
) {
    let (name, req) = match kind {
        Kind::Edit(body) => match MessageBody::parse(body, &ctx.st.settings.limits) {
            Ok(b) => ("edit", ChangeRequest::Edit(b)),
            Err(e) => return ctx.parse_error(e, Some(reference.unwrap_or("edit"))),
        },
        Kind::Delete => ("delete", ChangeRequest::Delete),
        Kind::React(emoji, on) => match Emoji::parse(emoji) {
            Ok(e) => ("react", ChangeRequest::React(e, on)),
            Err(e) => return ctx.parse_error(e, Some(reference.unwrap_or("react"))),
        },
    };
    let reference_or_kind = reference.unwrap_or(name);
    match crate::api::lifecycle::change(ctx.st, &ctx.user.id, room_id, message_id, req).await {
        Ok(_) => {
            ctx.handle.push(done_frame(reference));
        }
        Err(e) => ctx.error(e.code(), &e.to_string(), Some(reference_or_kind)),
    }
}
