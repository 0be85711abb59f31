//! Several real `chatd` processes on loopback, one shared SQLite file (WAL),
//! bridged by the real RabbitMQ (127.0.0.1:5672, or `CHAT_TEST_AMQP_URI`):
//! cross-node chat, receipts, typing and presence; one user on two nodes; a
//! node killed with SIGKILL; the broker link cut and restored; a clean
//! shutdown; and the local cluster behind nginx. Each test has its own
//! exchange/queue prefix and node ids and removes them at the end.
//!
//! `broker_restart_loses_nothing` restarts the RabbitMQ application
//! (`rabbitmqctl stop_app`/`start_app`), which disturbs every other client
//! of that broker, so it is ignored by default (`cargo test --test cluster
//! -- --ignored` runs it).

#[path = "cluster/harness.rs"]
mod harness;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use harness::*;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(20);

fn addr(c: &Cluster, i: usize) -> String {
    format!("127.0.0.1:{}", c.nodes[i].port)
}

fn is_presence(f: &Value, user: &User, online: bool) -> bool {
    f["type"] == "presence" && f["user_id"] == user.id.as_str() && f["online"] == online
}

/// Message ids of the acks a client got.
fn acked_ids(c: &Client) -> HashSet<String> {
    c.acks()
        .values()
        .filter_map(|a| a["message_id"].as_str().map(str::to_owned))
        .collect()
}

