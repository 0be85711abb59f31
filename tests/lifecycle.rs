//! Message lifecycle end to end (issue 19, message side): replies, edits,
//! deletes, reactions over HTTP and /ws, `message_updated` live, blocks,
//! offline catch-up, attachments on a message, and the error rows.

mod common;

use common::*;
use serde_json::{json, Value};

fn pct(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

async fn send(app: &TestApp, u: &TestUser, room: &str, body: Value) -> (u16, Value) {
    app.post(
        &format!("/api/v1/rooms/{room}/messages"),
        Some(&u.token),
        body,
    )
    .await
}

async fn text(app: &TestApp, u: &TestUser, room: &str, body: &str) -> Value {
    let (s, m) = send(
        app,
        u,
        room,
        json!({"client_msg_id": uniq("c"), "body": body}),
    )
    .await;
    assert_eq!(s, 201, "{m}");
    m
}

async fn edit(app: &TestApp, u: &TestUser, room: &str, id: &str, body: &str) -> (u16, Value) {
    app.req(
        reqwest::Method::PATCH,
        &format!("/api/v1/rooms/{room}/messages/{id}"),
        Some(&u.token),
        Some(json!({ "body": body })),
    )
    .await
}

async fn react(
    app: &TestApp,
    u: &TestUser,
    room: &str,
    id: &str,
    emoji: &str,
    on: bool,
) -> (u16, Value) {
    let path = format!(
        "/api/v1/rooms/{room}/messages/{id}/reactions/{}",
        pct(emoji)
    );
    let m = if on {
        reqwest::Method::PUT
    } else {
        reqwest::Method::DELETE
    };
    app.req(m, &path, Some(&u.token), None).await
}

async fn delete(app: &TestApp, u: &TestUser, room: &str, id: &str) -> (u16, Value) {
    app.delete(&format!("/api/v1/rooms/{room}/messages/{id}"), &u.token)
        .await
}

fn find<'a>(h: &'a [Value], id: &Value) -> &'a Value {
    h.iter()
        .find(|m| &m["id"] == id)
        .expect("message in history")
}

