//! `/rooms`: direct and group rooms, members, history, and HTTP sends (which
//! go through the same Room actor as socket sends).

use std::collections::HashSet;

use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{ApiResult, AppState, Error, ErrorBody, Json, Path, Query};
use crate::actors::room::{Replier, RoomMsg};
use crate::auth::AuthUser;
use crate::domain::{ClientMsgId, RoomId, RoomName, UserId};
use crate::store::{HistoryQuery, Message, Role, Room, RoomKind, RoomSummary};

/// Routes under `/api/v1/rooms`.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create, list))
        .routes(routes!(show))
        .routes(routes!(add_member))
        .routes(routes!(remove_member))
        .routes(routes!(history, send))
}

#[derive(Deserialize, ToSchema)]
#[serde(tag = "kind", rename_all = "lowercase")]
enum CreateBody {
    /// The direct room with `peer` (a user id).
    Direct { peer: String },
    /// A group named `name`; `members` are user ids besides the caller (the owner).
    Group {
        name: String,
        #[serde(default)]
        members: Vec<String>,
    },
}

fn room_id(s: &str) -> ApiResult<RoomId> {
    RoomId::parse(s).map_err(|_| Error::NotFound("no such room".into()))
}

fn user_id(s: &str) -> ApiResult<UserId> {
    UserId::parse(s).map_err(|e| Error::BadRequest {
        code: "invalid_user_id",
        message: e.message,
    })
}

/// The room, if it exists and `user` is a member: 404 if missing, 403 if foreign.
async fn member_room(st: &AppState, id: &str, user: &UserId) -> ApiResult<Room> {
    let id = room_id(id)?;
    let room = st
        .hub
        .stores
        .rooms
        .room(&id)
        .await?
        .ok_or_else(|| Error::NotFound("no such room".into()))?;
    if room.member(user).is_none() {
        return Err(Error::not_member());
    }
    Ok(room)
}

/// Whether any of `users` blocks `caller`. A blocked user cannot put the
/// blocker in a room; the refusal is the one for a user who does not
/// exist, so the block is not revealed.
async fn blocks_caller(st: &AppState, caller: &UserId, users: &[UserId]) -> ApiResult<bool> {
    if users.is_empty() {
        return Ok(false);
    }
    let blockers: HashSet<UserId> = st
        .hub
        .stores
        .users
        .blockers_of(caller)
        .await?
        .into_iter()
        .collect();
    Ok(users.iter().any(|u| blockers.contains(u)))
}

/// The direct room of `a` and `b`, if there is one.
async fn existing_direct(st: &AppState, a: &UserId, b: &UserId) -> ApiResult<Option<Room>> {
    Ok(st
        .hub
        .stores
        .rooms
        .rooms_for_user(a)
        .await?
        .into_iter()
        .map(|s| s.room)
        .find(|r| r.kind == RoomKind::Direct && r.member(b).is_some()))
}

/// Creates a room; a direct room between the same two users is returned
/// again. A user who blocks the caller cannot be put in a room by them:
/// the answer is the same 404 as for a user who does not exist.
#[utoipa::path(post, path = "/rooms", tag = "rooms", security(("bearer" = [])),
    request_body = CreateBody,
    responses(
        (status = 201, description = "created", body = Room),
        (status = 200, description = "the existing direct room of the two users", body = Room),
        (status = 400, description = "`invalid_request`, `invalid_peer`, `invalid_user_id`, `invalid_room_name`, `too_many_members`", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 404, description = "`not_found`: the peer or a member does not exist (or blocks the caller)", body = ErrorBody),
    ))]
