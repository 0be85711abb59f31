//! One Room actor per active room: membership and block checks, typing,
//! receipts, and the ordered pipeline that stores, acks and fans out messages.
//!
//! The actor validates a send and hands it to its pipeline task, which takes
//! every pending send of the room, appends them in one store call (the store
//! group-commits across rooms), and only then acks each sender and fans the
//! messages out ([`super::fanout`]: one group per destination node, never
//! waiting for the broker). The pipeline owns its queue, so an actor restart (crash,
//! operator stop) never drops a send that was accepted: the old pipeline
//! finishes its queue, the new actor starts a new one, and sessions restore
//! per-room order by `seq` (filling any gap from the store).

use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

pub use super::audience::Audience;
use super::keyed_sup::{Child, StopReason};
use super::{fanout, ActorError, Hub};
use crate::broker::NotifyJob;
use crate::domain::{ClientMsgId, MessageBody, MessageId, RoomId, Seq, UserId};
use crate::protocol::{ack_frame, error_frame, message_frame, ServerFrame};
use crate::socket::SocketHandle;
use crate::store::{Appended, CursorKind, Message, NewMessage, RoomKind, StoreError};

/// Room actor.
pub struct RoomActor;

/// Where the outcome of a send goes.
pub enum Replier {
    /// An `ack` or `error` frame on this socket.
    Socket(SocketHandle),
    /// An HTTP request waiting for the stored message.
    Http(oneshot::Sender<Result<Appended, SendError>>),
}

/// Why a send was refused.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SendError {
    #[error("you are not a member of this room")]
    Forbidden,
    #[error("room not found")]
    NotFound,
    #[error("store unavailable, retry")]
    Unavailable,
}

impl SendError {
    /// The contract's code.
    pub fn code(&self) -> &'static str {
        match self {
            SendError::Forbidden => "forbidden",
            SendError::NotFound => "not_found",
            SendError::Unavailable => "unavailable",
        }
    }
}

/// Messages of a room actor.
pub enum RoomMsg {
    /// Store and fan out a message.
    Send {
        sender: UserId,
        client_msg_id: ClientMsgId,
        body: MessageBody,
        /// Checked by the caller: a message of this room.
        reply_to: Option<MessageId>,
        /// Checked by the caller ([`crate::blobs::check_attachable`]).
        attachments: Vec<crate::store::Attachment>,
        reply: Replier,
    },
    /// Edit, delete or react to a stored message (see [`super::lifecycle`]).
    Change {
        user: UserId,
        message_id: MessageId,
        change: super::lifecycle::ChangeRequest,
        reply: super::lifecycle::ChangeReply,
    },
    /// Move a member's cursor; errors go to `socket` if given.
    Cursor {
        user: UserId,
        kind: CursorKind,
        up_to: Seq,
        socket: Option<SocketHandle>,
    },
    /// Typing started or stopped.
    Typing { user: UserId, state: bool },
    /// Membership changed somewhere: reload members and blocks (answering
    /// on the port once done, if given).
    Reload(Option<RpcReplyPort<()>>),
    /// Someone's blocks changed: reload blocks if they are a member.
    BlocksChanged(UserId, Option<RpcReplyPort<()>>),
    /// Idle check.
    Tick,
    /// State for the admin view.
    Inspect(RpcReplyPort<RoomInfo>),
}

/// The admin view of a room actor.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct RoomInfo {
    pub room_id: RoomId,
    pub kind: RoomKind,
    pub members: Vec<UserId>,
    pub online_members: Vec<UserId>,
    #[schema(value_type = i64, minimum = 0)]
    pub last_seq: Seq,
    pub cursors: Vec<crate::store::Member>,
    pub pipeline_queued: usize,
}

/// Actor state.
pub struct RoomState {
    pub(super) hub: Arc<Hub>,
    pub(super) room_id: RoomId,
    pub(super) kind: RoomKind,
    pub(super) audience: Arc<Audience>,
    pipeline: mpsc::Sender<Pending>,
    last_activity: Instant,
    /// Set when the actor removed itself from the registry and will stop at
    /// the next tick (messages already routed to it are still served).
    retiring: bool,
}

