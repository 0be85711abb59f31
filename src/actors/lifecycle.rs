//! Edits, deletes and reactions inside the Room actor (docs/lifecycle.md).
//!
//! A change goes through the room's actor, so changes of one room are
//! applied one at a time on a node and after the sends the actor accepted
//! earlier were stored. The actor checks membership and permission, the
//! store applies the change atomically and stamps the room's next change
//! number, then one `message_updated` frame (serialized once) goes the same
//! way as a message: to every connected device of every member that hears
//! the message's sender, here and on other nodes. No notification job:
//! edits and reactions notify nobody.

use tokio::sync::oneshot;

use super::audience::Audience;
use super::Hub;
use crate::domain::RoomId;
use crate::domain::{Emoji, MessageBody, MessageId, UserId};
use crate::protocol::ServerFrame;
use crate::store::{ChangeOutcome, Message, MessageChange, Role, RoomKind, StoreError};

/// What a member asks to change on a message.
#[derive(Debug, Clone)]
pub enum ChangeRequest {
    /// A new body (already validated like a send).
    Edit(MessageBody),
    /// Delete (tombstone).
    Delete,
    /// Put (`true`) or take back an emoji.
    React(Emoji, bool),
}

/// A change that was applied (or changed nothing).
#[derive(Debug, Clone)]
pub struct ChangeDone {
    /// The message in its current state.
    pub message: Message,
    /// Attachment ids whose files the caller must now erase (after a delete).
    pub erased: Vec<String>,
}

/// Why a change was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChangeError {
    #[error("you are not a member of this room")]
    NotMember,
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("no such message in this room")]
    NotFound,
    #[error("the message was deleted")]
    Deleted,
    #[error("this message has the most distinct reactions allowed ({0})")]
    TooManyReactions(usize),
    #[error("store unavailable, retry")]
    Unavailable,
}

impl ChangeError {
    /// The contract's code.
    pub fn code(&self) -> &'static str {
        match self {
            ChangeError::NotMember | ChangeError::Forbidden(_) => "forbidden",
            ChangeError::NotFound => "not_found",
            ChangeError::Deleted => "message_deleted",
            ChangeError::TooManyReactions(_) => "too_many_reactions",
            ChangeError::Unavailable => "unavailable",
        }
    }
}

/// The reply port of a change.
pub type ChangeReply = oneshot::Sender<Result<ChangeDone, ChangeError>>;

fn unavailable(e: StoreError) -> ChangeError {
    match e {
        StoreError::NotFound => ChangeError::NotFound,
        other => {
            tracing::warn!(error = %other, "message change failed");
            ChangeError::Unavailable
        }
    }
}

/// Applies one change for `user` (called by the room actor with its state).
/// What a change needs of its room actor's state.
pub(super) struct Room<'a> {
    pub hub: &'a Hub,
    pub room_id: &'a RoomId,
    pub kind: RoomKind,
    pub audience: &'a Audience,
}

pub(super) async fn apply(
    st: &Room<'_>,
    user: UserId,
    message_id: MessageId,
    req: ChangeRequest,
) -> Result<ChangeDone, ChangeError> {
    let Some(role) = st.audience.members.get(&user).copied() else {
        return Err(ChangeError::NotMember);
    };
    let messages = &st.hub.stores.messages;
    let Some(current) = messages
        .message(st.room_id, &message_id)
        .await
        .map_err(unavailable)?
    else {
        return Err(ChangeError::NotFound);
    };
    let max_distinct = st.hub.settings.limits.reactions_per_message.max(1);
    let change = match req {
        ChangeRequest::Edit(body) => {
            if current.sender_id != user {
                return Err(ChangeError::Forbidden("only the sender may edit a message"));
            }
            MessageChange::Edit {
                body,
                at: crate::domain::now_rfc3339(),
            }
        }
        ChangeRequest::Delete => {
            let moderator = st.kind == RoomKind::Group && matches!(role, Role::Owner | Role::Admin);
            if current.sender_id != user && !moderator {
                return Err(ChangeError::Forbidden(
                    "only the sender or an owner/admin of the group may delete a message",
                ));
            }
            MessageChange::Delete
        }
        ChangeRequest::React(emoji, on) => MessageChange::React {
            user: user.clone(),
            emoji,
            on,
            max_distinct,
        },
    };
    let is_react = matches!(change, MessageChange::React { .. });
    let erased: Vec<String> = match change {
        MessageChange::Delete => current.attachments.iter().map(|a| a.id.clone()).collect(),
        _ => Vec::new(),
    };
    match messages
        .change_message(st.room_id, &message_id, change)
        .await
        .map_err(unavailable)?
    {
        ChangeOutcome::Changed(message, _) => {
            metrics::counter!("chatd_message_changes_total").increment(1);
            let frame = ServerFrame::MessageUpdated { message: &message }.encode();
            let hearing = st.audience.hearing(&message.sender_id);
            let to: Vec<UserId> = if is_react && user != message.sender_id {
                // Blocks apply to the reacting user too.
                let also = st.audience.hearing(&user);
                hearing
                    .iter()
                    .filter(|u| also.contains(u))
                    .cloned()
                    .collect()
            } else {
                hearing.into_owned()
            };
            st.hub.deliver(&to, st.room_id, None, None, &frame);
            Ok(ChangeDone { message, erased })
        }
        ChangeOutcome::Unchanged(message) => Ok(ChangeDone {
            message,
            erased: Vec::new(),
        }),
        ChangeOutcome::Gone => Err(ChangeError::Deleted),
        ChangeOutcome::TooManyReactions => Err(ChangeError::TooManyReactions(max_distinct)),
    }
}

/// Catch-up of one room for a connecting socket: `message_updated` for
/// every message up to `delivered_seq` changed after the member's change
/// cursor (later messages are pushed whole by the message catch-up), then
/// the cursor moves to the last change pushed. `false` when the socket is
/// gone or the store failed (the socket is closed so the client retries).
pub(super) async fn catch_up_changes(
    hub: &super::Hub,
    user: &UserId,
    blocked: &std::collections::HashSet<UserId>,
    room: &crate::domain::RoomId,
    delivered_seq: crate::domain::Seq,
    socket: &crate::socket::SocketHandle,
) -> bool {
    let messages = &hub.stores.messages;
    let fail = |e: StoreError| {
        tracing::warn!(error = %e, "change catch-up read failed; closing socket");
        socket.close(1011, "store unavailable; reconnect");
        false
    };
    let start = match messages.change_cursor(room, user).await {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let mut cursor = start;
    loop {
        let page = match messages.changes_since(room, cursor, 500).await {
            Ok(p) => p,
            Err(e) => return fail(e),
        };
        let Some((last, _)) = page.last() else { break };
        let last = *last;
        for (_, m) in &page {
            if m.seq > delivered_seq || blocked.contains(&m.sender_id) {
                continue;
            }
            let f = ServerFrame::MessageUpdated { message: m }.encode();
            if !socket.push_wait(f).await {
                return false;
            }
        }
        cursor = last;
        if page.len() < 500 {
            break;
        }
    }
    if cursor > start {
        if let Err(e) = messages.advance_change_cursor(room, user, cursor).await {
            tracing::warn!(error = %e, "could not store a change cursor; changes may repeat");
        }
    }
    true
}
