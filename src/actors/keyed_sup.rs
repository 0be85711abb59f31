//! One generic keyed supervisor: one child actor per key (a room, a user),
//! started on demand and restarted (one-for-one) when it fails or an
//! operator stops it; a child that ends for a [`StopReason`] that means "not
//! needed" (idle, empty, shutdown) stays down until its key is used again.
//!
//! The supervisor owns its registry: it is the only writer. Everyone else
//! holds a [`Keyed`] handle (cloneable, cheap) to read it (`get`, `keys`,
//! ...), to reach a child (`get_or_spawn`, `send`, `inspect`) and to tell the
//! supervisor that a child leaves (`retire`). Rooms ([`RoomChild`]) and
//! sessions ([`SessionChild`]) are two uses of it.

use std::fmt::Display;
use std::future::Future;
use std::hash::Hash;
use std::marker::PhantomData;
use std::sync::{Arc, RwLock};

use dashmap::DashMap;
use ractor::{
    Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, ActorStatus, MessagingErr,
    RpcReplyPort, SupervisionEvent,
};

use super::{ActorError, Hub, CALL_TIMEOUT};

/// Why a child stopped on its own (carried as ractor's stop reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// A room without activity for `rooms.idle_secs`.
    Idle,
    /// A session whose last socket closed.
    Empty,
    /// The node is shutting down.
    Shutdown,
    /// An operator stopped it (`POST /admin/v1/actors/{id}/stop`): restarted.
    Operator,
}

impl StopReason {
    /// The text ractor carries.
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::Idle => "idle",
            StopReason::Empty => "empty",
            StopReason::Shutdown => "shutdown",
            StopReason::Operator => "stopped by operator",
        }
    }

    /// The reason a stop text stands for, if it is one of ours.
    pub fn parse(s: &str) -> Option<Self> {
        [
            StopReason::Idle,
            StopReason::Empty,
            StopReason::Shutdown,
            StopReason::Operator,
        ]
        .into_iter()
        .find(|r| r.as_str() == s)
    }

    /// Whether a child that stopped for this reason stays down.
    fn is_final(self) -> bool {
        !matches!(self, StopReason::Operator)
    }
}

impl From<StopReason> for String {
    fn from(r: StopReason) -> Self {
        r.as_str().to_owned()
    }
}

/// What a keyed supervisor needs to know of its children.
pub trait Child: Send + Sync + 'static {
    /// What a child serves.
    type Key: Clone + Eq + Hash + Display + Send + Sync + 'static;
    /// The child's messages.
    type Msg: ractor::Message;
    /// Label for logs and `chatd_actor_restarts_total{kind}`.
    const KIND: &'static str;
    /// Starts the child of `key` linked to `sup`; `restart` when it replaces
    /// one that ended.
    fn spawn(
        hub: Arc<Hub>,
        key: Self::Key,
        restart: bool,
        sup: ActorCell,
    ) -> impl Future<Output = Result<ActorRef<Self::Msg>, ActorError>> + Send;
    /// The registry's size changed (a gauge).
    fn count(n: usize);
}

/// Messages of a keyed supervisor.
pub enum SupMsg<C: Child> {
    /// The key's child, started if needed.
    GetOrSpawn(C::Key, RpcReplyPort<Result<ActorRef<C::Msg>, ActorError>>),
    /// The child `ActorId` of the key leaves the registry (it stops soon).
    Retire(C::Key, ActorId),
    /// Forget every child (the node is shutting down).
    Clear,
}

struct Shared<C: Child> {
    children: DashMap<C::Key, ActorRef<C::Msg>>,
    sup: RwLock<Option<ActorRef<SupMsg<C>>>>,
}

/// A handle on a keyed supervisor and its registry (cloneable).
pub struct Keyed<C: Child> {
    shared: Arc<Shared<C>>,
}

impl<C: Child> Clone for Keyed<C> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<C: Child> Default for Keyed<C> {
    fn default() -> Self {
        Self {
            shared: Arc::new(Shared {
                children: DashMap::new(),
                sup: RwLock::new(None),
            }),
        }
    }
}

