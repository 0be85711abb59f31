//! The OpenAPI document served at GET /api/openapi.json against the router
//! that serves the API: every documented operation is routed (the router's
//! fallback never answers it), documented paths answer no other method, every
//! row of the contract (API.md) is documented, and no route is registered
//! around the OpenAPI router; and an outside validator
//! (openapi-spec-validator from PyPI) accepts the document.

mod common;

use std::collections::{BTreeSet, HashSet};

use common::*;
use serde_json::{json, Value};

/// Every call of the contract (../shared/API.md), plus the pages, the socket
/// and the document itself.
const KNOWN: &[(&str, &str)] = &[
    ("post", "/api/v1/auth/register"),
    ("post", "/api/v1/auth/login"),
    ("post", "/api/v1/auth/refresh"),
    ("post", "/api/v1/auth/logout"),
    ("get", "/api/v1/users/me"),
    ("get", "/api/v1/users/{id}"),
    ("get", "/api/v1/users"),
    ("put", "/api/v1/users/me/devices"),
    ("delete", "/api/v1/users/me/devices/{token}"),
    ("put", "/api/v1/users/me/notification-settings"),
    ("put", "/api/v1/users/me/blocks/{user_id}"),
    ("delete", "/api/v1/users/me/blocks/{user_id}"),
    ("get", "/api/v1/users/me/blocks"),
    ("post", "/api/v1/rooms"),
    ("get", "/api/v1/rooms"),
    ("get", "/api/v1/rooms/{id}"),
    ("post", "/api/v1/rooms/{id}/members"),
    ("delete", "/api/v1/rooms/{id}/members/{user_id}"),
    ("get", "/api/v1/rooms/{id}/messages"),
    ("post", "/api/v1/rooms/{id}/messages"),
    ("get", "/admin/v1/cluster"),
    ("get", "/admin/v1/actors"),
    ("post", "/admin/v1/actors/{id}/stop"),
    ("get", "/admin/v1/sessions/{user_id}"),
    ("get", "/admin/v1/rooms/{room_id}"),
    ("post", "/admin/v1/sessions/{user_id}/disconnect"),
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
    ("get", "/ws"),
    ("get", "/"),
    ("get", "/admin"),
    ("get", "/api/openapi.json"),
];

/// Operations anyone may call without a token.
const PUBLIC: &[(&str, &str)] = &[
    ("post", "/api/v1/auth/register"),
    ("post", "/api/v1/auth/login"),
    ("post", "/api/v1/auth/refresh"),
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
    ("get", "/"),
    ("get", "/app.js"),
    ("get", "/app.css"),
    ("get", "/admin"),
    ("get", "/admin/admin.js"),
    ("get", "/admin/admin.css"),
    ("get", "/api/openapi.json"),
];

const METHODS: &[&str] = &["get", "post", "put", "delete", "patch"];

/// (method, path) of every operation in the document.
fn operations(doc: &Value) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, _) in item.as_object().expect("path item") {
            if METHODS.contains(&method.as_str()) {
                out.insert((method.clone(), path.clone()));
            }
        }
    }
    out
}

/// A concrete URL for a templated path: every `{param}` becomes `x0`.
fn concrete(path: &str) -> String {
    let mut out = String::new();
    let mut in_param = false;
    for c in path.chars() {
        match c {
            '{' => in_param = true,
            '}' => {
                in_param = false;
                out.push_str("x0");
            }
            _ if !in_param => out.push(c),
            _ => {}
        }
    }
    out
}

/// Status and body (JSON or not) of one call.
async fn call(app: &TestApp, method: &str, path: &str, token: &str) -> (u16, String) {
    let m = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
    let mut r = app.http.request(m, app.url(path)).bearer_auth(token);
    if method == "post" || method == "put" || method == "patch" {
        r = r.json(&json!({}));
    }
    let resp = r.send().await.expect("request sent");
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap_or_default())
}

/// Whether the answer came from the router's fallback (no such route).
fn is_fallback(status: u16, body: &str) -> bool {
    let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    status == 404 && v["error"]["message"] == "no such route"
}

