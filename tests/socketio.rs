//! Socket.IO at /socket.io/ against the real socket.io-client 4 (Node):
//! tests/socketio/client.mjs runs a scenario against a node spawned here
//! and reports each step as a JSON line. Needs `node` and `npm install` in
//! tests/socketio (scripts/test.sh does it); without them these tests fail
//! and say so.

mod common;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

/// The whole script's time limit (each of its waits has its own).
const SCRIPT_LIMIT: Duration = Duration::from_secs(120);

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/socketio")
}

/// Fails with a clear message when Node or the npm package is missing.
async fn require_node() {
    let v = Command::new("node").arg("--version").output().await;
    match v {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "`node --version` failed ({}): the Socket.IO tests need Node.js 18+",
            o.status
        ),
        Err(e) => panic!("Node.js is not installed (`node`: {e}): the Socket.IO tests need Node.js 18+ and `npm install` in tests/socketio"),
    }
    let pkg = dir().join("node_modules/socket.io-client/package.json");
    assert!(
        pkg.exists(),
        "socket.io-client is not installed: run `npm install` in tests/socketio \
         (scripts/test.sh does it); missing {}",
        pkg.display()
    );
}

struct Script {
    child: Child,
    stdin: ChildStdin,
    lines: tokio::io::Lines<BufReader<ChildStdout>>,
    steps: Vec<Value>,
}

async fn script(app: &TestApp, scenario: &str, env: &[(&str, &str)]) -> Script {
    require_node().await;
    let mut cmd = Command::new("node");
    cmd.arg(dir().join("client.mjs"))
        .current_dir(dir())
        .env("CHATD_URL", &app.base)
        .env("SCENARIO", scenario)
        .env("WAIT_MS", WAIT.as_millis().to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("node starts");
    let stdin = child.stdin.take().unwrap();
    let lines = BufReader::new(child.stdout.take().unwrap()).lines();
    Script {
        child,
        stdin,
        lines,
        steps: Vec::new(),
    }
}

impl Script {
    /// The next step line; fails with the script's stderr if it ended.
    async fn step(&mut self, name: &str) -> Value {
        let line = tokio::time::timeout(WAIT * 2, self.lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("no step {name:?} from the script in time"));
        match line.expect("read stdout") {
            Some(l) => {
                let v: Value = serde_json::from_str(&l)
                    .unwrap_or_else(|_| panic!("script printed a non-JSON line: {l}"));
                self.steps.push(v.clone());
                assert_eq!(v["step"], name, "steps so far: {:?}", self.steps);
                v
            }
            None => {
                let err = self.stderr().await;
                panic!(
                    "script ended before step {name:?}; steps {:?}; stderr:\n{err}",
                    self.steps
                )
            }
        }
    }

    async fn say(&mut self, line: &str) {
        self.stdin
            .write_all(format!("{line}\n").as_bytes())
            .await
            .expect("script reads stdin");
    }

    async fn stderr(&mut self) -> String {
        let mut s = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = tokio::time::timeout(
                Duration::from_secs(5),
                tokio::io::AsyncReadExt::read_to_string(&mut e, &mut s),
            )
            .await;
        }
        s
    }

    /// Reads the remaining steps and asserts a clean exit.
    async fn finish(mut self) -> Vec<Value> {
        let all = tokio::time::timeout(SCRIPT_LIMIT, async {
            while let Ok(Some(l)) = self.lines.next_line().await {
                if let Ok(v) = serde_json::from_str::<Value>(&l) {
                    self.steps.push(v);
                }
            }
            self.child.wait().await.expect("script exit status")
        })
        .await;
        let status = match all {
            Ok(s) => s,
            Err(_) => {
                let _ = self.child.kill().await;
                panic!(
                    "script did not finish within {SCRIPT_LIMIT:?}; steps {:?}",
                    self.steps
                )
            }
        };
        let err = self.stderr().await;
        assert!(
            status.success(),
            "socket.io-client script failed ({status}); steps {:?}; stderr:\n{err}",
            self.steps
        );
        assert_eq!(
            self.steps.last().map(|s| s["step"].clone()),
            Some(json!("done")),
            "stderr:\n{err}"
        );
        self.steps
    }
}

