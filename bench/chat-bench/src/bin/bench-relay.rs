//! bench-relay: the transport ceiling for chat-bench.
//!
//! A minimal relay on tokio-tungstenite with no auth, no actors and no storage.
//! It speaks just enough of the client contract (shared/API.md) for chat-bench:
//!
//! * `POST /api/v1/auth/register` returns a fake user whose token is its id;
//! * `POST /api/v1/rooms` creates a direct or group room in memory;
//! * `GET /healthz` answers 200;
//! * `GET /ws?access_token=TOKEN` (or `Authorization: Bearer`) sends `ready`, acks each
//!   `send` at once and forwards one `message` frame (serialised once) to every other
//!   socket of every member of the room; `ping` gets `pong`.
//!
//! The WebSocket read buffer is 4 KiB, as chatd's should be.
//!
//! With `--durable PATH` (or `$RELAY_DURABLE=PATH`) it is the durable baseline of issue 14:
//! every `send` is queued to one SQLite writer thread (WAL, `synchronous = FULL`), which
//! commits whatever is queued as one transaction and only then acks and forwards each
//! message of the batch. That is what "a relay that group-commits to SQLite before
//! acking" means in BENCHMARKS.md ("relay-durable" in the suite).
//!
//! Usage: `bench-relay [--durable PATH] [LISTEN_ADDR]` (default `127.0.0.1:9101`, or
//! `$RELAY_LISTEN`).

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use dashmap::DashMap;
use futures_util::{FutureExt, SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

type Tx = mpsc::UnboundedSender<Message>;

struct Room {
    members: Vec<Arc<str>>,
    /// Held while a message gets its seq and is queued to every socket, so that every
    /// socket sees a room's messages in seq order (as the contract asks of chatd).
    seq: Mutex<u64>,
}

#[derive(Default)]
struct State {
    next_id: AtomicU64,
    next_conn: AtomicU64,
    next_msg: AtomicU64,
    rooms: DashMap<Arc<str>, Arc<Room>>,
    direct: DashMap<(Arc<str>, Arc<str>), Arc<str>>,
    conns: DashMap<Arc<str>, Vec<(u64, Tx)>>,
    /// The SQLite writer's queue, in durable mode.
    durable: Option<std::sync::mpsc::Sender<Job>>,
}

/// One `send` waiting for the group commit: the row to store, then what to do after.
struct Job {
    room_id: String,
    seq: u64,
    id: String,
    sender_id: Arc<str>,
    client_msg_id: String,
    body: String,
    created_at: String,
    /// The sender's socket, for the ack.
    tx: Tx,
    conn_id: u64,
    ack: Message,
    out: Message,
    room: Arc<Room>,
}

/// Opens the database (WAL, `synchronous = FULL`) and starts the writer thread.
fn start_writer(
    path: &str,
    state: Arc<std::sync::OnceLock<Arc<State>>>,
) -> anyhow::Result<std::sync::mpsc::Sender<Job>> {
    let conn = rusqlite::Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS messages (
            room_id TEXT NOT NULL, seq INTEGER NOT NULL, id TEXT NOT NULL,
            sender_id TEXT NOT NULL, client_msg_id TEXT NOT NULL, body TEXT NOT NULL,
            created_at TEXT NOT NULL, PRIMARY KEY (room_id, seq))",
    )?;
    let (qtx, qrx) = std::sync::mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name("sqlite-writer".into())
        .spawn(move || {
            let mut conn = conn;
            let mut batch: Vec<Job> = Vec::with_capacity(4096);
            while let Ok(first) = qrx.recv() {
                batch.push(first);
                while batch.len() < 4096 {
                    match qrx.try_recv() {
                        Ok(j) => batch.push(j),
                        Err(_) => break,
                    }
                }
                let commit = (|| -> rusqlite::Result<()> {
                    let t = conn.transaction()?;
                    {
                        let mut st = t.prepare_cached(
                            "INSERT INTO messages (room_id, seq, id, sender_id, client_msg_id, body, created_at)
                             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                        )?;
                        for j in &batch {
                            st.execute(rusqlite::params![
                                j.room_id, j.seq as i64, j.id, &*j.sender_id, j.client_msg_id, j.body, j.created_at
                            ])?;
                        }
                    }
                    t.commit()
                })();
                if let Err(e) = commit {
                    eprintln!("bench-relay: commit failed: {e}");
                    std::process::exit(1);
                }
                let state = state.get().expect("set before serving");
                for j in batch.drain(..) {
                    let _ = j.tx.send(j.ack);
                    forward(state, &j.room, j.conn_id, &j.out);
                }
            }
        })?;
    Ok(qtx)
}

