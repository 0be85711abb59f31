//! The root supervisor: starts the session supervisor, the room supervisor
//! and the broker bridge, and restarts any of them that fails (one-for-one).
//! More than [`MAX_RESTARTS`] restarts within [`RESTART_WINDOW`] means
//! something is badly wrong: the root stops and the node shuts down.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, SupervisionEvent};

use super::bridge::BrokerBridge;
use super::keyed_sup::KeyedSupervisor;
use super::room::RoomChild;
use super::session::SessionChild;
use super::Hub;

/// Restarts tolerated within [`RESTART_WINDOW`].
pub const MAX_RESTARTS: usize = 10;
/// Window of the restart budget.
pub const RESTART_WINDOW: Duration = Duration::from_secs(60);

/// Root supervisor actor.
pub struct RootSupervisor;

/// Children of the root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Child {
    Sessions,
    Rooms,
    Bridge,
}

/// State: the children and the recent restarts.
pub struct RootState {
    hub: Arc<Hub>,
    children: Vec<(Child, ActorCell)>,
    restarts: VecDeque<Instant>,
}

async fn start_child(
    hub: &Arc<Hub>,
    root: &ActorRef<()>,
    child: Child,
) -> Result<ActorCell, ActorProcessingErr> {
    let cell = match child {
        Child::Sessions => {
            let (a, _) = Actor::spawn_linked(
                Some(format!("sessions@{}", hub.node_id)),
                KeyedSupervisor::<SessionChild>::default(),
                (hub.clone(), hub.sessions.clone()),
                root.get_cell(),
            )
            .await?;
            a.get_cell()
        }
        Child::Rooms => {
            let (a, _) = Actor::spawn_linked(
                Some(format!("rooms@{}", hub.node_id)),
                KeyedSupervisor::<RoomChild>::default(),
                (hub.clone(), hub.rooms.clone()),
                root.get_cell(),
            )
            .await?;
            a.get_cell()
        }
        Child::Bridge => {
            let (a, _) = Actor::spawn_linked(
                Some(format!("broker-bridge@{}", hub.node_id)),
                BrokerBridge,
                hub.clone(),
                root.get_cell(),
            )
            .await?;
            a.get_cell()
        }
    };
    Ok(cell)
}

impl Actor for RootSupervisor {
    type Msg = ();
    type State = RootState;
    type Arguments = Arc<Hub>;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        hub: Arc<Hub>,
    ) -> Result<Self::State, ActorProcessingErr> {
        let mut children = Vec::new();
        for c in [Child::Sessions, Child::Rooms, Child::Bridge] {
            children.push((c, start_child(&hub, &myself, c).await?));
        }
        Ok(RootState {
            hub,
            children,
            restarts: VecDeque::new(),
        })
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        evt: SupervisionEvent,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, why) = match evt {
            SupervisionEvent::ActorFailed(cell, err) => (cell, err.to_string()),
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                (cell, reason.unwrap_or_default())
            }
            _ => return Ok(()),
        };
        if st.hub.shutdown.is_cancelled() {
            return Ok(());
        }
        let Some(pos) = st
            .children
            .iter()
            .position(|(_, c)| c.get_id() == cell.get_id())
        else {
            return Ok(());
        };
        let (child, _) = st.children.remove(pos);
        let now = Instant::now();
        while st
            .restarts
            .front()
            .is_some_and(|t| now - *t > RESTART_WINDOW)
        {
            st.restarts.pop_front();
        }
        if st.restarts.len() >= MAX_RESTARTS {
            tracing::error!(?child, "restart budget exhausted; stopping the node");
            myself.stop(Some("restart budget exhausted".into()));
            return Ok(());
        }
        st.restarts.push_back(now);
        tracing::error!(?child, reason = %why, "supervisor child ended; restarting");
        match start_child(&st.hub, &myself, child).await {
            Ok(c) => st.children.push((child, c)),
            Err(e) => {
                tracing::error!(?child, error = %e, "restart failed; stopping the node");
                myself.stop(Some("child restart failed".into()));
            }
        }
        Ok(())
    }
}

/// Starts the tree of a node.
pub async fn start(
    hub: Arc<Hub>,
) -> Result<(ActorRef<()>, tokio::task::JoinHandle<()>), ActorProcessingErr> {
    let (root, handle) =
        Actor::spawn(Some(format!("root@{}", hub.node_id)), RootSupervisor, hub).await?;
    Ok((root, handle))
}
