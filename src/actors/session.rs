//! One UserSession actor per connected user on this node: all of the user's
//! sockets (devices), presence, and per-room delivery order.
//!
//! Each socket has a bounded outbound queue; a socket that cannot keep up is
//! closed with 4008 and its client resyncs from its cursors, so a slow device
//! never stalls the user's other devices or the room. Live `message` frames
//! carry their `seq`: the session drops what it already pushed and fills a
//! gap from the store before pushing a later message, so every socket sees a
//! room's messages in `seq` order even across room restarts and nodes.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort};

use super::keyed_sup::{Child, StopReason};
use super::{ActorError, Hub};
use crate::broker::{Event, Route};
use crate::domain::{now_rfc3339, RoomId, Seq, SessionId, UserId};
use crate::protocol::{message_frame, Frame, ServerFrame};
use crate::socket::{SocketHandle, CLOSE_KICKED, CLOSE_SLOW_CONSUMER};
use crate::store::{HistoryQuery, RoomCursor};

/// Session actor.
pub struct SessionActor;

/// Messages of a session actor.
pub enum SessionMsg {
    /// A socket joins: send it `ready` and what it missed.
    Attach(SocketHandle, RpcReplyPort<()>),
    /// A socket ended.
    Detach(SessionId),
    /// A room frame; `seq` is set for `message` frames.
    Deliver {
        room_id: RoomId,
        seq: Option<Seq>,
        exclude: Option<SessionId>,
        frame: Frame,
    },
    /// A frame for every socket (presence).
    Frame(Frame),
    /// The user's blocks changed (answering on the port once applied).
    BlocksChanged(Option<RpcReplyPort<()>>),
    /// Close every socket (operator).
    Disconnect,
    /// After a restart: resend catch-up to the adopted sockets.
    Resume,
    /// Push what the store has beyond what this session pushed (across
    /// nodes, a live copy can miss: directory not yet updated, broker outage).
    Settle,
    /// State for the admin view.
    Inspect(RpcReplyPort<SessionInfo>),
}

pub use crate::cluster::{DeviceInfo, SessionInfo};

/// Actor state.
pub struct SessionState {
    hub: Arc<Hub>,
    user_id: UserId,
    connected_at: String,
    sockets: Vec<SocketHandle>,
    last_pushed: HashMap<RoomId, Seq>,
    blocked: HashSet<UserId>,
    announced_online: bool,
}

