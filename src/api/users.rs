//! `/users`: profiles, search, push devices, notification settings, blocks.

use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{ApiResult, AppState, Error, ErrorBody, Json, Path, Query};
use crate::auth::AuthUser;
use crate::domain::UserId;
use crate::store::{NotificationSettings, User};

/// Routes under `/api/v1/users`.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(search))
        .routes(routes!(me))
        .routes(routes!(profile))
        .routes(routes!(put_device, list_devices))
        .routes(routes!(delete_device))
        .routes(routes!(put_settings, get_settings))
        .routes(routes!(list_blocks))
        .routes(routes!(block, unblock))
}

/// What others see of a user.
#[derive(Serialize, ToSchema)]
pub struct PublicProfile {
    pub id: UserId,
    pub username: String,
    pub display_name: Option<String>,
    pub online: bool,
    /// When the user's last socket closed.
    #[schema(format = DateTime)]
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

#[derive(Serialize, ToSchema)]
struct Users {
    users: Vec<PublicProfile>,
}

/// The caller's own account.
#[utoipa::path(get, path = "/users/me", tag = "users", security(("bearer" = [])),
    responses(
        (status = 200, description = "the caller", body = User),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
    ))]
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

/// A user's public profile with presence.
#[utoipa::path(get, path = "/users/{id}", tag = "users", security(("bearer" = [])),
    params(("id" = String, Path, description = "user id")),
    responses(
        (status = 200, description = "the profile", body = PublicProfile),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 404, description = "`not_found`: no such user", body = ErrorBody),
    ))]
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

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct SearchQuery {
    /// Username prefix (required).
    #[serde(default)]
    q: String,
    /// At most this many (1–50, default 20).
    #[serde(default)]
    limit: Option<u32>,
}

/// Users whose username starts with `q`.
#[utoipa::path(get, path = "/users", tag = "users", security(("bearer" = [])),
    params(SearchQuery),
    responses(
        (status = 200, description = "matching users, by username", body = Users),
        (status = 400, description = "`invalid_request`: `q` missing", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
    ))]
async fn search(
    State(st): State<AppState>,
    _user: AuthUser,
    Query(q): Query<SearchQuery>,
) -> ApiResult<Json<Users>> {
    let prefix = q.q.trim();
    if prefix.is_empty() {
        return Err(Error::bad("q (a username prefix) is required"));
    }
    if prefix.chars().count() > st.settings.limits.username_max {
        return Ok(Json(Users { users: Vec::new() }));
    }
    let limit = q.limit.unwrap_or(20).clamp(1, 50);
    let users = st.stores.users.search_users(prefix, limit).await?;
    Ok(Json(Users {
        users: users
            .into_iter()
            .map(|u| PublicProfile::of(&st, u))
            .collect(),
    }))
}

#[derive(Deserialize, ToSchema)]
struct DeviceBody {
    /// `android`, `ios` or `web`.
    #[schema(example = "android")]
    platform: String,
    /// The FCM registration token.
    token: String,
}

/// Registers a push token (FCM) for the caller.
#[utoipa::path(put, path = "/users/me/devices", tag = "users", security(("bearer" = [])),
    request_body = DeviceBody,
    responses(
        (status = 204, description = "registered"),
        (status = 400, description = "`invalid_platform`, `invalid_token`, `invalid_request`", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
    ))]
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

/// A registered push device.
#[derive(Serialize, ToSchema)]
struct DeviceView {
    /// `android`, `ios` or `web`.
    platform: String,
    /// The FCM registration token.
    token: String,
    /// When it was registered.
    #[schema(format = DateTime)]
    created_at: String,
}

#[derive(Serialize, ToSchema)]
struct Devices {
    devices: Vec<DeviceView>,
}

/// The caller's registered push devices.
#[utoipa::path(get, path = "/users/me/devices", tag = "users", security(("bearer" = [])),
    responses(
        (status = 200, description = "the caller's push devices", body = Devices),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
    ))]