async fn updated(ws: &mut Ws, id: &Value) -> Value {
    ws.until("message_updated", |v| {
        v["type"] == "message_updated" && &v["message"]["id"] == id
    })
    .await["message"]
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_carry_every_lifecycle_field() {
    let app = spawn_app().await;
    let (alice, bob) = (app.register("al").await, app.register("bo").await);
    let room = app.direct(&alice, &bob).await;
    let (mut bws, _) = app.ws(&bob).await;
    let m = text(&app, &alice, &room, "hi").await;
    let live = bws.next_of("message").await;
    for v in [&m, &live, &app.history(&bob, &room).await[0]] {
        assert_eq!(v["reply_to"], Value::Null, "{v}");
        assert_eq!(v["edited_at"], Value::Null, "{v}");
        assert!(v.get("reply_to").is_some() && v.get("edited_at").is_some());
        assert_eq!(v["attachments"], json!([]));
        assert_eq!(v["reactions"], json!([]));
        assert_eq!(v["deleted"], false);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_edits_reactions_and_deletes_over_http_reach_every_device_live() {
    live_flow(&spawn_app().await).await;
}

/// A fresh MongoDB database on the server under test, or `None` to skip
/// (CI sets `CHAT_REQUIRE_MONGODB=1` so that it cannot skip).
async fn mongo_app() -> Option<TestApp> {
    let uri = match std::env::var("CHAT_TEST_MONGODB_URI") {
        Ok(u) if !u.trim().is_empty() => u,
        _ => {
            assert!(
                std::env::var("CHAT_REQUIRE_MONGODB").as_deref() != Ok("1"),
                "CHAT_REQUIRE_MONGODB=1 but CHAT_TEST_MONGODB_URI is not set"
            );
            eprintln!("CHAT_TEST_MONGODB_URI is not set: MongoDB test skipped");
            return None;
        }
    };
    Some(
        spawn_app_with(|s| {
            s.store.kind = chatd::config::StoreKind::Mongodb;
            s.store.mongodb.uri = uri;
            s.store.mongodb.database = uniq("lifecycle_");
        })
        .await,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lifecycle_works_on_mongodb() {
    let Some(app) = mongo_app().await else { return };
    live_flow(&app).await;
    offline_flow(&app).await;
}

async fn live_flow(app: &TestApp) {
    let (alice, bob, carol) = (
        app.register("al").await,
        app.register("bo").await,
        app.register("ca").await,
    );
    let room = app.group(&alice, &[&bob, &carol]).await;
    let (mut bws, _) = app.ws(&bob).await;
    let (mut bws2, _) = app.ws(&bob).await;
    let (mut cws, _) = app.ws(&carol).await;

    let m1 = text(app, &alice, &room, "first").await;
    let (s, reply) = send(
        app,
        &bob,
        &room,
        json!({"client_msg_id": uniq("c"), "body": "an answer", "reply_to": m1["id"]}),
    )
    .await;
    assert_eq!(s, 201, "{reply}");
    assert_eq!(reply["reply_to"], m1["id"]);
    let live = cws
        .until("reply", |v| {
            v["type"] == "message" && v["id"] == reply["id"]
        })
        .await;
    assert_eq!(live["reply_to"], m1["id"]);

    // Edit: the sender only; every device of every member hears it.
    let (s, e) = edit(
        app,
        &alice,
        &room,
        m1["id"].as_str().unwrap(),
        "  first, fixed ",
    )
    .await;
    assert_eq!(s, 200, "{e}");
    assert_eq!(e["body"], "first, fixed");
    assert!(e["edited_at"].is_string());
    assert_eq!(
        (e["seq"].clone(), e["created_at"].clone()),
        (m1["seq"].clone(), m1["created_at"].clone())
    );
    for ws in [&mut bws, &mut bws2, &mut cws] {
        let u = updated(ws, &m1["id"]).await;
        assert_eq!(u["body"], "first, fixed");
        assert_eq!(u["edited_at"], e["edited_at"]);
    }
    let (s, err) = edit(app, &bob, &room, m1["id"].as_str().unwrap(), "hijack").await;
    assert_eq!(
        (s, err["error"]["code"].as_str()),
        (403, Some("forbidden")),
        "{err}"
    );

    // Reactions: any member, idempotent.
    let id = m1["id"].as_str().unwrap();
    assert_eq!(react(app, &bob, &room, id, "👍", true).await.0, 204);
    let u = updated(&mut cws, &m1["id"]).await;
    assert_eq!(
        u["reactions"],
        json!([{"emoji": "👍", "count": 1, "users": [bob.id]}])
    );
    assert_eq!(react(app, &bob, &room, id, "👍", true).await.0, 204);
    assert_eq!(react(app, &carol, &room, id, "👍", true).await.0, 204);
    assert_eq!(react(app, &carol, &room, id, "🎉", true).await.0, 204);
    assert_eq!(react(app, &carol, &room, id, "🎉", false).await.0, 204);
    assert_eq!(react(app, &carol, &room, id, "🎉", false).await.0, 204);
    let h = app.history(&alice, &room).await;
    assert_eq!(
        find(&h, &m1["id"])["reactions"],
        json!([{"emoji": "👍", "count": 2, "users": [bob.id, carol.id]}])
    );

    // Delete: the owner of the group may delete bob's reply.
    let (s, v) = delete(app, &alice, &room, reply["id"].as_str().unwrap()).await;
    assert_eq!(s, 204, "{v}");
    let u = updated(&mut bws, &reply["id"]).await;
    assert_eq!(
        (u["deleted"].clone(), u["body"].clone()),
        (json!(true), json!(""))
    );
    let h = app.history(&carol, &room).await;
    let t = find(&h, &reply["id"]);
    assert_eq!(t["deleted"], true);
    assert_eq!(t["body"], "");
    assert_eq!(t["seq"], reply["seq"]);
    assert_eq!(t["attachments"], json!([]));
    // A tombstone cannot be edited or reacted to; deleting again is fine.
    let (s, err) = edit(app, &bob, &room, reply["id"].as_str().unwrap(), "back").await;
    assert_eq!(
        (s, err["error"]["code"].as_str()),
        (409, Some("message_deleted")),
        "{err}"
    );
    let (s, _) = delete(app, &bob, &room, reply["id"].as_str().unwrap()).await;
    assert_eq!(s, 204);
    // Carol may not delete alice's message (not the sender, not an admin).
    let (s, err) = delete(app, &carol, &room, id).await;
    assert_eq!((s, err["error"]["code"].as_str()), (403, Some("forbidden")));
    assert!(
        !find(&app.history(&alice, &room).await, &m1["id"])["deleted"]
            .as_bool()
            .unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_lifecycle_input_gets_clear_errors_and_stores_nothing() {
    let app = spawn_app_with(|s| s.limits.reactions_per_message = 2).await;
    let (alice, bob, dave) = (
        app.register("al").await,
        app.register("bo").await,
        app.register("da").await,
    );
    let room = app.direct(&alice, &bob).await;
    let other = app.direct(&alice, &dave).await;
    let m = text(&app, &alice, &room, "hello").await;
    let elsewhere = text(&app, &alice, &other, "elsewhere").await;
    let id = m["id"].as_str().unwrap();
    let code = |v: &Value| v["error"]["code"].as_str().unwrap_or("").to_owned();

    let (s, v) = edit(&app, &alice, &room, "nosuchmessage", "x").await;
    assert_eq!((s, code(&v)), (404, "not_found".into()), "{v}");
    let (s, v) = edit(&app, &alice, &room, elsewhere["id"].as_str().unwrap(), "x").await;
    assert_eq!((s, code(&v)), (404, "not_found".into()), "{v}");
    let (s, v) = edit(&app, &dave, &room, id, "x").await;
    assert_eq!((s, code(&v)), (403, "forbidden".into()), "{v}");
    let (s, v) = react(&app, &dave, &room, id, "👍", true).await;
    assert_eq!((s, code(&v)), (403, "forbidden".into()), "{v}");
    let (s, v) = edit(&app, &alice, &room, id, "   ").await;
    assert_eq!((s, code(&v)), (400, "invalid_body".into()), "{v}");
    let (s, v) = edit(&app, &alice, &room, id, &"x".repeat(4001)).await;
    assert_eq!((s, code(&v)), (400, "body_too_long".into()), "{v}");
    let (s, v) = react(&app, &bob, &room, id, "a b", true).await;
    assert_eq!((s, code(&v)), (400, "invalid_emoji".into()), "{v}");
    let (s, v) = react(&app, &bob, &room, id, &"x".repeat(40), true).await;
    assert_eq!((s, code(&v)), (400, "invalid_emoji".into()), "{v}");
    assert_eq!(react(&app, &bob, &room, id, "👍", true).await.0, 204);
    assert_eq!(react(&app, &bob, &room, id, "🎉", true).await.0, 204);
    let (s, v) = react(&app, &bob, &room, id, "🔥", true).await;
    assert_eq!((s, code(&v)), (400, "too_many_reactions".into()), "{v}");
    // Reply to a message of another room; to nothing.
    for bad in [elsewhere["id"].clone(), json!("nope")] {
        let (s, v) = send(
            &app,
            &alice,
            &room,
            json!({"client_msg_id": uniq("c"), "body": "re", "reply_to": bad}),
        )
        .await;
        assert_eq!((s, code(&v)), (400, "invalid_request".into()), "{v}");
    }
    // Unknown attachment; empty body without attachments.
    let (s, v) = send(
        &app,
        &alice,
        &room,
        json!({"client_msg_id": uniq("c"), "body": "", "attachments": ["0".repeat(32)]}),
    )
    .await;
    assert_eq!((s, code(&v)), (400, "invalid_request".into()), "{v}");
    let (s, v) = send(
        &app,
        &alice,
        &room,
        json!({"client_msg_id": uniq("c"), "body": ""}),
    )
    .await;
    assert_eq!((s, code(&v)), (400, "invalid_body".into()), "{v}");

    // Nothing was stored by any of it.
    let h = app.history(&alice, &room).await;
    assert_eq!(h.len(), 1);
    assert_eq!(h[0]["body"], "hello");
    assert_eq!(h[0]["edited_at"], Value::Null);
    assert_eq!(h[0]["reactions"].as_array().unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_edit_delete_react_answer_done_or_error() {
    let app = spawn_app().await;
    let (alice, bob) = (app.register("al").await, app.register("bo").await);
    let room = app.direct(&alice, &bob).await;
    let (mut aws, _) = app.ws(&alice).await;
    let (mut bws, _) = app.ws(&bob).await;
    let ack = aws.send_msg(&room, "c1", "hello").await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let mid = ack["message_id"].clone();
    bws.next_of("message").await;

    // A reply over the socket.
    bws.send(json!({"type": "send", "room_id": room, "client_msg_id": "r1", "body": "re", "reply_to": mid}))
        .await;
    let got = aws
        .until("reply", |v| {
            v["type"] == "message" && v["client_msg_id"] == "r1"
        })
        .await;
    assert_eq!(got["reply_to"], mid);

    aws.send(
        json!({"type": "edit", "room_id": room, "message_id": mid, "body": "hello!", "ref": "e1"}),
    )
    .await;
    let done = aws
        .until("done", |v| v["type"] == "done" || v["type"] == "error")
        .await;
    assert_eq!(done, json!({"type": "done", "ref": "e1"}));
    assert_eq!(updated(&mut bws, &mid).await["body"], "hello!");

    bws.send(
        json!({"type": "edit", "room_id": room, "message_id": mid, "body": "mine", "ref": "e2"}),
    )
    .await;
    let err = bws
        .until("error", |v| v["type"] == "error" || v["type"] == "done")
        .await;
    assert_eq!(
        (err["code"].as_str(), err["ref"].as_str()),
        (Some("forbidden"), Some("e2")),
        "{err}"
    );

    bws.send(json!({"type": "react", "room_id": room, "message_id": mid, "emoji": "❤️", "on": true, "ref": "r1"}))
        .await;
    let done = bws
        .until("done", |v| v["type"] == "done" || v["type"] == "error")
        .await;
    assert_eq!(done["ref"], "r1", "{done}");
    let u = aws
        .until("reaction", |v| {
            v["type"] == "message_updated" && v["message"]["reactions"][0]["emoji"] == "❤️"
        })
        .await;
    assert_eq!(u["message"]["reactions"][0]["users"], json!([bob.id]));
    bws.send(json!({"type": "react", "room_id": room, "message_id": mid, "emoji": " ", "on": true, "ref": "r2"}))
        .await;
    let err = bws
        .until("error", |v| v["type"] == "error" || v["type"] == "done")
        .await;
    assert_eq!(
        (err["code"].as_str(), err["ref"].as_str()),
        (Some("invalid_emoji"), Some("r2"))
    );

    aws.send(json!({"type": "delete", "room_id": room, "message_id": mid, "ref": "d1"}))
        .await;
    let done = aws
        .until("done", |v| v["type"] == "done" || v["type"] == "error")
        .await;
    assert_eq!(done["ref"], "d1", "{done}");
    let u = bws
        .until("tombstone", |v| {
            v["type"] == "message_updated" && v["message"]["deleted"] == true
        })
        .await;
    assert_eq!(u["message"]["body"], "");
    // sync returns the current state.
    bws.send(json!({"type": "sync", "room_id": room, "after_seq": 0}))
        .await;
    let synced = bws
        .until("sync", |v| v["type"] == "message" && v["id"] == mid)
        .await;
    assert_eq!(synced["deleted"], true);
    // Malformed frame: missing message_id.
    aws.send(json!({"type": "delete", "room_id": room})).await;
    let err = aws.next_of("error").await;
    assert_eq!(
        (err["code"].as_str(), err["ref"].as_str()),
        (Some("invalid_request"), Some("delete"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocks_apply_to_message_updated() {
    let app = spawn_app().await;
    let (alice, bob, carol) = (
        app.register("al").await,
        app.register("bo").await,
        app.register("ca").await,
    );
    let room = app.group(&alice, &[&bob, &carol]).await;
    let m = text(&app, &alice, &room, "hi").await;
    let (s, _) = app
        .put(
            &format!("/api/v1/users/me/blocks/{}", alice.id),
            &bob.token,
            None,
        )
        .await;
    assert_eq!(s, 204);
    let (mut bws, _) = app.ws(&bob).await;
    let (mut cws, _) = app.ws(&carol).await;
    let (s, _) = edit(&app, &alice, &room, m["id"].as_str().unwrap(), "edited").await;
    assert_eq!(s, 200);
    updated(&mut cws, &m["id"]).await;
    bws.assert_none_of("message_updated").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_device_gets_the_changes_it_missed_on_reconnect() {
    offline_flow(&spawn_app().await).await;
}

async fn offline_flow(app: &TestApp) {
    let (alice, bob) = (app.register("al").await, app.register("bo").await);
    let room = app.direct(&alice, &bob).await;
    let m1 = text(app, &alice, &room, "one").await;
    let m2 = text(app, &alice, &room, "two").await;
    {
        let (mut bws, _) = app.ws(&bob).await;
        bws.until("m2", |v| v["type"] == "message" && v["id"] == m2["id"])
            .await;
        bws.send(json!({"type": "delivered", "room_id": room, "up_to_seq": m2["seq"]}))
            .await;
        bws.assert_none_of("message_updated").await;
    }
    // Wait until the server saw bob's socket go (delivered cursor stored).
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (_, r) = app
            .get(&format!("/api/v1/rooms/{room}"), &alice.token)
            .await;
        let d = r["members"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["user_id"] == bob.id.as_str())
            .unwrap()["delivered_seq"]
            .clone();
        if d == m2["seq"] {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "delivered cursor not stored"
        );
        tokio::task::yield_now().await;
    }
    // While bob is away: an edit, a reaction, a delete, and a new message.
    let (s, _) = edit(
        app,
        &alice,
        &room,
        m1["id"].as_str().unwrap(),
        "one, edited",
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(
        react(app, &alice, &room, m1["id"].as_str().unwrap(), "👍", true)
            .await
            .0,
        204
    );
    assert_eq!(
        delete(app, &alice, &room, m2["id"].as_str().unwrap())
            .await
            .0,
        204
    );
    let m3 = text(app, &alice, &room, "three").await;

    let (mut bws, _) = app.ws(&bob).await;
    let mut got_m1 = None;
    let mut got_m2 = None;
    let mut got_m3 = false;
    while got_m1.is_none() || got_m2.is_none() || !got_m3 {
        let v = bws.next().await.expect("socket open");
        match v["type"].as_str() {
            Some("message_updated") if v["message"]["id"] == m1["id"] => {
                got_m1 = Some(v["message"].clone())
            }
            Some("message_updated") if v["message"]["id"] == m2["id"] => {
                got_m2 = Some(v["message"].clone())
            }
            Some("message") if v["id"] == m3["id"] => got_m3 = true,
            _ => {}
        }
    }
    let m1u = got_m1.unwrap();
    assert_eq!(m1u["body"], "one, edited");
    assert_eq!(m1u["reactions"][0]["count"], 1);
    assert_eq!(got_m2.unwrap()["deleted"], true);
    // The catch-up is not repeated on the next connect.
    drop(bws);
    let (mut again, _) = app.ws(&bob).await;
    again.assert_none_of("message_updated").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attachments_go_with_a_message_and_are_erased_with_it() {
    let app = spawn_app().await;
    let (alice, bob) = (app.register("al").await, app.register("bo").await);
    let room = app.direct(&alice, &bob).await;
    let resp = app
        .http
        .post(app.url(&format!(
            "/api/v1/rooms/{room}/attachments?filename=notes.txt"
        )))
        .bearer_auth(&alice.token)
        .header("content-type", "text/plain")
        .body(b"some notes".to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201);
    let a: Value = resp.json().await.unwrap();
    let (mut bws, _) = app.ws(&bob).await;
    let (s, m) = send(
        &app,
        &alice,
        &room,
        json!({"client_msg_id": uniq("c"), "body": "", "attachments": [a["id"]]}),
    )
    .await;
    assert_eq!(s, 201, "{m}");
    assert_eq!(m["body"], "");
    assert_eq!(m["attachments"][0]["id"], a["id"]);
    assert_eq!(m["attachments"][0]["filename"], "notes.txt");
    let live = bws
        .until("message", |v| v["type"] == "message" && v["id"] == m["id"])
        .await;
    assert_eq!(live["attachments"][0]["sha256"], a["sha256"]);
    // Bob may download it now that it was posted.
    let url = app.url(&format!(
        "/api/v1/attachments/{}",
        a["id"].as_str().unwrap()
    ));
    let r = app
        .http
        .get(&url)
        .bearer_auth(&bob.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    // The same upload cannot go with a second message.
    let (s, v) = send(
        &app,
        &alice,
        &room,
        json!({"client_msg_id": uniq("c"), "body": "again", "attachments": [a["id"]]}),
    )
    .await;
    assert_eq!(s, 400, "{v}");
    // Deleting the message erases the file.
    assert_eq!(
        delete(&app, &alice, &room, m["id"].as_str().unwrap())
            .await
            .0,
        204
    );
    let r = app
        .http
        .get(&url)
        .bearer_auth(&alice.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    let h = app.history(&bob, &room).await;
    assert_eq!(find(&h, &m["id"])["attachments"], json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socketio_edit_react_delete() {
    let app = spawn_app().await;
    let (alice, bob) = (app.register("al").await, app.register("bo").await);
    let room = app.direct(&alice, &bob).await;
    let m = text(&app, &alice, &room, "hello sio").await;
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/socketio");
    assert!(
        dir.join("node_modules/socket.io-client/package.json")
            .exists(),
        "socket.io-client is not installed: run `npm install` in tests/socketio"
    );
    let out = tokio::time::timeout(
        WAIT * 3,
        tokio::process::Command::new("node")
            .arg(dir.join("lifecycle.mjs"))
            .current_dir(&dir)
            .env("CHATD_URL", &app.base)
            .env("WAIT_MS", WAIT.as_millis().to_string())
            .env("TOKEN_A", &alice.token)
            .env("TOKEN_B", &bob.token)
            .env("ROOM_ID", &room)
            .env("MSG_ID", m["id"].as_str().unwrap())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the script ends")
    .expect("node runs");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert_eq!(stdout.trim(), "OK");
    let h = app.history(&bob, &room).await;
    assert_eq!(h[0]["deleted"], true);
}

/// The current state of every message of a room, as history shows it.
async fn room_state(s: &chatd::store::Stores, room: &chatd::domain::RoomId) -> Vec<Value> {
    let q = chatd::store::HistoryQuery {
        limit: 100,
        ..Default::default()
    };
    let h = s.messages.history(room, q).await.unwrap();
    h.iter().map(|m| serde_json::to_value(m).unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_and_import_carry_replies_edits_tombstones_and_reactions() {
    use chatd::domain::{ClientMsgId, Emoji, MessageBody};
    use chatd::store::{self, transfer, MessageChange, NewMessage};
    let dir = tempfile::tempdir().unwrap();
    let mut src = chatd::config::Settings::defaults().store;
    src.sqlite.path = dir.path().join("src.db").to_string_lossy().into_owned();
    let s = store::open(&src).await.unwrap();
    let a = store::contract::make_user(&s, "ex").await;
    let b = store::contract::make_user(&s, "ex").await;
    let (room, _) = s.rooms.create_direct(&a.id, &b.id).await.unwrap();
    let new = |cmid: &str, body: &str| {
        NewMessage::plain(
            room.id.clone(),
            a.id.clone(),
            ClientMsgId::from_trusted(cmid.into()),
            MessageBody::from_trusted(body.into()),
        )
    };
    let first = s
        .messages
        .append_batch(vec![new("c1", "one")])
        .await
        .unwrap();
    let first = first[0].as_ref().unwrap().message.clone();
    let mut reply = new("c2", "two");
    reply.reply_to = Some(first.id.clone());
    let third = new("c3", "three");
    let r = s.messages.append_batch(vec![reply, third]).await.unwrap();
    let third = r[1].as_ref().unwrap().message.clone();
    let edit = MessageChange::Edit {
        body: MessageBody::from_trusted("one, edited".into()),
        at: "2026-01-02T03:04:05.000Z".into(),
    };
    s.messages
        .change_message(&room.id, &first.id, edit)
        .await
        .unwrap();
    let react = MessageChange::React {
        user: b.id.clone(),
        emoji: Emoji::parse("👍").unwrap(),
        on: true,
        max_distinct: 20,
    };
    s.messages
        .change_message(&room.id, &first.id, react)
        .await
        .unwrap();
    s.messages
        .change_message(&room.id, &third.id, MessageChange::Delete)
        .await
        .unwrap();
    let before = room_state(&s, &room.id).await;
    assert_eq!(before[1]["reply_to"], json!(first.id.as_str()));
    assert_eq!(before[2]["deleted"], true);

    // SQLite → file → SQLite.
    let file = dir.path().join("dump.jsonl");
    transfer::export(&src, std::fs::File::create(&file).unwrap(), false)
        .await
        .unwrap();
    let mut dst = chatd::config::Settings::defaults().store;
    dst.sqlite.path = dir.path().join("dst.db").to_string_lossy().into_owned();
    let f = std::io::BufReader::new(std::fs::File::open(&file).unwrap());
    transfer::import(&dst, f, None, false).await.unwrap();
    let d = store::open(&dst).await.unwrap();
    assert_eq!(room_state(&d, &room.id).await, before);

    // And through MongoDB when available.
    let Ok(uri) = std::env::var("CHAT_TEST_MONGODB_URI") else {
        return;
    };
    let mut m = chatd::config::Settings::defaults().store;
    m.kind = chatd::config::StoreKind::Mongodb;
    m.mongodb.uri = uri;
    m.mongodb.database = uniq("lcexport_");
    let f = std::io::BufReader::new(std::fs::File::open(&file).unwrap());
    transfer::import(&m, f, None, false).await.unwrap();
    let ms = store::open(&m).await.unwrap();
    assert_eq!(room_state(&ms, &room.id).await, before);
    let back = dir.path().join("back.jsonl");
    transfer::export(&m, std::fs::File::create(&back).unwrap(), false)
        .await
        .unwrap();
    let mut again = chatd::config::Settings::defaults().store;
    again.sqlite.path = dir.path().join("again.db").to_string_lossy().into_owned();
    let f = std::io::BufReader::new(std::fs::File::open(&back).unwrap());
    transfer::import(&again, f, None, false).await.unwrap();
    let g = store::open(&again).await.unwrap();
    assert_eq!(room_state(&g, &room.id).await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_react_edit_delete_in_the_browser() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    assert!(
        root.join("tests/browser/node_modules/playwright-core")
            .exists(),
        "run `npm install` in tests/browser (scripts/test.sh does it)"
    );
    assert!(
        std::path::Path::new("/usr/bin/chromium").exists(),
        "Debian's chromium is required (apt-get install chromium; .ci/run does it)"
    );
    let app = spawn_app().await;
    let out = root.join("test-output/browser");
    std::fs::create_dir_all(&out).unwrap();
    let child = tokio::process::Command::new("node")
        .arg(root.join("tests/browser/lifecycle.mjs"))
        .env("CHATD_URL", &app.base)
        .env("OUT_DIR", &out)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(std::time::Duration::from_secs(180), child)
        .await
        .expect("browser test finishes within 3 minutes")
        .expect("node runs (is Node.js installed?)");
    assert!(
        output.status.success(),
        "lifecycle.mjs failed:\n--- stdout\n{}\n--- stderr\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
