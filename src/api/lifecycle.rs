//! The message lifecycle over HTTP (docs/lifecycle.md): edit
//! (`PATCH /rooms/{id}/messages/{message_id}`), delete (`DELETE` on the
//! same path), reactions (`PUT`/`DELETE
//! /rooms/{id}/messages/{message_id}/reactions/{emoji}`), and the helpers
//! that `send` (HTTP and socket) and the socket's `edit`/`delete`/`react`
//! share: checking `reply_to` and `attachments` before a send, binding the
//! attachments after it, routing a change to the room actor and erasing the
//! files of a deleted message.

use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;
use tokio::sync::oneshot;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{ApiResult, AppState, Error, ErrorBody, Json, Path};
use crate::actors::lifecycle::{ChangeDone, ChangeError, ChangeRequest};
use crate::actors::room::RoomMsg;
use crate::auth::AuthUser;
use crate::blobs::{AttachmentId, BlobError};
use crate::domain::{Emoji, MessageBody, MessageId, RoomId, UserId};
use crate::store::{Attachment, Message};

/// Most attachments on one message.
pub const MAX_ATTACHMENTS: usize = 10;

/// The lifecycle routes (mounted under `/api/v1`).
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(edit, delete))
        .routes(routes!(react_on, react_off))
}

/// What a send carries besides its `client_msg_id`, checked.
pub(crate) struct SendExtras {
    pub body: MessageBody,
    pub reply_to: Option<MessageId>,
    pub attachments: Vec<Attachment>,
    pub ids: Vec<AttachmentId>,
}

/// Checks the body (empty allowed only with attachments), `reply_to` (a
/// message of `room`) and `attachments` (uploaded by `user` to `room`, not
/// sent yet). Nothing is written.
pub(crate) async fn prepare_send(
    st: &AppState,
    user: &UserId,
    room: &RoomId,
    body: &str,
    reply_to: Option<&str>,
    attachments: &[String],
) -> ApiResult<SendExtras> {
    let limits = &st.settings.limits;
    let body = if !attachments.is_empty() && body.trim().is_empty() {
        MessageBody::from_trusted(String::new())
    } else {
        MessageBody::parse(body, limits)?
    };
    if attachments.len() > MAX_ATTACHMENTS {
        return Err(Error::bad(format!(
            "at most {MAX_ATTACHMENTS} attachments per message"
        )));
    }
    let reply_to = match reply_to {
        None => None,
        Some(r) => {
            let id = MessageId::parse(r)
                .map_err(|_| Error::bad("reply_to names no message of this room"))?;
            if st.stores.messages.message(room, &id).await?.is_none() {
                return Err(Error::bad("reply_to names no message of this room"));
            }
            Some(id)
        }
    };
    let mut ids = Vec::with_capacity(attachments.len());
    for a in attachments {
        ids.push(
            AttachmentId::parse(a)
                .map_err(|_| Error::bad(format!("malformed attachment id {a:?}")))?,
        );
    }
    let metas = if ids.is_empty() {
        Vec::new()
    } else {
        crate::blobs::check_attachable(st.blobs.as_ref(), &ids, room, user)
            .await
            .map_err(blob_error)?
    };
    Ok(SendExtras {
        body,
        reply_to,
        attachments: metas.iter().map(|m| m.public()).collect(),
        ids,
    })
}

fn blob_error(e: BlobError) -> Error {
    match e {
        BlobError::NotFound => Error::bad("unknown attachment"),
        BlobError::Conflict => Error::bad("an attachment was already sent with another message"),
        BlobError::Invalid { code, message } => Error::BadRequest { code, message },
        BlobError::Unavailable(m) => Error::Unavailable(format!("attachment store: {m}")),
        other => Error::Internal(other.to_string()),
    }
}

/// Binds the attachments of a stored (new) message to it, so members of the
/// room may download them and the sweeper leaves them.
pub(crate) async fn bind(st: &AppState, user: &UserId, m: &Message, ids: &[AttachmentId]) {
    if ids.is_empty() {
        return;
    }
    if let Err(e) =
        crate::blobs::attach_to_message(st.blobs.as_ref(), ids, &m.room_id, &m.id, user).await
    {
        tracing::warn!(error = %e, message = %m.id, "could not bind attachments to a stored message");
    }
}

/// Routes a change to the room actor and waits for its outcome; erases the
/// files of a message that was just deleted.
pub(crate) async fn change(
    st: &AppState,
    user: &UserId,
    room: &str,
    message: &str,
    req: ChangeRequest,
) -> Result<ChangeDone, ChangeError> {
    let room = RoomId::parse(room).map_err(|_| ChangeError::NotFound)?;
    let message_id = MessageId::parse(message).map_err(|_| ChangeError::NotFound)?;
    let (tx, rx) = oneshot::channel();
    st.hub
        .send_to_room(
            &room,
            RoomMsg::Change {
                user: user.clone(),
                message_id,
                change: req,
                reply: tx,
            },
        )
        .await
        .map_err(|e| match e {
            crate::actors::ActorError::NotFound => ChangeError::NotFound,
            crate::actors::ActorError::Unavailable(_) => ChangeError::Unavailable,
        })?;
    let done = rx.await.map_err(|_| ChangeError::Unavailable)??;
    for id in &done.erased {
        let Ok(id) = AttachmentId::parse(id) else {
            continue;
        };
        if let Err(e) = st.blobs.delete(&id).await {
            tracing::warn!(error = %e, attachment = %id, "could not erase a deleted message's file");
        }
    }
    Ok(done)
}

