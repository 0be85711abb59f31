//! HTTP and WebSocket surface: one axum router per area, one [`Error`]
//! type, extractors that turn every malformed input into the contract's
//! error envelope.

pub mod admin;
pub mod auth;
pub mod error;
pub mod health;
pub mod rooms;
pub mod users;
pub mod web;
pub mod ws;

use std::sync::Arc;

use axum::extract::{FromRequest, FromRequestParts};
use axum::http::request::Parts;
use axum::Router;

pub use error::{ApiResult, Error};

use crate::actors::Hub;
use crate::auth::{AuthService, AuthUser};

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub hub: Arc<Hub>,
    pub auth: Arc<AuthService>,
}

/// `axum::Json` whose rejections are the contract's errors.
#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(Error))]
pub struct Json<T>(pub T);

impl<T: serde::Serialize> axum::response::IntoResponse for Json<T> {
    fn into_response(self) -> axum::response::Response {
        axum::Json(self.0).into_response()
    }
}

/// `axum::extract::Path` whose rejections are the contract's errors.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(Error))]
pub struct Path<T>(pub T);

/// `axum::extract::Query` whose rejections are the contract's errors.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(Error))]
pub struct Query<T>(pub T);

/// The bearer token of a request: `Authorization: Bearer ...` or, for
/// browsers opening a socket, `?access_token=...`.
pub fn bearer(parts: &Parts) -> Option<String> {
    if let Some(h) = parts.headers.get(axum::http::header::AUTHORIZATION) {
        let v = h.to_str().ok()?;
        let (scheme, token) = v.split_once(' ')?;
        if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() {
            return Some(token.trim().to_owned());
        }
        return None;
    }
    parts.uri.query().and_then(|q| {
        q.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            (k == "access_token" && !v.is_empty()).then(|| v.to_owned())
        })
    })
}

impl FromRequestParts<AppState> for AuthUser {
    type Rejection = Error;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let token = bearer(parts)
            .ok_or_else(|| Error::Unauthorized("unauthorized", "missing bearer token".into()))?;
        state.auth.verify_access(&token).map_err(|_| {
            Error::Unauthorized("unauthorized", "invalid or expired access token".into())
        })
    }
}

/// A caller with the admin role.
pub struct AdminUser(pub AuthUser);

impl FromRequestParts<AppState> for AdminUser {
    type Rejection = Error;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let user = AuthUser::from_request_parts(parts, state).await?;
        if !state.hub.is_admin(&user.username) {
            return Err(Error::Forbidden("admin role required".into()));
        }
        Ok(AdminUser(user))
    }
}

/// Counts HTTP responses by status class.
async fn count_requests(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let resp = next.run(req).await;
    let class = match resp.status().as_u16() {
        100..=399 => "ok",
        400..=499 => "client_error",
        _ => "server_error",
    };
    metrics::counter!("chatd_http_responses_total", "class" => class).increment(1);
    resp
}

/// The whole application router.
pub fn router(state: AppState) -> Router {
    let max_body = state.hub.settings.http.max_body_bytes;
    let api = Router::new()
        .merge(auth::router())
        .merge(users::router())
        .merge(rooms::router());
    Router::new()
        .nest("/api/v1", api)
        .nest("/admin/v1", admin::router())
        .merge(ws::router())
        .merge(health::router())
        .merge(web::router())
        .fallback(|| async { Error::NotFound("no such route".into()) })
        .method_not_allowed_fallback(|| async { Error::MethodNotAllowed })
        .layer(axum::extract::DefaultBodyLimit::max(max_body))
        .layer(axum::middleware::from_fn(count_requests))
        .layer(tower_http::request_id::PropagateRequestIdLayer::x_request_id())
        .layer(
            tower_http::trace::TraceLayer::new_for_http().make_span_with(
                |req: &axum::http::Request<axum::body::Body>| {
                    let id = req
                        .headers()
                        .get("x-request-id")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("-");
                    tracing::info_span!("http", method = %req.method(), path = %req.uri().path(), request_id = %id)
                },
            ),
        )
        .layer(tower_http::request_id::SetRequestIdLayer::x_request_id(
            tower_http::request_id::MakeRequestUuid,
        ))
        .with_state(state)
}
