//! The actor tree: supervision restarts, idle rooms, admin inspection and
//! authorisation, graceful shutdown.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

fn find<'a>(node: &'a Value, pred: &dyn Fn(&Value) -> bool, out: &mut Vec<&'a Value>) {
    if pred(node) {
        out.push(node);
    }
    for c in node["children"].as_array().into_iter().flatten() {
        find(c, pred, out);
    }
}

async fn actor_id(app: &TestApp, admin: &TestUser, kind: &str, subject: &str) -> Option<String> {
    let (s, tree) = app.get("/admin/v1/actors", &admin.token).await;
    assert_eq!(s, 200, "{tree}");
    let mut hits = Vec::new();
    find(
        &tree,
        &|n| n["kind"] == kind && n["subject"] == subject,
        &mut hits,
    );
    hits.first().map(|n| n["id"].as_str().unwrap().to_owned())
}

/// Polls `f` until it is true (state owned by actors, no event to wait on).
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn admin_endpoints_need_the_admin_role() {
    let app = spawn_app().await;
    let admin = app.register_admin("admin").await;
    let u = app.register("plain").await;
    for path in [
        "/admin/v1/cluster",
        "/admin/v1/actors",
        &format!("/admin/v1/sessions/{}", u.id),
    ] {
        let (s, v) = app.req(reqwest::Method::GET, path, None, None).await;
        assert_eq!(s, 401, "{path} {v}");
        let (s, v) = app.get(path, &u.token).await;
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (403, Some("forbidden")),
            "{path}"
        );
        let (s, _) = app.get(path, &admin.token).await;
        assert_eq!(s, 200, "{path}");
    }
    let (s, _) = app
        .post(
            &format!("/admin/v1/sessions/{}/disconnect", u.id),
            Some(&u.token),
            json!({}),
        )
        .await;
    assert_eq!(s, 403);
    let (_, c) = app.get("/admin/v1/cluster", &admin.token).await;
    assert_eq!(c["nodes"][0]["id"], app.hub.node_id.as_str());
}

#[tokio::test]
async fn the_tree_shows_sessions_and_rooms_and_disconnect_closes_sockets() {
    let app = spawn_app().await;
    let admin = app.register_admin("admin").await;
    let a = app.register("a").await;
    let b = app.register("b").await;
    let room = app.direct(&a, &b).await;
    let (mut wa, _) = app.ws(&a).await;
    let (_wa2, _) = app.ws(&a).await;
    wa.send_msg(&room, "t1", "x").await;
    let (_, tree) = app.get("/admin/v1/actors", &admin.token).await;
    assert_eq!(tree["kind"], "root_supervisor");
    assert!(actor_id(&app, &admin, "session", &a.id).await.is_some());
    assert!(actor_id(&app, &admin, "room", &room).await.is_some());

    let (s, v) = app
        .get(&format!("/admin/v1/sessions/{}", a.id), &admin.token)
        .await;
    assert_eq!(s, 200);
    assert_eq!(v["sessions"][0]["devices"].as_array().unwrap().len(), 2);
    assert_eq!(v["sessions"][0]["presence"], "online");
    let (s, v) = app
        .get(&format!("/admin/v1/rooms/{room}"), &admin.token)
        .await;
    assert_eq!(s, 200);
    assert_eq!(v["last_seq"], 1);
    assert_eq!(v["online_members"], json!([a.id]));

    let (s, _) = app
        .post(
            &format!("/admin/v1/sessions/{}/disconnect", a.id),
            Some(&admin.token),
            json!({}),
        )
        .await;
    assert_eq!(s, 204);
    assert_eq!(wa.closed().await, Some(4001));
}

#[tokio::test]
async fn a_stopped_room_actor_restarts_and_loses_nothing() {
    let app = spawn_app().await;
    let admin = app.register_admin("admin").await;
    let a = app.register("a").await;
    let b = app.register("b").await;
    let room = app.direct(&a, &b).await;
    let (mut wa, _) = app.ws(&a).await;
    let (mut wb, _) = app.ws(&b).await;
    // Keep sends in flight while the actor is stopped.
    for i in 0..30 {
        wa.send(
            json!({"type": "send", "room_id": room, "client_msg_id": format!("k{i}"), "body": "x"}),
        )
        .await;
    }
    let first = wa.next_of("ack").await;
    assert_eq!(first["client_msg_id"], "k0");
    let old = actor_id(&app, &admin, "room", &room)
        .await
        .expect("room actor");
    let (s, _) = app
        .post(
            &format!("/admin/v1/actors/{old}/stop"),
            Some(&admin.token),
            json!({}),
        )
        .await;
    assert_eq!(s, 204);
    for i in 30..60 {
        wa.send(
            json!({"type": "send", "room_id": room, "client_msg_id": format!("k{i}"), "body": "x"}),
        )
        .await;
    }
    // Every send is acked or refused with a retryable error; retry those.
    let mut acked: std::collections::HashSet<String> = ["k0".to_owned()].into();
    let mut retry = Vec::new();
    while acked.len() + retry.len() < 60 {
        let v = wa.next().await.unwrap();
        match v["type"].as_str() {
            Some("ack") => {
                acked.insert(v["client_msg_id"].as_str().unwrap().to_owned());
            }
            Some("error") => retry.push(v["ref"].as_str().unwrap().to_owned()),
            _ => {}
        }
    }
    for cmid in retry {
        let ack = wa.send_msg(&room, &cmid, "x").await;
        assert_eq!(ack["type"], "ack");
        acked.insert(cmid);
    }
    assert_eq!(acked.len(), 60);
    // B got all 60 in order, and the store has exactly 60.
    for expect in 1..=60 {
        assert_eq!(wb.next_of("message").await["seq"], expect);
    }
    assert_eq!(app.history(&a, &room).await.len(), 60);
    let new = actor_id(&app, &admin, "room", &room)
        .await
        .expect("restarted");
    assert_ne!(new, old);
}