/// Two socket.io-client users register and log in over HTTP, are refused
/// with bad tokens, connect (WebSocket; polling + upgrade with the
/// Authorization header), send with acknowledgement, receive, exchange
/// receipts, typing, ping, errors, sync, and reconnect to get what they
/// missed after `ready`.
#[tokio::test]
async fn socketio_client_two_users() {
    let app = spawn_app().await;
    let s = script(&app, "two_users", &[]).await;
    let steps = s.finish().await;
    let names: Vec<&str> = steps.iter().filter_map(|s| s["step"].as_str()).collect();
    assert_eq!(
        names,
        [
            "registered",
            "refused",
            "connected",
            "acked",
            "receipts",
            "errors",
            "caught_up",
            "auto_reconnect",
            "polling",
            "done"
        ]
    );
    let refused = steps[1]["message"].as_str().unwrap();
    assert!(refused.contains("invalid or expired"), "{refused}");
    // Bob started on long polling and was upgraded to WebSocket (or stayed
    // on polling): either way he got everything.
    assert!(steps[2]["bob_transport"].is_string());
    // What the clients saw is what the store has.
    let room = steps[0]["room_id"].as_str().unwrap();
    let ack = &steps[3]["ack"];
    let msgs = app
        .hub
        .stores
        .messages
        .history(
            &chatd::domain::RoomId::parse(room).unwrap(),
            chatd::store::HistoryQuery {
                before: None,
                after: Some(0),
                limit: 100,
            },
        )
        .await
        .unwrap();
    assert_eq!(msgs[0].id.as_str(), ack["message_id"].as_str().unwrap());
    assert_eq!(
        msgs.len(),
        7,
        "a-1, b-1, a-2, a-3, a-4, p-1, b-2: nothing stored twice"
    );
}

/// A socket.io-client user and a /ws user chat both ways, with acks and
/// receipts; the Socket.IO user's own /ws device gets everything too.
#[tokio::test]
async fn socketio_and_ws_users_chat() {
    let app = spawn_app().await;
    let sio = app.register("sio").await;
    let ws_user = app.register("wsu").await;
    let room = app.direct(&sio, &ws_user).await;
    let (mut w, _) = app.ws(&ws_user).await;
    // The Socket.IO user's second device, on /ws.
    let (mut own, _) = app.ws(&sio).await;

    let mut s = script(
        &app,
        "mixed",
        &[
            ("SIO_TOKEN", &sio.token),
            ("ROOM_ID", &room),
            ("PEER_ID", &ws_user.id),
        ],
    )
    .await;
    assert_eq!(s.step("ready").await["user_id"], sio.id.as_str());

    // Socket.IO → /ws.
    let acked = s.step("acked").await;
    let ack = &acked["ack"];
    assert_eq!(ack["seq"], 1);
    let m = w.next_of("message").await;
    assert_eq!(m["id"], ack["message_id"]);
    assert_eq!(m["body"], "from socket.io");
    assert_eq!(m["sender_id"], sio.id.as_str());
    // The sender's other device gets the echo.
    let echo = own.next_of("message").await;
    assert_eq!(echo["id"], ack["message_id"]);

    // /ws → Socket.IO.
    let wack = w.send_msg(&room, "ws-1", "from ws").await;
    assert_eq!(wack["type"], "ack");
    s.say("go ws-sent").await;
    let got = s.step("got_message").await;
    assert_eq!(got["message"]["id"], wack["message_id"]);
    assert_eq!(got["message"]["seq"], 2);
    let on_own = own
        .until("the /ws user's message", |v| {
            v["type"] == "message" && v["seq"] == 2
        })
        .await;
    assert_eq!(on_own["id"], wack["message_id"]);

    // Receipts both ways: the Socket.IO user read seq 2 (script), the /ws
    // user reads seq 1.
    let r = w
        .until("read receipt from the Socket.IO user", |v| {
            v["type"] == "receipt" && v["kind"] == "read" && v["user_id"] == sio.id.as_str()
        })
        .await;
    assert_eq!(r["up_to_seq"], 2);
    w.send(json!({"type": "read", "room_id": room, "up_to_seq": 1}))
        .await;
    let rec = s.step("receipt").await;
    assert_eq!(rec["receipt"]["room_id"], room.as_str());
    s.say("go done").await;
    s.finish().await;
}

/// An operator disconnects the user: the Socket.IO client gets a `close`
/// event with 4001, then a server-side disconnect.
#[tokio::test]
async fn socketio_operator_disconnect() {
    let app = spawn_app().await;
    let admin = app.register_admin("admin").await;
    let u = app.register("kick").await;
    let mut s = script(&app, "kicked", &[("SIO_TOKEN", &u.token)]).await;
    s.step("ready").await;
    let (st, v) = app
        .post(
            &format!("/admin/v1/sessions/{}/disconnect", u.id),
            Some(&admin.token),
            json!({}),
        )
        .await;
    assert_eq!(st, 204, "{v}");
    let k = s.step("kicked").await;
    assert_eq!(k["close"]["code"], 4001);
    assert_eq!(k["reason"], "io server disconnect");
    s.finish().await;
}

