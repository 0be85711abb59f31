//! `/healthz` (process alive), `/readyz` (store and broker reachable) and
//! `/metrics` (Prometheus text).

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use serde_json::json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{AppState, Error, ErrorBody, Json};

/// Health routes.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(metrics))
}

/// The process is alive.
#[utoipa::path(get, path = "/healthz", tag = "health",
    responses((status = 200, description = "alive", body = serde_json::Value,
        example = json!({"status": "ok"}))))]
async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// The store and the broker are reachable.
#[utoipa::path(get, path = "/readyz", tag = "health",
    responses(
        (status = 200, description = "ready", body = serde_json::Value,
            example = json!({"status": "ready", "node_id": "node-1", "store": "sqlite", "broker": "inprocess"})),
        (status = 503, description = "`unavailable`: store or broker not reachable", body = ErrorBody),
    ))]
async fn readyz(State(st): State<AppState>) -> Result<Json<serde_json::Value>, Error> {
    let store = st.stores.health.ping().await;
    let broker = st.hub.broker.is_ready();
    if let Err(e) = &store {
        return Err(Error::Unavailable(format!("store not reachable: {e}")));
    }
    if !broker {
        return Err(Error::Unavailable("broker not connected".into()));
    }
    Ok(Json(json!({
        "status": "ready",
        "node_id": st.hub.node_id,
        "store": st.stores.health.backend(),
        "broker": st.hub.broker.kind(),
    })))
}

/// Prometheus metrics of this node.
#[utoipa::path(get, path = "/metrics", tag = "health",
    responses(
        (status = 200, description = "Prometheus text exposition format", body = String,
            content_type = "text/plain; version=0.0.4"),
        (status = 503, description = "`unavailable`: no metrics recorder", body = ErrorBody),
    ))]
async fn metrics() -> impl IntoResponse {
    match crate::telemetry::render_metrics() {
        Some(text) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            text,
        )
            .into_response(),
        None => Error::Unavailable("metrics recorder not installed".into()).into_response(),
    }
}
