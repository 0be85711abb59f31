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
//! store, broker, the fan-out, the registries of live actors, and the
//! cluster's node table and directory ([`crate::cluster`]).

pub mod audience;
pub mod bridge;
pub mod fanout;
pub mod keyed_sup;
pub mod lifecycle;
pub mod room;
pub mod root;
pub mod session;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use dashmap::DashMap;
use ractor::ActorRef;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use crate::cluster::{Directory, NodeInfo};

use crate::broker::{Broker, Envelope, Event, Route};
use crate::cluster::{NodeTable, Presence};
use crate::config::Settings;
use crate::domain::{RoomId, Seq, SessionId, UserId};
use crate::protocol::Frame;
use crate::socket::SocketHandle;
use crate::store::Stores;

/// How long a caller waits on an actor's answer.
pub const CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

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
    /// Local session actors by user (the session supervisor writes it).
    pub sessions: keyed_sup::Keyed<session::SessionChild>,
    /// Open sockets of local users; a restarted session actor adopts them.
    pub sockets: DashMap<UserId, Vec<SocketHandle>>,
    /// Local room actors by room (the room supervisor writes it).
    pub rooms: keyed_sup::Keyed<room::RoomChild>,
    pub directory: Directory,
    /// Known nodes (this one included), for the cluster view.
    pub nodes: NodeTable,
    /// Cancelled when the node shuts down: sockets stop reading.
    pub shutdown: CancellationToken,
    /// Room pipelines in flight; shutdown waits for them.
    pub pipelines: TaskTracker,
    pub(crate) broker_down: AtomicBool,
    /// Admin session queries waiting for other nodes' reports.
    pub admin_queries:
        DashMap<String, mpsc::UnboundedSender<(String, Vec<crate::cluster::SessionInfo>)>>,
    /// The root supervisor, for the admin tree.
    pub root: OnceLock<ractor::ActorCell>,
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
            sessions: Default::default(),
            sockets: DashMap::new(),
            rooms: Default::default(),
            directory: Directory::default(),
            nodes: NodeTable::default(),
            shutdown: CancellationToken::new(),
            pipelines: TaskTracker::new(),
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
                if self.shutdown.is_cancelled() {
                    // The node is stopping: its broker may be closed already.
                    tracing::debug!(error = %e, "broker publish failed: shutting down");
                } else if !self.broker_down.swap(true, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "broker publish failed; clients recover from the store");
                }
                metrics::counter!("chatd_broker_publish_failed_total").increment(1);
            }
        }
    }

    /// The room actor of `room`, started if needed. `NotFound` if the room
    /// does not exist.
    pub async fn room(&self, room: &RoomId) -> Result<ActorRef<room::RoomMsg>, ActorError> {
        self.rooms.get_or_spawn(room).await
    }

    /// Sends to a room actor, restarting it once if it stopped meanwhile.
    pub async fn send_to_room(&self, room: &RoomId, msg: room::RoomMsg) -> Result<(), ActorError> {
        self.rooms.send(room, msg).await
    }

    /// The session actor of a local user, started if needed.
    pub async fn session(
        &self,
        user: &UserId,
    ) -> Result<ActorRef<session::SessionMsg>, ActorError> {
        self.sessions.get_or_spawn(user).await
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
        let actor = self.rooms.actor(room);
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
        let rooms = self.rooms.actors();
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
        let session = self.sessions.actor(user);
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
    pub async fn inspect_local_session(
        &self,
        user: &UserId,
    ) -> Option<crate::cluster::SessionInfo> {
        self.sessions
            .inspect(user, session::SessionMsg::Inspect)
            .await
    }

    /// The user's session actors across the cluster: this node's, and those
    /// other nodes (from the directory) report over the broker within
    /// `wait`. Returns the sessions and the nodes that did not answer.
    pub async fn cluster_sessions(
        &self,
        user: &UserId,
        wait: std::time::Duration,
    ) -> (Vec<crate::cluster::SessionInfo>, Vec<String>) {
        let mut out: Vec<crate::cluster::SessionInfo> =
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

    /// Closes every socket of `user` on every node (an operator's request).
    pub async fn disconnect_everywhere(&self, user: &UserId) {
        let local = self.sessions.actor(user);
        if let Some(s) = local {
            let _ = s.cast(session::SessionMsg::Disconnect);
        }
        self.publish(
            Route::AllNodes,
            Event::Disconnect {
                user_id: user.clone(),
            },
        )
        .await;
    }
}

impl Presence for Hub {
    fn is_online(&self, user: &UserId) -> bool {
        // This node's own sessions count at once; the directory learns of
        // them when the presence event comes back from the bus.
        self.sessions.contains_key(user) || self.directory.is_online(user)
    }

    fn nodes_of(&self, user: &UserId) -> Vec<String> {
        self.directory.nodes_of(user)
    }
}

impl From<Arc<Hub>> for crate::notify::Services {
    fn from(hub: Arc<Hub>) -> Self {
        Self {
            node_id: hub.node_id.clone(),
            settings: hub.settings.clone(),
            stores: hub.stores.clone(),
            broker: hub.broker.clone(),
            supervisor: hub.root.get().cloned(),
            shutdown: hub.shutdown.clone(),
            presence: hub,
        }
    }
}
