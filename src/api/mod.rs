//! HTTP and WebSocket surface: one axum router per area, one [`Error`]
//! type, extractors that turn every malformed input into the contract's
//! error envelope.
//!
//! Every route is registered through `utoipa_axum`'s `OpenApiRouter` with
//! `routes!` on handlers carrying `#[utoipa::path]`, so the OpenAPI document
//! ([`openapi`], served at `GET /api/openapi.json`) is built from the same
//! registration as the router and cannot drift from it.

pub mod admin;
pub mod attachments;
pub mod auth;
pub mod error;
pub mod health;
pub mod lifecycle;
pub mod rooms;
pub(crate) mod socket;
pub mod socketio;
pub mod users;
pub mod web;
pub mod ws;

use std::sync::{Arc, OnceLock};

use axum::extract::{FromRequest, FromRequestParts};
use axum::http::request::Parts;
use axum::response::IntoResponse;
use axum::Router;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use error::{ApiResult, Error, ErrorBody, ErrorDetail};

use crate::actors::Hub;
use crate::auth::{AuthService, AuthUser};

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    /// The actor side of the node (rooms, sessions, cluster operations).
    pub hub: Arc<Hub>,
    /// The store, for handlers that only read or write data.
    pub stores: crate::store::Stores,
    /// The node's settings.
    pub settings: Arc<crate::config::Settings>,
    pub auth: Arc<AuthService>,
    /// Attachment bytes and metadata.
    pub blobs: Arc<dyn crate::blobs::BlobStore>,
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

/// The token of `Authorization: Bearer <token>`: the only place an HTTP
/// call may carry it.
fn header_token(parts: &Parts) -> Option<String> {
    let v = parts
        .headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = v.split_once(' ')?;
    (scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty())
        .then(|| token.trim().to_owned())
}

/// The token of a socket handshake (`GET /ws`, the Socket.IO handshake):
/// the `Authorization` header or, for browsers that cannot set a header on
/// a WebSocket, `?access_token=...`. Only the socket handshakes may use
/// this: everywhere else a token in the URL is ignored (URLs end up in
/// proxy logs and browser history), see [`AuthUser`]'s extractor.
pub fn bearer(parts: &Parts) -> Option<String> {
    if parts
        .headers
        .contains_key(axum::http::header::AUTHORIZATION)
    {
        return header_token(parts);
    }
    parts.uri.query().and_then(|q| {
        q.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            (k == "access_token" && !v.is_empty()).then(|| v.to_owned())
        })
    })
}

/// An HTTP caller, by the `Authorization` header only.
impl FromRequestParts<AppState> for AuthUser {
    type Rejection = Error;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let token = header_token(parts)
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
        // The role is read from the store on every admin call, so a grant
        // or revoke takes effect at once on every node.
        let stored = state.stores.users.user(&user.id).await?;
        if !stored.is_some_and(|u| u.admin) {
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

/// The top of the OpenAPI document; paths come from the routers.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "chatd",
        description = "HTTP API of chatd. Errors are `{\"error\": {\"code\", \"message\"}}` (ErrorBody). \
            The WebSocket frames of `GET /ws` are described in docs/protocol.md."
    ),
    modifiers(&SecuritySchemes),
    components(schemas(ErrorBody)),
    tags(
        (name = "auth", description = "accounts and tokens"),
        (name = "users", description = "profiles, search, push devices, notification settings, blocks"),
        (name = "rooms", description = "direct and group rooms, members, history, sends"),
        (name = "admin", description = "live actors and cluster (admin role only)"),
        (name = "socket", description = "the WebSocket upgrade"),
        (name = "health", description = "liveness, readiness, Prometheus metrics"),
        (name = "web", description = "the built-in chat page (/) and admin page (/admin)"),
        (name = "meta", description = "this document"),
    )
)]
struct ApiDoc;

/// `bearer`: `Authorization: Bearer <access_token>`; `access_token`: the
/// same token as a query parameter (only on `/ws`, for browsers).
struct SecuritySchemes;

impl utoipa::Modify for SecuritySchemes {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let c = doc.components.get_or_insert_with(Default::default);
        c.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
        c.add_security_scheme(
            "access_token",
            SecurityScheme::ApiKey(ApiKey::Query(ApiKeyValue::new("access_token"))),
        );
    }
}

/// Every route of chatd with its OpenAPI description (state is attached by [`router`]).
pub fn routes() -> OpenApiRouter<AppState> {
    let api = OpenApiRouter::new()
        .merge(auth::router())
        .merge(users::router())
        .merge(rooms::router())
        .merge(attachments::router())
        .merge(lifecycle::router());
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .nest("/api/v1", api)
        .nest("/admin/v1", admin::router())
        .merge(ws::router())
        .merge(health::router())
        .merge(web::router())
        .routes(routes!(openapi_json))
}

/// The OpenAPI 3 document of the whole HTTP API.
pub fn openapi() -> utoipa::openapi::OpenApi {
    routes().into_openapi()
}

/// This document.
#[utoipa::path(get, path = "/api/openapi.json", tag = "meta",
    responses((status = 200, description = "the OpenAPI document of this API", body = serde_json::Value)))]
async fn openapi_json() -> Result<impl IntoResponse, Error> {
    static DOC: OnceLock<Result<String, String>> = OnceLock::new();
    let doc = DOC
        .get_or_init(|| openapi().to_pretty_json().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| Error::Internal(format!("OpenAPI document: {e}")))?;
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        doc.as_str(),
    ))
}

/// The whole application router.
pub fn router(state: AppState) -> Router {
    let max_body = state.settings.http.max_body_bytes;
    let (routes, _) = routes().split_for_parts();
    // One registry for the node's `/ws` and Socket.IO sockets (per-user cap).
    let sockets = crate::socket::SocketRegistry::new();
    routes
        .fallback(|| async { Error::NotFound("no such route".into()) })
        .method_not_allowed_fallback(|| async { Error::MethodNotAllowed })
        .layer(socketio::layer(state.clone(), sockets.clone()))
        .layer(axum::Extension(sockets))
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