struct Pending {
    received: Instant,
    new: NewMessage,
    reply: Replier,
    audience: Arc<Audience>,
}

impl Actor for RoomActor {
    type Msg = RoomMsg;
    type State = RoomState;
    type Arguments = (Arc<Hub>, RoomId);

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        (hub, room_id): Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        let (kind, audience) = load_audience(&hub, &room_id).await?;
        let (tx, rx) = mpsc::channel(4096);
        hub.pipelines
            .spawn(pipeline(hub.clone(), room_id.clone(), rx));
        let idle = Duration::from_secs(hub.settings.rooms.idle_secs.max(1));
        myself.send_interval(idle / 2, || RoomMsg::Tick);
        Ok(RoomState {
            hub,
            room_id,
            kind,
            audience: Arc::new(audience),
            pipeline: tx,
            last_activity: Instant::now(),
            retiring: false,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            RoomMsg::Tick => {
                let idle = Duration::from_secs(st.hub.settings.rooms.idle_secs.max(1));
                if st.retiring {
                    myself.stop(Some(StopReason::Idle.into()));
                } else if st.last_activity.elapsed() >= idle {
                    // Leave the registry first, serve stragglers until the
                    // next tick, then stop.
                    st.hub.rooms.retire(st.room_id.clone(), myself.get_id());
                    st.retiring = true;
                }
                return Ok(());
            }
            RoomMsg::Inspect(reply) => {
                let _ = reply.send(inspect(st).await);
                return Ok(());
            }
            _ => {}
        }
        st.last_activity = Instant::now();
        match msg {
            RoomMsg::Send {
                sender,
                client_msg_id,
                body,
                reply_to,
                attachments,
                reply,
            } => {
                if !st.audience.members.contains_key(&sender) {
                    // The cache may be stale (member added on another node).
                    reload(st).await?;
                }
                if !st.audience.members.contains_key(&sender) {
                    refuse(reply, &client_msg_id, SendError::Forbidden);
                    return Ok(());
                }
                let pending = Pending {
                    received: Instant::now(),
                    new: NewMessage {
                        room_id: st.room_id.clone(),
                        sender_id: sender,
                        client_msg_id,
                        body,
                        reply_to,
                        attachments,
                    },
                    reply,
                    audience: st.audience.clone(),
                };
                if let Err(e) = st.pipeline.send(pending).await {
                    let p = e.0;
                    refuse(p.reply, &p.new.client_msg_id, SendError::Unavailable);
                }
            }
            RoomMsg::Change {
                user,
                message_id,
                change,
                reply,
            } => {
                if !st.audience.members.contains_key(&user) {
                    reload(st).await?;
                }
                let room = super::lifecycle::Room {
                    hub: &st.hub,
                    room_id: &st.room_id,
                    kind: st.kind,
                    audience: &st.audience,
                };
                let r = super::lifecycle::apply(&room, user, message_id, change).await;
                let _ = reply.send(r);
            }
            RoomMsg::Cursor {
                user,
                kind,
                up_to,
                socket,
            } => {
                cursor(st, user, kind, up_to, socket).await;
            }
            RoomMsg::Typing { user, state } => {
                if st.audience.members.contains_key(&user) {
                    let frame = ServerFrame::Typing {
                        room_id: &st.room_id,
                        user_id: &user,
                        state,
                    }
                    .encode();
                    let to: Vec<UserId> = st
                        .audience
                        .hearing(&user)
                        .iter()
                        .filter(|u| *u != &user)
                        .cloned()
                        .collect();
                    st.hub.deliver(&to, &st.room_id, None, None, &frame);
                }
            }
            RoomMsg::Reload(reply) => {
                reload(st).await?;
                if let Some(r) = reply {
                    let _ = r.send(());
                }
            }
            RoomMsg::BlocksChanged(user, reply) => {
                if st.audience.members.contains_key(&user) {
                    reload(st).await?;
                }
                if let Some(r) = reply {
                    let _ = r.send(());
                }
            }
            RoomMsg::Tick | RoomMsg::Inspect(_) => {}
        }
        Ok(())
    }
}

