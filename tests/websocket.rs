//! The socket contract against a real node: ready, send/ack, fan-out,
//! receipts, typing, presence, offline catch-up, sync, ping, error frames,
//! blocking.

mod common;

use common::*;
use serde_json::json;

#[tokio::test]
async fn upgrade_needs_a_valid_token() {
    let app = spawn_app().await;
    for token in ["", "garbage"] {
        let err = app.ws_raw(token).await.err().expect("refused");
        match err {
            tokio_tungstenite::tungstenite::Error::Http(r) => assert_eq!(r.status(), 401),
            other => panic!("expected 401, got {other:?}"),
        }
    }
    // The Authorization header works too.
    let u = app.register("hdr").await;
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        format!("ws://{}/ws", app.addr),
    )
    .unwrap();
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", u.token).parse().unwrap(),
    );
    let (stream, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let mut ws = Ws::new(stream);
    assert_eq!(ws.next_of("ready").await["user_id"], u.id.as_str());
}

#[tokio::test]
async fn ready_send_ack_message_and_idempotent_resend() {
    let app = spawn_app().await;
    let a = app.register("a").await;
    let b = app.register("b").await;
    let room = app.direct(&a, &b).await;
    let (mut wa, ready) = app.ws(&a).await;
    assert_eq!(ready["user_id"], a.id.as_str());
    assert!(ready["session_id"].is_string());
    assert_eq!(ready["node_id"], app.hub.node_id.as_str());
    assert_eq!(ready["rooms"][0]["room_id"], room.as_str());
    assert_eq!(ready["rooms"][0]["last_seq"], 0);
    let (mut wb, _) = app.ws(&b).await;

    let ack = wa.send_msg(&room, "m-1", " hi bob ").await;
    assert_eq!(ack["type"], "ack");
    assert_eq!(ack["seq"], 1);
    assert_eq!(ack["room_id"], room.as_str());
    assert!(ack["message_id"].is_string() && ack["created_at"].is_string());
    // Acked means durable: the store has it.
    assert_eq!(app.history(&a, &room).await[0]["id"], ack["message_id"]);

    let m = wb.next_of("message").await;
    assert_eq!(m["id"], ack["message_id"]);
    assert_eq!(m["body"], "hi bob");
    assert_eq!(m["sender_id"], a.id.as_str());
    assert_eq!(m["client_msg_id"], "m-1");
    assert_eq!(m["seq"], 1);

    let again = wa.send_msg(&room, "m-1", "hi bob").await;
    assert_eq!(again, ack, "a resend gets the same ack");
    assert_eq!(
        app.history(&a, &room).await.len(),
        1,
        "nothing stored twice"
    );
    wb.assert_none_of("message").await;
}

#[tokio::test]
async fn messages_arrive_in_seq_order_and_echo_to_other_devices() {
    let app = spawn_app().await;
    let a = app.register("a").await;
    let b = app.register("b").await;
    let room = app.direct(&a, &b).await;
    let (mut a1, _) = app.ws(&a).await;
    let (mut a2, _) = app.ws(&a).await;
    let (mut b1, _) = app.ws(&b).await;
    for i in 0..50 {
        a1.send(json!({"type": "send", "room_id": room, "client_msg_id": format!("c{i}"), "body": format!("n{i}")}))
            .await;
    }
    for expect in 1..=50 {
        let m = b1.next_of("message").await;
        assert_eq!(m["seq"], expect);
        let e = a2.next_of("message").await;
        assert_eq!(e["seq"], expect, "the sender's other device gets the echo");
    }
    let mut acks = 0;
    while acks < 50 {
        let v = a1.next().await.unwrap();
        assert_ne!(
            v["type"], "message",
            "the sending device gets acks, not echoes"
        );
        if v["type"] == "ack" {
            acks += 1;
            assert_eq!(v["seq"], acks);
        }
    }
}

#[tokio::test]
async fn group_fan_out_reaches_every_member() {
    let app = spawn_app().await;
    let o = app.register("o").await;
    let users = [
        app.register("g").await,
        app.register("g").await,
        app.register("g").await,
    ];
    let room = app.group(&o, &[&users[0], &users[1], &users[2]]).await;
    let mut socks = Vec::new();
    for u in &users {
        socks.push(app.ws(u).await.0);
    }
    let (mut wo, _) = app.ws(&o).await;
    let ack = wo.send_msg(&room, "g1", "hello all").await;
    for s in &mut socks {
        assert_eq!(s.next_of("message").await["id"], ack["message_id"]);
    }
}