/// Shutdown with sends in flight: every send is answered (acked, or refused
/// as `unavailable` if it was not handled yet), every ack callback comes
/// before the `close` event (1001), every stored message was acked, and the
/// transport closes (so clients reconnect by themselves, to another node).
#[tokio::test]
async fn socketio_shutdown_acks_accepted_messages_before_closing() {
    let mut app = spawn_app().await;
    let a = app.register("a").await;
    let b = app.register("b").await;
    let room = app.direct(&a, &b).await;
    let mut s = script(
        &app,
        "shutdown",
        &[("SIO_TOKEN", &a.token), ("ROOM_ID", &room)],
    )
    .await;
    s.step("ready").await;
    s.step("sending").await;
    app.hub.shutdown.cancel();
    let closed = s.step("closed").await;
    app.stop().await;
    assert_eq!(closed["code"], 1001);
    assert_eq!(closed["reason"], "transport close");
    assert_eq!(closed["ack_after_close"], false);
    // Every send was answered: acked, or refused as `unavailable` (queued
    // but not handled when the node stopped reading: resend).
    assert_eq!(
        closed["acked"].as_i64().unwrap() + closed["refused"].as_i64().unwrap(),
        200,
        "{closed}"
    );
    let c = rusqlite::Connection::open(app.dir.path().join("chat.db")).unwrap();
    let stored: i64 = c
        .query_row("SELECT COUNT(*) FROM messages", [], |r| r.get(0))
        .unwrap();
    assert_eq!(
        stored,
        closed["acked"].as_i64().unwrap(),
        "every stored message was acked before the close"
    );
    s.finish().await;
}

/// A socket.io-client that stops reading while its room is flooded: the
/// server closes it as a slow consumer (4008) instead of dropping frames;
/// what it got before is gap-free and it gets the rest after reconnecting.
#[tokio::test]
async fn socketio_slow_consumer_is_closed_not_dropped() {
    let app = spawn_app_with(|s| s.ws.outbound_queue = 64).await;
    let a = app.register("slow").await;
    let b = app.register("fast").await;
    let room = app.direct(&a, &b).await;
    let flag = app.dir.path().join("resume");
    let mut s = script(
        &app,
        "slow",
        &[
            ("SIO_TOKEN", &a.token),
            ("ROOM_ID", &room),
            ("RESUME_FLAG", flag.to_str().unwrap()),
        ],
    )
    .await;
    s.step("paused").await;
    let uid = chatd::domain::UserId::parse(&a.id).unwrap();
    // Closed: the user has no open socket left (a closed one is detached).
    let closed = || {
        !app.hub
            .sockets
            .get(&uid)
            .is_some_and(|v| v.iter().any(|h| !h.is_closed()))
    };
    assert!(!closed(), "the Socket.IO socket is attached");
    // Flood with large messages until the server gives up on the socket
    // (the kernel's socket buffers absorb some megabytes first).
    let body = "x".repeat(4000);
    let path = format!("/api/v1/rooms/{room}/messages");
    let mut sent = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !closed() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the paused socket was not closed after {sent} messages"
        );
        let batch = (0..32).map(|i| {
            app.post(
                &path,
                Some(&b.token),
                json!({"client_msg_id": format!("f{}", sent + i), "body": body}),
            )
        });
        for (st, v) in futures_util::future::join_all(batch).await {
            assert_eq!(st, 201, "{v}");
        }
        sent += 32;
    }
    std::fs::write(&flag, "").unwrap();
    let r = s.step("resynced").await;
    eprintln!("slow consumer: {sent} messages sent; {r}");
    assert_eq!(r["total"], sent);
    if !r["close"].is_null() {
        assert_eq!(r["close"]["code"], 4008);
    }
    s.finish().await;
}

/// `socketio.ping_interval_ms` / `ping_timeout_ms` reach the Engine.IO
/// handshake and the server pings at that interval (the Socket.IO protocol
/// test suites use 300/200 ms).
#[tokio::test]
async fn socketio_timers_are_configurable() {
    let app = spawn_app_with(|s| {
        s.socketio.ping_interval_ms = 300;
        s.socketio.ping_timeout_ms = 200;
        s.socketio.connect_timeout_ms = 1000;
        s.socketio.max_payload_bytes = 1_000_000;
    })
    .await;
    let a = app.register("beat").await;
    let mut s = script(&app, "heartbeat", &[("SIO_TOKEN", &a.token)]).await;
    let r = s.step("heartbeat").await;
    eprintln!("heartbeat: {r}");
    assert_eq!(r["ping_interval"], 300);
    assert_eq!(r["ping_timeout"], 200);
    for gap in r["gaps"].as_array().unwrap() {
        let gap = gap.as_u64().unwrap();
        assert!(
            (200..=1000).contains(&gap),
            "a ping every 300 ms, got a gap of {gap} ms"
        );
    }
    // socketioxide gives the Socket.IO socket its Engine.IO session id
    // (docs/protocol.md says so); this pins that down.
    assert_eq!(r["sid"], r["engine_sid"]);
    s.finish().await;
}

/// A Socket.IO connect over `ws.max_sockets_per_user` (counted with `/ws`
/// sockets) is refused with `too_many_sockets`.
#[tokio::test]
async fn socketio_connects_over_the_per_user_cap_are_refused() {
    let app = spawn_app_with(|s| s.ws.max_sockets_per_user = 1).await;
    let a = app.register("capped").await;
    let (mut ws, _) = app.ws(&a).await;
    let mut s = script(&app, "capped", &[("SIO_TOKEN", &a.token)]).await;
    let r = s.step("capped").await;
    assert!(
        r["message"]
            .as_str()
            .unwrap()
            .starts_with("too_many_sockets"),
        "{r}"
    );
    s.finish().await;
    ws.assert_none_of("error").await;
}
