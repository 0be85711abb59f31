//! The chatd binary as an operator runs it: logs written to a pipe are plain
//! text (no ANSI colour codes), and Ctrl-C (SIGINT) stops it cleanly — no
//! warning in the log, and the process exits promptly after `chatd stopped`.

use std::process::Stdio;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// The longest a stop may take from SIGINT to the exit of the process.
const STOP_BOUND: Duration = Duration::from_secs(2);

/// Sockets of other users open at the stop.
const SOCKETS: usize = 20;

/// chatd on a free port with its own data directory; its log lines (stdout
/// and stderr) arrive on the returned channel.
async fn start(dir: &std::path::Path) -> (Child, mpsc::UnboundedReceiver<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_chatd"))
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("CHAT__HTTP__LISTEN", "127.0.0.1:0")
        .env("CHAT__STORE__SQLITE__PATH", dir.join("chatd.db"))
        .env("CHAT__NODE__ID", "shutdown-test")
        // A generated secret is announced with a warning; this test wants none.
        .env(
            "CHAT__AUTH__JWT_SECRET",
            "5f0c3a7e9b2d4f6a8c1e3b5d7f9a2c4e6b8d0f1a3c5e7b9d2f4a6c8e0b1d3f5a",
        )
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("chatd starts");
    let (tx, rx) = mpsc::unbounded_channel();
    let out = child.stdout.take().unwrap();
    let err = child.stderr.take().unwrap();
    for r in [
        Box::new(out) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
        Box::new(err),
    ] {
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(r).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                let _ = tx.send(l);
            }
        });
    }
    (child, rx)
}

/// Collects log lines until one contains `what`; returns that line.
async fn line_with(
    rx: &mut mpsc::UnboundedReceiver<String>,
    seen: &mut Vec<String>,
    what: &str,
) -> String {
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let l = rx
                .recv()
                .await
                .expect("log closed before the expected line");
            seen.push(l.clone());
            if l.contains(what) {
                return l;
            }
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "no log line with {what:?}; log so far:\n{}",
            seen.join("\n")
        )
    })
}

/// The `addr=` of the "chatd started" line.
fn bound_addr(line: &str) -> String {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("addr="))
        .unwrap_or_else(|| panic!("no addr= in {line:?}"))
        .to_owned()
}

async fn post(http: &reqwest::Client, url: String, token: Option<&str>, body: Value) -> Value {
    let mut r = http.post(url).json(&body);
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    r.send().await.unwrap().json().await.unwrap()
}

#[tokio::test]
async fn sigint_stops_promptly_without_warnings_and_logs_are_plain() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, mut rx) = start(dir.path()).await;
    let mut seen = Vec::new();
    let started = line_with(&mut rx, &mut seen, "chatd started").await;
    let addr = bound_addr(&started);
    let base = format!("http://{addr}/api/v1");

    // Real traffic first: two users, a room, a connected socket, a message
    // acked over it, so the stop has sessions, a room and a pipeline to end.
    let http = reqwest::Client::new();
    let mut users = Vec::new();
    for name in ["stopa", "stopb"] {
        let s = post(
            &http,
            format!("{base}/auth/register"),
            None,
            json!({"username": name, "email": format!("{name}@example.com"), "password": "password123"}),
        )
        .await;
        users.push((
            s["access_token"].as_str().unwrap().to_owned(),
            s["user"]["id"].as_str().unwrap().to_owned(),
        ));
    }
    let room = post(
        &http,
        format!("{base}/rooms"),
        Some(&users[0].0),
        json!({"kind": "direct", "peer": users[1].1}),
    )
    .await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{addr}/ws?access_token={}", users[0].0))
            .await
            .expect("socket opens");
    let next = |v: Option<Result<WsMessage, _>>| -> Value {
        match v {
            Some(Ok(WsMessage::Text(t))) => serde_json::from_str(&t).unwrap(),
            other => panic!("expected a text frame, got {other:?}"),
        }
    };
    assert_eq!(next(ws.next().await)["type"], "ready");
    ws.send(WsMessage::Text(
        json!({"type": "send", "room_id": room, "client_msg_id": "c1", "body": "hi"})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    assert_eq!(next(ws.next().await)["type"], "ack");
    // More users online: each one's session goes offline (and publishes
    // its presence) while the node stops.
    let mut others = Vec::new();
    for i in 0..SOCKETS {
        let name = format!("stopper{i}");
        let s = post(
            &http,
            format!("{base}/auth/register"),
            None,
            json!({"username": name, "email": format!("{name}@example.com"), "password": "password123"}),
        )
        .await;
        let token = s["access_token"].as_str().unwrap().to_owned();
        let (mut w, _) =
            tokio_tungstenite::connect_async(format!("ws://{addr}/ws?access_token={token}"))
                .await
                .expect("socket opens");
        assert_eq!(next(w.next().await)["type"], "ready");
        others.push(w);
    }

    // Ctrl-C.
    let pid = child.id().expect("running").to_string();
    let kill = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    assert!(kill.success());
    let t = Instant::now();
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("chatd exits after SIGINT")
        .unwrap();
    let took = t.elapsed();
    // The socket was closed by the server (1001), not reset.
    while let Some(Ok(f)) = ws.next().await {
        if let WsMessage::Close(c) = f {
            assert_eq!(c.map(|c| u16::from(c.code)), Some(1001));
            break;
        }
    }
    while let Some(l) = rx.recv().await {
        seen.push(l);
    }
    let log = seen.join("\n");
    assert!(status.success(), "exit status {status:?}; log:\n{log}");
    assert!(log.contains("chatd stopped"), "log:\n{log}");
    assert!(
        !log.contains(" WARN ") && !log.contains("ERROR"),
        "warnings on a normal stop:\n{log}"
    );
    assert!(!log.contains('\u{1b}'), "ANSI codes in a piped log:\n{log}");
    assert!(
        took < STOP_BOUND,
        "chatd took {took:?} from SIGINT to exit (bound {STOP_BOUND:?}); log:\n{log}"
    );
}