#[tokio::test]
async fn receipts_move_cursors_forward_only() {
    let app = spawn_app().await;
    let a = app.register("a").await;
    let b = app.register("b").await;
    let room = app.direct(&a, &b).await;
    let (mut wa, _) = app.ws(&a).await;
    let (mut wb, _) = app.ws(&b).await;
    for i in 1..=3 {
        wa.send_msg(&room, &format!("r{i}"), "x").await;
    }
    wb.send(json!({"type": "delivered", "room_id": room, "up_to_seq": 3}))
        .await;
    let r = wa.next_of("receipt").await;
    assert_eq!(
        r,
        json!({"type": "receipt", "room_id": room, "user_id": b.id, "kind": "delivered", "up_to_seq": 3})
    );
    wb.send(json!({"type": "read", "room_id": room, "up_to_seq": 2}))
        .await;
    let r = wa.next_of("receipt").await;
    assert_eq!(
        (r["kind"].as_str(), r["up_to_seq"].as_i64()),
        (Some("read"), Some(2))
    );
    // Backwards: nothing moves, no receipt; beyond the end clamps.
    wb.send(json!({"type": "read", "room_id": room, "up_to_seq": 1}))
        .await;
    wb.send(json!({"type": "read", "room_id": room, "up_to_seq": 99}))
        .await;
    let r = wa.next_of("receipt").await;
    assert_eq!(
        (r["kind"].as_str(), r["up_to_seq"].as_i64()),
        (Some("read"), Some(3))
    );
    let (_, v) = app.get(&format!("/api/v1/rooms/{room}"), &a.token).await;
    let mb = v["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["user_id"] == b.id.as_str())
        .unwrap()
        .clone();
    assert_eq!(
        (mb["delivered_seq"].as_i64(), mb["read_seq"].as_i64()),
        (Some(3), Some(3))
    );
    let (_, list) = app.get("/api/v1/rooms", &b.token).await;
    assert_eq!(list["rooms"][0]["unread"], 0);

    let x = app.register("x").await;
    let (mut wx, _) = app.ws(&x).await;
    wx.send(json!({"type": "read", "room_id": room, "up_to_seq": 1}))
        .await;
    let e = wx.next_of("error").await;
    assert_eq!(
        (e["code"].as_str(), e["ref"].as_str()),
        (Some("forbidden"), Some("read"))
    );
}

#[tokio::test]
async fn typing_and_presence() {
    let app = spawn_app().await;
    let a = app.register("a").await;
    let b = app.register("b").await;
    let room = app.direct(&a, &b).await;
    let (mut wa, _) = app.ws(&a).await;
    let (mut wb, _) = app.ws(&b).await;
    let p = wa
        .until("b online", |v| {
            v["type"] == "presence" && v["user_id"] == b.id.as_str()
        })
        .await;
    assert_eq!(p["online"], true);

    wb.send(json!({"type": "typing", "room_id": room, "state": true}))
        .await;
    let t = wa.next_of("typing").await;
    assert_eq!(
        t,
        json!({"type": "typing", "room_id": room, "user_id": b.id, "state": true})
    );

    drop(wb);
    let p = wa
        .until("b offline", |v| {
            v["type"] == "presence" && v["user_id"] == b.id.as_str()
        })
        .await;
    assert_eq!(p["online"], false);
    assert!(p["last_seen"].is_string());
    let (_, prof) = app.get(&format!("/api/v1/users/{}", b.id), &a.token).await;
    assert_eq!(prof["online"], false);
    assert_eq!(prof["last_seen"], p["last_seen"]);
}

#[tokio::test]
async fn offline_messages_are_pushed_after_ready_in_order() {
    let app = spawn_app().await;
    let a = app.register("a").await;
    let b = app.register("b").await;
    let room = app.direct(&a, &b).await;
    let g = app.group(&a, &[&b]).await;
    let (mut wa, _) = app.ws(&a).await;
    for i in 1..=5 {
        wa.send_msg(&room, &format!("o{i}"), &format!("while away {i}"))
            .await;
    }
    wa.send_msg(&g, "g1", "group while away").await;

    let (mut wb, ready) = app.ws(&b).await;
    let cur = ready["rooms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["room_id"] == room.as_str())
        .unwrap()
        .clone();
    assert_eq!(
        (cur["last_seq"].as_i64(), cur["delivered_seq"].as_i64()),
        (Some(5), Some(0))
    );
    let mut direct = Vec::new();
    let mut group = Vec::new();
    while direct.len() < 5 || group.is_empty() {
        let m = wb.next_of("message").await;
        if m["room_id"] == room.as_str() {
            direct.push(m["seq"].as_i64().unwrap());
        } else {
            group.push(m["seq"].as_i64().unwrap());
        }
    }
    assert_eq!(direct, vec![1, 2, 3, 4, 5]);
    assert_eq!(group, vec![1]);

    // Once acknowledged as delivered, a reconnect pushes nothing again.
    wb.send(json!({"type": "delivered", "room_id": room, "up_to_seq": 5}))
        .await;
    wb.send(json!({"type": "delivered", "room_id": g, "up_to_seq": 1}))
        .await;
    wa.until("delivered receipt", |v| {
        v["type"] == "receipt" && v["room_id"] == g.as_str()
    })
    .await;
    drop(wb);
    let (mut wb2, _) = app.ws(&b).await;
    wb2.assert_none_of("message").await;
}

#[tokio::test]
async fn sync_returns_messages_after_a_seq() {
    let app = spawn_app().await;
    let a = app.register("a").await;
    let b = app.register("b").await;
    let x = app.register("x").await;
    let room = app.direct(&a, &b).await;
    let (mut wa, _) = app.ws(&a).await;
    for i in 1..=6 {
        wa.send_msg(&room, &format!("s{i}"), "x").await;
    }
    wa.send(json!({"type": "sync", "room_id": room, "after_seq": 3, "limit": 2}))
        .await;
    assert_eq!(wa.next_of("message").await["seq"], 4);
    assert_eq!(wa.next_of("message").await["seq"], 5);
    wa.assert_none_of("message").await;
    let (mut wx, _) = app.ws(&x).await;
    wx.send(json!({"type": "sync", "room_id": room, "after_seq": 0}))
        .await;
    let e = wx.next_of("error").await;
    assert_eq!(
        (e["code"].as_str(), e["ref"].as_str()),
        (Some("forbidden"), Some("sync"))
    );
}

#[tokio::test]
async fn bad_frames_get_error_frames_and_the_socket_stays_open() {
    let app = spawn_app().await;
    let a = app.register("a").await;
    let b = app.register("b").await;
    let x = app.register("x").await;
    let room = app.direct(&a, &b).await;
    let foreign = app.direct(&b, &x).await;
    let (mut w, _) = app.ws(&a).await;

    w.send(json!({"type": "ping", "nonce": 42})).await;
    assert_eq!(
        w.next_of("pong").await,
        json!({"type": "pong", "nonce": 42})
    );
    w.send(json!({"type": "ping"})).await;
    assert_eq!(w.next_of("pong").await, json!({"type": "pong"}));

    let cases = [
        ("{not json".to_owned(), "invalid_request", None),
        (json!({"no": "type"}).to_string(), "invalid_request", None),
        (json!({"type": "dance"}).to_string(), "unknown_type", Some("dance")),
        (json!({"type": "send", "room_id": room, "client_msg_id": "e1"}).to_string(), "invalid_request", Some("e1")),
        (json!({"type": "send", "room_id": room, "client_msg_id": "e2", "body": 5}).to_string(), "invalid_request", Some("e2")),
        (json!({"type": "send", "room_id": room, "client_msg_id": "e3", "body": "x".repeat(4001)}).to_string(), "body_too_long", Some("e3")),
        (json!({"type": "send", "room_id": room, "client_msg_id": "e4", "body": "  "}).to_string(), "invalid_body", Some("e4")),
        (json!({"type": "send", "room_id": room, "client_msg_id": "", "body": "x"}).to_string(), "invalid_client_msg_id", Some("send")),
        (json!({"type": "send", "room_id": foreign, "client_msg_id": "e5", "body": "x"}).to_string(), "forbidden", Some("e5")),
        (json!({"type": "send", "room_id": "0123456789abcdef", "client_msg_id": "e6", "body": "x"}).to_string(), "not_found", Some("e6")),
        (json!({"type": "send", "room_id": "../etc", "client_msg_id": "e7", "body": "x"}).to_string(), "not_found", Some("e7")),
        (json!({"type": "read", "room_id": room, "up_to_seq": "many"}).to_string(), "invalid_request", Some("read")),
        (json!({"type": "read", "room_id": room, "up_to_seq": -1}).to_string(), "invalid_request", Some("read")),
    ];
    for (frame, code, reference) in cases {
        w.send_text(&frame).await;
        let e = w.next_of("error").await;
        assert_eq!(e["code"], code, "{frame} -> {e}");
        assert_eq!(e["ref"].as_str(), reference, "{frame} -> {e}");
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    // Still open and working.
    let ack = w.send_msg(&room, "fine", "still here").await;
    assert_eq!(ack["seq"], 1);
    assert_eq!(
        app.history(&b, &foreign).await.len(),
        0,
        "nothing stored in the foreign room"
    );
}

#[tokio::test]
async fn oversize_frames_close_the_socket_with_1009() {
    let app = spawn_app_with(|s| s.ws.max_frame_bytes = 8192).await;
    let a = app.register("a").await;
    let (mut w, _) = app.ws(&a).await;
    w.send_text(&format!(
        "{{\"type\":\"ping\",\"nonce\":\"{}\"}}",
        "x".repeat(20_000)
    ))
    .await;
    assert_eq!(w.closed().await, Some(1009));
    // The server is fine.
    let (mut w2, _) = app.ws(&a).await;
    w2.send(json!({"type": "ping", "nonce": 1})).await;
    w2.next_of("pong").await;
}

#[tokio::test]
async fn blocking_hides_everything_of_the_blocked_user() {
    let app = spawn_app().await;
    let a = app.register("a").await;
    let b = app.register("b").await;
    let c = app.register("c").await;
    let direct = app.direct(&a, &b).await;
    let group = app.group(&c, &[&a, &b]).await;
    let (mut a1, _) = app.ws(&a).await;
    let (mut a2, _) = app.ws(&a).await;
    let (mut wb, _) = app.ws(&b).await;
    let (mut wc, _) = app.ws(&c).await;
    let (s, _) = app
        .put(&format!("/api/v1/users/me/blocks/{}", b.id), &a.token, None)
        .await;
    assert_eq!(s, 204);

    // B's direct send is acked to B (the block is not revealed) but A gets
    // nothing of it: A's own next message is the first thing A2 sees.
    let ack = wb.send_msg(&direct, "b1", "are you there?").await;
    assert_eq!(ack["type"], "ack");
    a1.send_msg(&direct, "a1", "after").await;
    let first = a2.next_of("message").await;
    assert_eq!(first["client_msg_id"], "a1", "{first}");

    // In a group: B's typing and message do not reach A; C's do.
    wb.send(json!({"type": "typing", "room_id": group, "state": true}))
        .await;
    wc.send(json!({"type": "typing", "room_id": group, "state": true}))
        .await;
    let t = a1.next_of("typing").await;
    assert_eq!(t["user_id"], c.id.as_str());
    wb.send_msg(&group, "bg", "from b").await;
    wc.send_msg(&group, "cg", "from c").await;
    let m = a1.next_of("message").await;
    assert_eq!(m["client_msg_id"], "cg");
    assert_eq!(m["seq"], 2);
    // History and sync hide B too; B still sees everything.
    let bodies: Vec<String> = app
        .history(&a, &group)
        .await
        .iter()
        .map(|m| m["client_msg_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(bodies, vec!["cg"]);
    assert_eq!(app.history(&b, &group).await.len(), 2);

    // Unblocking restores delivery.
    let (s, _) = app
        .delete(&format!("/api/v1/users/me/blocks/{}", b.id), &a.token)
        .await;
    assert_eq!(s, 204);
    wb.send_msg(&direct, "b2", "now?").await;
    let m = a1.next_of("message").await;
    assert_eq!(m["client_msg_id"], "b2");
}
