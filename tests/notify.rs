//! The notification pool end to end: a real chatd in-process (HTTP and
//! WebSocket clients), a real SMTP server on loopback (aiosmtpd, started
//! from tests/support/smtp_sink.py), and a local HTTP server standing in
//! for Google's OAuth token endpoint and FCM that verifies the RS256 JWT
//! assertion and the message shape, and can answer UNREGISTERED, 429 with
//! Retry-After, or 500.
//!
//! Needs Debian's `python3-aiosmtpd` (the tests use /usr/bin/python3, or
//! `CHAT_TEST_PYTHON`).

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_tungstenite::tungstenite::Message as WsMessage;

use chatd::domain::UserId;
use chatd::Settings;

const WAIT: Duration = Duration::from_secs(30);
const PROJECT: &str = "chatd-test";
const CLIENT_EMAIL: &str = "chatd-push@chatd-test.iam.gserviceaccount.com";
const KEY_ID: &str = "test-key-1";
const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";

fn support(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/support")
        .join(file)
}

/// Polls `check` every 50 ms until it returns `Some`, or panics after `WAIT`.
async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------- SMTP sink

/// A mail as the SMTP server received it.
#[derive(Debug, Clone, serde::Deserialize)]
struct Received {
    rcpt_tos: Vec<String>,
    from: String,
    subject: String,
    content_type: String,
    text: Option<String>,
    html: Option<String>,
}

/// aiosmtpd on a free loopback port, storing each mail as a JSON file.
struct SmtpSink {
    port: u16,
    dir: tempfile::TempDir,
    _child: tokio::process::Child,
}

