//! `/auth`: register, login, refresh (rotation with reuse detection), logout.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{ApiResult, AppState, Error, ErrorBody, Json};
use crate::auth::{AuthUser, LoginLimiter};
use crate::domain::{DisplayName, Email, Password, Username};
use crate::store::{NewRefreshToken, NewUser, RotateOutcome, User};

/// Routes under `/api/v1/auth`.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(register))
        .routes(routes!(login))
        .routes(routes!(refresh))
        .routes(routes!(logout))
}

#[derive(Deserialize, ToSchema)]
struct RegisterBody {
    username: String,
    email: String,
    password: String,
    #[serde(default)]
    display_name: Option<String>,
}

/// The answer of register, login and refresh.
#[derive(Serialize, ToSchema)]
pub struct Session {
    pub user: User,
    pub access_token: String,
    pub refresh_token: String,
    /// Seconds until the access token expires.
    pub expires_in: u64,
}

async fn issue(st: &AppState, user: User, family: Option<String>) -> ApiResult<Session> {
    let (token, hash) = st.auth.new_refresh();
    let expires_at = chrono::Utc::now().timestamp() + st.auth.refresh_ttl.as_secs() as i64;
    st.hub
        .stores
        .auth
        .insert_refresh(NewRefreshToken {
            hash,
            user_id: user.id.clone(),
            family_id: family.unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string()),
            expires_at,
        })
        .await?;
    Ok(Session {
        access_token: st.auth.issue_access(&user.id, user.username.as_ref()),
        refresh_token: token,
        expires_in: st.auth.access_ttl.as_secs(),
        user,
    })
}

/// Creates an account and logs it in.
#[utoipa::path(post, path = "/auth/register", tag = "auth",
    request_body = RegisterBody,
    responses(
        (status = 201, description = "registered and logged in", body = Session),
        (status = 400, description = "`invalid_request`, `invalid_username`, `invalid_email`, `invalid_password`, `invalid_display_name`", body = ErrorBody),
        (status = 409, description = "`username_taken` or `email_taken`", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 503, description = "`unavailable`: too many password hashes queued; retry", body = ErrorBody),
    ))]
#[tracing::instrument(skip_all)]
async fn register(
    State(st): State<AppState>,
    Json(b): Json<RegisterBody>,
) -> ApiResult<(StatusCode, Json<Session>)> {
    let limits = &st.settings.limits;
    let username = Username::parse(&b.username, limits)?;
    let email = Email::parse(&b.email)?;
    let password = Password::parse(&b.password, limits)?;
    let display_name = match b.display_name.as_deref() {
        Some(d) => Some(DisplayName::parse(d, limits)?.as_ref().to_owned()),
        None => None,
    };
    let password_hash = st.auth.hash_password(&password).await?;
    let user = st
        .hub
        .stores
        .users
        .create_user(NewUser {
            username,
            email,
            display_name,
            password_hash,
        })
        .await?;
    tracing::info!(user = %user.id, "registered");
    Ok((StatusCode::CREATED, Json(issue(&st, user, None).await?)))
}

#[derive(Deserialize, ToSchema)]
struct LoginBody {
    /// Username or e-mail.
    login: String,
    password: String,
}

/// Logs in with username or e-mail and password.
#[utoipa::path(post, path = "/auth/login", tag = "auth",
    request_body = LoginBody,
    responses(
        (status = 200, description = "logged in", body = Session),
        (status = 400, description = "`invalid_request`", body = ErrorBody),
        (status = 401, description = "`invalid_credentials`, alike for an unknown user and a wrong password", body = ErrorBody),
        (status = 429, description = "`rate_limited`: too many failed attempts for this account (its username and e-mail count together) or from this address", body = ErrorBody,
            headers(("Retry-After" = u64, description = "seconds to wait"))),
        (status = 503, description = "`unavailable`: too many password checks queued; retry", body = ErrorBody),
    ))]