#[tracing::instrument(skip_all, fields(user = %user.id))]
async fn create(
    State(st): State<AppState>,
    user: AuthUser,
    Json(b): Json<CreateBody>,
) -> ApiResult<(StatusCode, Json<Room>)> {
    match b {
        CreateBody::Direct { peer } => {
            let peer = user_id(&peer)?;
            if peer == user.id {
                return Err(Error::BadRequest {
                    code: "invalid_peer",
                    message: "a direct room needs another user".into(),
                });
            }
            if blocks_caller(&st, &user.id, std::slice::from_ref(&peer)).await? {
                // The existing room is returned as before the block; a new
                // one is refused as if the peer did not exist.
                return match existing_direct(&st, &user.id, &peer).await? {
                    Some(room) => Ok((StatusCode::OK, Json(room))),
                    None => Err(Error::NotFound("no such user".into())),
                };
            }
            let (room, created) = st
                .hub
                .stores
                .rooms
                .create_direct(&user.id, &peer)
                .await
                .map_err(|e| match e {
                    crate::store::StoreError::NotFound => Error::NotFound("no such user".into()),
                    other => other.into(),
                })?;
            let status = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            Ok((status, Json(room)))
        }
        CreateBody::Group { name, members } => {
            let limits = &st.settings.limits;
            let name = RoomName::parse(&name, limits)?;
            let mut seen = HashSet::new();
            let mut ids = Vec::new();
            for m in &members {
                let id = user_id(m)?;
                if id != user.id && seen.insert(id.clone()) {
                    ids.push(id);
                }
            }
            if ids.len() + 1 > limits.group_max_members {
                return Err(Error::BadRequest {
                    code: "too_many_members",
                    message: format!("a group has at most {} members", limits.group_max_members),
                });
            }
            if blocks_caller(&st, &user.id, &ids).await? {
                return Err(Error::NotFound("a member does not exist".into()));
            }
            let room = st
                .hub
                .stores
                .rooms
                .create_group(&user.id, name.as_ref(), &ids)
                .await
                .map_err(|e| match e {
                    crate::store::StoreError::NotFound => {
                        Error::NotFound("a member does not exist".into())
                    }
                    other => other.into(),
                })?;
            Ok((StatusCode::CREATED, Json(room)))
        }
    }
}

#[derive(Serialize, ToSchema)]
struct Rooms {
    rooms: Vec<RoomSummary>,
}

/// The caller's rooms with last message and unread count, newest activity first.
#[utoipa::path(get, path = "/rooms", tag = "rooms", security(("bearer" = [])),
    responses(
        (status = 200, description = "the caller's rooms", body = Rooms),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
    ))]
async fn list(State(st): State<AppState>, user: AuthUser) -> ApiResult<Json<Rooms>> {
    Ok(Json(Rooms {
        rooms: st.stores.rooms.rooms_for_user(&user.id).await?,
    }))
}

/// One room with its members and their cursors (members only).
#[utoipa::path(get, path = "/rooms/{id}", tag = "rooms", security(("bearer" = [])),
    params(("id" = String, Path, description = "room id")),
    responses(
        (status = 200, description = "the room", body = Room),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 403, description = "`forbidden`: not a member", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
    ))]
async fn show(
    State(st): State<AppState>,
    user: AuthUser,
    Path(id): Path<String>,
) -> ApiResult<Json<Room>> {
    Ok(Json(member_room(&st, &id, &user.id).await?))
}

#[derive(Deserialize, ToSchema)]
struct AddMember {
    user_id: String,
}

fn can_manage(room: &Room, user: &UserId) -> bool {
    room.member(user)
        .is_some_and(|m| matches!(m.role, Role::Owner | Role::Admin))
}

/// Adds a member to a group room (owner or admin of the room).
#[utoipa::path(post, path = "/rooms/{id}/members", tag = "rooms", security(("bearer" = [])),
    params(("id" = String, Path, description = "room id")),
    request_body = AddMember,
    responses(
        (status = 204, description = "added (or already a member)"),
        (status = 400, description = "`not_a_group`, `invalid_user_id`, `too_many_members`", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 403, description = "`forbidden`: not a member, or not owner/admin", body = ErrorBody),
        (status = 404, description = "`not_found`: no such room or user (or the user blocks the caller)", body = ErrorBody),
    ))]
