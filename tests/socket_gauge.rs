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
    let app = spawn_app_with(|s| s.ws.write_timeout_ms = 500).await;
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

    // The session actor of `b` stops; its supervisor restarts it and the
    // new one adopts the open sockets.
    let uid = chatd::domain::UserId::parse(&b.id).unwrap();
    let old = app.hub.sessions.get(&uid).map(|s| s.clone()).unwrap();
    old.stop(Some("test".into()));
    let deadline = tokio::time::Instant::now() + WAIT;
    while app
        .hub
        .sessions
        .get(&uid)
        .is_none_or(|s| s.get_id() == old.get_id())
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no new session actor"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for ws in &mut others {
        ws.assert_none_of("error").await;
    }
    expect_gauge(&app, 4, "session actor restarted").await;

    // A slow consumer: it stops reading while its room is flooded, until
    // the server closes it.
    let slow = app.register("gslow").await;
    let flooder = app.register("gflood").await;
    let room = app.direct(&slow, &flooder).await;
    let (stalled, _) = app.ws(&slow).await;
    expect_gauge(&app, 5, "a reader that will stall").await;
    let body = "x".repeat(4000);
    let path = format!("/api/v1/rooms/{room}/messages");
    let mut sent = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while gauge(&app).await != 4 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stalled socket still counts after {sent} messages"
        );
        let batch = (0..32).map(|i| {
            app.post(
                &path,
                Some(&flooder.token),
                serde_json::json!({"client_msg_id": format!("f{}", sent + i), "body": body}),
            )
        });
        futures_util::future::join_all(batch).await;
        sent += 32;
    }
    drop(stalled);
    expect_gauge(&app, 4, "slow consumer closed").await;

    // The other user's sockets close normally.
    for mut ws in others {
        ws.stream.close(None).await.unwrap();
        let _ = ws.closed().await;
    }
    expect_gauge(&app, 0, "all closed").await;
}