impl SmtpSink {
    async fn start() -> Self {
        let python = std::env::var("CHAT_TEST_PYTHON").unwrap_or_else(|_| {
            if Path::new("/usr/bin/python3").exists() {
                "/usr/bin/python3".into()
            } else {
                "python3".into()
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let mut child = tokio::process::Command::new(&python)
            .arg(support("smtp_sink.py"))
            .arg(dir.path())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let line = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .expect("the SMTP sink did not start in time (is python3-aiosmtpd installed?)")
            .unwrap()
            .expect("the SMTP sink exited (is python3-aiosmtpd installed?)");
        let port = line
            .strip_prefix("READY ")
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("unexpected sink output {line:?}"));
        Self {
            port,
            dir,
            _child: child,
        }
    }

    /// Every mail received so far, in arrival order.
    fn mails(&self) -> Vec<Received> {
        let mut files: Vec<_> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        files.sort();
        files
            .iter()
            .map(|p| serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap())
            .collect()
    }

    fn mails_to(&self, addr: &str) -> Vec<Received> {
        self.mails()
            .into_iter()
            .filter(|m| m.rcpt_tos.iter().any(|r| r == addr))
            .collect()
    }

    /// Waits until `addr` has received at least one mail; returns them all.
    async fn wait_for(&self, addr: &str) -> Vec<Received> {
        eventually(&format!("a mail to {addr}"), || async {
            let m = self.mails_to(addr);
            (!m.is_empty()).then_some(m)
        })
        .await
    }
}

// ---------------------------------------------------------- FCM stand-in

/// What the stand-in answers a send to one device token, in turn; once a
/// token's script is used up it answers 200.
#[derive(Debug, Clone, Copy)]
enum Scripted {
    Unregistered,
    TooMany { retry_after_secs: u64 },
    ServerError,
}

#[derive(Default)]
struct FcmLog {
    token_requests: usize,
    issued: HashSet<String>,
    /// Accepted messages (`message` objects).
    sent: Vec<Value>,
    /// Every send attempt per device token, with its time.
    attempts: HashMap<String, Vec<Instant>>,
    /// What the stand-in found wrong in what chatd sent.
    errors: Vec<String>,
    script: HashMap<String, VecDeque<Scripted>>,
}

#[derive(Clone)]
struct FcmStandIn {
    base: String,
    log: Arc<Mutex<FcmLog>>,
    public_key: Arc<jsonwebtoken::DecodingKey>,
}

impl FcmStandIn {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let pem = std::fs::read(support("fcm_test_key.pub.pem")).unwrap();
        let me = Self {
            base,
            log: Arc::default(),
            public_key: Arc::new(jsonwebtoken::DecodingKey::from_rsa_pem(&pem).unwrap()),
        };
        let app = Router::new()
            .route("/token", post(token))
            .route("/v1/projects/{project}/messages:send", post(send))
            .with_state(me.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        me
    }

    fn token_url(&self) -> String {
        format!("{}/token", self.base)
    }

    fn script(&self, device: &str, steps: &[Scripted]) {
        self.log
            .lock()
            .unwrap()
            .script
            .insert(device.into(), steps.iter().copied().collect());
    }

    fn with<T>(&self, f: impl FnOnce(&FcmLog) -> T) -> T {
        f(&self.log.lock().unwrap())
    }

    /// A service-account JSON with the test key, written into `dir`.
    fn service_account(&self, dir: &Path) -> PathBuf {
        let key = std::fs::read_to_string(support("fcm_test_key.pem")).unwrap();
        let path = dir.join("service-account.json");
        let sa = json!({
            "type": "service_account",
            "project_id": PROJECT,
            "private_key_id": KEY_ID,
            "private_key": key,
            "client_email": CLIENT_EMAIL,
            "client_id": "1",
            "token_uri": self.token_url(),
        });
        std::fs::write(&path, sa.to_string()).unwrap();
        path
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap_or(b'?'));
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[derive(Debug, serde::Deserialize)]
struct AssertionClaims {
    iss: String,
    scope: String,
    aud: String,
    iat: u64,
    exp: u64,
}

/// Google's token endpoint, as its service-account documentation describes
/// the JWT-bearer grant.
fn check_assertion(st: &FcmStandIn, headers: &HeaderMap, body: &str) -> Result<(), String> {
    let ct = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if !ct.starts_with("application/x-www-form-urlencoded") {
        return Err(format!("content-type {ct:?}"));
    }
    let form: HashMap<String, String> = body
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (percent_decode(k), percent_decode(v)))
        .collect();
    if form.get("grant_type").map(String::as_str)
        != Some("urn:ietf:params:oauth:grant-type:jwt-bearer")
    {
        return Err(format!("grant_type {:?}", form.get("grant_type")));
    }
    let assertion = form.get("assertion").ok_or("no assertion")?;
    let header = jsonwebtoken::decode_header(assertion).map_err(|e| e.to_string())?;
    if header.alg != jsonwebtoken::Algorithm::RS256 {
        return Err(format!("alg {:?}", header.alg));
    }
    if header.kid.as_deref() != Some(KEY_ID) {
        return Err(format!("kid {:?}", header.kid));
    }
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    v.set_audience(&[st.token_url()]);
    v.set_issuer(&[CLIENT_EMAIL]);
    v.set_required_spec_claims(&["exp", "iat", "iss", "aud"]);
    let claims = jsonwebtoken::decode::<AssertionClaims>(assertion, &st.public_key, &v)
        .map_err(|e| format!("assertion: {e}"))?
        .claims;
    if claims.scope != SCOPE {
        return Err(format!("scope {:?}", claims.scope));
    }
    if claims.aud != st.token_url() || claims.iss != CLIENT_EMAIL {
        return Err("iss/aud".into());
    }
    let now = jsonwebtoken::get_current_timestamp();
    if claims.exp <= claims.iat || claims.exp - claims.iat > 3600 || claims.iat > now + 60 {
        return Err(format!("iat {} exp {}", claims.iat, claims.exp));
    }
    Ok(())
}

async fn token(State(st): State<FcmStandIn>, headers: HeaderMap, body: String) -> Response {
    let mut log = st.log.lock().unwrap();
    log.token_requests += 1;
    if let Err(e) = check_assertion(&st, &headers, &body) {
        log.errors.push(format!("token: {e}"));
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"error": "invalid_grant", "error_description": e})),
        )
            .into_response();
    }
    let access = format!("ya29.test-{}", log.token_requests);
    log.issued.insert(access.clone());
    axum::Json(json!({"access_token": access, "expires_in": 3599, "token_type": "Bearer"}))
        .into_response()
}

