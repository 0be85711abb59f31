//! `/healthz` (process alive), `/readyz` (store and broker reachable) and
//! `/metrics` (Prometheus text).

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use serde_json::json;

use super::{AppState, Error, Json};

/// Health routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

async fn readyz(State(st): State<AppState>) -> Result<Json<serde_json::Value>, Error> {
    let store = st.hub.stores.health.ping().await;
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
        "store": st.hub.stores.health.backend(),
        "broker": st.hub.broker.kind(),
    })))
}

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
