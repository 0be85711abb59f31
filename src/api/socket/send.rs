//! `send {room_id, client_msg_id, body, reply_to?, attachments?}`: parsed
//! into domain values, then handed to the room actor, which answers with
//! `ack` once stored (or an `error` whose `ref` is the `client_msg_id`).
//! A reply's target and attachments are checked first
//! ([`crate::api::lifecycle::prepare_send`]); a send with attachments waits
//! for the store, binds the files to the message, then acks.

use tokio::sync::oneshot;

use super::Ctx;
use crate::actors::room::{Replier, RoomMsg};
use crate::domain::{ClientMsgId, MessageBody, RoomId};
use crate::protocol::ack_frame;

/// Parses and routes one `send`.
pub(crate) async fn apply(
    ctx: Ctx<'_>,
    room_id: &str,
    client_msg_id: &str,
    body: &str,
    reply_to: Option<&str>,
    attachments: &[String],
) {
    let limits = &ctx.st.settings.limits;
    let cmid = match ClientMsgId::parse(client_msg_id, limits) {
        Ok(c) => c,
        Err(e) => return ctx.parse_error(e, Some("send")),
    };
    let Ok(room) = RoomId::parse(room_id) else {
        return ctx.error("not_found", "no such room", Some(cmid.as_str()));
    };
    let (body, reply_to, files, ids) = if reply_to.is_none() && attachments.is_empty() {
        match MessageBody::parse(body, limits) {
            Ok(b) => (b, None, Vec::new(), Vec::new()),
            Err(e) => return ctx.parse_error(e, Some(cmid.as_str())),
        }
    } else {
        match crate::api::lifecycle::prepare_send(
            ctx.st,
            &ctx.user.id,
            &room,
            body,
            reply_to,
            attachments,
        )
        .await
        {
            Ok(x) => (x.body, x.reply_to, x.attachments, x.ids),
            Err(e) => return ctx.error(e.code(), &e.to_string(), Some(cmid.as_str())),
        }
    };
    let waiting = (!ids.is_empty()).then(oneshot::channel);
    let (reply, rx) = match waiting {
        Some((tx, rx)) => (Replier::Http(tx), Some(rx)),
        None => (Replier::Socket(ctx.handle.clone()), None),
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
                reply_to,
                attachments: files,
                reply,
            },
        )
        .await;
    if let Err(e) = r {
        return ctx.room_error(e, cmid.as_str());
    }
    let Some(rx) = rx else { return };
    match rx.await {
        Ok(Ok(appended)) => {
            if !appended.duplicate {
                crate::api::lifecycle::bind(ctx.st, &ctx.user.id, &appended.message, &ids).await;
            }
            ctx.handle.push(ack_frame(&appended.message));
        }
        Ok(Err(e)) => ctx.error(e.code(), &e.to_string(), Some(cmid.as_str())),
        Err(_) => ctx.error(
            "unavailable",
            "the room restarted; retry with the same client_msg_id",
            Some(cmid.as_str()),
        ),
    }
}