#[tracing::instrument(skip_all)]
async fn login(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Json(b): Json<LoginBody>,
) -> ApiResult<Json<Session>> {
    let ip = Some(peer.ip());
    // Count against the account the login names (its username and e-mail
    // are one account), or against the text when it names none.
    let found = st.stores.users.credentials(&b.login).await?;
    let account = LoginLimiter::account_key(found.as_ref().map(|(u, _)| &u.id), &b.login);
    if let Some(wait) = st.auth.limiter().check(&account, ip) {
        return Err(Error::RateLimited(wait));
    }
    let ok = st
        .auth
        .verify_password(&b.password, found.as_ref().map(|(_, h)| h.as_str()))
        .await?;
    match found {
        Some((user, _)) if ok => {
            st.auth.limiter().succeeded(&account);
            Ok(Json(issue(&st, user, None).await?))
        }
        _ => {
            st.auth.limiter().failed(&account, ip);
            Err(Error::Unauthorized(
                "invalid_credentials",
                "unknown user or wrong password".into(),
            ))
        }
    }
}

#[derive(Deserialize, ToSchema)]
struct RefreshBody {
    refresh_token: String,
}

/// Trades a refresh token for a new pair; the old refresh token stops working.
#[utoipa::path(post, path = "/auth/refresh", tag = "auth",
    request_body = RefreshBody,
    responses(
        (status = 200, description = "a new token pair", body = Session),
        (status = 400, description = "`invalid_request`", body = ErrorBody),
        (status = 401, description = "`invalid_refresh_token`: unknown, expired or already used (reuse revokes the login)", body = ErrorBody),
    ))]
#[tracing::instrument(skip_all)]
async fn refresh(
    State(st): State<AppState>,
    Json(b): Json<RefreshBody>,
) -> ApiResult<Json<Session>> {
    let old = crate::auth::AuthService::hash_refresh(&b.refresh_token);
    let (token, hash) = st.auth.new_refresh();
    let now = chrono::Utc::now().timestamp();
    let expires_at = now + st.auth.refresh_ttl.as_secs() as i64;
    match st
        .hub
        .stores
        .auth
        .rotate_refresh(&old, &hash, expires_at, now)
        .await?
    {
        RotateOutcome::Rotated(user_id) => {
            let user = st.stores.users.user(&user_id).await?.ok_or_else(|| {
                Error::Unauthorized("invalid_refresh_token", "user no longer exists".into())
            })?;
            Ok(Json(Session {
                access_token: st.auth.issue_access(&user.id, user.username.as_ref()),
                refresh_token: token,
                expires_in: st.auth.access_ttl.as_secs(),
                user,
            }))
        }
        RotateOutcome::Reused => {
            tracing::warn!("refresh token reused; the login was revoked");
            Err(Error::Unauthorized(
                "invalid_refresh_token",
                "refresh token was already used; log in again".into(),
            ))
        }
        RotateOutcome::Invalid => Err(Error::Unauthorized(
            "invalid_refresh_token",
            "unknown or expired refresh token".into(),
        )),
    }
}

/// Ends the login that the refresh token belongs to.
#[utoipa::path(post, path = "/auth/logout", tag = "auth",
    request_body = RefreshBody,
    security(("bearer" = [])),
    responses(
        (status = 204, description = "logged out"),
        (status = 400, description = "`invalid_request`", body = ErrorBody),
        (status = 401, description = "`unauthorized`: missing or invalid access token", body = ErrorBody),
    ))]
#[tracing::instrument(skip_all, fields(user = %user.id))]
async fn logout(
    State(st): State<AppState>,
    user: AuthUser,
    Json(b): Json<RefreshBody>,
) -> ApiResult<StatusCode> {
    let hash = crate::auth::AuthService::hash_refresh(&b.refresh_token);
    st.stores.auth.revoke_refresh(&hash).await?;
    Ok(StatusCode::NO_CONTENT)
}
