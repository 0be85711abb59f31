//! The fan-out service: how a frame reaches its recipients' sockets, here
//! and on other nodes, and how a message nobody received live becomes a
//! notification job. The room pipeline and the broker bridge use it; nothing
//! in it waits for the broker.
//!
//! - Local recipients: the frame goes to their session actors at once.
//! - Remote recipients: a [`Batch`] groups what one pipeline batch delivers
//!   per destination node (frames in order) and hands each group to that
//!   node's link, a task that publishes one [`Event::DeliverBatch`] per group
//!   (coalescing groups that queued up meanwhile) with at most
//!   [`MAX_IN_FLIGHT`] publisher confirms outstanding.
//! - When a link cannot take a group (its queue is full because RabbitMQ is
//!   slow or away) or a publish fails, the frames are dropped and counted
//!   (`chatd_fanout_dropped_total`), and the link sends the destination a
//!   `Resync` as soon as it can: its sessions re-read the store, which holds
//!   every dropped message (they were stored before the fan-out). A later
//!   message of the same room also fills the gap on arrival.
//! - Notification jobs go to one publishing task through a bounded queue.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use tokio::sync::mpsc;

use super::session::SessionMsg;
use super::Hub;
use crate::broker::{Broker, BrokerError, Confirm, DeliverItem, Envelope, Event, NotifyJob, Route};
use crate::domain::{RoomId, Seq, SessionId, UserId};
use crate::protocol::Frame;

/// Most publishes to one node whose confirm is outstanding.
pub const MAX_IN_FLIGHT: usize = 8;
/// Groups waiting for a node's link; beyond, deliveries are dropped.
const LINK_QUEUE: usize = 1024;
/// Most frames coalesced into one publish.
const MAX_FRAMES_PER_PUBLISH: usize = 2048;
/// Least time between two resyncs asked of one node.
const RESYNC_GAP: Duration = Duration::from_millis(500);
/// Notification jobs waiting to be published; beyond, they are dropped.
const NOTIFY_QUEUE: usize = 16_384;

/// The fan-out of one node (held by the [`Hub`]).
pub struct Fanout {
    node_id: String,
    broker: Arc<dyn Broker>,
    links: DashMap<String, Link>,
    notify: OnceLock<mpsc::Sender<NotifyJob>>,
}

/// The way to one other node.
struct Link {
    tx: mpsc::Sender<Vec<DeliverItem>>,
    /// Something for that node was dropped: ask it to resync.
    resync: Arc<AtomicBool>,
}

impl Fanout {
    /// The fan-out of node `node_id` over `broker`; its tasks start on first use.
    pub fn new(node_id: String, broker: Arc<dyn Broker>) -> Self {
        Self {
            node_id,
            broker,
            links: DashMap::new(),
            notify: OnceLock::new(),
        }
    }

    /// Hands a group of frames to `node`'s link, or drops it (counted, the
    /// node asked to resync) if the link's queue is full.
    fn send_to_node(&self, node: &str, items: Vec<DeliverItem>) {
        let n = items.len() as u64;
        let link = self
            .links
            .entry(node.to_owned())
            .or_insert_with(|| self.start_link(node));
        match link.tx.try_send(items) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                metrics::counter!("chatd_fanout_dropped_total", "why" => "queue_full").increment(n);
                link.resync.store(true, Ordering::Release);
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                // The link ended (cannot happen while it is in the map).
                metrics::counter!("chatd_fanout_dropped_total", "why" => "closed").increment(n);
            }
        }
    }

    fn start_link(&self, node: &str) -> Link {
        let (tx, rx) = mpsc::channel(LINK_QUEUE);
        let resync = Arc::new(AtomicBool::new(false));
        tokio::spawn(run_link(
            self.broker.clone(),
            self.node_id.clone(),
            node.to_owned(),
            rx,
            resync.clone(),
        ));
        Link { tx, resync }
    }

    /// A node is gone: its link ends once its queue is published.
    pub fn forget_node(&self, node: &str) {
        self.links.remove(node);
    }

    /// Queues a notification job for the pool (never waits).
    pub fn notify(&self, job: NotifyJob) {
        let tx = self.notify.get_or_init(|| {
            let (tx, rx) = mpsc::channel(NOTIFY_QUEUE);
            tokio::spawn(run_notify(self.broker.clone(), self.node_id.clone(), rx));
            tx
        });
        if tx.try_send(job).is_err() {
            metrics::counter!("chatd_fanout_dropped_total", "why" => "notify_queue_full")
                .increment(1);
        }
    }
}

/// What one pipeline batch (or one typing/receipt frame) fans out: local
/// sessions get each frame as it is added, other nodes one group each when
/// the batch is sent.
pub struct Batch<'h> {
    hub: &'h Hub,
    remote: HashMap<String, Vec<DeliverItem>>,
}

impl<'h> Batch<'h> {
    /// An empty batch.
    pub fn new(hub: &'h Hub) -> Self {
        Self {
            hub,
            remote: HashMap::new(),
        }
    }

