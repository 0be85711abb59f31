//! The MongoDB append path beyond the shared contract: resent messages mixed
//! into batches of new ones, several rooms per batch, and (ignored by
//! default) the cost per appended message. Runs when `CHAT_TEST_MONGODB_URI`
//! is set (`CHAT_REQUIRE_MONGODB=1` makes a missing URI fail).
//!
//! The measurement: `cargo test --test mongo_append -- --ignored --nocapture`.

use std::time::Instant;

use chatd::domain::{ClientMsgId, MessageBody, RoomId, UserId};
use chatd::store::{self, HistoryQuery, NewMessage, Stores};

#[path = "support/mongo.rs"]
mod mongo_support;
use mongo_support::{drop_db, mongo_cfg, mongo_uri};

fn msg(room: &RoomId, from: &UserId, cmid: &str, body: &str) -> NewMessage {
    NewMessage {
        room_id: room.clone(),
        sender_id: from.clone(),
        client_msg_id: ClientMsgId::from_trusted(cmid.to_owned()),
        body: MessageBody::from_trusted(body.to_owned()),
        reply_to: None,
        attachments: Vec::new(),
    }
}

async fn seqs(s: &Stores, room: &RoomId) -> Vec<i64> {
    let q = HistoryQuery {
        before: None,
        after: Some(0),
        limit: 1000,
    };
    let h = s.messages.history(room, q).await.unwrap();
    h.iter().map(|m| m.seq).collect()
}

/// `rooms` direct rooms, each of a fresh pair; returns (room, sender) pairs.
async fn rooms(s: &Stores, n: usize) -> Vec<(RoomId, UserId)> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let a = store::contract::make_user(s, "ap").await;
        let b = store::contract::make_user(s, "ap").await;
        let (room, _) = s.rooms.create_direct(&a.id, &b.id).await.unwrap();
        out.push((room.id, a.id));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resent_message_in_a_batch_of_new_ones_gets_its_ack_and_leaves_no_gap() {
    let Some(uri) = mongo_uri() else { return };
    let cfg = mongo_cfg(&uri);
    let s = store::open(&cfg).await.unwrap();
    let rs = rooms(&s, 2).await;
    let (r1, a1) = rs[0].clone();
    let (r2, a2) = rs[1].clone();
    let first = s
        .messages
        .append_batch(vec![msg(&r1, &a1, "c1", "one"), msg(&r2, &a2, "c1", "uno")])
        .await
        .unwrap();
    let one = first[0].clone().unwrap().message;

    // The resent c1 sits between new messages of both rooms.
    let r = s
        .messages
        .append_batch(vec![
            msg(&r1, &a1, "c2", "two"),
            msg(&r2, &a2, "c2", "dos"),
            msg(&r1, &a1, "c1", "one, resent"),
            msg(&r1, &a1, "c3", "three"),
            msg(&r1, &a1, "c3", "three, twice in one batch"),
        ])
        .await
        .unwrap();
    let r: Vec<_> = r.into_iter().map(Result::unwrap).collect();
    assert_eq!(
        r.iter()
            .map(|a| (a.message.seq, a.duplicate))
            .collect::<Vec<_>>(),
        vec![(2, false), (2, false), (1, true), (3, false), (3, true)]
    );
    assert_eq!(r[2].message, one, "the stored message, not the resent one");
    assert_eq!(r[4].message, r[3].message);
    assert_eq!(seqs(&s, &r1).await, vec![1, 2, 3]);
    assert_eq!(seqs(&s, &r2).await, vec![1, 2]);
    assert_eq!(s.rooms.room(&r1).await.unwrap().unwrap().last_seq, 3);

    // Only resent messages: nothing new, no seq taken.
    let again = s
        .messages
        .append_batch(vec![msg(&r2, &a2, "c2", "x"), msg(&r1, &a1, "c3", "x")])
        .await
        .unwrap();
    assert!(again.iter().all(|a| a.as_ref().unwrap().duplicate));
    let next = s
        .messages
        .append_batch(vec![msg(&r1, &a1, "c4", "four")])
        .await
        .unwrap();
    assert_eq!(next[0].as_ref().unwrap().message.seq, 4);
    drop_db(&cfg).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_rooms_in_one_batch_each_get_a_gapless_seq() {
    let Some(uri) = mongo_uri() else { return };
    let cfg = mongo_cfg(&uri);
    let s = store::open(&cfg).await.unwrap();
    let rs = rooms(&s, 5).await;
    for round in 0..3 {
        let mut batch = Vec::new();
        for i in 0..4 {
            for (room, a) in &rs {
                batch.push(msg(room, a, &format!("r{round}-{i}"), "x"));
            }
        }
        let r = s.messages.append_batch(batch).await.unwrap();
        assert!(r.iter().all(|a| !a.as_ref().unwrap().duplicate));
    }
    for (room, _) in &rs {
        assert_eq!(seqs(&s, room).await, (1..=12).collect::<Vec<_>>());
    }
    drop_db(&cfg).await;
}

/// Appends `per_room` messages in each of `rooms` rooms, every room a task
/// of its own sending batches of `batch`, all at once (as the room actors of
/// a busy node do). Returns µs per message.
async fn cost(s: &Stores, rooms_n: usize, per_room: usize, batch: usize) -> f64 {
    let rs = rooms(s, rooms_n).await;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (room, a) in rs {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut sent = 0;
            while sent < per_room {
                let n = batch.min(per_room - sent);
                let b = (sent..sent + n)
                    .map(|i| {
                        msg(
                            &room,
                            &a,
                            &format!("m{i}"),
                            "a 64-byte message body ......................................",
                        )
                    })
                    .collect();
                for r in s.messages.append_batch(b).await.unwrap() {
                    assert!(!r.unwrap().duplicate);
                }
                sent += n;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    started.elapsed().as_secs_f64() * 1e6 / (rooms_n * per_room) as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: run with --ignored --nocapture"]
async fn append_cost_per_message() {
    let Some(uri) = mongo_uri() else { return };
    let cfg = mongo_cfg(&uri);
    let s = store::open(&cfg).await.unwrap();
    // Warm the connection pool and the server's collections.
    cost(&s, 2, 20, 10).await;
    for (rooms_n, per_room, batch) in [(1, 500, 1), (1, 4000, 64), (10, 400, 8), (50, 80, 4)] {
        let us = cost(&s, rooms_n, per_room, batch).await;
        println!(
            "mongodb append: {rooms_n} room(s) x {per_room} msgs, batches of {batch}: {us:.1} µs/message"
        );
    }
    drop_db(&cfg).await;
}
