//! /metrics moves when messages flow; request ids are echoed.

mod common;

use common::*;

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn metrics_move_when_messages_flow() {
    let app = spawn_app().await;
    let a = app.register("m").await;
    let b = app.register("m").await;
    let room = app.direct(&a, &b).await;
    let (mut wa, _) = app.ws(&a).await;
    let (mut wb, _) = app.ws(&b).await;
    let get = || async {
        app.http
            .get(app.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let before = get().await;
    for i in 0..5 {
        wa.send_msg(&room, &format!("m{i}"), "x").await;
    }
    for _ in 0..5 {
        wb.next_of("message").await;
    }
    let after = get().await;
    assert!(
        metric(&after, "chatd_messages_stored_total")
            >= metric(&before, "chatd_messages_stored_total") + 5.0
    );
    assert!(
        metric(&after, "chatd_messages_delivered_total")
            >= metric(&before, "chatd_messages_delivered_total") + 5.0
    );
    assert!(
        after.contains("chatd_ack_latency_seconds_bucket"),
        "ack latency histogram"
    );
    assert!(
        after.contains("chatd_store_append_seconds"),
        "store latency"
    );
    assert!(metric(&after, "chatd_connections") >= 2.0);
    assert!(after.contains("chatd_http_responses_total"));
}

#[tokio::test]
async fn responses_carry_a_request_id() {
    let app = spawn_app().await;
    let r = app.http.get(app.url("/healthz")).send().await.unwrap();
    assert!(r
        .headers()
        .get("x-request-id")
        .is_some_and(|v| !v.is_empty()));
    let r = app
        .http
        .get(app.url("/healthz"))
        .header("x-request-id", "abc-123")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "abc-123");
}
