//! The room supervisor: starts Room actors on demand and restarts one that
//! failed or was stopped by an operator; a room that idled out stays down
//! until it is used again.

use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};

use super::room::{RoomActor, RoomMsg};
use super::{ActorError, Hub};
use crate::domain::RoomId;
use crate::store::StoreError;

/// Room supervisor actor.
pub struct RoomSupervisor;

/// Messages of the room supervisor.
pub enum RoomSupMsg {
    /// The room's actor, started if needed.
    GetOrSpawn(RoomId, RpcReplyPort<Result<ActorRef<RoomMsg>, ActorError>>),
}

/// State: the hub (the registry lives there).
pub struct RoomSupState {
    hub: Arc<Hub>,
}

async fn spawn_room(
    hub: &Arc<Hub>,
    myself: &ActorRef<RoomSupMsg>,
    room: RoomId,
) -> Result<ActorRef<RoomMsg>, ActorError> {
    if let Some(r) = hub.rooms.get(&room) {
        return Ok(r.clone());
    }
    match Actor::spawn_linked(
        None,
        RoomActor,
        (hub.clone(), room.clone()),
        myself.get_cell(),
    )
    .await
    {
        Ok((actor, _)) => {
            hub.rooms.insert(room, actor.clone());
            metrics::gauge!("chatd_rooms_active").set(hub.rooms.len() as f64);
            Ok(actor)
        }
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

impl Actor for RoomSupervisor {
    type Msg = RoomSupMsg;
    type State = RoomSupState;
    type Arguments = Arc<Hub>;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        hub: Arc<Hub>,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(RoomSupState { hub })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            RoomSupMsg::GetOrSpawn(room, reply) => {
                let r = spawn_room(&st.hub, &myself, room).await;
                let _ = reply.send(r);
            }
        }
        Ok(())
    }

    // ractor's default stops the supervisor when a child ends: never here.
    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        evt: SupervisionEvent,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, why, failed) = match evt {
            SupervisionEvent::ActorFailed(cell, err) => (cell, err.to_string(), true),
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                (cell, reason.unwrap_or_default(), false)
            }
            _ => return Ok(()),
        };
        let id = cell.get_id();
        let room = st
            .hub
            .rooms
            .iter()
            .find(|e| e.value().get_id() == id)
            .map(|e| e.key().clone());
        if why == "idle" || st.hub.shutdown.is_cancelled() {
            metrics::gauge!("chatd_rooms_active").set(st.hub.rooms.len() as f64);
            return Ok(());
        }
        // Failed, killed or stopped by an operator while registered:
        // one-for-one restart. The new actor reloads its state from the store.
        if let Some(room) = room {
            st.hub.rooms.remove(&room);
            tracing::warn!(room = %room, failed, reason = %why, "room actor ended; restarting");
            metrics::counter!("chatd_actor_restarts_total", "kind" => "room").increment(1);
            if let Err(e) = spawn_room(&st.hub, &myself, room.clone()).await {
                tracing::warn!(room = %room, error = %e, "room actor restart failed; it starts on next use");
            }
        }
        Ok(())
    }
}
