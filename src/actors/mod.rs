//! The actor tree of one node (ractor):
//!
//! ```text
//! root supervisor (restarts a failed child, gives up after a burst)
//! ├── session supervisor ── one UserSession per connected user
//! ├── room supervisor ───── one Room per active room (lazy, idles out)
//! └── broker bridge ─────── consumes this node's broker queue
//! ```
//!
//! [`Hub`] is the shared context every actor and socket task holds: config,
//! store, broker, the registries of live actors, and the cluster directory.

pub mod bridge;
pub mod fanout;
pub mod lifecycle;
pub mod room;
pub mod room_sup;
pub mod root;
pub mod session;
pub mod session_sup;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use dashmap::DashMap;
use ractor::ActorRef;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::{Broker, Envelope, Event, Route};
use crate::config::Settings;
use crate::domain::{RoomId, Seq, SessionId, UserId};
use crate::protocol::Frame;
use crate::socket::SocketHandle;
use crate::store::Stores;

/// How long a caller waits on an actor's answer.
pub const CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Which nodes hold sockets of which users, cluster-wide (this node's own
/// entries included). Kept fresh by presence events and heartbeats.
#[derive(Default)]
pub struct Directory {
    users: DashMap<UserId, BTreeSet<String>>,
}

impl Directory {
    /// Records that `node` does (or no longer does) hold `user`. Returns
    /// whether the user's cluster-wide online state changed.
    pub fn set(&self, user: &UserId, node: &str, online: bool) -> bool {
        if online {
            let mut e = self.users.entry(user.clone()).or_default();
            let was = !e.is_empty();
            e.insert(node.to_owned());
            !was
        } else {
            let mut changed = false;
            self.users.remove_if_mut(user, |_, nodes| {
                let was = !nodes.is_empty();
                nodes.remove(node);
                changed = was && nodes.is_empty();
                nodes.is_empty()
            });
            changed
        }
    }

    /// Whether any node holds a socket of the user.
    pub fn is_online(&self, user: &UserId) -> bool {
        self.users.get(user).is_some_and(|n| !n.is_empty())
    }

    /// Calls `f` for every node other than `own` that holds the user.
    pub fn for_each_remote(&self, user: &UserId, own: &str, mut f: impl FnMut(&str)) {
        if let Some(nodes) = self.users.get(user) {
            for n in nodes.iter().filter(|n| n.as_str() != own) {
                f(n);
            }
        }
    }

    /// Nodes holding the user.
    pub fn nodes_of(&self, user: &UserId) -> Vec<String> {
        self.users
            .get(user)
            .map(|n| n.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Replaces what `node` holds by `users` (a heartbeat); returns users
    /// whose online state changed, with their new state.
    pub fn replace_node(&self, node: &str, users: &[UserId]) -> Vec<(UserId, bool)> {
        let mut changed = Vec::new();
        let now: std::collections::HashSet<&UserId> = users.iter().collect();
        let stale: Vec<UserId> = self
            .users
            .iter()
            .filter(|e| e.value().contains(node) && !now.contains(e.key()))
            .map(|e| e.key().clone())
            .collect();
        for u in stale {
            if self.set(&u, node, false) {
                changed.push((u, false));
            }
        }
        for u in users {
            if self.set(u, node, true) {
                changed.push((u.clone(), true));
            }
        }
        changed
    }
}

/// Shared context of a node.
pub struct Hub {
    pub node_id: String,
    pub address: String,
    pub started_at: String,
    pub settings: Arc<Settings>,
    pub stores: Stores,
    pub broker: Arc<dyn Broker>,
    /// Where frames and notification jobs go (never waits for the broker).
    pub fanout: fanout::Fanout,
    /// Local session actors by user.
    pub sessions: DashMap<UserId, ActorRef<session::SessionMsg>>,
    /// Open sockets of local users; a restarted session actor adopts them.
    pub sockets: DashMap<UserId, Vec<SocketHandle>>,
    /// Local room actors by room.
    pub rooms: DashMap<RoomId, ActorRef<room::RoomMsg>>,
    pub directory: Directory,
    /// Known nodes (this one included), for the cluster view.
    pub nodes: DashMap<String, NodeInfo>,
    /// Cancelled when the node shuts down: sockets stop reading.
    pub shutdown: CancellationToken,
    /// Room pipelines in flight; shutdown waits for them.
    pub pipelines: TaskTracker,
    pub(crate) session_sup: RwLock<Option<ActorRef<session_sup::SessionSupMsg>>>,
    pub(crate) room_sup: RwLock<Option<ActorRef<room_sup::RoomSupMsg>>>,
    pub(crate) broker_down: AtomicBool,
    /// Admin session queries waiting for other nodes' reports.
    pub admin_queries: DashMap<String, mpsc::UnboundedSender<(String, Vec<session::SessionInfo>)>>,
    /// The root supervisor, for the admin tree.
    pub root: OnceLock<ractor::ActorCell>,
}

/// One node as seen in the cluster view.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct NodeInfo {
    pub id: String,
    pub address: String,
    pub started_at: String,
    pub last_heartbeat: String,
    pub sessions: usize,
    pub rooms: usize,
}

/// What may go wrong when asking an actor.
#[derive(Debug, thiserror::Error)]
pub enum ActorError {
    #[error("not found")]
    NotFound,
    #[error("actor unavailable: {0}")]
    Unavailable(String),
}

impl Hub {
    /// The context for a node; actors are started by [`root::start`].
    pub fn new(
        settings: Arc<Settings>,
        node_id: String,
        address: String,
        stores: Stores,
        broker: Arc<dyn Broker>,
    ) -> Arc<Self> {
        Arc::new(Self {
            fanout: fanout::Fanout::new(node_id.clone(), broker.clone()),
            node_id,
            address,
            started_at: crate::domain::now_rfc3339(),
            settings,
            stores,
            broker,
            sessions: DashMap::new(),
            sockets: DashMap::new(),
            rooms: DashMap::new(),
            directory: Directory::default(),
            nodes: DashMap::new(),
            shutdown: CancellationToken::new(),
            pipelines: TaskTracker::new(),
            session_sup: RwLock::new(None),
            room_sup: RwLock::new(None),
            broker_down: AtomicBool::new(false),
            admin_queries: DashMap::new(),
            root: OnceLock::new(),
        })
    }

    /// Publishes, logging (not failing) when the broker is down: the store
    /// is the source of truth and clients recover by cursor.
    pub async fn publish(&self, route: Route, event: Event) {
        let env = Envelope::new(&self.node_id, event);
        let started = std::time::Instant::now();
        let r = self.broker.publish(route, env).await;
        metrics::histogram!("chatd_broker_publish_seconds").record(started.elapsed().as_secs_f64());
        match r {
            Ok(()) => {
                self.broker_down.store(false, Ordering::Relaxed);
            }
            // No queue for that route (a node gone for good): not an outage.
            Err(e @ crate::broker::BrokerError::Unroutable(_)) => {
                tracing::debug!(error = %e, "broker returned a message");
                metrics::counter!("chatd_broker_unroutable_total").increment(1);
            }
            Err(e) => {
                if !self.broker_down.swap(true, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "broker publish failed; clients recover from the store");
                }
                metrics::counter!("chatd_broker_publish_failed_total").increment(1);
            }
        }
    }

    /// The room actor of `room`, started if needed. `NotFound` if the room
    /// does not exist.
    pub async fn room(&self, room: &RoomId) -> Result<ActorRef<room::RoomMsg>, ActorError> {
        if let Some(r) = self.rooms.get(room) {
            return Ok(r.clone());
        }
        let sup = self
            .room_sup
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| ActorError::Unavailable("room supervisor not started".into()))?;
        ractor::call!(sup, room_sup::RoomSupMsg::GetOrSpawn, room.clone())
            .map_err(|e| ActorError::Unavailable(e.to_string()))?
    }

    /// Sends to a room actor, restarting it once if it stopped meanwhile.
    pub async fn send_to_room(&self, room: &RoomId, msg: room::RoomMsg) -> Result<(), ActorError> {
        let r = self.room(room).await?;
        match r.cast(msg) {
            Ok(()) => Ok(()),
            Err(ractor::MessagingErr::SendErr(msg)) => {
                self.rooms.remove_if(room, |_, v| v.get_id() == r.get_id());
                let r = self.room(room).await?;
                r.cast(msg)
                    .map_err(|e| ActorError::Unavailable(e.to_string()))
            }
            Err(e) => Err(ActorError::Unavailable(e.to_string())),
        }
    }

    /// The session actor of a local user, started if needed.
    pub async fn session(
        &self,
        user: &UserId,
    ) -> Result<ActorRef<session::SessionMsg>, ActorError> {
        if let Some(s) = self.sessions.get(user) {
            return Ok(s.clone());
        }
        let sup = self
            .session_sup
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| ActorError::Unavailable("session supervisor not started".into()))?;
        ractor::call!(sup, session_sup::SessionSupMsg::GetOrSpawn, user.clone())
            .map_err(|e| ActorError::Unavailable(e.to_string()))?
    }

    /// Delivers a frame to `users`: local sessions directly, other nodes
    /// once per node through the fan-out (never waiting for the broker).
    /// Returns the users that have no socket anywhere in the cluster.
    pub fn deliver(
        &self,
        users: &[UserId],
        room_id: &RoomId,
        seq: Option<Seq>,
        exclude: Option<&SessionId>,
        frame: &Frame,
    ) -> Vec<UserId> {
        let mut batch = fanout::Batch::new(self);
        let offline = batch.add(users, room_id, seq, exclude, frame);
        batch.send();
        offline
    }

    /// Membership of `room` changed: the local room actor reloads (waiting
    /// for it with `wait`); with `wait`, other nodes are told as well.
    pub async fn apply_room_changed(&self, room: &RoomId, wait: bool) {
        let actor = self.rooms.get(room).map(|r| r.clone());
        if let Some(r) = actor {
            if wait {
                let _ = r
                    .call(|p| room::RoomMsg::Reload(Some(p)), Some(CALL_TIMEOUT))
                    .await;
            } else {
                let _ = r.cast(room::RoomMsg::Reload(None));
            }
        }
        if wait {
            self.publish(
                Route::AllNodes,
                Event::RoomChanged {
                    room_id: room.clone(),
                },
            )
            .await;
        }
    }

    /// `user` blocked or unblocked someone: local rooms and the user's
    /// session reload (waiting with `wait`, which also tells other nodes).
    pub async fn apply_blocks_changed(&self, user: &UserId, wait: bool) {
        let rooms: Vec<_> = self.rooms.iter().map(|r| r.value().clone()).collect();
        for r in rooms {
            if wait {
                let _ = r
                    .call(
                        |p| room::RoomMsg::BlocksChanged(user.clone(), Some(p)),
                        Some(CALL_TIMEOUT),
                    )
                    .await;
            } else {
                let _ = r.cast(room::RoomMsg::BlocksChanged(user.clone(), None));
            }
        }
        let session = self.sessions.get(user).map(|s| s.clone());
        if let Some(s) = session {
            if wait {
                let _ = s
                    .call(
                        |p| session::SessionMsg::BlocksChanged(Some(p)),
                        Some(CALL_TIMEOUT),
                    )
                    .await;
            } else {
                let _ = s.cast(session::SessionMsg::BlocksChanged(None));
            }
        }
        if wait {
            self.publish(
                Route::AllNodes,
                Event::BlocksChanged {
                    user_id: user.clone(),
                },
            )
            .await;
        }
    }

    /// The admin view of the user's session actor on this node, if any.
    pub async fn inspect_local_session(&self, user: &UserId) -> Option<session::SessionInfo> {
        let s = self.sessions.get(user).map(|s| s.clone())?;
        match s
            .call(session::SessionMsg::Inspect, Some(CALL_TIMEOUT))
            .await
        {
            Ok(ractor::rpc::CallResult::Success(info)) => Some(info),
            _ => None,
        }
    }

    /// The user's session actors across the cluster: this node's, and those
    /// other nodes (from the directory) report over the broker within
    /// `wait`. Returns the sessions and the nodes that did not answer.
    pub async fn cluster_sessions(
        &self,
        user: &UserId,
        wait: std::time::Duration,
    ) -> (Vec<session::SessionInfo>, Vec<String>) {
        let mut out: Vec<session::SessionInfo> =
            self.inspect_local_session(user).await.into_iter().collect();
        let mut waiting: std::collections::BTreeSet<String> = self
            .directory
            .nodes_of(user)
            .into_iter()
            .filter(|n| n != &self.node_id)
            .collect();
        if waiting.is_empty() {
            return (out, Vec::new());
        }
        let request_id = uuid::Uuid::new_v4().simple().to_string();
        let (tx, mut rx) = mpsc::unbounded_channel();
        self.admin_queries.insert(request_id.clone(), tx);
        for n in &waiting {
            self.publish(
                Route::Node(n.clone()),
                Event::SessionQuery {
                    user_id: user.clone(),
                    reply_to: self.node_id.clone(),
                    request_id: request_id.clone(),
                },
            )
            .await;
        }
        let deadline = tokio::time::Instant::now() + wait;
        while !waiting.is_empty() {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some((node, sessions))) => {
                    waiting.remove(&node);
                    out.extend(sessions);
                }
                _ => break,
            }
        }
        self.admin_queries.remove(&request_id);
        (out, waiting.into_iter().collect())
    }

    /// Whether the user counts as an admin.
    pub fn is_admin(&self, username: &str) -> bool {
        self.settings.admin.usernames.iter().any(|u| u == username)
    }
}
