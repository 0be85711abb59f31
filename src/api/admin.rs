//! `/admin/v1`: the live actors of this node and the cluster (admin role).

use axum::extract::State;
use axum::http::StatusCode;
use ractor::ActorCell;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{AdminUser, ApiResult, AppState, Error, ErrorBody, Json, Path};
use crate::actors::room::RoomInfo;
use crate::actors::CALL_TIMEOUT;
use crate::cluster::{NodeInfo, SessionInfo};
use crate::domain::{RoomId, UserId};

/// Admin routes.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(cluster))
        .routes(routes!(actors))
        .routes(routes!(stop_actor))
        .routes(routes!(sessions))
        .routes(routes!(disconnect))
        .routes(routes!(room))
}

#[derive(Serialize, ToSchema)]
struct Cluster {
    /// The node that answered.
    node_id: String,
    nodes: Vec<NodeInfo>,
}

/// The nodes of the cluster with their session and room counts.
#[utoipa::path(get, path = "/cluster", tag = "admin", security(("bearer" = [])),
    responses(
        (status = 200, description = "the cluster", body = Cluster),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 403, description = "`forbidden`: not an admin", body = ErrorBody),
    ))]
async fn cluster(State(st): State<AppState>, _a: AdminUser) -> Json<Cluster> {
    let hub = &st.hub;
    let mut nodes: Vec<NodeInfo> = hub.nodes.all();
    if !nodes.iter().any(|n| n.id == hub.node_id) {
        nodes.push(NodeInfo {
            id: hub.node_id.clone(),
            address: hub.address.clone(),
            started_at: hub.started_at.clone(),
            last_heartbeat: crate::domain::now_rfc3339(),
            sessions: hub.sessions.len(),
            rooms: hub.rooms.len(),
        });
    }
    for n in nodes.iter_mut().filter(|n| n.id == hub.node_id) {
        n.sessions = hub.sessions.len();
        n.rooms = hub.rooms.len();
    }
    nodes.sort_by(|a, b| a.id.cmp(&b.id));
    Json(Cluster {
        node_id: hub.node_id.clone(),
        nodes,
    })
}

/// One actor in the supervision tree.
#[derive(Serialize, ToSchema)]
pub struct ActorNode {
    pub id: String,
    pub name: Option<String>,
    pub kind: String,
    pub status: String,
    /// ractor does not expose mailbox lengths; `null` where unknown.
    pub mailbox_len: Option<usize>,
    /// What the actor serves: a user id, a room id.
    pub subject: Option<String>,
    #[schema(no_recursion)]
    pub children: Vec<ActorNode>,
}

fn describe(st: &AppState, cell: &ActorCell) -> ActorNode {
    let id = cell.get_id();
    let name = cell.get_name();
    let mut subject = None;
    let kind = if let Some(user) = st.hub.sessions.key_of(id) {
        subject = Some(user.to_string());
        "session".to_owned()
    } else if let Some(room) = st.hub.rooms.key_of(id) {
        subject = Some(room.to_string());
        "room".to_owned()
    } else {
        match name.as_deref().and_then(|n| n.split('@').next()) {
            Some("root") => "root_supervisor",
            Some("sessions") => "session_supervisor",
            Some("rooms") => "room_supervisor",
            Some("broker-bridge") => "broker_bridge",
            Some("notifier") => "notification_pool",
            _ => "actor",
        }
        .to_owned()
    };
    let mut children: Vec<ActorNode> = cell
        .get_children()
        .iter()
        .map(|c| describe(st, c))
        .collect();
    children.sort_by(|a, b| a.id.cmp(&b.id));
    ActorNode {
        id: id.to_string(),
        name,
        kind,
        status: format!("{:?}", cell.get_status()).to_lowercase(),
        mailbox_len: None,
        subject,
        children,
    }
}

fn root(st: &AppState) -> ApiResult<ActorCell> {
    st.hub
        .root
        .get()
        .cloned()
        .ok_or_else(|| Error::Unavailable("actor tree not started".into()))
}

/// This node's supervision tree, from the root supervisor down.
#[utoipa::path(get, path = "/actors", tag = "admin", security(("bearer" = [])),
    responses(
        (status = 200, description = "the root actor with its children", body = ActorNode),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 403, description = "`forbidden`: not an admin", body = ErrorBody),
        (status = 503, description = "`unavailable`: the tree is not started", body = ErrorBody),
    ))]
async fn actors(State(st): State<AppState>, _a: AdminUser) -> ApiResult<Json<ActorNode>> {
    Ok(Json(describe(&st, &root(&st)?)))
}