/// The message shape FCM v1 takes; returns what is wrong.
fn check_message(v: &Value) -> Vec<String> {
    let mut errs = Vec::new();
    let m = &v["message"];
    if !m["token"].is_string() {
        errs.push("message.token is not a string".into());
    }
    for k in ["title", "body"] {
        if !m["notification"][k].is_string() {
            errs.push(format!("message.notification.{k} is not a string"));
        }
    }
    match m["data"].as_object() {
        None => errs.push("message.data is not an object".into()),
        Some(data) => {
            for (k, v) in data {
                if !v.is_string() {
                    errs.push(format!("message.data.{k} is not a string"));
                }
            }
            for k in ["room_id", "message_id", "sender_name"] {
                if !data.contains_key(k) {
                    errs.push(format!("message.data.{k} is missing"));
                }
            }
        }
    }
    errs
}

async fn send(
    State(st): State<FcmStandIn>,
    UrlPath(project): UrlPath<String>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let mut log = st.log.lock().unwrap();
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default()
        .to_owned();
    if !log.issued.contains(&bearer) {
        log.errors
            .push(format!("send with unknown bearer {bearer:?}"));
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(json!({"error": {"code": 401, "status": "UNAUTHENTICATED"}})),
        )
            .into_response();
    }
    if project != PROJECT {
        log.errors.push(format!("project {project:?}"));
    }
    let v: Value = match serde_json::from_str(&body) {
        Ok(v) => v,
        Err(e) => {
            log.errors.push(format!("body: {e}"));
            return StatusCode::BAD_REQUEST.into_response();
        }
    };
    let shape = check_message(&v);
    if !shape.is_empty() {
        log.errors.extend(shape);
        // Not about the token: chatd must not delete the device for this.
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"error": {"code": 400, "status": "INVALID_ARGUMENT",
                "details": [{"@type": "type.googleapis.com/google.rpc.BadRequest",
                    "fieldViolations": [{"field": "message.data", "description": "bad"}]}]}})),
        )
            .into_response();
    }
    let device = v["message"]["token"].as_str().unwrap().to_owned();
    log.attempts
        .entry(device.clone())
        .or_default()
        .push(Instant::now());
    let step = log.script.get_mut(&device).and_then(|s| s.pop_front());
    match step {
        Some(Scripted::Unregistered) => (
            StatusCode::NOT_FOUND,
            axum::Json(json!({"error": {"code": 404, "message": "Requested entity was not found.",
                "status": "NOT_FOUND", "details": [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                "errorCode": "UNREGISTERED"}]}})),
        )
            .into_response(),
        Some(Scripted::TooMany { retry_after_secs }) => (
            StatusCode::TOO_MANY_REQUESTS,
            [("retry-after", retry_after_secs.to_string())],
            axum::Json(json!({"error": {"code": 429, "status": "RESOURCE_EXHAUSTED",
                "details": [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                "errorCode": "QUOTA_EXCEEDED"}]}})),
        )
            .into_response(),
        Some(Scripted::ServerError) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            axum::Json(json!({"error": {"code": 500, "status": "INTERNAL"}})),
        )
            .into_response(),
        None => {
            log.sent.push(v["message"].clone());
            let n = log.sent.len();
            axum::Json(json!({"name": format!("projects/{PROJECT}/messages/{n}")})).into_response()
        }
    }
}

// ---------------------------------------------------------------- chatd

struct Options {
    email_window_secs: u64,
    preview: bool,
    fcm: Option<FcmStandIn>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            email_window_secs: 2,
            preview: true,
            fcm: None,
        }
    }
}