async fn served_document(app: &TestApp) -> Value {
    let resp = app
        .http
        .get(app.url("/api/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    resp.json().await.unwrap()
}

#[tokio::test]
async fn the_document_is_served_and_lists_every_contract_call() {
    let app = spawn_app().await;
    let doc = served_document(&app).await;
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3."),
        "{}",
        doc["openapi"]
    );
    assert_eq!(doc["info"]["title"], "chatd");
    assert_eq!(
        doc,
        serde_json::to_value(chatd::api::openapi()).unwrap(),
        "the served document is the one built from the router"
    );
    let ops = operations(&doc);
    let missing: Vec<_> = KNOWN
        .iter()
        .filter(|(m, p)| !ops.contains(&(m.to_string(), p.to_string())))
        .collect();
    assert!(missing.is_empty(), "not in the document: {missing:?}");

    // The schemas the contract names are there, ids as plain strings.
    let schemas = &doc["components"]["schemas"];
    for name in [
        "ErrorBody",
        "User",
        "Room",
        "Member",
        "Message",
        "RoomSummary",
        "NotificationSettings",
        "Role",
        "RoomKind",
        "Session",
        "PublicProfile",
        "ActorNode",
        "NodeInfo",
        "SessionInfo",
        "RoomInfo",
    ] {
        assert!(schemas[name].is_object(), "schema {name} missing");
    }
    for name in schemas.as_object().unwrap().keys() {
        assert!(
            name.starts_with(|c: char| c.is_ascii_uppercase()),
            "component {name:?}: a type alias leaked (use value_type)"
        );
    }
    assert_eq!(schemas["UserId"]["type"], "string");
    assert_eq!(schemas["Message"]["properties"]["seq"]["type"], "integer");
    assert_eq!(schemas["RoomId"]["type"], "string");
    assert_eq!(schemas["RoomKind"]["enum"], json!(["direct", "group"]));
    for field in ["id", "username", "email", "display_name", "created_at"] {
        assert!(
            schemas["User"]["properties"][field].is_object(),
            "User.{field}"
        );
    }
    let env = &schemas["ErrorBody"]["properties"]["error"];
    assert!(env.is_object(), "ErrorBody.error");
    let detail = &schemas["ErrorDetail"]["properties"];
    assert!(detail["code"].is_object() && detail["message"].is_object());
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
}

#[tokio::test]
async fn every_operation_is_described_with_errors_and_security() {
    let doc = serde_json::to_value(chatd::api::openapi()).unwrap();
    let public: HashSet<(String, String)> = PUBLIC
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    let mut ids = HashSet::new();
    for (method, path) in operations(&doc) {
        let op = &doc["paths"][&path][&method];
        let what = format!("{} {path}", method.to_uppercase());
        let id = op["operationId"].as_str().unwrap_or_default().to_owned();
        assert!(
            !id.is_empty() && ids.insert(id.clone()),
            "{what}: operationId {id:?} missing or repeated"
        );
        assert!(
            op["tags"].as_array().is_some_and(|t| !t.is_empty()),
            "{what}: no tag"
        );
        let responses = op["responses"].as_object().expect("responses");
        assert!(
            responses.keys().any(|s| s.starts_with('2') || s == "101"),
            "{what}: no success response"
        );
        for (status, r) in responses {
            let json_schema = &r["content"]["application/json"]["schema"]["$ref"];
            if status.as_str() >= "400" && !r["content"]["text/plain"].is_object() {
                assert_eq!(
                    json_schema, "#/components/schemas/ErrorBody",
                    "{what} {status}: errors use the envelope"
                );
            }
        }
        let secured = op["security"].as_array().is_some_and(|s| !s.is_empty());
        let is_public = public.contains(&(method.clone(), path.clone()));
        assert_eq!(secured, !is_public, "{what}: security {}", op["security"]);
        if secured {
            assert!(responses.contains_key("401"), "{what}: 401 not documented");
        }
        if path.starts_with("/admin/v1/") {
            assert!(responses.contains_key("403"), "{what}: 403 not documented");
        }
        // Every path parameter is declared.
        let declared: HashSet<&str> = op["parameters"]
            .as_array()
            .map(|ps| {
                ps.iter()
                    .filter(|p| p["in"] == "path")
                    .filter_map(|p| p["name"].as_str())
                    .collect()
            })
            .unwrap_or_default();
        for seg in path.split('/').filter(|s| s.starts_with('{')) {
            let name = seg.trim_start_matches('{').trim_end_matches('}');
            assert!(
                declared.contains(name),
                "{what}: path parameter {name} not declared"
            );
        }
    }
}

#[tokio::test]
async fn every_documented_route_is_served_and_only_with_its_methods() {
    let app = spawn_app().await;
    let admin = app.register_admin("admin").await;
    let doc = served_document(&app).await;
    let ops = operations(&doc);
    assert!(ops.len() >= KNOWN.len());

    // The detector works: an unknown path is the fallback, a wrong method 405.
    let (s, b) = call(&app, "get", "/api/v1/no-such-thing", &admin.token).await;
    assert!(is_fallback(s, &b), "{s} {b}");
    let (s, _) = call(&app, "delete", "/healthz", &admin.token).await;
    assert_eq!(s, 405);

    let paths: BTreeSet<&String> = ops.iter().map(|(_, p)| p).collect();
    for path in paths {
        let url = concrete(path);
        for method in METHODS {
            let documented = ops.contains(&(method.to_string(), path.clone()));
            let (s, body) = call(&app, method, &url, &admin.token).await;
            if documented {
                assert!(
                    !is_fallback(s, &body) && s != 405,
                    "{} {path} is documented but not routed: {s} {body}",
                    method.to_uppercase()
                );
            } else {
                assert_eq!(
                    s,
                    405,
                    "{} {path} is served but not documented: {s} {body}",
                    method.to_uppercase()
                );
            }
        }
    }
}

/// Routes registered on a plain axum `Router` (not through `routes!`) would
/// be served without being documented: none may exist.
#[test]
fn no_route_bypasses_the_openapi_router() {
    fn walk(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    walk(&root, &mut files);
    let mut found = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for needle in [
                ".route(",
                ".route_service(",
                ".nest_service(",
                "axum::routing::",
                "Router::new()",
            ] {
                if code.contains(needle) && !code.contains("OpenApiRouter::new()") {
                    found.push(format!("{}:{}: {}", f.display(), n + 1, line.trim()));
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "register routes with utoipa_axum's routes! on an OpenApiRouter:\n{}",
        found.join("\n")
    );
}

/// The OpenAPI validator's command: `CHAT_TEST_OPENAPI_VALIDATOR`, else the
/// one scripts/test.sh installs into .venv, else one on PATH.
fn validator() -> Option<std::path::PathBuf> {
    if let Ok(v) = std::env::var("CHAT_TEST_OPENAPI_VALIDATOR") {
        return Some(v.into());
    }
    let venv =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/openapi-spec-validator");
    if venv.exists() {
        return Some(venv);
    }
    let on_path = std::process::Command::new("openapi-spec-validator")
        .arg("--help")
        .output()
        .is_ok_and(|o| o.status.success());
    on_path.then(|| "openapi-spec-validator".into())
}

/// An outside validator (openapi-spec-validator from PyPI) accepts the
/// served document: the drift tests above check it against the router, this
/// one against the OpenAPI specification (schema, `$ref`s, operation ids).
#[tokio::test]
async fn an_outside_validator_accepts_the_document() {
    let Some(cmd) = validator() else {
        assert!(
            std::env::var_os("CHAT_REQUIRE_OPENAPI_VALIDATOR").is_none(),
            "openapi-spec-validator is required (CHAT_REQUIRE_OPENAPI_VALIDATOR is set) but \
             missing: scripts/test.sh installs it into .venv (pip install openapi-spec-validator)"
        );
        eprintln!("openapi-spec-validator not found: outside validation skipped");
        return;
    };
    let app = spawn_app().await;
    let doc = served_document(&app).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("openapi.json");
    std::fs::write(&file, serde_json::to_vec_pretty(&doc).unwrap()).unwrap();
    let out = tokio::process::Command::new(&cmd)
        .arg(&file)
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", cmd.display()));
    assert!(
        out.status.success(),
        "{} rejects the document:\n{}\n{}",
        cmd.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