fn refuse(reply: Replier, cmid: &ClientMsgId, e: SendError) {
    match reply {
        Replier::Socket(s) => {
            s.push(error_frame(e.code(), &e.to_string(), Some(cmid.as_str())));
        }
        Replier::Http(tx) => {
            let _ = tx.send(Err(e));
        }
    }
}

async fn load_audience(
    hub: &Hub,
    room_id: &RoomId,
) -> Result<(RoomKind, Audience), ActorProcessingErr> {
    let room = hub
        .stores
        .rooms
        .room(room_id)
        .await?
        .ok_or_else(|| Box::new(StoreError::NotFound) as ActorProcessingErr)?;
    let ids: Vec<UserId> = room.members.iter().map(|m| m.user_id.clone()).collect();
    let pairs = hub.stores.users.blocks_among(&ids).await?;
    Ok((
        room.kind,
        Audience::new(
            room.members
                .into_iter()
                .map(|m| (m.user_id, m.role))
                .collect(),
            pairs.into_iter().collect(),
        ),
    ))
}

async fn reload(st: &mut RoomState) -> Result<(), ActorProcessingErr> {
    let (kind, audience) = load_audience(&st.hub, &st.room_id).await?;
    st.kind = kind;
    st.audience = Arc::new(audience);
    Ok(())
}

async fn cursor(
    st: &mut RoomState,
    user: UserId,
    kind: CursorKind,
    up_to: Seq,
    socket: Option<SocketHandle>,
) {
    let kind_name = match kind {
        CursorKind::Delivered => "delivered",
        CursorKind::Read => "read",
    };
    match st
        .hub
        .stores
        .rooms
        .advance_cursor(&st.room_id, &user, kind, up_to)
        .await
    {
        Ok((member, moved)) => {
            if !moved {
                return;
            }
            let up_to_seq = match kind {
                CursorKind::Delivered => member.delivered_seq,
                CursorKind::Read => member.read_seq,
            };
            let frame = ServerFrame::Receipt {
                room_id: &st.room_id,
                user_id: &user,
                kind,
                up_to_seq,
            }
            .encode();
            let to = st.audience.hearing(&user);
            st.hub.deliver(&to, &st.room_id, None, None, &frame);
        }
        Err(e) => {
            let (code, msg) = match e {
                StoreError::Forbidden | StoreError::NotFound => {
                    ("forbidden", "you are not a member of this room".to_owned())
                }
                other => {
                    tracing::warn!(error = %other, room = %st.room_id, "cursor update failed");
                    (
                        "unavailable",
                        "could not store the cursor; retry".to_owned(),
                    )
                }
            };
            if let Some(s) = socket {
                s.push(error_frame(code, &msg, Some(kind_name)));
            }
        }
    }
}

async fn inspect(st: &RoomState) -> RoomInfo {
    let room = st.hub.stores.rooms.room(&st.room_id).await.ok().flatten();
    let mut members: Vec<UserId> = st.audience.members.keys().cloned().collect();
    members.sort();
    let online_members = members
        .iter()
        .filter(|u| st.hub.directory.is_online(u))
        .cloned()
        .collect();
    RoomInfo {
        room_id: st.room_id.clone(),
        kind: st.kind,
        members,
        online_members,
        last_seq: room.as_ref().map(|r| r.last_seq).unwrap_or(0),
        cursors: room.map(|r| r.members).unwrap_or_default(),
        pipeline_queued: st.pipeline.max_capacity() - st.pipeline.capacity(),
    }
}

/// Most sends appended in one store call.
const PIPELINE_BATCH: usize = 256;

