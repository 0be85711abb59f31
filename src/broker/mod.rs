//! The message bus between nodes (and, on one node, between subsystems).
//!
//! One trait, [`Broker`], two backends: [`inprocess`] (the default: queues in
//! this process) and [`rabbitmq`] (a cluster; topology in docs/cluster.md).
//! The actors only see the trait:
//! they publish an [`Envelope`] to a [`Route`] and the bridge consumes this
//! node's queue. Deliveries are acked only after they were handled.

pub mod inprocess;
pub mod rabbitmq;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::domain::{MessageId, RoomId, Seq, SessionId, UserId};

/// Version of the envelope format on the wire.
pub const ENVELOPE_VERSION: u32 = 1;

/// Where a published envelope goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// The queue of one node.
    Node(String),
    /// Every node's queue (including the publisher's own).
    AllNodes,
    /// The shared queue of the notification pool (one consumer gets each job).
    Notify,
}

/// What travels on the bus.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope {
    /// Format version, [`ENVELOPE_VERSION`].
    pub v: u32,
    /// Node that published it.
    pub from: String,
    /// The content.
    pub event: Event,
}

impl Envelope {
    /// Wraps an event published by `from`.
    pub fn new(from: &str, event: Event) -> Self {
        Self {
            v: ENVELOPE_VERSION,
            from: from.to_owned(),
            event,
        }
    }
}

/// The events nodes exchange.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Event {
    /// A server frame for the local sessions of `users`.
    Deliver {
        users: Vec<UserId>,
        room_id: RoomId,
        /// Set for `message` frames (sessions keep per-room order with it).
        seq: Option<Seq>,
        /// The sending socket, which gets an ack instead of the echo.
        exclude: Option<SessionId>,
        /// The serialized frame, sent as is.
        frame: String,
    },
    /// Frames for the local sessions of their users, handed out in this
    /// order: what one room pipeline batch (or several, coalesced) delivers
    /// to one node, in one publish.
    DeliverBatch { items: Vec<DeliverItem> },
    /// A node gained the first or lost the last socket of a user.
    Presence {
        user_id: UserId,
        node: String,
        online: bool,
        last_seen: Option<String>,
        /// Who should hear of it (contacts that do not block the user).
        audience: Vec<UserId>,
    },
    /// Membership of a room changed: room actors reload it.
    RoomChanged { room_id: RoomId },
    /// A user blocked or unblocked someone.
    BlocksChanged { user_id: UserId },
    /// A node is alive; `users` are the users it holds sockets of.
    Heartbeat {
        node: String,
        address: String,
        started_at: String,
        sessions: usize,
        rooms: usize,
        users: Vec<UserId>,
    },
    /// A node is going away cleanly.
    NodeLeft { node: String },
    /// What `node` published or was sent may have been lost (it reconnected
    /// to the broker, or it just met the receiver): the receiving node's
    /// sessions re-read the store.
    Resync { node: String },
    /// An admin asks every node holding `user_id` for its session actor.
    SessionQuery {
        user_id: UserId,
        reply_to: String,
        request_id: String,
    },
    /// A node's answer to a [`Event::SessionQuery`] (empty: no session here).
    SessionReport {
        request_id: String,
        node: String,
        sessions: Vec<crate::cluster::wire::SessionInfo>,
    },
    /// Close every socket of a user.
    Disconnect { user_id: UserId },
    /// A message that some members did not receive live.
    Notify(NotifyJob),
}

/// One frame of an [`Event::DeliverBatch`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeliverItem {
    /// Recipients (those on the destination node get it).
    pub users: Vec<UserId>,
    pub room_id: RoomId,
    /// Set for `message` frames (sessions keep per-room order with it).
    pub seq: Option<Seq>,
    /// The sending socket, which gets an ack instead of the echo.
    pub exclude: Option<SessionId>,
    /// The serialized frame, sent as is.
    pub frame: String,
}