impl Actor for SessionActor {
    type Msg = SessionMsg;
    type State = SessionState;
    /// The hub, the user, and whether to adopt sockets of a crashed predecessor.
    type Arguments = (Arc<Hub>, UserId, bool);

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        (hub, user_id, adopt): Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        let blocked = hub
            .stores
            .users
            .blocked_by(&user_id)
            .await?
            .into_iter()
            .collect();
        let sockets: Vec<SocketHandle> = if adopt {
            hub.sockets
                .get(&user_id)
                .map(|v| v.iter().filter(|s| !s.is_closed()).cloned().collect())
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        if !sockets.is_empty() {
            let _ = myself.cast(SessionMsg::Resume);
        }
        Ok(SessionState {
            hub,
            user_id,
            connected_at: now_rfc3339(),
            announced_online: !sockets.is_empty(),
            sockets,
            last_pushed: HashMap::new(),
            blocked,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SessionMsg::Attach(socket, reply) => {
                st.hub
                    .sockets
                    .entry(st.user_id.clone())
                    .or_default()
                    .push(socket.clone());
                st.sockets.push(socket.clone());
                let first = !st.announced_online;
                catch_up(st, &socket, true, first).await;
                let _ = reply.send(());
                if first {
                    st.announced_online = true;
                    announce(st, true, None).await;
                    if st.hub.broker.backend().spans_nodes() {
                        // Other nodes route to this one once they processed
                        // the announcement; settle after that.
                        let secs = st.hub.settings.cluster.heartbeat_secs.max(1);
                        myself.send_after(std::time::Duration::from_secs(secs), || {
                            SessionMsg::Settle
                        });
                    }
                }
            }
            SessionMsg::Detach(id) => {
                // (`chatd_connections` is kept by the socket task's guard.)
                if let Some(pos) = st.sockets.iter().position(|s| s.id == id) {
                    st.sockets.swap_remove(pos);
                }
                st.hub.sockets.remove_if_mut(&st.user_id, |_, v| {
                    v.retain(|s| s.id != id);
                    v.is_empty()
                });
                st.sockets.retain(|s| !s.is_closed());
                if st.sockets.is_empty() {
                    go_offline(st, &myself).await;
                }
            }
            SessionMsg::Deliver {
                room_id,
                seq,
                exclude,
                frame,
            } => deliver(st, room_id, seq, exclude, frame).await,
            SessionMsg::Frame(frame) => {
                for s in &st.sockets {
                    s.push(frame.clone());
                }
            }
            SessionMsg::BlocksChanged(reply) => {
                st.blocked = st
                    .hub
                    .stores
                    .users
                    .blocked_by(&st.user_id)
                    .await?
                    .into_iter()
                    .collect();
                if let Some(r) = reply {
                    let _ = r.send(());
                }
            }
            SessionMsg::Disconnect => {
                for s in &st.sockets {
                    s.close(CLOSE_KICKED, "disconnected by an operator");
                }
            }
            SessionMsg::Settle => settle(st).await,
            SessionMsg::Resume => {
                let sockets = st.sockets.clone();
                for (i, s) in sockets.iter().enumerate() {
                    catch_up(st, s, false, i == 0).await;
                }
            }
            SessionMsg::Inspect(reply) => {
                let _ = reply.send(SessionInfo {
                    node: st.hub.node_id.clone(),
                    user_id: st.user_id.clone(),
                    connected_at: st.connected_at.clone(),
                    presence: if st.sockets.is_empty() {
                        "offline"
                    } else {
                        "online"
                    }
                    .to_owned(),
                    devices: st
                        .sockets
                        .iter()
                        .map(|s| DeviceInfo {
                            session_id: s.id.clone(),
                            connected_at: s.connected_at.clone(),
                            queued_frames: s.queued(),
                        })
                        .collect(),
                });
            }
        }
        Ok(())
    }
}

/// Last socket gone: leave the registry, record `last_seen`, tell contacts.
async fn go_offline(st: &mut SessionState, myself: &ActorRef<SessionMsg>) {
    st.hub.sessions.retire(st.user_id.clone(), myself.get_id());
    let now = now_rfc3339();
    if let Err(e) = st.hub.stores.users.set_last_seen(&st.user_id, &now).await {
        if st.hub.shutdown.is_cancelled() {
            // The node is stopping and the store may already be closed.
            tracing::debug!(error = %e, "last_seen not stored: shutting down");
        } else {
            tracing::warn!(error = %e, "could not store last_seen");
        }
    }
    announce(st, false, Some(now)).await;
    myself.stop(Some(StopReason::Empty.into()));
}

async fn announce(st: &SessionState, online: bool, last_seen: Option<String>) {
    let audience = match audience_of(&st.hub, &st.user_id).await {
        Ok(a) => a,
        Err(e) if st.hub.shutdown.is_cancelled() => {
            // The node is stopping and the store may already be closed.
            tracing::debug!(error = %e, "presence audience unavailable: shutting down");
            Vec::new()
        }
        Err(e) => {
            tracing::warn!(error = %e, "presence audience unavailable");
            Vec::new()
        }
    };
    st.hub
        .publish(
            Route::AllNodes,
            Event::Presence {
                user_id: st.user_id.clone(),
                node: st.hub.node_id.clone(),
                online,
                last_seen,
                audience,
            },
        )
        .await;
}

/// Contacts of `user` that do not block it.
async fn audience_of(hub: &Hub, user: &UserId) -> Result<Vec<UserId>, crate::store::StoreError> {
    let contacts = hub.stores.rooms.contacts(user).await?;
    let blockers: HashSet<UserId> = hub
        .stores
        .users
        .blockers_of(user)
        .await?
        .into_iter()
        .collect();
    Ok(contacts
        .into_iter()
        .filter(|c| !blockers.contains(c))
        .collect())
}

async fn deliver(
    st: &mut SessionState,
    room_id: RoomId,
    seq: Option<Seq>,
    exclude: Option<SessionId>,
    frame: Frame,
) {
    if let Some(seq) = seq {
        let last = st.last_pushed.get(&room_id).copied();
        match last {
            Some(last) if seq <= last => return,
            Some(last) if seq > last + 1 => {
                // A gap: the missing messages are stored (they were
                // committed before this one); push them first.
                fill_gap(st, &room_id, last, seq, false).await;
            }
            _ => {}
        }
        st.last_pushed.insert(room_id, seq);
        metrics::counter!("chatd_messages_delivered_total").increment(st.sockets.len() as u64);
    }
    for s in &st.sockets {
        if exclude.as_ref() != Some(&s.id) {
            s.push(frame.clone());
        }
    }
}

/// Pushes the stored messages with `last < seq < upto`, page by page, and
/// returns the last `seq` it covered. Live fills (`wait` false) never wait:
/// a socket whose queue fills is closed as slow and resyncs. Settles wait a
/// moment for room before doing the same.
async fn fill_gap(st: &SessionState, room_id: &RoomId, last: Seq, upto: Seq, wait: bool) -> Seq {
    let mut after = last;
    while after + 1 < upto {
        let q = HistoryQuery {
            before: Some(upto),
            after: Some(after),
            limit: (upto - after - 1).clamp(1, 500) as u32,
        };
        let page = match st.hub.stores.messages.history(room_id, q).await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, room = %room_id, "gap fill failed; clients resync by cursor");
                break;
            }
        };
        let Some(end) = page.last().map(|m| m.seq) else {
            break;
        };
        for m in page.iter().filter(|m| !st.blocked.contains(&m.sender_id)) {
            let f = message_frame(m);
            for s in &st.sockets {
                if !wait {
                    s.push(f.clone());
                } else if tokio::time::timeout(SETTLE_PUSH_WAIT, s.push_wait(f.clone()))
                    .await
                    .is_err()
                {
                    s.close(CLOSE_SLOW_CONSUMER, "outbound queue full; resync");
                }
            }
        }
        after = end;
    }
    after
}