/// Waits until the union of `clients`' messages of `room` holds `want`.
async fn wait_all_received(clients: &[&Client], room: &str, want: &HashSet<String>) -> Result<()> {
    // Generous: it returns as soon as everything is there, and a loaded
    // 2-core machine can take a while to drain thousands of messages.
    let deadline = tokio::time::Instant::now() + 3 * WAIT;
    loop {
        let mut got = HashSet::new();
        for c in clients {
            got.extend(c.message_ids(room));
        }
        let missing: Vec<&String> = want.difference(&got).collect();
        if missing.is_empty() {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            let state: Vec<String> = clients
                .iter()
                .map(|c| {
                    let seqs: Vec<i64> = c
                        .messages(room)
                        .iter()
                        .filter_map(|m| m["seq"].as_i64())
                        .collect();
                    format!(
                        "{}: {} messages, last seq {:?}, closed {}, close/error frames {:?}",
                        c.user.username,
                        seqs.len(),
                        seqs.last(),
                        c.is_closed(),
                        c.frames()
                            .iter()
                            .filter(|f| f["type"] == "error")
                            .take(2)
                            .collect::<Vec<_>>()
                    )
                })
                .collect();
            bail!(
                "{} of {} acked messages never arrived (e.g. {:?}); receivers: {state:?}",
                missing.len(),
                want.len(),
                &missing[..missing.len().min(3)]
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends `n` messages with ids `{tag}{i}`, each waiting for its ack, and
/// stops at the first failure (a killed node). Returns how many were acked.
async fn send_many(c: Arc<Client>, room: String, tag: &'static str, n: usize) -> usize {
    for i in 0..n {
        if c.send_acked(&room, &format!("{tag}{i}"), &format!("{tag} says {i}"))
            .await
            .is_err()
        {
            return i;
        }
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_chat_with_acks_receipts_typing_and_presence() -> Result<()> {
    let c = Cluster::start(2).await?;
    let alice = c.register(0, "alice").await?;
    let bob = c.register(1, "bob").await?;
    let room = direct_room(&c.http, &c.nodes[0].base(), &alice, &bob).await?;

    let a = Client::connect(&addr(&c, 0), &alice).await?;
    assert_eq!(a.node_id(), c.nodes[0].id);
    let b = Client::connect(&addr(&c, 1), &bob).await?;
    assert_eq!(b.node_id(), c.nodes[1].id);
    // Presence crosses nodes: alice (on A) hears bob (on B) come online.
    a.wait_for(WAIT, |f| is_presence(f, &bob, true)).await?;
    let profile: Value = c
        .http
        .get(format!("{}/api/v1/users/{}", c.nodes[0].base(), bob.id))
        .bearer_auth(&alice.token)
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(profile["online"], true, "{profile}");

    // Both talk at once.
    const N: usize = 60;
    for i in 0..N {
        a.say(&room, &format!("a{i}"), &format!("hello {i} from A"));
        b.say(&room, &format!("b{i}"), &format!("hello {i} from B"));
    }
    a.wait_until(WAIT, |fs| {
        (fs.iter().filter(|f| f["type"] == "ack").count() >= N).then_some(())
    })
    .await?;
    b.wait_until(WAIT, |fs| {
        (fs.iter().filter(|f| f["type"] == "ack").count() >= N).then_some(())
    })
    .await?;
    let from_a = acked_ids(&a);
    let from_b = acked_ids(&b);
    assert_eq!(from_a.len(), N);
    assert_eq!(from_b.len(), N);
    wait_all_received(&[&b], &room, &from_a).await?;
    wait_all_received(&[&a], &room, &from_b).await?;
    assert_in_order(&a, &room);
    assert_in_order(&b, &room);
    // One room, one sequence: the acks of both nodes share it without gaps.
    let mut seqs: Vec<i64> = a
        .acks()
        .values()
        .chain(b.acks().values())
        .filter_map(|f| f["seq"].as_i64())
        .collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=(2 * N) as i64).collect::<Vec<_>>());

    // Receipts: bob (on B) reads everything; alice (on A) sees it.
    let top = *seqs.last().unwrap();
    b.send(json!({"type": "delivered", "room_id": room, "up_to_seq": top}));
    b.send(json!({"type": "read", "room_id": room, "up_to_seq": top}));
    for kind in ["delivered", "read"] {
        a.wait_for(WAIT, |f| {
            f["type"] == "receipt"
                && f["user_id"] == bob.id.as_str()
                && f["kind"] == kind
                && f["up_to_seq"] == top
        })
        .await
        .with_context(|| format!("{kind} receipt"))?;
    }

    // Typing crosses both ways.
    a.send(json!({"type": "typing", "room_id": room, "state": true}));
    b.wait_for(WAIT, |f| {
        f["type"] == "typing" && f["user_id"] == alice.id.as_str() && f["state"] == true
    })
    .await?;
    b.send(json!({"type": "typing", "room_id": room, "state": false}));
    a.wait_for(WAIT, |f| {
        f["type"] == "typing" && f["user_id"] == bob.id.as_str() && f["state"] == false
    })
    .await?;

    // Bob leaves: alice hears it with a last_seen.
    b.close();
    let off = a.wait_for(WAIT, |f| is_presence(f, &bob, false)).await?;
    assert!(off["last_seen"].is_string(), "{off}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_user_on_two_nodes_gets_everything_on_both() -> Result<()> {
    let c = Cluster::start(2).await?;
    let carol = c.register(0, "carol").await?;
    let dave = c.register(1, "dave").await?;
    let room = direct_room(&c.http, &c.nodes[0].base(), &carol, &dave).await?;

    let dave_a = Arc::new(Client::connect(&addr(&c, 0), &dave).await?);
    let carol_a = Client::connect(&addr(&c, 0), &carol).await?;
    let carol_b = Client::connect(&addr(&c, 1), &carol).await?;
    assert_ne!(carol_a.node_id(), carol_b.node_id());

    // Dave (on A) sends right away; carol's device on B gets every one even
    // though A may not know yet that carol is also on B.
    let sent = send_many(dave_a.clone(), room.clone(), "d", 40).await;
    assert_eq!(sent, 40);
    let from_dave = acked_ids(&dave_a);
    wait_all_received(&[&carol_a], &room, &from_dave).await?;
    wait_all_received(&[&carol_b], &room, &from_dave).await?;

    // Carol sends from B: dave gets them, and so does her device on A.
    let carol_b = Arc::new(carol_b);
    assert_eq!(send_many(carol_b.clone(), room.clone(), "c", 20).await, 20);
    let from_carol = acked_ids(&carol_b);
    wait_all_received(&[&dave_a], &room, &from_carol).await?;
    wait_all_received(&[&carol_a], &room, &from_carol).await?;

    for cl in [&carol_a, &*carol_b, &*dave_a] {
        assert_in_order(cl, &room);
    }
    Ok(())
}

/// Issue 15: a group hot on two nodes at once. Senders on both nodes send
/// with a window (so room pipelines batch and the fan-out coalesces), and
/// every member on either node gets every message once, in seq order,
/// without a gap: one sequence per room across nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_with_senders_on_two_nodes_delivers_everything_in_order() -> Result<()> {
    let c = Cluster::start(2).await?;
    let alice = c.register(0, "alice").await?;
    let bob = c.register(0, "bob").await?;
    let carol = c.register(1, "carol").await?;
    let dave = c.register(1, "dave").await?;
    let room = group_room(&c.http, &c.nodes[0].base(), &alice, &[&bob, &carol, &dave]).await?;
    let a = Arc::new(Client::connect(&addr(&c, 0), &alice).await?);
    let cc = Arc::new(Client::connect(&addr(&c, 1), &carol).await?);
    let b = Client::connect(&addr(&c, 0), &bob).await?;
    let d = Client::connect(&addr(&c, 1), &dave).await?;
    // Both nodes know where everyone is before the traffic starts: each
    // node's presence events reach the other in order, so hearing of the
    // last one connected there means the earlier ones were applied too.
    a.wait_for(WAIT, |f| is_presence(f, &dave, true)).await?;
    cc.wait_for(WAIT, |f| is_presence(f, &bob, true)).await?;

    const N: usize = 300;
    let (sent_a, sent_c) = tokio::join!(
        a.send_window(&room, "a", N, 32),
        cc.send_window(&room, "c", N, 32)
    );
    assert_eq!((sent_a, sent_c), (N, N));
    let from_a = acked_ids(&a);
    let from_c = acked_ids(&cc);
    assert_eq!((from_a.len(), from_c.len()), (N, N));
    let all: HashSet<String> = from_a.union(&from_c).cloned().collect();
    wait_all_received(&[&b], &room, &all).await?;
    wait_all_received(&[&d], &room, &all).await?;
    wait_all_received(&[&cc], &room, &from_a).await?;
    wait_all_received(&[&a], &room, &from_c).await?;
    // Listeners on both nodes see the whole sequence, once each, in order.
    for listener in [&b, &d] {
        let mut seen = HashSet::new();
        let seqs: Vec<i64> = listener
            .messages(&room)
            .iter()
            .filter(|m| seen.insert(m["id"].as_str().unwrap_or_default().to_owned()))
            .filter_map(|m| m["seq"].as_i64())
            .collect();
        assert_eq!(
            seqs,
            (1..=(2 * N) as i64).collect::<Vec<_>>(),
            "{} got the room out of order or with a gap",
            listener.user.username
        );
    }
    for cl in [&*a, &b, &*cc, &d] {
        assert_in_order(cl, &room);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_a_node_loses_no_acked_message() -> Result<()> {
    let mut c = Cluster::start(2).await?;
    let alice = c.register(0, "alice").await?;
    let bob = c.register(1, "bob").await?;
    let erin = c.register(1, "erin").await?;
    let room = direct_room(&c.http, &c.nodes[0].base(), &alice, &bob).await?;
    let _erin_room = direct_room(&c.http, &c.nodes[0].base(), &alice, &erin).await?;

    let a = Arc::new(Client::connect(&addr(&c, 0), &alice).await?);
    let b1 = Arc::new(Client::connect(&addr(&c, 1), &bob).await?);
    let e = Client::connect(&addr(&c, 1), &erin).await?;
    a.wait_for(WAIT, |f| is_presence(f, &erin, true)).await?;

    // Both send at full speed; B dies in the middle of it.
    let alice_sends = tokio::spawn(send_many(a.clone(), room.clone(), "a", 300));
    let bob_sends = tokio::spawn(send_many(b1.clone(), room.clone(), "b", 1000));
    b1.wait_until(WAIT, |fs| {
        (fs.iter().filter(|f| f["type"] == "ack").count() >= 40).then_some(())
    })
    .await?;
    c.kill(1);
    b1.wait_closed(WAIT).await?;
    e.wait_closed(WAIT).await?;
    let bob_acked_on_b = bob_sends.await?;
    assert!((40..1000).contains(&bob_acked_on_b), "{bob_acked_on_b}");

    // Bob's device reconnects (to A, as the load balancer would send it)
    // and keeps talking while alice still sends.
    let b2 = Arc::new(Client::connect(&addr(&c, 0), &bob).await?);
    assert_eq!(b2.node_id(), c.nodes[0].id);
    assert_eq!(send_many(b2.clone(), room.clone(), "b2-", 30).await, 30);
    assert_eq!(alice_sends.await?, 300);

    // Everything acked reached its recipient (duplicates allowed).
    let mut from_bob = acked_ids(&b1);
    from_bob.extend(acked_ids(&b2));
    assert_eq!(from_bob.len(), bob_acked_on_b + 30);
    let from_alice = acked_ids(&a);
    wait_all_received(&[&a], &room, &from_bob).await?;
    wait_all_received(&[&b1, &b2], &room, &from_alice).await?;
    for cl in [&*a, &*b1, &*b2] {
        assert_in_order(cl, &room);
    }

    // Erin was only on B: after the node timeout she counts as offline,
    // with a last_seen, cluster-wide.
    let off = a
        .wait_for(
            Duration::from_secs(NODE_TIMEOUT_SECS + HEARTBEAT_SECS + 10),
            |f| is_presence(f, &erin, false),
        )
        .await?;
    assert!(off["last_seen"].is_string(), "{off}");
    let profile: Value = c
        .http
        .get(format!("{}/api/v1/users/{}", c.nodes[0].base(), erin.id))
        .bearer_auth(&alice.token)
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(profile["online"], false, "{profile}");
    assert!(profile["last_seen"].is_string(), "{profile}");
    // Bob is on A now: still online.
    assert!(!a.frames().iter().any(|f| is_presence(f, &bob, false)));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_link_cut_and_restored_loses_nothing() -> Result<()> {
    // Node A reaches RabbitMQ through a proxy the test can cut; node B
    // directly. Cutting the proxy is a broker outage for A alone.
    let proxy = CutProxy::start(amqp_host()).await?;
    let mut c = Cluster::new();
    c.spawn_node(Some(proxy.uri()));
    c.spawn_node(None);
    c.wait_ready(0).await?;
    c.wait_ready(1).await?;
    let alice = c.register(0, "alice").await?;
    let bob = c.register(1, "bob").await?;
    // Each direction gets a room of its own: a session that sends into a
    // room also fills gaps in it from the store, which would hide a lost
    // live copy; here only the broker (or the resync) can bring them.
    let from_alice_room = direct_room(&c.http, &c.nodes[0].base(), &alice, &bob).await?;
    let from_bob_room = group_room(&c.http, &c.nodes[1].base(), &bob, &[&alice]).await?;
    let a = Arc::new(Client::connect(&addr(&c, 0), &alice).await?);
    let b = Arc::new(Client::connect(&addr(&c, 1), &bob).await?);
    a.wait_for(WAIT, |f| is_presence(f, &bob, true)).await?;
    assert_eq!(
        send_many(a.clone(), from_alice_room.clone(), "before", 10).await,
        10
    );
    wait_all_received(&[&b], &from_alice_room, &acked_ids(&a)).await?;

    proxy.cut();
    let ready_a = format!("{}/readyz", c.nodes[0].base());
    c.poll_status(0, &ready_a, 503, WAIT).await?;
    let health_a = format!("{}/healthz", c.nodes[0].base());
    c.poll_status(0, &health_a, 200, WAIT).await?;

    // While A is cut off, alice's messages are stored and acked but their
    // live copies cannot leave A.
    assert_eq!(
        send_many(a.clone(), from_alice_room.clone(), "during", 25).await,
        25
    );
    // After the node timeout, B counts A as gone: bob sees alice offline,
    // and B stops routing to A what bob sends.
    b.wait_for(
        Duration::from_secs(NODE_TIMEOUT_SECS + HEARTBEAT_SECS + 10),
        |f| is_presence(f, &alice, false),
    )
    .await?;
    assert_eq!(
        send_many(b.clone(), from_bob_room.clone(), "meanwhile", 25).await,
        25
    );

    proxy.restore();
    c.poll_status(0, &ready_a, 200, WAIT).await?;
    // A's heartbeats bring alice back for bob.
    b.wait_until(WAIT, |fs| {
        fs.iter()
            .rposition(|f| is_presence(f, &alice, true))
            .zip(fs.iter().rposition(|f| is_presence(f, &alice, false)))
            .and_then(|(on, off)| (on > off).then_some(()))
    })
    .await?;
    // Nothing acked is lost: settling from the store (each node when it
    // counted the other as gone, and everyone on A's resync) pushes what the
    // outage kept from crossing, without any new message.
    wait_all_received(&[&b], &from_alice_room, &acked_ids(&a)).await?;
    wait_all_received(&[&a], &from_bob_room, &acked_ids(&b)).await?;
    assert_in_order(&b, &from_alice_room);
    assert_in_order(&a, &from_bob_room);

    // And live traffic flows again, both ways.
    assert_eq!(
        send_many(a.clone(), from_alice_room.clone(), "after", 10).await,
        10
    );
    assert_eq!(
        send_many(b.clone(), from_bob_room.clone(), "after", 10).await,
        10
    );
    wait_all_received(&[&b], &from_alice_room, &acked_ids(&a)).await?;
    wait_all_received(&[&a], &from_bob_room, &acked_ids(&b)).await?;
    let metrics = c
        .http
        .get(format!("{}/metrics", c.nodes[0].base()))
        .send()
        .await?
        .text()
        .await?;
    assert!(
        metrics.contains("chatd_broker_reconnects_total"),
        "reconnects are counted"
    );
    Ok(())
}

/// An outage shorter than the node timeout: no node counts the other as
/// gone, so only the resync after the reconnection brings the live copies
/// that could not leave the cut-off node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_broker_outage_is_healed_by_the_resync() -> Result<()> {
    let proxy = CutProxy::start(amqp_host()).await?;
    let mut c = Cluster::new();
    c.node_timeout_secs = 120;
    c.spawn_node(Some(proxy.uri()));
    c.spawn_node(None);
    c.wait_ready(0).await?;
    c.wait_ready(1).await?;
    let alice = c.register(0, "alice").await?;
    let bob = c.register(1, "bob").await?;
    let room = direct_room(&c.http, &c.nodes[0].base(), &alice, &bob).await?;
    let a = Arc::new(Client::connect(&addr(&c, 0), &alice).await?);
    let b = Client::connect(&addr(&c, 1), &bob).await?;
    a.wait_for(WAIT, |f| is_presence(f, &bob, true)).await?;
    // Sessions settle once, a heartbeat after they start; let that pass so
    // that it cannot stand in for the resync under test.
    tokio::time::sleep(Duration::from_secs(2 * HEARTBEAT_SECS)).await;

    proxy.cut();
    let ready_a = format!("{}/readyz", c.nodes[0].base());
    c.poll_status(0, &ready_a, 503, WAIT).await?;
    assert_eq!(send_many(a.clone(), room.clone(), "cut", 20).await, 20);
    proxy.restore();
    c.poll_status(0, &ready_a, 200, WAIT).await?;
    wait_all_received(&[&b], &room, &acked_ids(&a)).await?;
    assert_in_order(&b, &room);
    assert!(
        !b.frames().iter().any(|f| is_presence(f, &alice, false)),
        "a short outage does not show alice offline"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_started_without_its_broker_becomes_ready_when_it_appears() -> Result<()> {
    let proxy = CutProxy::start(amqp_host()).await?;
    proxy.cut();
    let mut c = Cluster::new();
    c.spawn_node(Some(proxy.uri()));
    let base = c.nodes[0].base();
    c.poll_status(0, &format!("{base}/healthz"), 200, WAIT)
        .await?;
    c.poll_status(0, &format!("{base}/readyz"), 503, WAIT)
        .await?;
    proxy.restore();
    c.wait_ready(0).await?;
    // It is a working node: a user can connect and send.
    let u = c.register(0, "solo").await?;
    let v = c.register(0, "peer").await?;
    let room = direct_room(&c.http, &base, &u, &v).await?;
    let cu = Client::connect(&addr(&c, 0), &u).await?;
    cu.send_acked(&room, "one", "hello").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_closing_connections_mid_traffic_loses_nothing() -> Result<()> {
    assert!(
        std::process::Command::new("rabbitmqctl")
            .arg("-q")
            .arg("status")
            .output()
            .is_ok_and(|o| o.status.success()),
        "rabbitmqctl is required to close the nodes' connections from the broker side"
    );
    let c = Cluster::start(2).await?;
    let alice = c.register(0, "alice").await?;
    let bob = c.register(1, "bob").await?;
    let room = direct_room(&c.http, &c.nodes[0].base(), &alice, &bob).await?;
    let a = Arc::new(Client::connect(&addr(&c, 0), &alice).await?);
    let b = Arc::new(Client::connect(&addr(&c, 1), &bob).await?);
    a.wait_for(WAIT, |f| is_presence(f, &bob, true)).await?;

    let alice_sends = tokio::spawn(send_many(a.clone(), room.clone(), "a", 400));
    let bob_sends = tokio::spawn(send_many(b.clone(), room.clone(), "b", 400));
    a.wait_until(WAIT, |fs| {
        (fs.iter().filter(|f| f["type"] == "ack").count() >= 50).then_some(())
    })
    .await?;
    // The broker drops both nodes' connections (only ours: other clients of
    // this broker are left alone).
    let ids: Vec<String> = c.nodes.iter().map(|n| n.id.clone()).collect();
    let closed = tokio::task::spawn_blocking(move || close_broker_connections(&ids)).await??;
    assert!(closed >= 2, "closed {closed} connections");
    assert_eq!(alice_sends.await?, 400);
    assert_eq!(bob_sends.await?, 400);
    for n in &c.nodes {
        wait_ok(&c.http, &format!("{}/readyz", n.base())).await?;
    }
    wait_all_received(&[&b], &room, &acked_ids(&a)).await?;
    wait_all_received(&[&a], &room, &acked_ids(&b)).await?;
    assert_in_order(&a, &room);
    assert_in_order(&b, &room);
    Ok(())
}

/// The "done when": two clients on two nodes chat at full speed; in
/// the middle the broker drops every node's connection and then one node is
/// killed; at the end every acked message reached the other side, in order.
/// The clients behave like real ones: a socket closed under them (a dead
/// node, or 4008 when they fell behind) is reopened and unacked sends are
/// resent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_speed_with_the_broker_bounced_and_a_node_killed() -> Result<()> {
    let mut c = Cluster::start(3).await?;
    let alice = c.register(0, "alice").await?;
    let bob = c.register(1, "bob").await?;
    let room = direct_room(&c.http, &c.nodes[0].base(), &alice, &bob).await?;
    let a = Chatter::new(&alice, &room, "a", vec![addr(&c, 0)]);
    // Bob prefers B; once B is dead he lands on C.
    let b = Chatter::new(&bob, &room, "b", vec![addr(&c, 1), addr(&c, 2)]);
    let first_a = a.connect().await?;
    let first_b = b.connect().await?;
    assert_eq!(first_b.node_id(), c.nodes[1].id);
    first_a
        .wait_for(WAIT, |f| is_presence(f, &bob, true))
        .await?;

    const N: usize = 3000;
    // Bob sends more, so that he is still at it when his node dies (acks
    // no longer wait for the broker: 10,000 were done before the bounce).
    const NB: usize = 30_000;
    const WINDOW: usize = 64;
    let started = std::time::Instant::now();
    let alice_sends = tokio::spawn(a.clone().run(N, WINDOW));
    let bob_sends = tokio::spawn(b.clone().run(NB, WINDOW));

    first_a
        .wait_until(WAIT, |_| (a.answered() >= 500).then_some(()))
        .await?;
    let ids: Vec<String> = c.nodes.iter().map(|n| n.id.clone()).collect();
    let bounced = tokio::task::spawn_blocking(move || close_broker_connections(&ids))
        .await?
        .unwrap_or(0);
    eprintln!("broker closed {bounced} node connections");

    let mark = b.answered() + 300;
    first_b
        .wait_until(WAIT, |_| (b.answered() >= mark).then_some(()))
        .await?;
    assert!(b.answered() < NB, "bob is still sending");
    c.kill(1);
    assert_eq!(alice_sends.await??, N);
    assert_eq!(bob_sends.await??, NB);
    let elapsed = started.elapsed();

    let from_alice: HashSet<String> = a.acked().into_values().collect();
    let from_bob: HashSet<String> = b.acked().into_values().collect();
    assert_eq!((from_alice.len(), from_bob.len()), (N, NB));
    let a_socks = a.all();
    let b_socks = b.all();
    let a_refs: Vec<&Client> = a_socks.iter().map(|c| &**c).collect();
    let b_refs: Vec<&Client> = b_socks.iter().map(|c| &**c).collect();
    wait_all_received(&b_refs, &room, &from_alice).await?;
    wait_all_received(&a_refs, &room, &from_bob).await?;
    for cl in a_refs.iter().chain(&b_refs) {
        assert_in_order(cl, &room);
    }
    assert!(
        b_socks.iter().any(|s| s.node_id() == c.nodes[2].id),
        "bob moved to C"
    );
    let closes: Vec<Vec<u64>> = a_socks
        .iter()
        .chain(&b_socks)
        .map(|s| s.close_codes())
        .collect();
    eprintln!(
        "{N} + {NB} acked, all received in order; sockets: alice {}, bob {}, close codes {closes:?}; {:.1} s",
        a_socks.len(),
        b_socks.len(),
        elapsed.as_secs_f64()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_shutdown_announces_and_removes_the_node_queue() -> Result<()> {
    let mut c = Cluster::start(2).await?;
    let alice = c.register(0, "alice").await?;
    let bob = c.register(1, "bob").await?;
    direct_room(&c.http, &c.nodes[0].base(), &alice, &bob).await?;
    let a = Client::connect(&addr(&c, 0), &alice).await?;
    let b = Client::connect(&addr(&c, 1), &bob).await?;
    a.wait_for(WAIT, |f| is_presence(f, &bob, true)).await?;
    let queue = format!("{}.node.{}", c.prefix, c.nodes[1].id);
    assert!(queue_exists(&queue).await?);

    let status = tokio::task::block_in_place(|| c.terminate(1))?;
    assert!(status.success(), "{status}");
    b.wait_closed(WAIT).await?;
    // Bob's presence goes offline at once (no need for the node timeout).
    a.wait_for(Duration::from_secs(NODE_TIMEOUT_SECS), |f| {
        is_presence(f, &bob, false)
    })
    .await?;
    assert!(!queue_exists(&queue).await?, "{queue} should be gone");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "restarts the RabbitMQ app for every client of it; run with --ignored"]
async fn broker_restart_loses_nothing() -> Result<()> {
    let c = Cluster::start(2).await?;
    let alice = c.register(0, "alice").await?;
    let bob = c.register(1, "bob").await?;
    let room = direct_room(&c.http, &c.nodes[0].base(), &alice, &bob).await?;
    let a = Arc::new(Client::connect(&addr(&c, 0), &alice).await?);
    let b = Arc::new(Client::connect(&addr(&c, 1), &bob).await?);
    a.wait_for(WAIT, |f| is_presence(f, &bob, true)).await?;
    let alice_sends = tokio::spawn(send_many(a.clone(), room.clone(), "a", 300));
    a.wait_until(WAIT, |fs| {
        (fs.iter().filter(|f| f["type"] == "ack").count() >= 30).then_some(())
    })
    .await?;
    let st = tokio::task::spawn_blocking(|| {
        std::process::Command::new("rabbitmqctl")
            .args(["-q", "stop_app"])
            .status()
    })
    .await??;
    assert!(st.success());
    let url = format!("{}/readyz", c.nodes[0].base());
    let mut not_ready = false;
    for _ in 0..200 {
        if c.http.get(&url).send().await?.status().as_u16() == 503 {
            not_ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let st = tokio::task::spawn_blocking(|| {
        std::process::Command::new("rabbitmqctl")
            .args(["-q", "start_app"])
            .status()
    })
    .await??;
    assert!(st.success());
    assert!(not_ready, "readyz reported the outage");
    assert_eq!(alice_sends.await?, 300);
    for n in &c.nodes {
        wait_ok(&c.http, &format!("{}/readyz", n.base())).await?;
    }
    wait_all_received(&[&b], &room, &acked_ids(&a)).await?;
    assert_in_order(&b, &room);
    Ok(())
}

/// The local cluster script (three nodes behind nginx): two clients through
/// the load balancer chat; the node of one is killed; it reconnects through
/// the load balancer to another node and gets what it missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_nginx_load_balancer() -> Result<()> {
    // Like the browser test, this never passes silently without its tool.
    assert!(
        std::process::Command::new("nginx")
            .arg("-v")
            .output()
            .is_ok(),
        "nginx is required: apt-get install nginx-light (.ci/run installs nginx)"
    );
    let lb = LocalCluster::start().await?;
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{}", lb.lb_port);
    let alice = register(&http, &base, "alice").await?;
    let bob = register(&http, &base, "bob").await?;
    let room = direct_room(&http, &base, &alice, &bob).await?;
    let lb_addr = format!("127.0.0.1:{}", lb.lb_port);

    let a = Arc::new(Client::connect(&lb_addr, &alice).await?);
    // Round robin: connect bob until he lands on another node than alice.
    let mut b = Client::connect(&lb_addr, &bob).await?;
    for _ in 0..6 {
        if b.node_id() != a.node_id() {
            break;
        }
        b.close();
        b = Client::connect(&lb_addr, &bob).await?;
    }
    assert_ne!(a.node_id(), b.node_id(), "two nodes behind the balancer");
    let b = Arc::new(b);
    assert_eq!(send_many(a.clone(), room.clone(), "a", 30).await, 30);
    assert_eq!(send_many(b.clone(), room.clone(), "b", 30).await, 30);
    wait_all_received(&[&b], &room, &acked_ids(&a)).await?;
    wait_all_received(&[&a], &room, &acked_ids(&b)).await?;

    // Bob's node dies; alice keeps sending; bob comes back through nginx.
    lb.kill_node(&b.node_id())?;
    b.wait_closed(WAIT).await?;
    assert_eq!(send_many(a.clone(), room.clone(), "later", 20).await, 20);
    let b2 = Client::connect(&lb_addr, &bob).await?;
    assert_ne!(b2.node_id(), b.node_id());
    wait_all_received(&[&b, &b2], &room, &acked_ids(&a)).await?;
    assert_in_order(&b2, &room);
    Ok(())
}

/// scripts/local-cluster.sh, started in a temporary directory with ports
/// and a broker prefix of its own.
struct LocalCluster {
    dir: tempfile::TempDir,
    lb_port: u16,
    prefix: String,
    node_ids: Vec<String>,
}

impl LocalCluster {
    async fn start() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let lb_port = free_port();
        let prefix = format!("chatd-lb-{}", rand_id(8));
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/local-cluster.sh");
        let ports: Vec<String> = (0..3).map(|_| free_port().to_string()).collect();
        let out = std::process::Command::new("bash")
            .arg(script)
            .arg("start")
            .env("CLUSTER_DIR", dir.path())
            .env("CHATD_BIN", env!("CARGO_BIN_EXE_chatd"))
            .env("LB_PORT", lb_port.to_string())
            .env("NODE_PORTS", ports.join(" "))
            .env("BROKER_PREFIX", &prefix)
            .env("AMQP_URI", amqp_uri())
            .env("HEARTBEAT_SECS", HEARTBEAT_SECS.to_string())
            .env("NODE_TIMEOUT_SECS", NODE_TIMEOUT_SECS.to_string())
            .output()?;
        let node_ids = std::fs::read_to_string(dir.path().join("nodes"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
            .collect();
        let lc = LocalCluster {
            dir,
            lb_port,
            prefix,
            node_ids,
        };
        if !out.status.success() {
            bail!(
                "local-cluster.sh start failed: {}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(lc)
    }

    fn kill_node(&self, node_id: &str) -> Result<()> {
        let nodes = std::fs::read_to_string(self.dir.path().join("nodes"))?;
        let pid = nodes
            .lines()
            .find_map(|l| {
                let mut p = l.split_whitespace();
                (p.next() == Some(node_id)).then(|| p.nth(1).map(str::to_owned))?
            })
            .context("node not in the nodes file")?;
        let st = std::process::Command::new("kill")
            .args(["-KILL", &pid])
            .status()?;
        if !st.success() {
            bail!("kill failed");
        }
        Ok(())
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/local-cluster.sh");
        let _ = std::process::Command::new("bash")
            .arg(script)
            .arg("stop")
            .env("CLUSTER_DIR", self.dir.path())
            .status();
        let mut queues: Vec<String> = self
            .node_ids
            .iter()
            .map(|id| format!("{}.node.{id}", self.prefix))
            .collect();
        queues.push(format!("{}.notify", self.prefix));
        let exchanges = vec![
            format!("{}.cluster", self.prefix),
            format!("{}.notify", self.prefix),
        ];
        let _ = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(delete_broker_objects(queues, exchanges));
        })
        .join();
    }
}

/// Polls `url` until 200.
async fn wait_ok(http: &reqwest::Client, url: &str) -> Result<()> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Ok(r) = http.get(url).send().await {
            if r.status().is_success() {
                return Ok(());
            }
        }
        if tokio::time::Instant::now() > deadline {
            bail!("{url} never became ready");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_finds_a_users_sessions_across_nodes() -> Result<()> {
    let c = Cluster::start(2).await?;
    let admin = c.register_admin(0).await?;
    let erin = c.register(0, "erin").await?;
    let frank = c.register(1, "frank").await?;
    let _room = direct_room(&c.http, &c.nodes[0].base(), &erin, &frank).await?;
    let on_a = Client::connect(&addr(&c, 0), &erin).await?;
    let on_b = Client::connect(&addr(&c, 1), &erin).await?;
    assert_ne!(on_a.node_id(), on_b.node_id());
    // Node A learns that erin is also on B from B's presence event.
    let url = format!("{}/admin/v1/sessions/{}", c.nodes[0].base(), erin.id);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let v: Value = c
            .http
            .get(&url)
            .bearer_auth(&admin.token)
            .send()
            .await?
            .json()
            .await?;
        let mut nodes: Vec<String> = v["sessions"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| s["node"].as_str().unwrap_or_default().to_owned())
            .collect();
        nodes.sort();
        let mut want = vec![on_a.node_id(), on_b.node_id()];
        want.sort();
        if nodes == want {
            assert_eq!(v["unreachable_nodes"], json!([]), "{v}");
            for s in v["sessions"].as_array().unwrap() {
                assert_eq!(s["devices"].as_array().unwrap().len(), 1, "{v}");
            }
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "sessions on both nodes: {v}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A plain user may not ask.
    let r = c.http.get(&url).bearer_auth(&frank.token).send().await?;
    assert_eq!(r.status(), 403);
    Ok(())
}

/// Issue 19: an edit and a delete made on one node, and a reaction made on
/// the other, reach the members' devices on both nodes as `message_updated`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_updated_reaches_devices_on_the_other_node() -> Result<()> {
    let c = Cluster::start(2).await?;
    let erin = c.register(0, "erin").await?;
    let finn = c.register(1, "finn").await?;
    let (a, b) = (c.nodes[0].base(), c.nodes[1].base());
    let room = direct_room(&c.http, &a, &erin, &finn).await?;
    let erin_a = Client::connect(&addr(&c, 0), &erin).await?;
    let finn_b = Client::connect(&addr(&c, 1), &finn).await?;
    let m: Value = c
        .http
        .post(format!("{a}/api/v1/rooms/{room}/messages"))
        .bearer_auth(&erin.token)
        .json(&json!({"client_msg_id": "lc-1", "body": "hello"}))
        .send()
        .await?
        .json()
        .await?;
    let id = m["id"].as_str().context("message id")?.to_owned();
    finn_b
        .wait_for(WAIT, |f| f["type"] == "message" && f["id"] == id.as_str())
        .await?;

    let r = c
        .http
        .patch(format!("{a}/api/v1/rooms/{room}/messages/{id}"))
        .bearer_auth(&erin.token)
        .json(&json!({"body": "hello, edited"}))
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 200);
    finn_b
        .wait_for(WAIT, |f| {
            f["type"] == "message_updated" && f["message"]["body"] == "hello, edited"
        })
        .await?;

    let r = c
        .http
        .put(format!(
            "{b}/api/v1/rooms/{room}/messages/{id}/reactions/%F0%9F%91%8D"
        ))
        .bearer_auth(&finn.token)
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 204);
    erin_a
        .wait_for(WAIT, |f| {
            f["type"] == "message_updated" && f["message"]["reactions"][0]["count"] == 1
        })
        .await?;

    let r = c
        .http
        .delete(format!("{a}/api/v1/rooms/{room}/messages/{id}"))
        .bearer_auth(&erin.token)
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 204);
    let t = finn_b
        .wait_for(WAIT, |f| {
            f["type"] == "message_updated" && f["message"]["deleted"] == true
        })
        .await?;
    assert_eq!(t["message"]["body"], "");
    Ok(())
}