#[tracing::instrument(skip_all, fields(user = %user.id))]
async fn add_member(
    State(st): State<AppState>,
    user: AuthUser,
    Path(id): Path<String>,
    Json(b): Json<AddMember>,
) -> ApiResult<StatusCode> {
    let room = member_room(&st, &id, &user.id).await?;
    if room.kind != RoomKind::Group {
        return Err(Error::BadRequest {
            code: "not_a_group",
            message: "members can only be changed in group rooms".into(),
        });
    }
    if !can_manage(&room, &user.id) {
        return Err(Error::Forbidden(
            "only the owner or an admin of the room may add members".into(),
        ));
    }
    let target = user_id(&b.user_id)?;
    if room.member(&target).is_some() {
        return Ok(StatusCode::NO_CONTENT);
    }
    if room.members.len() >= st.settings.limits.group_max_members {
        return Err(Error::BadRequest {
            code: "too_many_members",
            message: "the room is full".into(),
        });
    }
    if blocks_caller(&st, &user.id, std::slice::from_ref(&target)).await? {
        return Err(Error::NotFound("no such user".into()));
    }
    st.hub
        .stores
        .rooms
        .add_member(&room.id, &target, Role::Member)
        .await
        .map_err(|e| match e {
            crate::store::StoreError::NotFound => Error::NotFound("no such user".into()),
            other => other.into(),
        })?;
    st.hub.apply_room_changed(&room.id, true).await;
    Ok(StatusCode::NO_CONTENT)
}

/// Removes a member from a group room: anyone may leave; the owner or an
/// admin may remove others, but not the owner.
#[utoipa::path(delete, path = "/rooms/{id}/members/{user_id}", tag = "rooms", security(("bearer" = [])),
    params(
        ("id" = String, Path, description = "room id"),
        ("user_id" = String, Path, description = "the member to remove"),
    ),
    responses(
        (status = 204, description = "removed"),
        (status = 400, description = "`not_a_group`, `invalid_user_id`", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 403, description = "`forbidden`", body = ErrorBody),
        (status = 404, description = "`not_found`: no such room, or not a member", body = ErrorBody),
    ))]