    /// Delivers `frame` to `users` (local sessions now, remote nodes with
    /// [`Batch::send`]). Returns the users with no socket anywhere.
    pub fn add(
        &mut self,
        users: &[UserId],
        room_id: &RoomId,
        seq: Option<Seq>,
        exclude: Option<&SessionId>,
        frame: &Frame,
    ) -> Vec<UserId> {
        let hub = self.hub;
        let mut offline = Vec::new();
        // Index of this frame's item in each node's group, if any yet.
        let mut here: HashMap<&str, usize> = HashMap::new();
        let mut remote_nodes: Vec<(String, UserId)> = Vec::new();
        for u in users {
            let mut reached = false;
            if let Some(s) = hub.sessions.get(u) {
                let _ = s.cast(SessionMsg::Deliver {
                    room_id: room_id.clone(),
                    seq,
                    exclude: exclude.cloned(),
                    frame: frame.clone(),
                });
                reached = true;
            }
            hub.directory.for_each_remote(u, &hub.node_id, |n| {
                remote_nodes.push((n.to_owned(), u.clone()));
                reached = true;
            });
            if !reached {
                offline.push(u.clone());
            }
        }
        for (node, user) in &remote_nodes {
            let group = self.remote.entry(node.clone()).or_default();
            let i = *here.entry(node.as_str()).or_insert_with(|| {
                group.push(DeliverItem {
                    users: Vec::new(),
                    room_id: room_id.clone(),
                    seq,
                    exclude: exclude.cloned(),
                    frame: frame.as_str().to_owned(),
                });
                group.len() - 1
            });
            group[i].users.push(user.clone());
        }
        offline
    }

    /// Hands each node's group to its link: one publish per destination node.
    pub fn send(self) {
        for (node, items) in self.remote {
            metrics::counter!("chatd_broker_deliver_published_total").increment(1);
            self.hub.fanout.send_to_node(&node, items);
        }
    }
}

/// Hands the frames of a [`Event::DeliverBatch`] to local sessions, in order.
pub fn deliver_local(hub: &Hub, items: &[DeliverItem]) {
    for item in items {
        let frame = Frame::from(item.frame.clone());
        for u in &item.users {
            if let Some(s) = hub.sessions.get(u) {
                let _ = s.cast(SessionMsg::Deliver {
                    room_id: item.room_id.clone(),
                    seq: item.seq,
                    exclude: item.exclude.clone(),
                    frame: frame.clone(),
                });
            }
        }
    }
}

/// What an outstanding publish carried.
enum Carried {
    Frames(usize),
    Resync,
}

/// Publishes `dest`'s groups in order, confirms pipelined, and asks `dest`
/// to resync after anything was dropped.
async fn run_link(
    broker: Arc<dyn Broker>,
    own: String,
    dest: String,
    mut rx: mpsc::Receiver<Vec<DeliverItem>>,
    resync: Arc<AtomicBool>,
) {
    let route = Route::Node(dest.clone());
    let mut inflight: FuturesUnordered<_> = FuturesUnordered::new();
    let mut last_resync: Option<Instant> = None;
    let mut open = true;
    while open || !inflight.is_empty() {
        let want_resync = resync.load(Ordering::Acquire);
        tokio::select! {
            Some((r, carried)) = inflight.next(), if !inflight.is_empty() => {
                settle(&r, &carried, &dest, &resync);
            }
            got = rx.recv(), if open && inflight.len() < MAX_IN_FLIGHT => {
                let Some(mut items) = got else {
                    open = false;
                    continue;
                };
                while items.len() < MAX_FRAMES_PER_PUBLISH {
                    match rx.try_recv() {
                        Ok(more) => items.extend(more),
                        Err(_) => break,
                    }
                }
                let n = items.len();
                let env = Envelope::new(&own, Event::DeliverBatch { items });
                match broker.publish_start(route.clone(), env).await {
                    Ok(c) => inflight.push(tagged(c, Carried::Frames(n))),
                    Err(e) => settle(&Err(e), &Carried::Frames(n), &dest, &resync),
                }
            }
            _ = tokio::time::sleep(RESYNC_GAP), if want_resync => {}
        }
        if open
            && resync.load(Ordering::Acquire)
            && inflight.len() < MAX_IN_FLIGHT
            && last_resync.is_none_or(|t| t.elapsed() >= RESYNC_GAP)
        {
            resync.store(false, Ordering::Release);
            last_resync = Some(Instant::now());
            let env = Envelope::new(&own, Event::Resync { node: own.clone() });
            match broker.publish_start(route.clone(), env).await {
                Ok(c) => inflight.push(tagged(c, Carried::Resync)),
                Err(e) => settle(&Err(e), &Carried::Resync, &dest, &resync),
            }
        }
    }
}

async fn tagged(c: Confirm, carried: Carried) -> (Result<(), BrokerError>, Carried) {
    (c.await, carried)
}

/// Accounts for a publish's outcome.
fn settle(r: &Result<(), BrokerError>, carried: &Carried, dest: &str, resync: &AtomicBool) {
    match r {
        Ok(()) => {}
        // No queue for that node (gone for good): nobody to deliver to.
        Err(BrokerError::Unroutable(e)) => {
            tracing::debug!(node = %dest, error = %e, "broker returned a delivery");
            metrics::counter!("chatd_broker_unroutable_total").increment(1);
        }
        Err(e) => {
            if let Carried::Frames(n) = carried {
                tracing::debug!(node = %dest, error = %e, frames = n, "fan-out publish failed; the node resyncs from the store");
                metrics::counter!("chatd_fanout_dropped_total", "why" => "publish_failed")
                    .increment(*n as u64);
            }
            resync.store(true, Ordering::Release);
        }
    }
}

/// Publishes notification jobs one by one (they are rare: only messages
/// that some recipient did not get live).
async fn run_notify(broker: Arc<dyn Broker>, own: String, mut rx: mpsc::Receiver<NotifyJob>) {
    while let Some(job) = rx.recv().await {
        let env = Envelope::new(&own, Event::Notify(job));
        if let Err(e) = broker.publish(Route::Notify, env).await {
            tracing::debug!(error = %e, "notification job not published");
            metrics::counter!("chatd_fanout_dropped_total", "why" => "notify_failed").increment(1);
        }
    }
}
