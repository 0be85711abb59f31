//! Test support: `spawn_app()` starts a real chatd node on port 0 with a
//! temporary SQLite store; `TestApp` and `Ws` talk to it over real HTTP and
//! WebSocket connections. Waits are on events with timeouts, never sleeps.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use chatd::actors::Hub;
use chatd::config::Settings;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message as WsMessage;

pub const SECRET: &str = "test-secret-0123456789-0123456789-abcdef";
pub const WAIT: Duration = Duration::from_secs(10);

pub struct TestApp {
    pub base: String,
    pub addr: std::net::SocketAddr,
    pub hub: Arc<Hub>,
    pub http: reqwest::Client,
    pub dir: tempfile::TempDir,
    pub server: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

#[derive(Clone, Debug)]
pub struct TestUser {
    pub id: String,
    pub username: String,
    pub token: String,
    pub refresh: String,
}

pub fn test_settings(dir: &std::path::Path) -> Settings {
    let mut s = Settings::defaults();
    s.http.listen = "127.0.0.1:0".into();
    s.store.sqlite.path = dir.join("chat.db").to_string_lossy().into_owned();
    s.auth.jwt_secret = SECRET.into();
    s.node.id = format!("test-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    s
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

pub async fn spawn_app_with(f: impl FnOnce(&mut Settings)) -> TestApp {
    if std::env::var("TEST_LOG").is_ok() {
        chatd::telemetry::init_logs(false);
    }
    let dir = tempfile::tempdir().unwrap();
    let mut s = test_settings(dir.path());
    f(&mut s);
    let app = chatd::Application::build(s).await.expect("app builds");
    let addr = app.addr();
    let hub = app.hub();
    let server = tokio::spawn(app.run_until_stopped(std::future::pending()));
    TestApp {
        base: format!("http://{addr}"),
        addr,
        hub,
        http: reqwest::Client::new(),
        dir,
        server: Some(server),
    }
}

pub fn uniq(prefix: &str) -> String {
    format!(
        "{prefix}{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub async fn req(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut r = self.http.request(method, self.url(path));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await.expect("request sent");
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        let v = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"))
        };
        (status, v)
    }

    pub async fn get(&self, path: &str, token: &str) -> (u16, Value) {
        self.req(reqwest::Method::GET, path, Some(token), None)
            .await
    }

    pub async fn post(&self, path: &str, token: Option<&str>, body: Value) -> (u16, Value) {
        self.req(reqwest::Method::POST, path, token, Some(body))
            .await
    }

    pub async fn put(&self, path: &str, token: &str, body: Option<Value>) -> (u16, Value) {
        self.req(reqwest::Method::PUT, path, Some(token), body)
            .await
    }

    pub async fn delete(&self, path: &str, token: &str) -> (u16, Value) {
        self.req(reqwest::Method::DELETE, path, Some(token), None)
            .await
    }

    pub async fn register(&self, prefix: &str) -> TestUser {
        let name = uniq(prefix);
        let (s, v) = self
            .post(
                "/api/v1/auth/register",
                None,
                json!({"username": name, "email": format!("{name}@example.com"), "password": "password123"}),
            )
            .await;
        assert_eq!(s, 201, "{v}");
        TestUser {
            id: v["user"]["id"].as_str().unwrap().to_owned(),
            username: name,
            token: v["access_token"].as_str().unwrap().to_owned(),
            refresh: v["refresh_token"].as_str().unwrap().to_owned(),
        }
    }

    pub async fn register_named(&self, name: &str) -> TestUser {
        let (s, v) = self
            .post(
                "/api/v1/auth/register",
                None,
                json!({"username": name, "email": format!("{name}@example.com"), "password": "password123"}),
            )
            .await;
        assert_eq!(s, 201, "{v}");
        TestUser {
            id: v["user"]["id"].as_str().unwrap().to_owned(),
            username: name.to_owned(),
            token: v["access_token"].as_str().unwrap().to_owned(),
            refresh: v["refresh_token"].as_str().unwrap().to_owned(),
        }
    }

    /// Registers `name` and gives it the admin role, as the operator would
    /// (`chatd admin grant`): registering alone never makes an admin.
    pub async fn register_admin(&self, name: &str) -> TestUser {
        let u = self.register_named(name).await;
        let granted = self
            .hub
            .stores
            .users
            .set_admin(name, true)
            .await
            .expect("store");
        assert!(granted.is_some_and(|g| g.admin));
        u
    }

    pub async fn direct(&self, a: &TestUser, b: &TestUser) -> String {
        let (s, v) = self
            .post(
                "/api/v1/rooms",
                Some(&a.token),
                json!({"kind": "direct", "peer": b.id}),
            )
            .await;
        assert!(s == 201 || s == 200, "{s} {v}");
        v["id"].as_str().unwrap().to_owned()
    }

    pub async fn group(&self, owner: &TestUser, members: &[&TestUser]) -> String {
        let ids: Vec<&str> = members.iter().map(|m| m.id.as_str()).collect();
        let (s, v) = self
            .post(
                "/api/v1/rooms",
                Some(&owner.token),
                json!({"kind": "group", "name": "team", "members": ids}),
            )
            .await;
        assert_eq!(s, 201, "{v}");
        v["id"].as_str().unwrap().to_owned()
    }

    pub async fn history(&self, u: &TestUser, room: &str) -> Vec<Value> {
        let (s, v) = self
            .get(
                &format!("/api/v1/rooms/{room}/messages?limit=100"),
                &u.token,
            )
            .await;
        assert_eq!(s, 200, "{v}");
        v["messages"].as_array().unwrap().clone()
    }

    /// Opens a socket and reads its `ready` frame.
    pub async fn ws(&self, u: &TestUser) -> (Ws, Value) {
        let mut ws = self.ws_raw(&u.token).await.expect("upgrade");
        let ready = ws.next_of("ready").await;
        (ws, ready)
    }

    pub async fn ws_raw(&self, token: &str) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
        let url = format!("ws://{}/ws?access_token={token}", self.addr);
        let (stream, _) = tokio_tungstenite::connect_async(url).await?;
        Ok(Ws::new(stream))
    }

    /// Shuts the node down and waits for it to finish draining.
    pub async fn stop(&mut self) {
        self.hub.shutdown.cancel();
        if let Some(s) = self.server.take() {
            tokio::time::timeout(Duration::from_secs(40), s)
                .await
                .expect("stops in time")
                .unwrap()
                .unwrap();
        }
    }
}

pub struct Ws {
    pub stream: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    /// The close code, once the server closed the socket.
    pub last_close: Option<u16>,
}

impl Ws {
    pub fn new(
        stream: tokio_tungstenite::WebSocketStream<
            tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
        >,
    ) -> Self {
        Self {
            stream,
            last_close: None,
        }
    }