struct TestApp {
    base: String,
    ws: String,
    http: reqwest::Client,
    hub: Arc<chatd::actors::Hub>,
    smtp: SmtpSink,
    _dir: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
}

struct Account {
    id: String,
    token: String,
    email: String,
}

impl TestApp {
    async fn spawn(opts: Options) -> Self {
        let smtp = SmtpSink::start().await;
        let dir = tempfile::tempdir().unwrap();
        let mut s = Settings::defaults();
        s.http.listen = "127.0.0.1:0".into();
        s.store.sqlite.path = dir.path().join("chatd.db").to_string_lossy().into_owned();
        s.store.sqlite.synchronous = "normal".into();
        let n = &mut s.notify;
        n.email_window_secs = opts.email_window_secs;
        n.preview = opts.preview;
        n.backoff_base_ms = 50;
        n.backoff_max_ms = 500;
        n.requeue_delay_secs = 1;
        n.smtp.host = "127.0.0.1".into();
        n.smtp.port = smtp.port;
        n.smtp.tls = "none".into();
        n.smtp.from = "chatd <notify@chatd.test>".into();
        if let Some(fcm) = &opts.fcm {
            n.fcm.service_account_path = fcm
                .service_account(dir.path())
                .to_string_lossy()
                .into_owned();
            n.fcm.token_url = fcm.token_url();
            n.fcm.base_url = fcm.base.clone();
        }
        let app = chatd::Application::build(s).await.expect("chatd starts");
        let port = app.port();
        let hub = app.hub();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(app.run_until_stopped(async move {
            let _ = stopped.await;
        }));
        Self {
            base: format!("http://127.0.0.1:{port}/api/v1"),
            ws: format!("ws://127.0.0.1:{port}/ws"),
            http: reqwest::Client::new(),
            hub,
            smtp,
            _dir: dir,
            _stop: stop,
        }
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> Value {
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.base))
            .bearer_auth(token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        assert!(status.is_success(), "{method} {path}: {status} {text}");
        if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap()
        }
    }

    async fn register(&self, username: &str, display: &str) -> Account {
        let email = format!("{username}@example.com");
        let resp = self
            .http
            .post(format!("{}/auth/register", self.base))
            .json(&json!({"username": username, "email": email,
                "password": "correct horse battery", "display_name": display}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201);
        let v: Value = resp.json().await.unwrap();
        Account {
            id: v["user"]["id"].as_str().unwrap().to_owned(),
            token: v["access_token"].as_str().unwrap().to_owned(),
            email,
        }
    }

    async fn direct(&self, a: &Account, b: &Account) -> String {
        let v = self
            .call(
                reqwest::Method::POST,
                "/rooms",
                &a.token,
                Some(json!({"kind": "direct", "peer": b.id})),
            )
            .await;
        v["id"].as_str().unwrap().to_owned()
    }

    async fn group(&self, owner: &Account, name: &str, members: &[&Account]) -> String {
        let ids: Vec<&str> = members.iter().map(|m| m.id.as_str()).collect();
        let v = self
            .call(
                reqwest::Method::POST,
                "/rooms",
                &owner.token,
                Some(json!({"kind": "group", "name": name, "members": ids})),
            )
            .await;
        v["id"].as_str().unwrap().to_owned()
    }

    /// Sends over HTTP; returns the stored message.
    async fn send(&self, from: &Account, room: &str, body: &str) -> Value {
        let id = uuid::Uuid::new_v4().to_string();
        self.call(
            reqwest::Method::POST,
            &format!("/rooms/{room}/messages"),
            &from.token,
            Some(json!({"client_msg_id": id, "body": body})),
        )
        .await
    }

    async fn put_device(&self, who: &Account, token: &str) {
        self.call(
            reqwest::Method::PUT,
            "/users/me/devices",
            &who.token,
            Some(json!({"platform": "android", "token": token})),
        )
        .await;
    }

    async fn devices(&self, who: &Account) -> Vec<String> {
        let id = UserId::parse(&who.id).unwrap();
        self.hub
            .stores
            .users
            .devices(&id)
            .await
            .unwrap()
            .into_iter()
            .map(|d| d.token)
            .collect()
    }

    /// Connects a socket, optionally marks `read` up to a seq, disconnects,
    /// and waits until the user counts as offline with a `last_seen`.
    async fn visit(&self, who: &Account, observer: &Account, read: Option<(&str, i64)>) {
        let url = format!("{}?access_token={}", self.ws, who.token);
        let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        tokio::time::timeout(WAIT, async {
            while let Some(f) = ws.next().await {
                if let WsMessage::Text(t) = f.unwrap() {
                    let v: Value = serde_json::from_str(&t).unwrap();
                    if v["type"] == "ready" {
                        return;
                    }
                }
            }
            panic!("socket closed before ready");
        })
        .await
        .expect("ready frame");
        if let Some((room, seq)) = read {
            ws.send(WsMessage::Text(
                json!({"type": "read", "room_id": room, "up_to_seq": seq})
                    .to_string()
                    .into(),
            ))
            .await
            .unwrap();
            eventually("the read cursor", || async {
                let r = self
                    .call(
                        reqwest::Method::GET,
                        &format!("/rooms/{room}"),
                        &who.token,
                        None,
                    )
                    .await;
                r["members"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|m| m["user_id"] == who.id.as_str() && m["read_seq"].as_i64() >= Some(seq))
                    .then_some(())
            })
            .await;
        }
        ws.close(None).await.unwrap();
        eventually("the user to go offline", || async {
            let p = self
                .call(
                    reqwest::Method::GET,
                    &format!("/users/{}", who.id),
                    &observer.token,
                    None,
                )
                .await;
            (p["online"] == false && p["last_seen"].is_string()).then_some(())
        })
        .await;
    }

    /// A counter's value from `/metrics` (0 when not there yet).
    async fn counter(&self, series: &str) -> f64 {
        let root = self.base.trim_end_matches("/api/v1");
        let text = self
            .http
            .get(format!("{root}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    }
}

fn text_of(m: &Received) -> &str {
    m.text.as_deref().expect("a text part")
}

// ---------------------------------------------------------------- tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_to_an_offline_user_yields_one_mail() {
    let app = TestApp::spawn(Options {
        email_window_secs: 3,
        ..Default::default()
    })
    .await;
    let alice = app.register("alice", "Alice").await;
    let bob = app.register("bob", "Bob").await;
    let room = app.direct(&alice, &bob).await;
    for body in ["first <b>bold</b>", "second", "third"] {
        app.send(&alice, &room, body).await;
    }
    let mails = app.smtp.wait_for(&bob.email).await;
    assert_eq!(mails.len(), 1, "{mails:#?}");
    let m = &mails[0];
    assert_eq!(m.rcpt_tos, vec![bob.email.clone()]);
    assert!(m.from.contains("notify@chatd.test"), "{}", m.from);
    assert_eq!(m.subject, "3 new messages from Alice");
    assert_eq!(m.content_type, "multipart/alternative");
    let text = text_of(m);
    let (i1, i2, i3) = (
        text.find("Alice: first <b>bold</b>").expect(text),
        text.find("Alice: second").expect(text),
        text.find("Alice: third").expect(text),
    );
    assert!(i1 < i2 && i2 < i3, "{text}");
    let html = m.html.as_deref().expect("an HTML part");
    assert!(html.contains("first &lt;b&gt;bold&lt;/b&gt;"), "{html}");
    assert!(html.contains("third"));
    // Every message of the burst is in this one mail, so no other can follow.
    assert!(app.smtp.mails_to(&alice.email).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_read_meanwhile_are_not_mailed() {
    let app = TestApp::spawn(Options {
        email_window_secs: 4,
        ..Default::default()
    })
    .await;
    let alice = app.register("alice", "Alice").await;
    let bob = app.register("bob", "Bob").await;
    let room = app.direct(&alice, &bob).await;
    let m1 = app.send(&alice, &room, "read me on the phone").await;
    app.visit(&bob, &alice, Some((&room, m1["seq"].as_i64().unwrap())))
        .await;
    app.send(&alice, &room, "and this one you missed").await;
    // m1's job comes before m2's on bob's worker: whether they shared a
    // window or not, any mail about m1 would have arrived by now.
    let mails = app.smtp.wait_for(&bob.email).await;
    assert_eq!(mails.len(), 1, "{mails:#?}");
    let text = text_of(&mails[0]);
    assert!(text.contains("and this one you missed"), "{text}");
    assert!(!text.contains("read me on the phone"), "{text}");
    assert_eq!(mails[0].subject, "New message from Alice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocked_senders_are_not_mailed() {
    let app = TestApp::spawn(Options::default()).await;
    let alice = app.register("alice", "Alice").await;
    let bob = app.register("bob", "Bob").await;
    let mallory = app.register("mallory", "Mallory").await;
    let room = app.group(&alice, "team", &[&bob, &mallory]).await;
    app.call(
        reqwest::Method::PUT,
        &format!("/users/me/blocks/{}", mallory.id),
        &bob.token,
        None,
    )
    .await;
    app.send(&mallory, &room, "from the blocked one").await;
    app.send(&alice, &room, "from a friend").await;
    let mails = app.smtp.wait_for(&bob.email).await;
    assert_eq!(mails.len(), 1, "{mails:#?}");
    let text = text_of(&mails[0]);
    assert!(text.contains("#team"), "{text}");
    assert!(text.contains("Alice: from a friend"), "{text}");
    assert!(!text.contains("from the blocked one"), "{text}");
    // Alice is offline too and does not block Mallory.
    let to_alice = app.smtp.wait_for(&alice.email).await;
    assert!(text_of(&to_alice[0]).contains("Mallory: from the blocked one"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_mailed_when_email_is_off_and_previews_can_be_off() {
    let fcm = FcmStandIn::start().await;
    let app = TestApp::spawn(Options {
        email_window_secs: 1,
        preview: false,
        fcm: Some(fcm.clone()),
    })
    .await;
    let alice = app.register("alice", "Alice").await;
    let bob = app.register("bob", "Bob").await;
    let carol = app.register("carol", "Carol").await;
    app.call(
        reqwest::Method::PUT,
        "/users/me/notification-settings",
        &bob.token,
        Some(json!({"push": true, "email": false})),
    )
    .await;
    // Carol has a device but has not been around: offline, so e-mail only.
    app.put_device(&carol, "tok-carol-idle").await;
    let series = r#"chatd_notifications_dropped_total{reason="settings"}"#;
    let before = app.counter(series).await;
    let to_bob = app.direct(&alice, &bob).await;
    let to_carol = app.direct(&alice, &carol).await;
    app.send(&alice, &to_bob, "secret plans for bob").await;
    app.send(&alice, &to_carol, "secret plans for carol").await;
    eventually("the settings drop", || async {
        (app.counter(series).await > before).then_some(())
    })
    .await;
    let mails = app.smtp.wait_for(&carol.email).await;
    assert_eq!(mails.len(), 1);
    let text = text_of(&mails[0]);
    assert!(text.contains("Alice: New message"), "{text}");
    assert!(!text.contains("secret plans"), "{text}");
    assert!(!mails[0].html.as_deref().unwrap().contains("secret plans"));
    assert!(app.smtp.mails_to(&bob.email).is_empty());
    fcm.with(|l| {
        assert!(l.attempts.is_empty(), "no push for an offline user");
        assert!(l.errors.is_empty(), "{:?}", l.errors);
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_online_user_with_a_device_gets_one_push_per_message() {
    let fcm = FcmStandIn::start().await;
    let app = TestApp::spawn(Options {
        fcm: Some(fcm.clone()),
        ..Default::default()
    })
    .await;
    let alice = app.register("alice", "Alice").await;
    let bob = app.register("bob", "Bob").await;
    app.put_device(&bob, "tok-bob-phone").await;
    let room = app.direct(&alice, &bob).await;
    app.visit(&bob, &alice, None).await;
    let m1 = app.send(&alice, &room, "push one").await;
    let m2 = app.send(&alice, &room, "push two").await;
    let sent = eventually("two pushes", || async {
        let s = fcm.with(|l| l.sent.clone());
        (s.len() >= 2).then_some(s)
    })
    .await;
    assert_eq!(sent.len(), 2);
    for (push, (msg, body)) in sent.iter().zip([(&m1, "push one"), (&m2, "push two")]) {
        assert_eq!(push["token"], "tok-bob-phone");
        assert_eq!(push["notification"]["title"], "Alice");
        assert_eq!(push["notification"]["body"], body);
        assert_eq!(push["data"]["room_id"], room.as_str());
        assert_eq!(push["data"]["message_id"], msg["id"]);
        assert_eq!(push["data"]["sender_name"], "Alice");
        assert_eq!(push["data"]["preview"], body);
    }
    fcm.with(|l| {
        assert!(l.errors.is_empty(), "{:?}", l.errors);
        assert_eq!(l.token_requests, 1, "the access token is cached");
    });
    assert!(app.smtp.mails_to(&bob.email).is_empty());
    assert_eq!(app.devices(&bob).await, vec!["tok-bob-phone".to_owned()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unregistered_token_is_removed_and_mail_follows() {
    let fcm = FcmStandIn::start().await;
    fcm.script("tok-stale", &[Scripted::Unregistered]);
    let app = TestApp::spawn(Options {
        email_window_secs: 1,
        fcm: Some(fcm.clone()),
        ..Default::default()
    })
    .await;
    let alice = app.register("alice", "Alice").await;
    let bob = app.register("bob", "Bob").await;
    app.put_device(&bob, "tok-stale").await;
    let room = app.direct(&alice, &bob).await;
    app.visit(&bob, &alice, None).await;
    app.send(&alice, &room, "are you there?").await;
    let mails = app.smtp.wait_for(&bob.email).await;
    assert_eq!(mails.len(), 1);
    assert!(text_of(&mails[0]).contains("Alice: are you there?"));
    assert!(
        app.devices(&bob).await.is_empty(),
        "the stale token is gone"
    );
    fcm.with(|l| {
        assert_eq!(l.attempts["tok-stale"].len(), 1);
        assert!(l.sent.is_empty());
        assert!(l.errors.is_empty(), "{:?}", l.errors);
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overloaded_fcm_is_retried_honouring_retry_after() {
    let fcm = FcmStandIn::start().await;
    fcm.script(
        "tok-busy",
        &[
            Scripted::TooMany {
                retry_after_secs: 1,
            },
            Scripted::ServerError,
        ],
    );
    let app = TestApp::spawn(Options {
        fcm: Some(fcm.clone()),
        ..Default::default()
    })
    .await;
    let alice = app.register("alice", "Alice").await;
    let bob = app.register("bob", "Bob").await;
    app.put_device(&bob, "tok-busy").await;
    let room = app.direct(&alice, &bob).await;
    app.visit(&bob, &alice, None).await;
    app.send(&alice, &room, "eventually").await;
    let sent = eventually("the push after retries", || async {
        let s = fcm.with(|l| l.sent.clone());
        (!s.is_empty()).then_some(s)
    })
    .await;
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0]["notification"]["body"], "eventually");
    fcm.with(|l| {
        let at = &l.attempts["tok-busy"];
        assert_eq!(at.len(), 3, "429, 500, then 200");
        let waited = at[1] - at[0];
        assert!(
            waited >= Duration::from_millis(950),
            "Retry-After: 1 was not honoured ({waited:?})"
        );
        assert!(l.errors.is_empty(), "{:?}", l.errors);
    });
    assert_eq!(app.devices(&bob).await, vec!["tok-busy".to_owned()]);
    assert!(app.smtp.mails_to(&bob.email).is_empty());
}

/// A push sender whose first send panics, inside the pool's worker.
#[derive(Default)]
struct CrashesOnce {
    calls: std::sync::atomic::AtomicUsize,
    delivered: Mutex<Vec<(String, String)>>,
}

#[async_trait::async_trait]
impl chatd::notify::PushSender for CrashesOnce {
    async fn send(
        &self,
        token: &str,
        push: &chatd::notify::Push,
    ) -> Result<(), chatd::notify::NotifyError> {
        if self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
            panic!("injected worker crash");
        }
        self.delivered
            .lock()
            .unwrap()
            .push((token.to_owned(), push.body.clone()));
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_crash_loses_no_job() {
    use chatd::broker::{Broker, Envelope, Event, NotifyJob, Route};
    use chatd::domain::{ClientMsgId, Email, MessageBody, Username};
    use chatd::store::{NewMessage, NewUser};

    let dir = tempfile::tempdir().unwrap();
    let mut s = Settings::defaults();
    s.store.sqlite.path = dir.path().join("crash.db").to_string_lossy().into_owned();
    s.store.sqlite.synchronous = "normal".into();
    s.notify.requeue_delay_secs = 0;
    let limits = s.limits.clone();
    let stores = chatd::store::open(&s.store).await.unwrap();
    let broker: Arc<dyn Broker> = Arc::new(chatd::broker::inprocess::InProcess::new("n1"));
    let hub = chatd::actors::Hub::new(
        Arc::new(s),
        "n1".into(),
        "127.0.0.1:0".into(),
        stores.clone(),
        broker.clone(),
    );
    let mut ids = Vec::new();
    for name in ["alice", "bob"] {
        let u = stores
            .users
            .create_user(NewUser {
                username: Username::parse(name, &limits).unwrap(),
                email: Email::parse(&format!("{name}@example.com")).unwrap(),
                display_name: None,
                password_hash: "unused".into(),
            })
            .await
            .unwrap();
        ids.push(u.id);
    }
    let (alice, bob) = (ids[0].clone(), ids[1].clone());
    let (room, _) = stores.rooms.create_direct(&alice, &bob).await.unwrap();
    let stored = stores
        .messages
        .append_batch(vec![NewMessage {
            room_id: room.id.clone(),
            sender_id: alice.clone(),
            client_msg_id: ClientMsgId::parse("c1", &limits).unwrap(),
            body: MessageBody::parse("survives a crash", &limits).unwrap(),
            reply_to: None,
            attachments: Vec::new(),
        }])
        .await
        .unwrap()
        .remove(0)
        .unwrap()
        .message;
    stores
        .users
        .put_device(&bob, "android", "tok-1")
        .await
        .unwrap();
    stores
        .users
        .set_last_seen(&bob, &chatd::domain::now_rfc3339())
        .await
        .unwrap();

    let push = Arc::new(CrashesOnce::default());
    let pool = chatd::notify::start_with(hub.clone(), Some(push.clone()), None)
        .await
        .unwrap();
    broker
        .publish(
            Route::Notify,
            Envelope::new(
                "n1",
                Event::Notify(NotifyJob {
                    room_id: room.id.clone(),
                    message_id: stored.id.clone(),
                    seq: stored.seq,
                    sender_id: alice.clone(),
                    recipients: vec![bob.clone()],
                    created_at: stored.created_at.clone(),
                }),
            ),
        )
        .await
        .unwrap();
    let delivered = eventually("the push after the crash", || async {
        let d = push.delivered.lock().unwrap().clone();
        (!d.is_empty()).then_some(d)
    })
    .await;
    assert_eq!(
        delivered,
        vec![("tok-1".to_owned(), "survives a crash".to_owned())]
    );
    assert_eq!(push.calls.load(std::sync::atomic::Ordering::SeqCst), 2);
    hub.shutdown.cancel();
    tokio::time::timeout(WAIT, pool)
        .await
        .expect("the pool stops on shutdown")
        .unwrap();
}
