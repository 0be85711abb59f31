//! Issue 16: a client cannot hold a node's connections (header, body and
//! idle timeouts, the connection cap). Raw TCP clients wait on the server's
//! answer or EOF, never on a sleep.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads until the server closes; returns what it sent and how long it took.
async fn read_to_close(tcp: &mut TcpStream) -> (String, Duration) {
    let t0 = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(WAIT, tcp.read(&mut buf))
            .await
            .expect("the server closes the connection within the timeout");
        match n {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    (String::from_utf8_lossy(&out).into_owned(), t0.elapsed())
}

/// Reads one response (head and a `content-length` body).
async fn read_response(tcp: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&out).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let len = text[..end]
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if out.len() >= end + 4 + len {
                return text;
            }
        }
        let n = tokio::time::timeout(WAIT, tcp.read(&mut buf))
            .await
            .expect("a response within the timeout")
            .expect("read");
        assert!(n > 0, "closed before a whole response: {text}");
        out.extend_from_slice(&buf[..n]);
    }
}

async fn connect(app: &TestApp) -> TcpStream {
    TcpStream::connect(app.addr).await.unwrap()
}

#[tokio::test]
async fn half_a_header_is_closed_within_the_bound() {
    let app = spawn_app_with(|s| {
        s.http.header_read_timeout_secs = 1;
        s.http.idle_timeout_secs = 60;
    })
    .await;
    let mut tcp = connect(&app).await;
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: 1")
        .await
        .unwrap();
    let (got, took) = read_to_close(&mut tcp).await;
    assert!(!got.contains("200"), "no answer to half a header: {got}");
    assert!(took < Duration::from_secs(4), "closed after {took:?}");
    // The node still serves.
    let (s, _) = app.req(reqwest::Method::GET, "/healthz", None, None).await;
    assert_eq!(s, 200);
}

#[tokio::test]
async fn half_a_body_gets_408_and_a_close() {
    let app = spawn_app_with(|s| {
        s.http.body_read_timeout_secs = 1;
        s.http.idle_timeout_secs = 60;
    })
    .await;
    let mut tcp = connect(&app).await;
    tcp.write_all(
        b"POST /api/v1/auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"login\":",
    )
    .await
    .unwrap();
    let (got, took) = read_to_close(&mut tcp).await;
    assert!(got.starts_with("HTTP/1.1 408"), "{got}");
    assert!(got.contains(r#""code":"request_timeout""#), "{got}");
    assert!(took < Duration::from_secs(4), "answered after {took:?}");
}

#[tokio::test]
async fn a_request_in_progress_is_not_idle() {
    // The handler waits for the body longer than the idle timeout: the
    // body timeout answers, the idle timeout does not cut it short.
    let app = spawn_app_with(|s| {
        s.http.idle_timeout_secs = 1;
        s.http.body_read_timeout_secs = 2;
    })
    .await;
    let mut tcp = connect(&app).await;
    tcp.write_all(
        b"POST /api/v1/auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{",
    )
    .await
    .unwrap();
    let (got, took) = read_to_close(&mut tcp).await;
    assert!(got.starts_with("HTTP/1.1 408"), "{got}");
    assert!(
        took >= Duration::from_millis(1500),
        "answered after {took:?}"
    );
}

#[tokio::test]
async fn idle_connections_are_closed() {
    let app = spawn_app_with(|s| {
        s.http.idle_timeout_secs = 1;
        s.http.header_read_timeout_secs = 60;
    })
    .await;
    // Kept alive after a request, then silent.
    let mut tcp = connect(&app).await;
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let resp = read_response(&mut tcp).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let (rest, took) = read_to_close(&mut tcp).await;
    assert!(rest.is_empty(), "{rest}");
    assert!(took < Duration::from_secs(4), "closed after {took:?}");
    // Never said anything.
    let mut tcp = connect(&app).await;
    let (rest, took) = read_to_close(&mut tcp).await;
    assert!(rest.is_empty(), "{rest}");
    assert!(took < Duration::from_secs(4), "closed after {took:?}");
}

#[tokio::test]
async fn connections_over_the_cap_are_refused_with_503() {
    let app = spawn_app_with(|s| s.http.max_connections = 2).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut tcp = connect(&app).await;
        tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let resp = read_response(&mut tcp).await;
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
        held.push(tcp);
    }
    let mut tcp = connect(&app).await;
    let _ = tcp
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let (got, _) = read_to_close(&mut tcp).await;
    assert!(got.starts_with("HTTP/1.1 503"), "{got}");
    assert!(got.to_ascii_lowercase().contains("retry-after: 1"), "{got}");
    let body = &got[got.find("\r\n\r\n").unwrap() + 4..];
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(v["error"]["code"], "unavailable");

    // A closed connection gives its place back.
    drop(held.pop());
    let mut served = false;
    for _ in 0..200 {
        let mut tcp = connect(&app).await;
        let _ = tcp
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await;
        let (got, _) = read_to_close(&mut tcp).await;
        if got.starts_with("HTTP/1.1 200") {
            served = true;
            break;
        }
        assert!(got.starts_with("HTTP/1.1 503") || got.is_empty(), "{got}");
    }
    assert!(served, "a place was freed");
}

#[tokio::test]
async fn sockets_count_against_the_cap_and_shutdown_still_drains() {
    let mut app = spawn_app_with(|s| s.http.max_connections = 2).await;
    let u = app.register("cap").await;
    // Close the client's pooled connection; its place comes back once the
    // server has seen the close.
    app.http = reqwest::Client::new();
    let mut sockets = Vec::new();
    for _ in 0..200 {
        if let Ok(mut ws) = app.ws_raw(&u.token).await {
            ws.next_of("ready").await;
            sockets.push(ws);
            if sockets.len() == 2 {
                break;
            }
        }
    }
    assert_eq!(sockets.len(), 2, "two sockets fit under the cap");
    let mut tcp = connect(&app).await;
    let _ = tcp
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let (got, _) = read_to_close(&mut tcp).await;
    assert!(
        got.starts_with("HTTP/1.1 503"),
        "upgraded sockets hold their places: {got}"
    );
    // The sockets still work, and shutdown drains and closes them.
    sockets[0]
        .send(serde_json::json!({"type": "ping", "nonce": "n1"}))
        .await;
    let pong = sockets[0].next_of("pong").await;
    assert_eq!(pong["nonce"], "n1");
    app.stop().await;
    assert_eq!(sockets[0].closed().await, Some(1001));
}