/// Queues `out` to every socket of every member of `room` but the sender's.
fn forward(state: &State, room: &Room, conn_id: u64, out: &Message) {
    for m in &room.members {
        if let Some(conns) = state.conns.get(m) {
            for (id, ctx) in conns.iter() {
                if *id != conn_id {
                    let _ = ctx.send(out.clone());
                }
            }
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut addr = std::env::var("RELAY_LISTEN").ok();
    let mut durable = std::env::var("RELAY_DURABLE")
        .ok()
        .filter(|p| !p.is_empty());
    let mut argv = std::env::args().skip(1);
    while let Some(a) = argv.next() {
        if a == "--durable" {
            durable = Some(
                argv.next()
                    .ok_or_else(|| anyhow::anyhow!("--durable needs a path"))?,
            );
        } else {
            addr = Some(a);
        }
    }
    let addr = addr.unwrap_or_else(|| "127.0.0.1:9101".to_string());
    let listener = TcpListener::bind(&addr).await?;
    let cell = Arc::new(std::sync::OnceLock::new());
    let writer = match &durable {
        Some(p) => Some(start_writer(p, cell.clone())?),
        None => None,
    };
    let state = Arc::new(State {
        durable: writer,
        ..State::default()
    });
    let _ = cell.set(state.clone());
    match &durable {
        Some(p) => eprintln!(
            "bench-relay listening on {addr}, durable: SQLite {p} (WAL, synchronous=FULL)"
        ),
        None => eprintln!("bench-relay listening on {addr}"),
    }
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: keep serving the sockets we have.
                eprintln!("accept: {e}");
                tokio::task::yield_now().await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        tokio::spawn(async move {
            if let Err(e) = serve(stream, state).await {
                let _ = e; // a client went away; nothing to report
            }
        });
    }
}

async fn serve(stream: TcpStream, state: Arc<State>) -> anyhow::Result<()> {
    // Look at the request line: a WebSocket upgrade goes to tungstenite, the rest
    // to the tiny HTTP/1.1 handler.
    let mut peek = [0u8; 8];
    loop {
        let n = stream.peek(&mut peek).await?;
        if n == 0 {
            return Ok(());
        }
        if n >= 7 {
            break;
        }
    }
    if peek.starts_with(b"GET /ws") {
        serve_ws(stream, state).await
    } else {
        serve_http(stream, state).await
    }
}

// ---------------------------------------------------------------- HTTP stubs

async fn serve_http(mut stream: TcpStream, state: Arc<State>) -> anyhow::Result<()> {
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    loop {
        // Read one request: head, then Content-Length bytes of body.
        let head_end = loop {
            if let Some(p) = find(&buf, b"\r\n\r\n") {
                break p + 4;
            }
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        let mut lines = head.split("\r\n");
        let request_line = lines.next().unwrap_or("");
        let mut parts = request_line.split(' ');
        let method = parts.next().unwrap_or("").to_string();
        let path = parts.next().unwrap_or("").to_string();
        let mut content_length = 0usize;
        let mut bearer = None;
        for l in lines {
            if let Some((k, v)) = l.split_once(':') {
                let k = k.trim().to_ascii_lowercase();
                let v = v.trim();
                if k == "content-length" {
                    content_length = v.parse().unwrap_or(0);
                } else if k == "authorization" {
                    bearer = v.strip_prefix("Bearer ").map(|s| s.to_string());
                }
            }
        }
        while buf.len() < head_end + content_length {
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let body = buf[head_end..head_end + content_length].to_vec();
        buf.drain(..head_end + content_length);

        let (status, json) = route(&state, &method, &path, bearer.as_deref(), &body);
        let reason = match status {
            200 => "OK",
            201 => "Created",
            400 => "Bad Request",
            401 => "Unauthorized",
            _ => "Not Found",
        };
        let resp = format!(
            "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{json}",
            json.len()
        );
        stream.write_all(resp.as_bytes()).await?;
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn err(status: u16, code: &str) -> (u16, String) {
    (
        status,
        serde_json::json!({"error": {"code": code, "message": code}}).to_string(),
    )
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[derive(Deserialize)]
struct CreateRoom {
    kind: String,
    peer: Option<String>,
    name: Option<String>,
    #[serde(default)]
    members: Vec<String>,
}

fn route(
    state: &State,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: &[u8],
) -> (u16, String) {
    match (method, path) {
        ("GET", "/healthz") | ("GET", "/readyz") => (200, "{\"status\":\"ok\"}".into()),
        ("POST", "/api/v1/auth/register") => {
            let v: serde_json::Value = match serde_json::from_slice(body) {
                Ok(v) => v,
                Err(_) => return err(400, "invalid_request"),
            };
            let id = format!("u{}", state.next_id.fetch_add(1, Ordering::Relaxed) + 1);
            let user = serde_json::json!({
                "id": id, "username": v["username"], "email": v["email"],
                "display_name": v.get("display_name"), "created_at": now_rfc3339(),
            });
            (
                201,
                serde_json::json!({
                    "user": user, "access_token": id, "refresh_token": format!("r-{id}"),
                    "expires_in": 3600,
                })
                .to_string(),
            )
        }
        ("POST", "/api/v1/rooms") => {
            let Some(me) = bearer else {
                return err(401, "unauthorized");
            };
            let me: Arc<str> = Arc::from(me);
            let req: CreateRoom = match serde_json::from_slice(body) {
                Ok(v) => v,
                Err(_) => return err(400, "invalid_request"),
            };
            let (members, status, id) = if req.kind == "direct" {
                let Some(peer) = req.peer else {
                    return err(400, "invalid_request");
                };
                let peer: Arc<str> = Arc::from(peer.as_str());
                let key = if me <= peer {
                    (me.clone(), peer.clone())
                } else {
                    (peer.clone(), me.clone())
                };
                if let Some(id) = state.direct.get(&key) {
                    (vec![me.clone(), peer], 200, id.clone())
                } else {
                    let id: Arc<str> = Arc::from(format!(
                        "r{}",
                        state.next_id.fetch_add(1, Ordering::Relaxed) + 1
                    ));
                    state.direct.insert(key, id.clone());
                    (vec![me.clone(), peer], 201, id)
                }
            } else {
                let mut members = vec![me.clone()];
                for m in req.members {
                    if *m != *me {
                        members.push(Arc::from(m.as_str()));
                    }
                }
                let id: Arc<str> = Arc::from(format!(
                    "r{}",
                    state.next_id.fetch_add(1, Ordering::Relaxed) + 1
                ));
                (members, 201, id)
            };
            if status == 201 {
                state.rooms.insert(
                    id.clone(),
                    Arc::new(Room {
                        members: members.clone(),
                        seq: Mutex::new(0),
                    }),
                );
            }
            let members: Vec<_> = members
                .iter()
                .map(|m| serde_json::json!({"user_id": &**m, "role": if *m == me {"owner"} else {"member"}}))
                .collect();
            (
                status,
                serde_json::json!({
                    "id": &*id, "kind": req.kind, "name": req.name, "members": members,
                    "created_at": now_rfc3339(), "last_seq": 0,
                })
                .to_string(),
            )
        }
        _ => err(404, "not_found"),
    }
}

// ---------------------------------------------------------------- WebSocket

#[derive(Deserialize)]
struct InFrame<'a> {
    #[serde(rename = "type", borrow)]
    ty: Cow<'a, str>,
    #[serde(borrow, default)]
    room_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    client_msg_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    body: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    nonce: Option<Cow<'a, str>>,
}

#[derive(Serialize)]
struct Ack<'a> {
    #[serde(rename = "type")]
    ty: &'static str,
    client_msg_id: &'a str,
    message_id: &'a str,
    room_id: &'a str,
    seq: u64,
    created_at: &'a str,
}

#[derive(Serialize)]
struct OutMessage<'a> {
    #[serde(rename = "type")]
    ty: &'static str,
    id: &'a str,
    room_id: &'a str,
    seq: u64,
    sender_id: &'a str,
    client_msg_id: &'a str,
    body: &'a str,
    created_at: &'a str,
}

fn token_from(req: &Request) -> Option<String> {
    if let Some(q) = req.uri().query() {
        for kv in q.split('&') {
            if let Some(t) = kv.strip_prefix("access_token=") {
                return Some(t.to_string());
            }
        }
    }
    req.headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|s| s.to_string())
}

// The callback type is tungstenite's; its large Err variant is not ours to box.
#[allow(clippy::result_large_err)]
async fn serve_ws(stream: TcpStream, state: Arc<State>) -> anyhow::Result<()> {
    let mut user: Option<String> = None;
    let config = WebSocketConfig::default().read_buffer_size(4096);
    let callback = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        match token_from(req) {
            Some(t) if !t.is_empty() => {
                user = Some(t);
                Ok(resp)
            }
            _ => {
                let mut e = ErrorResponse::new(Some("unauthorized".into()));
                *e.status_mut() = StatusCode::UNAUTHORIZED;
                Err(e)
            }
        }
    };
    let ws =
        tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config)).await?;
    let me: Arc<str> = Arc::from(user.expect("set by the callback").as_str());
    let conn_id = state.next_conn.fetch_add(1, Ordering::Relaxed);
    let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
    state
        .conns
        .entry(me.clone())
        .or_default()
        .push((conn_id, tx.clone()));

    let (mut sink, mut stream) = ws.split();
    let writer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            if sink.feed(m).await.is_err() {
                return;
            }
            while let Ok(m) = rx.try_recv() {
                if sink.feed(m).await.is_err() {
                    return;
                }
            }
            if sink.flush().await.is_err() {
                return;
            }
        }
        let _ = sink.close().await;
    });

    let ready = serde_json::json!({
        "type": "ready", "user_id": &*me, "session_id": format!("s{conn_id}"),
        "node_id": "bench-relay", "rooms": [],
    })
    .to_string();
    let _ = tx.send(Message::text(ready));

    let mut room_cache: HashMap<String, Arc<Room>> = HashMap::new();
    while let Some(msg) = stream.next().await {
        let msg = match msg {
            Ok(m) => m,
            Err(_) => break,
        };
        handle_frame(&state, &me, conn_id, &tx, &mut room_cache, msg);
        // Frames that are already buffered are handled before yielding.
        while let Some(Some(Ok(m))) = stream.next().now_or_never() {
            handle_frame(&state, &me, conn_id, &tx, &mut room_cache, m);
        }
    }

    if let Some(mut v) = state.conns.get_mut(&me) {
        v.retain(|(id, _)| *id != conn_id);
    }
    drop(tx);
    let _ = writer.await;
    Ok(())
}