impl From<ChangeError> for Error {
    fn from(e: ChangeError) -> Self {
        let message = e.to_string();
        match e {
            ChangeError::NotMember | ChangeError::Forbidden(_) => Error::Forbidden(message),
            ChangeError::NotFound => Error::NotFound(message),
            ChangeError::Deleted => Error::Conflict("message_deleted", message),
            ChangeError::TooManyReactions(_) => Error::BadRequest {
                code: "too_many_reactions",
                message,
            },
            ChangeError::Unavailable => Error::Unavailable(message),
        }
    }
}

#[derive(Deserialize, ToSchema)]
struct EditBody {
    /// The new body (same rules as a send).
    body: String,
}

/// Edits a message's body: the sender only; `edited_at` is set and every
/// member's devices get `message_updated` (no notification).
#[utoipa::path(patch, path = "/rooms/{id}/messages/{message_id}", tag = "messages", security(("bearer" = [])),
    params(("id" = String, Path, description = "room id"), ("message_id" = String, Path, description = "message id")),
    request_body = EditBody,
    responses(
        (status = 200, description = "the message with `edited_at`", body = Message),
        (status = 400, description = "`invalid_body`, `body_too_long`, `invalid_request`", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 403, description = "`forbidden`: not a member, or not the sender", body = ErrorBody),
        (status = 404, description = "`not_found`: no such message in this room", body = ErrorBody),
        (status = 409, description = "`message_deleted`", body = ErrorBody),
        (status = 503, description = "`unavailable`", body = ErrorBody),
    ))]
#[tracing::instrument(skip_all, fields(user = %user.id))]
async fn edit(
    State(st): State<AppState>,
    user: AuthUser,
    Path((id, message_id)): Path<(String, String)>,
    Json(b): Json<EditBody>,
) -> ApiResult<Json<Message>> {
    let body = MessageBody::parse(&b.body, &st.settings.limits)?;
    let done = change(&st, &user.id, &id, &message_id, ChangeRequest::Edit(body)).await?;
    Ok(Json(done.message))
}

/// Deletes a message: the sender, or an owner/admin of a group room. The
/// body and attachments are erased; a tombstone keeps the seq.
#[utoipa::path(delete, path = "/rooms/{id}/messages/{message_id}", tag = "messages", security(("bearer" = [])),
    params(("id" = String, Path, description = "room id"), ("message_id" = String, Path, description = "message id")),
    responses(
        (status = 204, description = "deleted (also when it already was)"),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 403, description = "`forbidden`", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
        (status = 503, description = "`unavailable`", body = ErrorBody),
    ))]
#[tracing::instrument(skip_all, fields(user = %user.id))]
async fn delete(
    State(st): State<AppState>,
    user: AuthUser,
    Path((id, message_id)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    change(&st, &user.id, &id, &message_id, ChangeRequest::Delete).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn react(
    st: &AppState,
    user: &AuthUser,
    (id, message_id, emoji): (String, String, String),
    on: bool,
) -> ApiResult<StatusCode> {
    let emoji = Emoji::parse(&emoji)?;
    change(
        st,
        &user.id,
        &id,
        &message_id,
        ChangeRequest::React(emoji, on),
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Puts a reaction on a message (any member; idempotent).
#[utoipa::path(put, path = "/rooms/{id}/messages/{message_id}/reactions/{emoji}", tag = "messages", security(("bearer" = [])),
    params(("id" = String, Path, description = "room id"), ("message_id" = String, Path, description = "message id"),
        ("emoji" = String, Path, description = "the emoji (URL-encoded): 1–32 characters, no whitespace or control characters")),
    responses(
        (status = 204, description = "the reaction is on"),
        (status = 400, description = "`invalid_emoji`, `too_many_reactions`", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 403, description = "`forbidden`", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
        (status = 409, description = "`message_deleted`", body = ErrorBody),
    ))]
#[tracing::instrument(skip_all, fields(user = %user.id))]
async fn react_on(
    State(st): State<AppState>,
    user: AuthUser,
    Path(p): Path<(String, String, String)>,
) -> ApiResult<StatusCode> {
    react(&st, &user, p, true).await
}

/// Takes a reaction back (idempotent).
#[utoipa::path(delete, path = "/rooms/{id}/messages/{message_id}/reactions/{emoji}", tag = "messages", security(("bearer" = [])),
    params(("id" = String, Path, description = "room id"), ("message_id" = String, Path, description = "message id"),
        ("emoji" = String, Path, description = "the emoji (URL-encoded)")),
    responses(
        (status = 204, description = "the reaction is off"),
        (status = 400, description = "`invalid_emoji`", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 403, description = "`forbidden`", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
        (status = 409, description = "`message_deleted`", body = ErrorBody),
    ))]
#[tracing::instrument(skip_all, fields(user = %user.id))]
async fn react_off(
    State(st): State<AppState>,
    user: AuthUser,
    Path(p): Path<(String, String, String)>,
) -> ApiResult<StatusCode> {
    react(&st, &user, p, false).await
}