/// How long a settle waits for room in a socket's queue.
const SETTLE_PUSH_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

async fn settle(st: &mut SessionState) {
    if st.sockets.is_empty() {
        return;
    }
    let Ok(cursors) = st.hub.stores.rooms.cursors_for_user(&st.user_id).await else {
        return;
    };
    for c in cursors {
        let last = st
            .last_pushed
            .get(&c.room_id)
            .copied()
            .unwrap_or(c.delivered_seq);
        if c.last_seq > last {
            // Live copies still on their way are dropped as duplicates later.
            let covered = fill_gap(st, &c.room_id, last, c.last_seq + 1, true).await;
            st.last_pushed.insert(c.room_id, covered);
        }
    }
}

/// Sends `ready` (if asked) and every message after the user's delivered
/// cursor in each room, in order. With `baseline`, the session's per-room
/// order starts from what this catch-up covered.
async fn catch_up(st: &mut SessionState, socket: &SocketHandle, ready: bool, baseline: bool) {
    let cursors: Vec<RoomCursor> = match st.hub.stores.rooms.cursors_for_user(&st.user_id).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read cursors; closing socket so the client retries");
            socket.close(1011, "store unavailable; reconnect");
            return;
        }
    };
    if ready {
        let f = ServerFrame::Ready {
            user_id: &st.user_id,
            session_id: &socket.id,
            node_id: &st.hub.node_id,
            rooms: &cursors,
        }
        .encode();
        if !socket.push_wait(f).await {
            return;
        }
    }
    for c in &cursors {
        if baseline {
            let e = st.last_pushed.entry(c.room_id.clone()).or_insert(0);
            *e = (*e).max(c.last_seq);
        }
        if !super::lifecycle::catch_up_changes(
            &st.hub,
            &st.user_id,
            &st.blocked,
            &c.room_id,
            c.delivered_seq,
            socket,
        )
        .await
        {
            return;
        }
        let mut after = c.delivered_seq;
        while after < c.last_seq {
            let q = HistoryQuery {
                before: Some(c.last_seq + 1),
                after: Some(after),
                limit: 500,
            };
            let page = match st.hub.stores.messages.history(&c.room_id, q).await {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(error = %e, "catch-up read failed; closing socket");
                    socket.close(1011, "store unavailable; reconnect");
                    return;
                }
            };
            let Some(last) = page.last() else { break };
            after = last.seq;
            for m in page.iter().filter(|m| !st.blocked.contains(&m.sender_id)) {
                if !socket.push_wait(message_frame(m)).await {
                    return;
                }
            }
        }
    }
}

/// Sessions: one [`SessionActor`] per user with sockets on this node; a
/// restarted one adopts the user's open sockets.
pub struct SessionChild;

impl Child for SessionChild {
    type Key = UserId;
    type Msg = SessionMsg;
    const KIND: &'static str = "session";

    async fn spawn(
        hub: Arc<Hub>,
        key: UserId,
        restart: bool,
        sup: ActorCell,
    ) -> Result<ActorRef<SessionMsg>, ActorError> {
        Actor::spawn_linked(None, SessionActor, (hub, key, restart), sup)
            .await
            .map(|(a, _)| a)
            .map_err(|e| ActorError::Unavailable(e.to_string()))
    }

    fn count(n: usize) {
        metrics::gauge!("chatd_sessions").set(n as f64);
    }
}