fn handle_frame(
    state: &State,
    me: &Arc<str>,
    conn_id: u64,
    tx: &Tx,
    room_cache: &mut HashMap<String, Arc<Room>>,
    msg: Message,
) {
    let Message::Text(text) = msg else {
        return;
    };
    let Ok(f) = serde_json::from_str::<InFrame>(text.as_str()) else {
        let _ = tx.send(Message::text(
            r#"{"type":"error","code":"invalid_frame","message":"not a JSON frame"}"#,
        ));
        return;
    };
    match &*f.ty {
        "send" => {
            let (Some(room_id), Some(cmid), Some(body)) = (f.room_id, f.client_msg_id, f.body)
            else {
                let _ = tx.send(Message::text(
                    r#"{"type":"error","code":"invalid_request","message":"send needs room_id, client_msg_id, body"}"#,
                ));
                return;
            };
            let room = match room_cache.get(&*room_id) {
                Some(r) => r.clone(),
                None => match state.rooms.get(&*room_id) {
                    Some(r) => {
                        room_cache.insert(room_id.to_string(), r.clone());
                        r.clone()
                    }
                    None => {
                        let e = serde_json::json!({"type":"error","code":"not_found","message":"no such room","ref": &*cmid});
                        let _ = tx.send(Message::text(e.to_string()));
                        return;
                    }
                },
            };
            let mut seq_guard = room.seq.lock().expect("not poisoned");
            *seq_guard += 1;
            let seq = *seq_guard;
            let mid = format!("m{}", state.next_msg.fetch_add(1, Ordering::Relaxed) + 1);
            let created_at = now_rfc3339();
            let ack = serde_json::to_string(&Ack {
                ty: "ack",
                client_msg_id: &cmid,
                message_id: &mid,
                room_id: &room_id,
                seq,
                created_at: &created_at,
            })
            .expect("serialisable");
            let out = serde_json::to_string(&OutMessage {
                ty: "message",
                id: &mid,
                room_id: &room_id,
                seq,
                sender_id: me,
                client_msg_id: &cmid,
                body: &body,
                created_at: &created_at,
            })
            .expect("serialisable");
            let out = Message::Text(Utf8Bytes::from(out));
            if let Some(q) = &state.durable {
                // Queued under the room's lock, so the writer stores, acks and forwards
                // each room's messages in seq order.
                let _ = q.send(Job {
                    room_id: room_id.into_owned(),
                    seq,
                    id: mid,
                    sender_id: me.clone(),
                    client_msg_id: cmid.into_owned(),
                    body: body.into_owned(),
                    created_at,
                    tx: tx.clone(),
                    conn_id,
                    ack: Message::text(ack),
                    out,
                    room: room.clone(),
                });
            } else {
                let _ = tx.send(Message::text(ack));
                forward(state, &room, conn_id, &out);
            }
            drop(seq_guard);
        }
        "ping" => {
            let pong = match f.nonce {
                Some(n) => serde_json::json!({"type": "pong", "nonce": &*n}).to_string(),
                None => r#"{"type":"pong"}"#.to_string(),
            };
            let _ = tx.send(Message::text(pong));
        }
        // delivered, read, typing, sync: accepted and ignored by the ceiling relay.
        _ => {}
    }
}