/// The outcome of a publish whose confirm is still on its way (see
/// [`Broker::publish_start`]).
pub type Confirm = Pin<Box<dyn Future<Output = Result<(), BrokerError>> + Send>>;

/// Work for the notification pool: one stored message and the recipients
/// who had no live socket when it was fanned out.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NotifyJob {
    pub room_id: RoomId,
    pub message_id: MessageId,
    pub seq: Seq,
    pub sender_id: UserId,
    pub recipients: Vec<UserId>,
    pub created_at: String,
}

pub use crate::config::BrokerKind;

/// Broker failures.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    /// Not connected (the caller may retry; nothing was published).
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// The broker took the message but no queue was bound to its route
    /// (e.g. the destination node is gone and its queue expired).
    #[error("broker could not route the message: {0}")]
    Unroutable(String),
    /// A consumer was asked for twice, or similar misuse.
    #[error("broker: {0}")]
    Other(String),
}

/// Settles a delivery with the backend.
#[async_trait]
pub trait Acker: Send + Sync {
    /// Handled: remove it from the queue.
    async fn ack(&self);
    /// Not handled: give it back (`requeue`) or drop it.
    async fn nack(&self, requeue: bool);
}

/// One consumed envelope, to be acked after it was handled.
pub struct Delivery {
    /// The content.
    pub envelope: Envelope,
    acker: Option<Box<dyn Acker>>,
}

impl Delivery {
    /// A delivery settled through `acker` (None: nothing to settle).
    pub fn new(envelope: Envelope, acker: Option<Box<dyn Acker>>) -> Self {
        Self { envelope, acker }
    }

    /// Handled.
    pub async fn ack(self) {
        if let Some(a) = self.acker {
            a.ack().await;
        }
    }

    /// Not handled.
    pub async fn nack(self, requeue: bool) {
        if let Some(a) = self.acker {
            a.nack(requeue).await;
        }
    }
}

/// Which queue a consumer reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Queue {
    /// This node's own queue (deliveries, presence, control).
    Node(String),
    /// The notification pool's shared queue.
    Notify,
}

/// The bus.
#[async_trait]
pub trait Broker: Send + Sync {
    /// Publishes; returns once the backend has taken responsibility
    /// (publisher confirm on RabbitMQ).
    async fn publish(&self, route: Route, envelope: Envelope) -> Result<(), BrokerError>;
    /// Hands the envelope to the backend and returns at once with its
    /// confirm as a future: envelopes started one after the other from one
    /// task reach a queue in that order, and their confirms may be awaited
    /// later, several at a time (pipelined). The default waits for the
    /// confirm before returning.
    async fn publish_start(
        &self,
        route: Route,
        envelope: Envelope,
    ) -> Result<Confirm, BrokerError> {
        let r = self.publish(route, envelope).await;
        Ok(Box::pin(std::future::ready(r)))
    }
    /// Starts consuming a queue. Each queue is consumed once per process.
    async fn consume(&self, queue: Queue) -> Result<mpsc::Receiver<Delivery>, BrokerError>;
    /// Connected and able to publish.
    fn is_ready(&self) -> bool;
    /// Which backend this is.
    fn backend(&self) -> BrokerKind;
    /// Backend name (for logs and `/healthz`).
    fn kind(&self) -> &'static str {
        self.backend().as_str()
    }
    /// Counts the backend's (re)connections: a change means the node may
    /// have missed events meanwhile. Constant for backends that never drop.
    fn epoch(&self) -> u64 {
        0
    }
    /// The node leaves for good: remove its queue and disconnect.
    async fn close(&self) {}
}

/// Opens the configured backend.
pub async fn open(
    cfg: &crate::config::BrokerConfig,
    node_id: &str,
) -> Result<Arc<dyn Broker>, BrokerError> {
    match cfg.kind {
        BrokerKind::InProcess => Ok(Arc::new(inprocess::InProcess::new(node_id))),
        BrokerKind::RabbitMq => Ok(Arc::new(
            rabbitmq::RabbitMq::open(&cfg.rabbitmq, node_id).await?,
        )),
    }
}