fn is_alive<M>(a: &ActorRef<M>) -> bool {
    matches!(
        a.get_status(),
        ActorStatus::Running | ActorStatus::Starting | ActorStatus::Upgrading
    )
}

impl<C: Child> Keyed<C> {
    /// The registered child of `key`, if any.
    pub fn actor(&self, key: &C::Key) -> Option<ActorRef<C::Msg>> {
        self.shared.children.get(key).map(|a| a.clone())
    }

    /// The registered child of `key`, borrowed from the registry (do not
    /// hold it across an `.await`; [`Keyed::actor`] clones it).
    pub fn get(
        &self,
        key: &C::Key,
    ) -> Option<dashmap::mapref::one::Ref<'_, C::Key, ActorRef<C::Msg>>> {
        self.shared.children.get(key)
    }

    /// Whether `key` has a registered child.
    pub fn contains_key(&self, key: &C::Key) -> bool {
        self.shared.children.contains_key(key)
    }

    /// Registered children.
    pub fn len(&self) -> usize {
        self.shared.children.len()
    }

    /// No registered child.
    pub fn is_empty(&self) -> bool {
        self.shared.children.is_empty()
    }

    /// Keys of the registered children.
    pub fn keys(&self) -> Vec<C::Key> {
        self.shared
            .children
            .iter()
            .map(|e| e.key().clone())
            .collect()
    }

    /// The registered children.
    pub fn actors(&self) -> Vec<ActorRef<C::Msg>> {
        self.shared
            .children
            .iter()
            .map(|e| e.value().clone())
            .collect()
    }

    /// The key served by the actor `id`, if it is a registered child.
    pub fn key_of(&self, id: ActorId) -> Option<C::Key> {
        self.shared
            .children
            .iter()
            .find(|e| e.value().get_id() == id)
            .map(|e| e.key().clone())
    }

    /// The supervisor, once started.
    pub fn supervisor(&self) -> Option<ActorRef<SupMsg<C>>> {
        self.shared
            .sup
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_supervisor(&self, sup: ActorRef<SupMsg<C>>) {
        *self.shared.sup.write().unwrap_or_else(|e| e.into_inner()) = Some(sup);
    }

    /// The key's child, started if needed (`NotFound` if the key names
    /// nothing that exists).
    pub async fn get_or_spawn(&self, key: &C::Key) -> Result<ActorRef<C::Msg>, ActorError> {
        if let Some(a) = self.actor(key).filter(is_alive) {
            return Ok(a);
        }
        let sup = self.supervisor().ok_or_else(|| {
            ActorError::Unavailable(format!("{} supervisor not started", C::KIND))
        })?;
        ractor::call!(sup, SupMsg::GetOrSpawn, key.clone())
            .map_err(|e| ActorError::Unavailable(e.to_string()))?
    }

    /// Sends to the key's child, starting it if needed and once more if it
    /// stopped meanwhile.
    pub async fn send(&self, key: &C::Key, msg: C::Msg) -> Result<(), ActorError> {
        let a = self.get_or_spawn(key).await?;
        match a.cast(msg) {
            Ok(()) => Ok(()),
            Err(MessagingErr::SendErr(msg)) => {
                self.retire(key.clone(), a.get_id());
                let a = self.get_or_spawn(key).await?;
                a.cast(msg)
                    .map_err(|e| ActorError::Unavailable(e.to_string()))
            }
            Err(e) => Err(ActorError::Unavailable(e.to_string())),
        }
    }

    /// Asks the key's registered child (never starts one); `None` if there
    /// is none or it did not answer within [`CALL_TIMEOUT`].
    pub async fn inspect<R: Send + 'static>(
        &self,
        key: &C::Key,
        ask: impl FnOnce(RpcReplyPort<R>) -> C::Msg,
    ) -> Option<R> {
        let a = self.actor(key)?;
        match a.call(ask, Some(CALL_TIMEOUT)).await {
            Ok(ractor::rpc::CallResult::Success(r)) => Some(r),
            _ => None,
        }
    }

    /// The child `id` of `key` leaves the registry (it is about to stop);
    /// a later use of the key starts a new one.
    pub fn retire(&self, key: C::Key, id: ActorId) {
        if let Some(sup) = self.supervisor() {
            let _ = sup.cast(SupMsg::Retire(key, id));
        }
    }

    /// The supervisor forgets every child (shutdown: they are stopping).
    pub fn clear(&self) {
        if let Some(sup) = self.supervisor() {
            let _ = sup.cast(SupMsg::Clear);
        }
    }
}