    /// The next JSON frame, or None at close (recording the close code).
    pub async fn stream_next(&mut self) -> Option<Value> {
        loop {
            let m = tokio::time::timeout(WAIT, self.stream.next())
                .await
                .expect("a frame within the timeout");
            match m {
                None | Some(Err(_)) => return None,
                Some(Ok(WsMessage::Text(t))) => return Some(serde_json::from_str(&t).unwrap()),
                Some(Ok(WsMessage::Close(f))) => {
                    self.last_close = f.map(|f| u16::from(f.code));
                    return None;
                }
                Some(Ok(_)) => continue,
            }
        }
    }

    pub async fn send(&mut self, v: Value) {
        self.stream
            .send(WsMessage::Text(v.to_string().into()))
            .await
            .unwrap();
    }

    pub async fn send_text(&mut self, t: &str) {
        self.stream.send(WsMessage::Text(t.into())).await.unwrap();
    }

    /// The next JSON frame, or None when the socket closed; panics after WAIT.
    pub async fn next(&mut self) -> Option<Value> {
        loop {
            let m = tokio::time::timeout(WAIT, self.stream.next())
                .await
                .expect("a frame within the timeout");
            match m {
                None | Some(Err(_)) => return None,
                Some(Ok(WsMessage::Text(t))) => return Some(serde_json::from_str(&t).unwrap()),
                Some(Ok(WsMessage::Close(_))) => return None,
                Some(Ok(_)) => continue,
            }
        }
    }

    /// The next frame of `ty`, skipping presence/typing/receipt noise of other types.
    pub async fn next_of(&mut self, ty: &str) -> Value {
        loop {
            let v = self
                .next()
                .await
                .unwrap_or_else(|| panic!("socket closed while waiting for {ty}"));
            if v["type"] == ty {
                return v;
            }
        }
    }

    /// Waits for a frame matching `pred`.
    pub async fn until(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        loop {
            let v = self
                .next()
                .await
                .unwrap_or_else(|| panic!("socket closed while waiting for {what}"));
            if pred(&v) {
                return v;
            }
        }
    }

    /// Proves no frame of `ty` is pending: a ping round trip comes back
    /// with nothing of that type before its pong (frames are ordered).
    pub async fn assert_none_of(&mut self, ty: &str) {
        let nonce = uniq("n");
        self.send(json!({"type": "ping", "nonce": nonce})).await;
        loop {
            let v = self.next().await.expect("socket open");
            assert_ne!(v["type"], ty, "unexpected frame {v}");
            if v["type"] == "pong" && v["nonce"] == nonce {
                return;
            }
        }
    }

    /// Sends a message and returns its ack.
    pub async fn send_msg(&mut self, room: &str, cmid: &str, body: &str) -> Value {
        self.send(json!({"type": "send", "room_id": room, "client_msg_id": cmid, "body": body}))
            .await;
        self.until("ack", |v| {
            (v["type"] == "ack" || v["type"] == "error")
                && (v["client_msg_id"] == cmid || v["ref"] == cmid)
        })
        .await
    }

    /// Waits until the socket is closed; returns the close code.
    pub async fn closed(&mut self) -> Option<u16> {
        loop {
            let m = tokio::time::timeout(WAIT, self.stream.next())
                .await
                .expect("closed within the timeout");
            match m {
                None | Some(Err(_)) => return None,
                Some(Ok(WsMessage::Close(f))) => return f.map(|f| u16::from(f.code)),
                Some(Ok(_)) => continue,
            }
        }
    }
}