#[tokio::test]
async fn a_stopped_session_actor_restarts_keeping_its_sockets_and_neighbours() {
    let app = spawn_app().await;
    let admin = app.register_admin("admin").await;
    let a = app.register("a").await;
    let b = app.register("b").await;
    let c = app.register("c").await;
    let room = app.direct(&a, &b).await;
    let room_c = app.direct(&c, &b).await;
    let (mut wa, _) = app.ws(&a).await;
    let (mut wb, _) = app.ws(&b).await;
    let (mut wc, _) = app.ws(&c).await;
    let old = actor_id(&app, &admin, "session", &a.id)
        .await
        .expect("session actor");
    let c_session = actor_id(&app, &admin, "session", &c.id).await.unwrap();
    let (s, _) = app
        .post(
            &format!("/admin/v1/actors/{old}/stop"),
            Some(&admin.token),
            json!({}),
        )
        .await;
    assert_eq!(s, 204);
    let uid = chatd::domain::UserId::parse(&a.id).unwrap();
    let hub = app.hub.clone();
    eventually("a new session actor", || {
        hub.sessions
            .get(&uid)
            .is_some_and(|s| s.get_id().to_string() != old)
    })
    .await;
    // A's socket is still open and receives; the neighbour kept its actor.
    wb.send_msg(&room, "after-restart", "still there?").await;
    let m = wa
        .until("message", |v| {
            v["type"] == "message" && v["client_msg_id"] == "after-restart"
        })
        .await;
    assert_eq!(m["seq"], 1);
    assert_eq!(wa.send_msg(&room, "a-reply", "yes").await["type"], "ack");
    assert_eq!(
        actor_id(&app, &admin, "session", &c.id).await.unwrap(),
        c_session
    );
    wb.send_msg(&room_c, "to-c", "hi c").await;
    assert_eq!(wc.next_of("message").await["client_msg_id"], "to-c");
}

#[tokio::test]
async fn idle_rooms_stop_and_come_back_on_use() {
    let app = spawn_app_with(|s| s.rooms.idle_secs = 1).await;
    let a = app.register("a").await;
    let b = app.register("b").await;
    let room = app.direct(&a, &b).await;
    let (mut wa, _) = app.ws(&a).await;
    wa.send_msg(&room, "i1", "x").await;
    let rid = chatd::domain::RoomId::parse(&room).unwrap();
    assert!(app.hub.rooms.contains_key(&rid));
    let hub = app.hub.clone();
    eventually("the room to idle out", || !hub.rooms.contains_key(&rid)).await;
    let ack = wa.send_msg(&room, "i2", "x").await;
    assert_eq!(ack["seq"], 2);
}

#[tokio::test]
async fn shutdown_acks_accepted_messages_before_closing() {
    let mut app = spawn_app().await;
    let a = app.register("a").await;
    let b = app.register("b").await;
    let room = app.direct(&a, &b).await;
    let (mut wa, _) = app.ws(&a).await;
    for i in 0..200 {
        wa.send(
            json!({"type": "send", "room_id": room, "client_msg_id": format!("s{i}"), "body": "x"}),
        )
        .await;
    }
    // Wait for the first ack so sends are in flight, then stop the node.
    wa.next_of("ack").await;
    app.hub.shutdown.cancel();
    let mut acked = 1;
    let code = loop {
        match wa.stream_next().await {
            Some(v) if v["type"] == "ack" => acked += 1,
            Some(_) => {}
            None => break wa.last_close,
        }
    };
    app.stop().await;
    // Every ack the client got is in the store; nothing acked was lost.
    let dir = app.dir.path().to_path_buf();
    let c = rusqlite::Connection::open(dir.join("chat.db")).unwrap();
    let stored: i64 = c
        .query_row("SELECT COUNT(*) FROM messages", [], |r| r.get(0))
        .unwrap();
    assert_eq!(
        stored, acked,
        "every stored message was acked before the socket closed"
    );
    assert_eq!(code, Some(1001));
}

