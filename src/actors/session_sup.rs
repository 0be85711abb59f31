//! The session supervisor: starts a UserSession actor when a user's first
//! socket arrives and restarts one that crashed or was stopped by an
//! operator; the new actor adopts the user's open sockets and resends what
//! they may have missed, so the sockets stay open across the restart.

use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};

use super::session::{SessionActor, SessionMsg};
use super::{ActorError, Hub};
use crate::domain::UserId;

/// Session supervisor actor.
pub struct SessionSupervisor;

/// Messages of the session supervisor.
pub enum SessionSupMsg {
    /// The user's session actor, started if needed.
    GetOrSpawn(
        UserId,
        RpcReplyPort<Result<ActorRef<SessionMsg>, ActorError>>,
    ),
}

/// State: the hub (the registry lives there).
pub struct SessionSupState {
    hub: Arc<Hub>,
}

async fn spawn_session(
    hub: &Arc<Hub>,
    myself: &ActorRef<SessionSupMsg>,
    user: UserId,
    adopt: bool,
) -> Result<ActorRef<SessionMsg>, ActorError> {
    if let Some(s) = hub.sessions.get(&user) {
        return Ok(s.clone());
    }
    let (actor, _) = Actor::spawn_linked(
        None,
        SessionActor,
        (hub.clone(), user.clone(), adopt),
        myself.get_cell(),
    )
    .await
    .map_err(|e| ActorError::Unavailable(e.to_string()))?;
    hub.sessions.insert(user, actor.clone());
    metrics::gauge!("chatd_sessions").set(hub.sessions.len() as f64);
    Ok(actor)
}

impl Actor for SessionSupervisor {
    type Msg = SessionSupMsg;
    type State = SessionSupState;
    type Arguments = Arc<Hub>;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        hub: Arc<Hub>,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(SessionSupState { hub })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SessionSupMsg::GetOrSpawn(user, reply) => {
                let r = spawn_session(&st.hub, &myself, user, false).await;
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
        if why == "empty" || st.hub.shutdown.is_cancelled() {
            return Ok(());
        }
        let id = cell.get_id();
        let user = st
            .hub
            .sessions
            .iter()
            .find(|e| e.value().get_id() == id)
            .map(|e| e.key().clone());
        if let Some(user) = user {
            st.hub.sessions.remove(&user);
            tracing::warn!(user = %user, failed, reason = %why, "session actor ended; restarting");
            metrics::counter!("chatd_actor_restarts_total", "kind" => "session").increment(1);
            if let Err(e) = spawn_session(&st.hub, &myself, user.clone(), true).await {
                tracing::warn!(user = %user, error = %e, "session restart failed; closing its sockets");
                if let Some((_, socks)) = st.hub.sockets.remove(&user) {
                    for s in socks {
                        s.close(1011, "session failed; reconnect");
                    }
                }
            }
        }
        Ok(())
    }
}
