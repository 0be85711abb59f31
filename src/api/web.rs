//! The built-in web page: a small chat client at `/`, shipped inside the binary.
//!
//! Plain HTML, CSS and JavaScript from `static/`, embedded at compile time; no
//! build step, no CDN, no outside URL. The page speaks only the public contract
//! (HTTP under `/api/v1`, live traffic on `/ws`) and doubles as the reference client.
//!
//! The operators' page at `/admin` (from `static/admin/`) is built the same way and
//! speaks only `POST /api/v1/auth/login` and the `/admin/v1` endpoints.

use axum::http::header;
use axum::response::IntoResponse;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

const INDEX_HTML: &str = include_str!("../../static/index.html");
const APP_JS: &str = include_str!("../../static/app.js");
const APP_CSS: &str = include_str!("../../static/app.css");
const ADMIN_HTML: &str = include_str!("../../static/admin/index.html");
const ADMIN_JS: &str = include_str!("../../static/admin/admin.js");
const ADMIN_CSS: &str = include_str!("../../static/admin/admin.css");

/// Routes of the web pages: `/`, `/app.js`, `/app.css`, and the admin page
/// `/admin`, `/admin/admin.js`, `/admin/admin.css`.
pub fn router<S: Clone + Send + Sync + 'static>() -> OpenApiRouter<S> {
    OpenApiRouter::new()
        .routes(routes!(index))
        .routes(routes!(app_js))
        .routes(routes!(app_css))
        .routes(routes!(admin_index))
        .routes(routes!(admin_js))
        .routes(routes!(admin_css))
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

/// The chat page.
#[utoipa::path(get, path = "/", tag = "web",
    responses((status = 200, description = "HTML", body = String, content_type = "text/html")))]
async fn index() -> impl IntoResponse {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

/// The chat page's script.
#[utoipa::path(get, path = "/app.js", tag = "web",
    responses((status = 200, description = "JavaScript", body = String, content_type = "text/javascript")))]
async fn app_js() -> impl IntoResponse {
    asset("text/javascript; charset=utf-8", APP_JS)
}

/// The chat page's style sheet.
#[utoipa::path(get, path = "/app.css", tag = "web",
    responses((status = 200, description = "CSS", body = String, content_type = "text/css")))]
async fn app_css() -> impl IntoResponse {
    asset("text/css; charset=utf-8", APP_CSS)
}

/// The admin page: cluster, supervision tree, sessions (log in as an admin).
#[utoipa::path(get, path = "/admin", tag = "web",
    responses((status = 200, description = "HTML", body = String, content_type = "text/html")))]
async fn admin_index() -> impl IntoResponse {
    asset("text/html; charset=utf-8", ADMIN_HTML)
}

/// The admin page's script.
#[utoipa::path(get, path = "/admin/admin.js", tag = "web",
    responses((status = 200, description = "JavaScript", body = String, content_type = "text/javascript")))]
async fn admin_js() -> impl IntoResponse {
    asset("text/javascript; charset=utf-8", ADMIN_JS)
}

/// The admin page's style sheet.
#[utoipa::path(get, path = "/admin/admin.css", tag = "web",
    responses((status = 200, description = "CSS", body = String, content_type = "text/css")))]
async fn admin_css() -> impl IntoResponse {
    asset("text/css; charset=utf-8", ADMIN_CSS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_loads_its_assets_by_absolute_path_and_nothing_from_outside() {
        assert!(INDEX_HTML.contains(r#"src="/app.js""#));
        assert!(INDEX_HTML.contains(r#"href="/app.css""#));
        assert!(ADMIN_HTML.contains(r#"src="/admin/admin.js""#));
        assert!(ADMIN_HTML.contains(r#"href="/admin/admin.css""#));
        for text in [INDEX_HTML, APP_JS, APP_CSS, ADMIN_HTML, ADMIN_JS, ADMIN_CSS] {
            assert!(!text.contains("http://"), "an outside URL in the page");
            assert!(!text.contains("https://"), "an outside URL in the page");
            assert!(!text.contains("//cdn"), "a CDN in the page");
        }
    }
}