fn find(cell: &ActorCell, id: &str) -> Option<ActorCell> {
    if cell.get_id().to_string() == id {
        return Some(cell.clone());
    }
    cell.get_children().iter().find_map(|c| find(c, id))
}

/// Stops one actor of this node; its supervisor restarts it.
#[utoipa::path(post, path = "/actors/{id}/stop", tag = "admin", security(("bearer" = [])),
    params(("id" = String, Path, description = "actor id from GET /admin/v1/actors")),
    responses(
        (status = 204, description = "stop requested"),
        (status = 400, description = "`invalid_request`: the root supervisor", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 403, description = "`forbidden`: not an admin", body = ErrorBody),
        (status = 404, description = "`not_found`: no such actor", body = ErrorBody),
    ))]
async fn stop_actor(
    State(st): State<AppState>,
    _a: AdminUser,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let root = root(&st)?;
    if root.get_id().to_string() == id {
        return Err(Error::bad(
            "the root supervisor cannot be stopped from here",
        ));
    }
    let cell = find(&root, &id).ok_or_else(|| Error::NotFound("no such actor".into()))?;
    tracing::warn!(actor = %id, "stopped by an operator");
    cell.stop(Some(crate::actors::keyed_sup::StopReason::Operator.into()));
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Serialize, ToSchema)]
struct Sessions {
    user_id: UserId,
    sessions: Vec<SessionInfo>,
    /// Nodes that did not answer in time.
    unreachable_nodes: Vec<String>,
}

/// A user's session actors across the cluster.
#[utoipa::path(get, path = "/sessions/{user_id}", tag = "admin", security(("bearer" = [])),
    params(("user_id" = String, Path, description = "user id")),
    responses(
        (status = 200, description = "the sessions; nodes that did not answer are listed", body = Sessions),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 403, description = "`forbidden`: not an admin", body = ErrorBody),
        (status = 404, description = "`not_found`: malformed user id", body = ErrorBody),
    ))]
async fn sessions(
    State(st): State<AppState>,
    _a: AdminUser,
    Path(user): Path<String>,
) -> ApiResult<Json<Sessions>> {
    let user = UserId::parse(&user).map_err(|_| Error::NotFound("no such user".into()))?;
    // Other nodes holding the user answer over the broker; those silent
    // for 2 s are listed as unreachable.
    let (out, unreachable_nodes) = st
        .hub
        .cluster_sessions(&user, std::time::Duration::from_secs(2))
        .await;
    Ok(Json(Sessions {
        user_id: user,
        sessions: out,
        unreachable_nodes,
    }))
}

/// Closes every socket of the user on every node.
#[utoipa::path(post, path = "/sessions/{user_id}/disconnect", tag = "admin", security(("bearer" = [])),
    params(("user_id" = String, Path, description = "user id")),
    responses(
        (status = 204, description = "the user's sockets close"),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 403, description = "`forbidden`: not an admin", body = ErrorBody),
        (status = 404, description = "`not_found`: malformed user id", body = ErrorBody),
    ))]
async fn disconnect(
    State(st): State<AppState>,
    _a: AdminUser,
    Path(user): Path<String>,
) -> ApiResult<StatusCode> {
    let user = UserId::parse(&user).map_err(|_| Error::NotFound("no such user".into()))?;
    st.hub.disconnect_everywhere(&user).await;
    Ok(StatusCode::NO_CONTENT)
}

/// The state of a room actor on this node.
#[utoipa::path(get, path = "/rooms/{room_id}", tag = "admin", security(("bearer" = [])),
    params(("room_id" = String, Path, description = "room id")),
    responses(
        (status = 200, description = "the room actor's state", body = RoomInfo),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 403, description = "`forbidden`: not an admin", body = ErrorBody),
        (status = 404, description = "`not_found`: no active actor for the room on this node", body = ErrorBody),
        (status = 503, description = "`unavailable`: the actor did not answer", body = ErrorBody),
    ))]
async fn room(
    State(st): State<AppState>,
    _a: AdminUser,
    Path(room): Path<String>,
) -> ApiResult<Json<RoomInfo>> {
    let room = RoomId::parse(&room).map_err(|_| Error::NotFound("no such room".into()))?;
    let actor = st
        .hub
        .rooms
        .actor(&room)
        .ok_or_else(|| Error::NotFound("no active actor for this room on this node".into()))?;
    match actor
        .call(crate::actors::room::RoomMsg::Inspect, Some(CALL_TIMEOUT))
        .await
    {
        Ok(ractor::rpc::CallResult::Success(info)) => Ok(Json(info)),
        _ => Err(Error::Unavailable("room actor did not answer".into())),
    }
}
