//! Socket limits (issue 16): a client that stops reading is dropped by the
//! server within `ws.write_timeout_ms` (its TCP connection released, not a
//! close frame queued behind megabytes), and a user's sockets are capped
//! per node (the newest over the cap is closed with 4009).

mod common;

use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// The server side of the TCP connection `server` ↔ `client` as this
/// process's kernel shows it: `Some(owned)` while it exists, `owned` being
/// whether a file descriptor still holds it (an orphan the kernel finishes
/// alone has inode 0). `None` once it is gone.
#[cfg(target_os = "linux")]
fn server_side(server: std::net::SocketAddr, client: std::net::SocketAddr) -> Option<bool> {
    fn hex(a: std::net::SocketAddr) -> String {
        let std::net::IpAddr::V4(ip) = a.ip() else {
            panic!("IPv4 test addresses expected")
        };
        format!("{:08X}:{:04X}", u32::from_le_bytes(ip.octets()), a.port())
    }
    let (local, remote) = (hex(server), hex(client));
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(1) == Some(&local.as_str()) && f.get(2) == Some(&remote.as_str()))
            .then(|| f.get(9).is_some_and(|inode| *inode != "0"))
    })
}

/// Whether the user has an open socket attached to a session on the node.
fn attached(app: &TestApp, user: &TestUser) -> bool {
    let uid = chatd::domain::UserId::parse(&user.id).unwrap();
    app.hub
        .sockets
        .get(&uid)
        .is_some_and(|v| v.iter().any(|h| !h.is_closed()))
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn a_client_that_stops_reading_is_dropped_by_the_server() {
    let app = spawn_app_with(|s| {
        s.ws.write_timeout_ms = 500;
        s.ws.close_timeout_ms = 500;
    })
    .await;
    let slow = app.register("stalled").await;
    let flooder = app.register("flooder").await;
    let room = app.direct(&slow, &flooder).await;

    // A raw client with a small receive window that never reads.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let tcp = sock.connect(app.addr).await.unwrap();
    let client_addr = tcp.local_addr().unwrap();
    let mut req = format!("ws://{}/ws", app.addr)
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", slow.token).parse().unwrap(),
    );
    let (mut ws, _) = tokio_tungstenite::client_async(req, tcp).await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !attached(&app, &slow) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "socket never attached"
        );
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(server_side(app.addr, client_addr), Some(true));

    // Flood the room until the server lets go of the connection.
    let body = "x".repeat(4000);
    let path = format!("/api/v1/rooms/{room}/messages");
    let mut sent = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while server_side(app.addr, client_addr) == Some(true) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the server still holds the stalled connection after {sent} messages"
        );
        let batch = (0..32).map(|i| {
            app.post(
                &path,
                Some(&flooder.token),
                json!({"client_msg_id": format!("f{}", sent + i), "body": body}),
            )
        });
        for (st, v) in futures_util::future::join_all(batch).await {
            assert_eq!(st, 201, "{v}");
        }
        sent += 32;
    }
    eprintln!("stalled connection released after {sent} messages");
    assert!(
        !attached(&app, &slow),
        "the node released the user's socket"
    );

    // The client, reading at last, gets what fitted and then the end of
    // the connection (EOF or reset), not a live socket.
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
    assert!(ended.is_ok(), "the connection did not end");

    // The flooder's socket is unaffected.
    let (mut w, _) = app.ws(&flooder).await;
    w.assert_none_of("error").await;
}

#[tokio::test]
async fn sockets_over_the_per_user_cap_are_refused_with_4009() {
    let app = spawn_app_with(|s| s.ws.max_sockets_per_user = 2).await;
    let a = app.register("capped").await;
    let other = app.register("uncapped").await;
    let (mut w1, _) = app.ws(&a).await;
    let (mut w2, _) = app.ws(&a).await;
    // The newest is refused right after the upgrade, before `ready`.
    let mut w3 = app.ws_raw(&a.token).await.expect("upgrade");
    assert_eq!(w3.closed().await, Some(4009));
    // The first two are untouched; other users are not affected.
    w1.assert_none_of("error").await;
    w2.assert_none_of("error").await;
    let (_o1, _) = app.ws(&other).await;
    let (_o2, _) = app.ws(&other).await;
    // A socket that ends frees its place.
    w1.stream.close(None).await.unwrap();
    assert_eq!(w1.closed().await, None);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut w = app.ws_raw(&a.token).await.expect("upgrade");
        match w.next().await {
            Some(v) if v["type"] == "ready" => break,
            _ => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the freed place was not given to a new socket"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// The same stalled reader over Socket.IO (a raw Engine.IO WebSocket that
/// sends the Socket.IO connect and then never reads).
#[cfg(target_os = "linux")]
#[tokio::test]
async fn a_socketio_client_that_stops_reading_is_dropped_by_the_server() {
    use futures_util::SinkExt;
    let app = spawn_app_with(|s| {
        s.ws.write_timeout_ms = 500;
        s.ws.close_timeout_ms = 500;
        s.ws.outbound_queue = 64;
    })
    .await;
    let slow = app.register("sstalled").await;
    let flooder = app.register("sflooder").await;
    let room = app.direct(&slow, &flooder).await;
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let tcp = sock.connect(app.addr).await.unwrap();
    let client_addr = tcp.local_addr().unwrap();
    let req = format!("ws://{}/socket.io/?EIO=4&transport=websocket", app.addr)
        .into_client_request()
        .unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(req, tcp).await.unwrap();
    let connect = format!("40{}", json!({"token": slow.token}));
    ws.send(tokio_tungstenite::tungstenite::Message::Text(
        connect.into(),
    ))
    .await
    .unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !attached(&app, &slow) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "socket never attached"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let body = "x".repeat(4000);
    let path = format!("/api/v1/rooms/{room}/messages");
    let mut sent = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while server_side(app.addr, client_addr) == Some(true) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the server still holds the stalled Socket.IO connection after {sent} messages (attached: {})",
            attached(&app, &slow)
        );
        let batch = (0..32).map(|i| {
            app.post(
                &path,
                Some(&flooder.token),
                json!({"client_msg_id": format!("f{}", sent + i), "body": body}),
            )
        });
        for (st, v) in futures_util::future::join_all(batch).await {
            assert_eq!(st, 201, "{v}");
        }
        sent += 32;
    }
    eprintln!("stalled Socket.IO connection released after {sent} messages");
    assert!(!attached(&app, &slow));
}