#[tracing::instrument(skip_all, fields(user = %user.id))]
async fn remove_member(
    State(st): State<AppState>,
    user: AuthUser,
    Path((id, target)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let room = member_room(&st, &id, &user.id).await?;
    if room.kind != RoomKind::Group {
        return Err(Error::BadRequest {
            code: "not_a_group",
            message: "members can only be changed in group rooms".into(),
        });
    }
    let target = user_id(&target)?;
    let Some(t) = room.member(&target) else {
        return Err(Error::NotFound("not a member of this room".into()));
    };
    // Anyone may leave; the owner or an admin may remove others, but nobody
    // removes the owner.
    let leaving = target == user.id;
    if !leaving && (!can_manage(&room, &user.id) || t.role == Role::Owner) {
        return Err(Error::Forbidden("you may not remove this member".into()));
    }
    st.stores.rooms.remove_member(&room.id, &target).await?;
    st.hub.apply_room_changed(&room.id, true).await;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct HistoryParams {
    /// Only messages with `seq` below this.
    before: Option<i64>,
    /// Only messages with `seq` above this.
    after: Option<i64>,
    /// At most this many (1–100, default 50).
    limit: Option<u32>,
}

#[derive(Serialize, ToSchema)]
struct Messages {
    messages: Vec<Message>,
}

/// Messages visible to `user` (senders it blocks are hidden).
pub async fn visible(st: &AppState, user: &UserId, msgs: Vec<Message>) -> ApiResult<Vec<Message>> {
    let blocked: HashSet<UserId> = st
        .hub
        .stores
        .users
        .blocked_by(user)
        .await?
        .into_iter()
        .collect();
    if blocked.is_empty() {
        return Ok(msgs);
    }
    Ok(msgs
        .into_iter()
        .filter(|m| !blocked.contains(&m.sender_id))
        .collect())
}

/// A slice of a room's history in ascending `seq` (members only; senders
/// the caller blocks are left out).
#[utoipa::path(get, path = "/rooms/{id}/messages", tag = "rooms", security(("bearer" = [])),
    params(("id" = String, Path, description = "room id"), HistoryParams),
    responses(
        (status = 200, description = "messages in ascending seq", body = Messages),
        (status = 400, description = "`invalid_limit`, `invalid_request`", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 403, description = "`forbidden`: not a member", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
    ))]
async fn history(
    State(st): State<AppState>,
    user: AuthUser,
    Path(id): Path<String>,
    Query(q): Query<HistoryParams>,
) -> ApiResult<Json<Messages>> {
    let limit = q.limit.unwrap_or(50);
    if !(1..=100).contains(&limit) {
        return Err(Error::BadRequest {
            code: "invalid_limit",
            message: "limit must be 1–100".into(),
        });
    }
    if q.before.is_some_and(|b| b < 0) || q.after.is_some_and(|a| a < 0) {
        return Err(Error::bad("before and after must be non-negative"));
    }
    let room = member_room(&st, &id, &user.id).await?;
    let msgs = st
        .hub
        .stores
        .messages
        .history(
            &room.id,
            HistoryQuery {
                before: q.before,
                after: q.after,
                limit,
            },
        )
        .await?;
    Ok(Json(Messages {
        messages: visible(&st, &user.id, msgs).await?,
    }))
}

#[derive(Deserialize, ToSchema)]
struct SendBody {
    client_msg_id: String,
    /// May be empty (or absent) when `attachments` are given.
    #[serde(default)]
    body: String,
    /// A message of the same room this one answers.
    #[serde(default)]
    reply_to: Option<String>,
    /// Ids of attachments the sender uploaded to this room.
    #[serde(default)]
    attachments: Vec<String>,
}

/// Sends a message, like a socket `send`; resending a `client_msg_id`
/// returns the stored message and stores nothing new.
#[utoipa::path(post, path = "/rooms/{id}/messages", tag = "rooms", security(("bearer" = [])),
    params(("id" = String, Path, description = "room id")),
    request_body = SendBody,
    responses(
        (status = 201, description = "stored durably", body = Message),
        (status = 400, description = "`invalid_body`, `body_too_long`, `invalid_client_msg_id`, `invalid_request`", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 403, description = "`forbidden`: not a member", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
        (status = 503, description = "`unavailable`: retry with the same `client_msg_id`", body = ErrorBody),
    ))]
#[tracing::instrument(skip_all, fields(user = %user.id))]
async fn send(
    State(st): State<AppState>,
    user: AuthUser,
    Path(id): Path<String>,
    Json(b): Json<SendBody>,
) -> ApiResult<(StatusCode, Json<Message>)> {
    let limits = &st.settings.limits;
    let room = room_id(&id)?;
    let client_msg_id = ClientMsgId::parse(&b.client_msg_id, limits)?;
    let x = super::lifecycle::prepare_send(
        &st,
        &user.id,
        &room,
        &b.body,
        b.reply_to.as_deref(),
        &b.attachments,
    )
    .await?;
    let (tx, rx) = oneshot::channel();
    st.hub
        .send_to_room(
            &room,
            RoomMsg::Send {
                sender: user.id.clone(),
                client_msg_id,
                body: x.body,
                reply_to: x.reply_to,
                attachments: x.attachments,
                reply: Replier::Http(tx),
            },
        )
        .await?;
    let appended = rx
        .await
        .map_err(|_| {
            Error::Unavailable("the room restarted; retry with the same client_msg_id".into())
        })?
        .map_err(|e| match e {
            crate::actors::room::SendError::Forbidden => Error::not_member(),
            crate::actors::room::SendError::NotFound => Error::NotFound("no such room".into()),
            crate::actors::room::SendError::Unavailable => Error::Unavailable(
                "could not store the message; retry with the same client_msg_id".into(),
            ),
        })?;
    if !appended.duplicate {
        super::lifecycle::bind(&st, &user.id, &appended.message, &x.ids).await;
    }
    Ok((StatusCode::CREATED, Json(appended.message)))
}