/// The ordered store → ack → fan-out loop of one room. Acks depend on the
/// store only; the fan-out of a batch hands each destination node one group
/// and never waits for the broker.
async fn pipeline(hub: Arc<Hub>, room_id: RoomId, mut rx: mpsc::Receiver<Pending>) {
    let mut batch: Vec<Pending> = Vec::with_capacity(PIPELINE_BATCH);
    loop {
        if rx.recv_many(&mut batch, PIPELINE_BATCH).await == 0 {
            break;
        }
        let news: Vec<NewMessage> = batch.iter().map(|p| p.new.clone()).collect();
        let started = Instant::now();
        let results = hub.stores.messages.append_batch(news).await;
        metrics::histogram!("chatd_store_append_seconds").record(started.elapsed().as_secs_f64());
        match results {
            Ok(results) => {
                let mut out = fanout::Batch::new(&hub);
                let mut jobs = Vec::new();
                for (p, r) in batch.drain(..).zip(results) {
                    jobs.extend(finish(&mut out, p, r));
                }
                out.send();
                for job in jobs {
                    hub.fanout.notify(job);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, room = %room_id, "append failed; senders may retry");
                for p in batch.drain(..) {
                    refuse(p.reply, &p.new.client_msg_id, SendError::Unavailable);
                }
            }
        }
    }
}

/// Acks one stored send and adds its frame to the batch's fan-out; returns
/// the notification job for recipients with no socket, if any.
fn finish(
    out: &mut fanout::Batch<'_>,
    p: Pending,
    r: Result<Appended, StoreError>,
) -> Option<NotifyJob> {
    let appended = match r {
        Ok(a) => a,
        Err(e) => {
            let se = match e {
                StoreError::Forbidden => SendError::Forbidden,
                StoreError::NotFound => SendError::NotFound,
                other => {
                    tracing::warn!(error = %other, "append failed");
                    SendError::Unavailable
                }
            };
            refuse(p.reply, &p.new.client_msg_id, se);
            return None;
        }
    };
    let exclude = match &p.reply {
        Replier::Socket(s) => Some(s.id.clone()),
        Replier::Http(_) => None,
    };
    let message: Message = appended.message.clone();
    let duplicate = appended.duplicate;
    metrics::histogram!("chatd_ack_latency_seconds").record(p.received.elapsed().as_secs_f64());
    match p.reply {
        Replier::Socket(s) => {
            s.push(ack_frame(&message));
        }
        Replier::Http(tx) => {
            let _ = tx.send(Ok(appended));
        }
    }
    if duplicate {
        return None;
    }
    metrics::counter!("chatd_messages_stored_total").increment(1);
    let frame = message_frame(&message);
    let to = p.audience.hearing(&message.sender_id);
    let offline = out.add(
        &to,
        &message.room_id,
        Some(message.seq),
        exclude.as_ref(),
        &frame,
    );
    let recipients: Vec<UserId> = offline
        .into_iter()
        .filter(|u| u != &message.sender_id)
        .collect();
    (!recipients.is_empty()).then(|| NotifyJob {
        room_id: message.room_id.clone(),
        message_id: message.id.clone(),
        seq: message.seq,
        sender_id: message.sender_id.clone(),
        recipients,
        created_at: message.created_at.clone(),
    })
}

/// Rooms: one [`RoomActor`] per active room.
pub struct RoomChild;

impl Child for RoomChild {
    type Key = RoomId;
    type Msg = RoomMsg;
    const KIND: &'static str = "room";

    async fn spawn(
        hub: Arc<Hub>,
        key: RoomId,
        _restart: bool,
        sup: ActorCell,
    ) -> Result<ActorRef<RoomMsg>, ActorError> {
        match Actor::spawn_linked(None, RoomActor, (hub, key), sup).await {
            Ok((a, _)) => Ok(a),
            Err(e) => {
                let not_found = matches!(
                    &e,
                    ractor::SpawnErr::StartupFailed(inner)
                        if inner.downcast_ref::<StoreError>().is_some_and(|s| matches!(s, StoreError::NotFound))
                );
                if not_found {
                    Err(ActorError::NotFound)
                } else {
                    Err(ActorError::Unavailable(e.to_string()))
                }
            }
        }
    }

    fn count(n: usize) {
        metrics::gauge!("chatd_rooms_active").set(n as f64);
    }
}