/// A broker whose publishes to other nodes never complete (a RabbitMQ that
/// stopped confirming); everything else goes through the in-process queues.
struct StuckBroker {
    own: String,
    inner: chatd::broker::inprocess::InProcess,
    node_publishes: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl chatd::broker::Broker for StuckBroker {
    async fn publish(
        &self,
        route: chatd::broker::Route,
        envelope: chatd::broker::Envelope,
    ) -> Result<(), chatd::broker::BrokerError> {
        if matches!(&route, chatd::broker::Route::Node(n) if n != &self.own) {
            self.node_publishes
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            std::future::pending::<()>().await;
        }
        self.inner.publish(route, envelope).await
    }

    async fn consume(
        &self,
        queue: chatd::broker::Queue,
    ) -> Result<tokio::sync::mpsc::Receiver<chatd::broker::Delivery>, chatd::broker::BrokerError>
    {
        self.inner.consume(queue).await
    }

    fn is_ready(&self) -> bool {
        true
    }

    fn backend(&self) -> chatd::broker::BrokerKind {
        chatd::broker::BrokerKind::RabbitMq
    }
}

/// Issue 15: the sender's ack depends on the store only. A member on
/// another node whose broker publishes never confirm must not hold back
/// the acks of later messages (the room pipeline never waits for the broker).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_do_not_wait_for_a_stuck_broker() {
    use chatd::actors::room::{Replier, RoomMsg};
    use chatd::domain::{ClientMsgId, Email, Limits, MessageBody, Username};
    use std::sync::Arc;

    let dir = tempfile::tempdir().unwrap();
    let settings = test_settings(dir.path());
    let node = settings.node.id.clone();
    let stores = chatd::store::open(&settings.store).await.unwrap();
    let limits = Limits::default();
    let mut ids = Vec::new();
    for name in ["alice", "bob"] {
        let u = stores
            .users
            .create_user(chatd::store::NewUser {
                username: Username::parse(name, &limits).unwrap(),
                email: Email::parse(&format!("{name}@example.com")).unwrap(),
                display_name: None,
                password_hash: "x".into(),
            })
            .await
            .unwrap();
        ids.push(u.id);
    }
    let room = stores
        .rooms
        .create_group(&ids[0], "stuck", &ids[1..])
        .await
        .unwrap()
        .id;
    let broker = Arc::new(StuckBroker {
        own: node.clone(),
        inner: chatd::broker::inprocess::InProcess::new(&node),
        node_publishes: Default::default(),
    });
    let hub = chatd::actors::Hub::new(
        Arc::new(settings),
        node,
        "127.0.0.1:0".into(),
        stores,
        broker.clone(),
    );
    let (_root, _handle) = chatd::actors::root::start(hub.clone()).await.unwrap();
    // Bob's sockets are on another node: every message crosses the broker.
    hub.directory.set(&ids[1], "elsewhere", true);

    for i in 0..20 {
        let (tx, rx) = tokio::sync::oneshot::channel();
        hub.send_to_room(
            &room,
            RoomMsg::Send {
                sender: ids[0].clone(),
                client_msg_id: ClientMsgId::parse(&format!("m{i}"), &limits).unwrap(),
                body: MessageBody::parse("hello", &limits).unwrap(),
                reply_to: None,
                attachments: Vec::new(),
                reply: Replier::Http(tx),
            },
        )
        .await
        .unwrap();
        let appended = tokio::time::timeout(WAIT, rx)
            .await
            .unwrap_or_else(|_| {
                panic!("message {i} was not acked: the pipeline waits for the broker")
            })
            .unwrap()
            .unwrap();
        assert_eq!(appended.message.seq, i + 1);
    }
    assert!(
        broker
            .node_publishes
            .load(std::sync::atomic::Ordering::SeqCst)
            >= 1,
        "the cross-node copy was attempted"
    );
}

/// Issue 17 point 5: the notification pool runs under the root supervisor
/// and shows in the admin tree.
#[tokio::test]
async fn the_notification_pool_is_in_the_tree() {
    let app = spawn_app().await;
    let admin = app.register_admin("admin").await;
    let (s, tree) = app.get("/admin/v1/actors", &admin.token).await;
    assert_eq!(s, 200, "{tree}");
    let mut hits = Vec::new();
    find(&tree, &|n| n["kind"] == "notification_pool", &mut hits);
    assert_eq!(hits.len(), 1, "{tree}");
    assert!(
        !hits[0]["children"].as_array().unwrap().is_empty(),
        "its workers are listed: {tree}"
    );
}