/// The supervisor actor for children `C`.
pub struct KeyedSupervisor<C>(PhantomData<fn() -> C>);

impl<C> Default for KeyedSupervisor<C> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

/// State: the hub (children's arguments) and the registry it writes.
pub struct SupState<C: Child> {
    hub: Arc<Hub>,
    registry: Keyed<C>,
    shutting_down: bool,
}

async fn spawn_child<C: Child>(
    st: &SupState<C>,
    myself: &ActorRef<SupMsg<C>>,
    key: C::Key,
    restart: bool,
) -> Result<ActorRef<C::Msg>, ActorError> {
    if let Some(a) = st.registry.actor(&key).filter(is_alive) {
        return Ok(a);
    }
    let a = C::spawn(st.hub.clone(), key.clone(), restart, myself.get_cell()).await?;
    st.registry.shared.children.insert(key, a.clone());
    C::count(st.registry.len());
    Ok(a)
}

impl<C: Child> Actor for KeyedSupervisor<C> {
    type Msg = SupMsg<C>;
    type State = SupState<C>;
    type Arguments = (Arc<Hub>, Keyed<C>);

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        (hub, registry): Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        // A restarted supervisor starts with no children (they were linked
        // to the old one and stopped with it).
        registry.shared.children.clear();
        registry.set_supervisor(myself);
        Ok(SupState {
            hub,
            registry,
            shutting_down: false,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupMsg::GetOrSpawn(key, reply) => {
                let r = spawn_child(st, &myself, key, false).await;
                let _ = reply.send(r);
            }
            SupMsg::Retire(key, id) => {
                st.registry
                    .shared
                    .children
                    .remove_if(&key, |_, v| v.get_id() == id);
                C::count(st.registry.len());
            }
            SupMsg::Clear => {
                st.shutting_down = true;
                st.registry.shared.children.clear();
                C::count(0);
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
        let key = st.registry.key_of(id);
        if let Some(k) = &key {
            st.registry
                .shared
                .children
                .remove_if(k, |_, v| v.get_id() == id);
            C::count(st.registry.len());
        }
        let reason = (!failed).then(|| StopReason::parse(&why)).flatten();
        if reason.is_some_and(StopReason::is_final)
            || st.shutting_down
            || st.hub.shutdown.is_cancelled()
        {
            return Ok(());
        }
        // Failed, killed or stopped by an operator while registered:
        // one-for-one restart. The new actor reloads its state.
        if let Some(key) = key {
            tracing::warn!(kind = C::KIND, key = %key, failed, reason = %why, "actor ended; restarting");
            metrics::counter!("chatd_actor_restarts_total", "kind" => C::KIND).increment(1);
            if let Err(e) = spawn_child(st, &myself, key.clone(), true).await {
                tracing::warn!(kind = C::KIND, key = %key, error = %e, "restart failed; it starts on next use");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_reasons_round_trip_and_only_operator_stops_restart() {
        for r in [
            StopReason::Idle,
            StopReason::Empty,
            StopReason::Shutdown,
            StopReason::Operator,
        ] {
            assert_eq!(StopReason::parse(r.as_str()), Some(r));
        }
        assert_eq!(StopReason::parse("boom"), None);
        assert!(StopReason::Idle.is_final());
        assert!(!StopReason::Operator.is_final());
    }
}
