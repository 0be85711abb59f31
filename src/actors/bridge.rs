//! The broker bridge: consumes this node's queue and hands each event to
//! the local actors; publishes this node's heartbeat (`[cluster]
//! heartbeat_secs`) and counts nodes silent for `node_timeout_secs` as gone.
//! A delivery is acked after it was handled. A node that reconnected to the
//! broker asks every node (itself included) to let its sessions re-read the
//! store once heartbeats were exchanged again (`resync`), and a node that
//! counts another as gone does the same, so live copies lost in an outage or
//! with a dead node still arrive.

use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};

use super::session::SessionMsg;
use super::{Hub, NodeInfo};
use crate::broker::{Delivery, Event, Queue, Route};
use crate::domain::now_rfc3339;
use crate::protocol::ServerFrame;

/// Bridge actor; its work runs in tasks it owns.
pub struct BrokerBridge;

/// State: the consumer and heartbeat tasks.
pub struct BridgeState {
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Actor for BrokerBridge {
    type Msg = ();
    type State = BridgeState;
    type Arguments = Arc<Hub>;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        hub: Arc<Hub>,
    ) -> Result<Self::State, ActorProcessingErr> {
        let mut rx = hub.broker.consume(Queue::Node(hub.node_id.clone())).await?;
        let consumer = tokio::spawn({
            let hub = hub.clone();
            async move {
                while let Some(d) = rx.recv().await {
                    handle(&hub, d).await;
                }
            }
        });
        let heartbeat = tokio::spawn({
            let hub = hub.clone();
            async move {
                let secs = hub.settings.cluster.heartbeat_secs.max(1);
                let mut every = tokio::time::interval(Duration::from_secs(secs));
                let mut epoch = hub.broker.epoch();
                let mut resync_next = false;
                loop {
                    every.tick().await;
                    heartbeat(&hub).await;
                    if resync_next {
                        // A heartbeat after reconnecting, every node knows
                        // again who is where: all re-read the store for
                        // what this node's outage kept from crossing.
                        hub.publish(
                            Route::AllNodes,
                            Event::Resync {
                                node: hub.node_id.clone(),
                            },
                        )
                        .await;
                    }
                    let now = hub.broker.epoch();
                    resync_next = now != epoch;
                    epoch = now;
                }
            }
        });
        Ok(BridgeState {
            tasks: vec![consumer, heartbeat],
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        for t in st.tasks.drain(..) {
            t.abort();
        }
        Ok(())
    }
}

async fn heartbeat(hub: &Hub) {
    let users = hub.sessions.keys();
    hub.publish(
        Route::AllNodes,
        Event::Heartbeat {
            node: hub.node_id.clone(),
            address: hub.address.clone(),
            started_at: hub.started_at.clone(),
            sessions: users.len(),
            rooms: hub.rooms.len(),
            users,
        },
    )
    .await;
    // Nodes silent for too long are gone: their users are offline.
    let dead = hub
        .nodes
        .silent(&hub.node_id, hub.settings.cluster.node_timeout_secs);
    for node in dead {
        tracing::warn!(node = %node, "node missed its heartbeats; its sessions count as gone");
        node_gone(hub, &node).await;
    }
}

async fn node_gone(hub: &Hub, node: &str) {
    hub.nodes.remove(node);
    hub.fanout.forget_node(node);
    for (user, online) in hub.directory.replace_node(node, &[]) {
        let now = now_rfc3339();
        // The dead node cannot record `last_seen`; the survivors do.
        if let Err(e) = hub.stores.users.set_last_seen(&user, &now).await {
            tracing::warn!(error = %e, "could not store last_seen");
        }
        presence_changed(hub, &user, online, Some(now), None).await;
    }
    // It may have stored messages it never forwarded.
    settle_sessions(hub);
}

/// Asks every local session to push what the store has beyond what it
/// pushed (live copies that did not cross the broker).
fn settle_sessions(hub: &Hub) {
    for s in hub.sessions.actors() {
        let _ = s.cast(SessionMsg::Settle);
    }
}

/// Tells local contacts that `user` went online or offline.
async fn presence_changed(
    hub: &Hub,
    user: &crate::domain::UserId,
    online: bool,
    last_seen: Option<String>,
    audience: Option<&[crate::domain::UserId]>,
) {
    let audience = match audience {
        Some(a) => a.to_vec(),
        None => hub.stores.rooms.contacts(user).await.unwrap_or_default(),
    };
    let frame = ServerFrame::Presence {
        user_id: user,
        online,
        last_seen: last_seen.as_deref(),
    }
    .encode();
    for u in &audience {
        if let Some(s) = hub.sessions.get(u) {
            let _ = s.cast(SessionMsg::Frame(frame.clone()));
        }
    }
}

async fn handle(hub: &Arc<Hub>, d: Delivery) {
    let from = &d.envelope.from;
    if from != &hub.node_id
        && !matches!(d.envelope.event, Event::NodeLeft { .. })
        && hub.nodes.track(from)
    {
        // A node heard of before its first heartbeat (its presence events
        // fill the directory): tracked from now, so that it times out if it
        // dies before that heartbeat. It may also be a node this one had
        // counted as gone (a backlog delayed its heartbeats) and stopped
        // routing to meanwhile: its sessions settle from the store.
        hub.publish(
            Route::Node(from.clone()),
            Event::Resync {
                node: hub.node_id.clone(),
            },
        )
        .await;
    }
    match &d.envelope.event {
        Event::Deliver {
            users,
            room_id,
            seq,
            exclude,
            frame,
        } => super::fanout::deliver_local(
            hub,
            &[crate::broker::DeliverItem {
                users: users.clone(),
                room_id: room_id.clone(),
                seq: *seq,
                exclude: exclude.clone(),
                frame: frame.clone(),
            }],
        ),
        Event::DeliverBatch { items } => super::fanout::deliver_local(hub, items),
        Event::Presence {
            user_id,
            node,
            online,
            last_seen,
            audience,
        } => {
            if hub.directory.set(user_id, node, *online) {
                presence_changed(hub, user_id, *online, last_seen.clone(), Some(audience)).await;
            }
        }
        // The publishing node applied these itself before publishing.
        Event::RoomChanged { room_id } if d.envelope.from != hub.node_id => {
            hub.apply_room_changed(room_id, false).await;
        }
        Event::BlocksChanged { user_id } if d.envelope.from != hub.node_id => {
            hub.apply_blocks_changed(user_id, false).await;
        }
        Event::RoomChanged { .. } | Event::BlocksChanged { .. } => {}
        Event::Heartbeat {
            node,
            address,
            started_at,
            sessions,
            rooms,
            users,
        } => {
            hub.nodes.insert(
                node.clone(),
                NodeInfo {
                    id: node.clone(),
                    address: address.clone(),
                    started_at: started_at.clone(),
                    last_heartbeat: now_rfc3339(),
                    sessions: *sessions,
                    rooms: *rooms,
                },
            );
            if node != &hub.node_id {
                for (user, online) in hub.directory.replace_node(node, users) {
                    let last_seen = (!online).then(now_rfc3339);
                    presence_changed(hub, &user, online, last_seen, None).await;
                }
            }
        }
        Event::NodeLeft { node } => {
            if node != &hub.node_id {
                node_gone(hub, node).await;
            }
        }
        Event::Resync { node } => {
            // Sent after a broker reconnection, or when the fan-out dropped
            // deliveries for this node (broker slow or away).
            tracing::debug!(node = %node, "resync asked; sessions re-read the store");
            settle_sessions(hub);
        }
        Event::Disconnect { user_id } => {
            if let Some(s) = hub.sessions.get(user_id) {
                let _ = s.cast(SessionMsg::Disconnect);
            }
        }
        Event::SessionQuery {
            user_id,
            reply_to,
            request_id,
        } => {
            let sessions = hub
                .inspect_local_session(user_id)
                .await
                .into_iter()
                .collect();
            hub.publish(
                Route::Node(reply_to.clone()),
                Event::SessionReport {
                    request_id: request_id.clone(),
                    node: hub.node_id.clone(),
                    sessions,
                },
            )
            .await;
        }
        Event::SessionReport {
            request_id,
            node,
            sessions,
        } => {
            if let Some(tx) = hub.admin_queries.get(request_id) {
                let _ = tx.send((node.clone(), sessions.clone()));
            }
        }
        Event::Notify(_) => {}
    }
    d.ack().await;
}