async fn list_devices(State(st): State<AppState>, user: AuthUser) -> ApiResult<Json<Devices>> {
    let devices = st.stores.users.devices(&user.id).await?;
    Ok(Json(Devices {
        devices: devices
            .into_iter()
            .map(|d| DeviceView {
                platform: d.platform,
                token: d.token,
                created_at: d.created_at,
            })
            .collect(),
    }))
}

/// Removes one of the caller's push tokens.
#[utoipa::path(delete, path = "/users/me/devices/{token}", tag = "users", security(("bearer" = [])),
    params(("token" = String, Path, description = "the push token")),
    responses(
        (status = 204, description = "removed (or was not there)"),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
    ))]
async fn delete_device(
    State(st): State<AppState>,
    user: AuthUser,
    Path(token): Path<String>,
) -> ApiResult<StatusCode> {
    st.stores.users.delete_device(&user.id, &token).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Replaces the caller's notification switches.
#[utoipa::path(put, path = "/users/me/notification-settings", tag = "users", security(("bearer" = [])),
    request_body = NotificationSettings,
    responses(
        (status = 200, description = "the new settings", body = NotificationSettings),
        (status = 400, description = "`invalid_request`", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
    ))]
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

/// The caller's notification switches.
#[utoipa::path(get, path = "/users/me/notification-settings", tag = "users", security(("bearer" = [])),
    responses(
        (status = 200, description = "the settings", body = NotificationSettings),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
    ))]
async fn get_settings(
    State(st): State<AppState>,
    user: AuthUser,
) -> ApiResult<Json<NotificationSettings>> {
    Ok(Json(st.stores.users.notification_settings(&user.id).await?))
}

/// The users the caller blocks.
#[utoipa::path(get, path = "/users/me/blocks", tag = "users", security(("bearer" = [])),
    responses(
        (status = 200, description = "blocked users", body = Users),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
    ))]
async fn list_blocks(State(st): State<AppState>, user: AuthUser) -> ApiResult<Json<Users>> {
    let ids = st.stores.users.blocked_by(&user.id).await?;
    let mut users = Vec::with_capacity(ids.len());
    for id in ids {
        if let Some(u) = st.stores.users.user(&id).await? {
            users.push(PublicProfile::of(&st, u));
        }
    }
    Ok(Json(Users { users }))
}

/// Blocks a user: nothing of theirs reaches the caller any more.
#[utoipa::path(put, path = "/users/me/blocks/{user_id}", tag = "users", security(("bearer" = [])),
    params(("user_id" = String, Path, description = "the user to block")),
    responses(
        (status = 204, description = "blocked (idempotent)"),
        (status = 400, description = "`cannot_block_self`", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 404, description = "`not_found`: no such user", body = ErrorBody),
    ))]
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
    if st.stores.users.user(&target).await?.is_none() {
        return Err(Error::NotFound("no such user".into()));
    }
    st.stores.users.block(&user.id, &target).await?;
    st.hub.apply_blocks_changed(&user.id, true).await;
    Ok(StatusCode::NO_CONTENT)
}

/// Lifts a block.
#[utoipa::path(delete, path = "/users/me/blocks/{user_id}", tag = "users", security(("bearer" = [])),
    params(("user_id" = String, Path, description = "the blocked user")),
    responses(
        (status = 204, description = "unblocked (idempotent)"),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 404, description = "`not_found`: malformed user id", body = ErrorBody),
    ))]
async fn unblock(
    State(st): State<AppState>,
    user: AuthUser,
    Path(target): Path<String>,
) -> ApiResult<StatusCode> {
    let target = parse_user_id(&target)?;
    st.stores.users.unblock(&user.id, &target).await?;
    st.hub.apply_blocks_changed(&user.id, true).await;
    Ok(StatusCode::NO_CONTENT)
}
