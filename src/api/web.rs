//! The built-in web page: a small chat client at `/`, shipped inside the binary.
//!
//! Plain HTML, CSS and JavaScript from `static/`, embedded at compile time; no
//! build step, no CDN, no outside URL. The page speaks only the public contract
//! (HTTP under `/api/v1`, live traffic on `/ws`) and doubles as the reference client.

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

const INDEX_HTML: &str = include_str!("../../static/index.html");
const APP_JS: &str = include_str!("../../static/app.js");
const APP_CSS: &str = include_str!("../../static/app.css");

/// Routes of the web page: `/`, `/app.js`, `/app.css`.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(index))
        .route("/app.js", get(app_js))
        .route("/app.css", get(app_css))
}

fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
}

async fn index() -> impl IntoResponse {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

async fn app_js() -> impl IntoResponse {
    asset("text/javascript; charset=utf-8", APP_JS)
}

async fn app_css() -> impl IntoResponse {
    asset("text/css; charset=utf-8", APP_CSS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_loads_its_assets_by_absolute_path_and_nothing_from_outside() {
        assert!(INDEX_HTML.contains(r#"src="/app.js""#));
        assert!(INDEX_HTML.contains(r#"href="/app.css""#));
        for text in [INDEX_HTML, APP_JS, APP_CSS] {
            assert!(!text.contains("http://"), "an outside URL in the page");
            assert!(!text.contains("https://"), "an outside URL in the page");
            assert!(!text.contains("//cdn"), "a CDN in the page");
        }
    }
}
