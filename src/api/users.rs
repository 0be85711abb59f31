//! `/users`: profiles, search, push devices, notification settings, blocks.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, put};
use axum::Router;
use serde::{Deserialize, Serialize};

use super::{ApiResult, AppState, Error, Json, Path, Query};
use crate::auth::AuthUser;
use crate::domain::UserId;
use crate::store::{NotificationSettings, User};

/// Routes under `/api/v1/users`.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/users", get(search))
        .route("/users/me", get(me))
        .route("/users/{id}", get(profile))
        .route("/users/me/devices", put(put_device))
        .route(
            "/users/me/devices/{token}",
            axum::routing::delete(delete_device),
        )
        .route(
            "/users/me/notification-settings",
            put(put_settings).get(get_settings),
        )
        .route("/users/me/blocks", get(list_blocks))
        .route("/users/me/blocks/{user_id}", put(block).delete(unblock))
}

/// What others see of a user.
#[derive(Serialize)]
pub struct PublicProfile {
    pub id: UserId,
    pub username: String,
    pub display_name: Option<String>,
    pub online: bool,
    pub last_seen: Option<String>,
}

impl PublicProfile {
    /// The profile of `u` with its cluster-wide presence.
    pub fn of(st: &AppState, u: User) -> Self {
        let online = st.hub.sessions.contains_key(&u.id) || st.hub.directory.is_online(&u.id);
        Self {
            online,
            id: u.id,
            username: u.username.as_ref().to_owned(),
            display_name: u.display_name,
            last_seen: u.last_seen,
        }
    }
}

#[derive(Serialize)]
struct Users {
    users: Vec<PublicProfile>,
}

async fn me(State(st): State<AppState>, user: AuthUser) -> ApiResult<Json<User>> {
    let u = st
        .hub
        .stores
        .users
        .user(&user.id)
        .await?
        .ok_or_else(|| Error::Unauthorized("unauthorized", "user no longer exists".into()))?;
    Ok(Json(u))
}

fn parse_user_id(s: &str) -> ApiResult<UserId> {
    UserId::parse(s).map_err(|_| Error::NotFound("no such user".into()))
}

async fn profile(
    State(st): State<AppState>,
    _user: AuthUser,
    Path(id): Path<String>,
) -> ApiResult<Json<PublicProfile>> {
    let id = parse_user_id(&id)?;
    let u = st
        .hub
        .stores
        .users
        .user(&id)
        .await?
        .ok_or_else(|| Error::NotFound("no such user".into()))?;
    Ok(Json(PublicProfile::of(&st, u)))
}

#[derive(Deserialize)]
struct SearchQuery {
    #[serde(default)]
    q: String,
    #[serde(default)]
    limit: Option<u32>,
}

async fn search(
    State(st): State<AppState>,
    _user: AuthUser,
    Query(q): Query<SearchQuery>,
) -> ApiResult<Json<Users>> {
    let prefix = q.q.trim();
    if prefix.is_empty() {
        return Err(Error::bad("q (a username prefix) is required"));
    }
    if prefix.chars().count() > st.hub.settings.limits.username_max {
        return Ok(Json(Users { users: Vec::new() }));
    }
    let limit = q.limit.unwrap_or(20).clamp(1, 50);
    let users = st.hub.stores.users.search_users(prefix, limit).await?;
    Ok(Json(Users {
        users: users
            .into_iter()
            .map(|u| PublicProfile::of(&st, u))
            .collect(),
    }))
}

#[derive(Deserialize)]
struct DeviceBody {
    platform: String,
    token: String,
}

async fn put_device(
    State(st): State<AppState>,
    user: AuthUser,
    Json(b): Json<DeviceBody>,
) -> ApiResult<StatusCode> {
    if !matches!(b.platform.as_str(), "android" | "ios" | "web") {
        return Err(Error::BadRequest {
            code: "invalid_platform",
            message: "platform must be android, ios or web".into(),
        });
    }
    let token = b.token.trim();
    if token.is_empty() || token.len() > 4096 || token.chars().any(|c| c.is_control() || c == '/') {
        return Err(Error::BadRequest {
            code: "invalid_token",
            message: "device token must be 1–4096 printable characters without '/'".into(),
        });
    }
    st.hub
        .stores
        .users
        .put_device(&user.id, &b.platform, token)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn delete_device(
    State(st): State<AppState>,
    user: AuthUser,
    Path(token): Path<String>,
) -> ApiResult<StatusCode> {
    st.hub.stores.users.delete_device(&user.id, &token).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn put_settings(
    State(st): State<AppState>,
    user: AuthUser,
    Json(b): Json<NotificationSettings>,
) -> ApiResult<Json<NotificationSettings>> {
    st.hub
        .stores
        .users
        .set_notification_settings(&user.id, b)
        .await?;
    Ok(Json(b))
}

async fn get_settings(
    State(st): State<AppState>,
    user: AuthUser,
) -> ApiResult<Json<NotificationSettings>> {
    Ok(Json(
        st.hub.stores.users.notification_settings(&user.id).await?,
    ))
}

async fn list_blocks(State(st): State<AppState>, user: AuthUser) -> ApiResult<Json<Users>> {
    let ids = st.hub.stores.users.blocked_by(&user.id).await?;
    let mut users = Vec::with_capacity(ids.len());
    for id in ids {
        if let Some(u) = st.hub.stores.users.user(&id).await? {
            users.push(PublicProfile::of(&st, u));
        }
    }
    Ok(Json(Users { users }))
}

async fn block(
    State(st): State<AppState>,
    user: AuthUser,
    Path(target): Path<String>,
) -> ApiResult<StatusCode> {
    let target = parse_user_id(&target)?;
    if target == user.id {
        return Err(Error::BadRequest {
            code: "cannot_block_self",
            message: "you cannot block yourself".into(),
        });
    }
    if st.hub.stores.users.user(&target).await?.is_none() {
        return Err(Error::NotFound("no such user".into()));
    }
    st.hub.stores.users.block(&user.id, &target).await?;
    st.hub.apply_blocks_changed(&user.id, true).await;
    Ok(StatusCode::NO_CONTENT)
}

async fn unblock(
    State(st): State<AppState>,
    user: AuthUser,
    Path(target): Path<String>,
) -> ApiResult<StatusCode> {
    let target = parse_user_id(&target)?;
    st.hub.stores.users.unblock(&user.id, &target).await?;
    st.hub.apply_blocks_changed(&user.id, true).await;
    Ok(StatusCode::NO_CONTENT)
}
