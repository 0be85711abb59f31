//! `chatd_connections` equals the node's live sockets at all times, also
//! after abrupt closes (issue 16). The gauge is process-wide, so this
//! binary holds one test and one node.

mod common;

use std::time::Duration;

use common::*;

async fn gauge(app: &TestApp) -> i64 {
    let body = app
        .http
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    body.lines()
        .find_map(|l| l.strip_prefix("chatd_connections "))
        .map(|v| v.trim().parse::<f64>().unwrap() as i64)
        .unwrap_or(0)
}

/// Polls /metrics until the gauge shows `want`.
async fn expect_gauge(app: &TestApp, want: i64, what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let g = gauge(app).await;
        if g == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: chatd_connections is {g}, live sockets {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Drops a socket without a close frame: linger 0 makes the kernel send a
/// reset, as a killed client's would.
fn reset(ws: Ws) {
    if let tokio_tungstenite::MaybeTlsStream::Plain(tcp) = ws.stream.get_ref() {
        #[allow(deprecated)] // blocking on close is what linger 0 avoids
        tcp.set_linger(Some(Duration::ZERO)).unwrap();
    }
    drop(ws);
}

#[tokio::test]
async fn connection_gauge_follows_live_sockets_through_abrupt_closes() {
    let app = spawn_app().await;
    let admin = app.register_admin("admin").await;
    let a = app.register("gauge").await;
    let b = app.register("gauge").await;
    expect_gauge(&app, 0, "no sockets").await;

    // Ten sockets of one user; half of them reset at once.
    let mut socks = Vec::new();
    for _ in 0..10 {
        socks.push(app.ws(&a).await.0);
    }
    expect_gauge(&app, 10, "ten open").await;
    for ws in socks.drain(..5) {
        reset(ws);
    }
    expect_gauge(&app, 5, "five reset").await;
    // Plain drops (no close frame, FIN) of two more.
    for ws in socks.drain(..2) {
        drop(ws);
    }
    expect_gauge(&app, 3, "two dropped").await;

    // An operator disconnects the user: every socket closes at once.
    let mut others = Vec::new();
    for _ in 0..4 {
        others.push(app.ws(&b).await.0);
    }
    expect_gauge(&app, 7, "four more").await;
    let (st, v) = app
        .post(
            &format!("/admin/v1/sessions/{}/disconnect", a.id),
            Some(&admin.token),
            serde_json::json!({}),
        )
        .await;
    assert_eq!(st, 204, "{v}");
    for mut ws in socks {
        assert_eq!(ws.closed().await, Some(4001));
    }
    expect_gauge(&app, 4, "user kicked").await;

    // The other user's sockets close normally.
    for mut ws in others {
        ws.stream.close(None).await.unwrap();
        let _ = ws.closed().await;
    }
    expect_gauge(&app, 0, "all closed").await;
}
