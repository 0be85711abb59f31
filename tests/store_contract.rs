//! The store contract suite against every backend available here: SQLite
//! always; MongoDB when `CHAT_TEST_MONGODB_URI` is set (CI sets it, and sets
//! `CHAT_REQUIRE_MONGODB=1` so that a missing URI fails instead of skipping).

use chatd::config::{Settings, StoreConfig};
use chatd::store::{self, StoreError};

#[path = "support/mongo.rs"]
mod mongo_support;
use mongo_support::{mongo_cfg, mongo_uri};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_passes_the_store_contract() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Settings::defaults().store;
    cfg.sqlite.path = dir
        .path()
        .join("contract.db")
        .to_string_lossy()
        .into_owned();
    let stores = store::open(&cfg).await.unwrap();
    store::contract::run_all(&stores).await;
    store::contract_lifecycle::run_all(&stores).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_refuses_an_unknown_schema_version() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.db");
    let mut cfg = Settings::defaults().store;
    cfg.sqlite.path = path.to_string_lossy().into_owned();
    drop(store::open(&cfg).await.unwrap());
    let c = rusqlite::Connection::open(&path).unwrap();
    c.execute(
        "UPDATE meta SET value = '999' WHERE key = 'schema_version'",
        [],
    )
    .unwrap();
    drop(c);
    let err = store::open(&cfg).await.err().expect("must refuse");
    assert!(err.to_string().contains("schema version 999"), "{err}");
}

async fn raw_db(cfg: &StoreConfig) -> mongodb::Database {
    mongodb::Client::with_uri_str(&cfg.mongodb.uri)
        .await
        .unwrap()
        .database(&cfg.mongodb.database)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongodb_passes_the_store_contract() {
    let Some(uri) = mongo_uri() else { return };
    let cfg = mongo_cfg(&uri);
    let stores = store::open(&cfg).await.unwrap();
    assert_eq!(stores.health.backend(), "mongodb");
    store::contract::run_all(&stores).await;
    store::contract_lifecycle::run_all(&stores).await;
    raw_db(&cfg).await.drop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongodb_two_nodes_share_one_gapless_seq() {
    use chatd::domain::{ClientMsgId, MessageBody};
    use chatd::store::{HistoryQuery, NewMessage};
    let Some(uri) = mongo_uri() else { return };
    let cfg = mongo_cfg(&uri);
    // Two stores on one database behave like two chatd nodes.
    let n1 = store::open(&cfg).await.unwrap();
    let n2 = store::open(&cfg).await.unwrap();
    let a = store::contract::make_user(&n1, "two").await;
    let b = store::contract::make_user(&n2, "two").await;
    let (room, _) = n1.rooms.create_direct(&a.id, &b.id).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..60 {
        let s = if i % 2 == 0 { n1.clone() } else { n2.clone() };
        let (room, a) = (room.id.clone(), a.id.clone());
        tasks.push(tokio::spawn(async move {
            let m = NewMessage {
                room_id: room,
                sender_id: a,
                client_msg_id: ClientMsgId::from_trusted(format!("n{i}")),
                body: MessageBody::from_trusted("x".into()),
                reply_to: None,
                attachments: Vec::new(),
            };
            s.messages
                .append_batch(vec![m])
                .await
                .unwrap()
                .pop()
                .unwrap()
        }));
    }
    let mut seqs = Vec::new();
    for t in tasks {
        seqs.push(t.await.unwrap().unwrap().message.seq);
    }
    seqs.sort();
    assert_eq!(seqs, (1..=60).collect::<Vec<_>>());
    let q = HistoryQuery {
        before: None,
        after: Some(0),
        limit: 100,
    };
    let stored: Vec<i64> = n2
        .messages
        .history(&room.id, q)
        .await
        .unwrap()
        .iter()
        .map(|m| m.seq)
        .collect();
    assert_eq!(stored, seqs);
    raw_db(&cfg).await.drop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongodb_reopens_and_refuses_an_unknown_schema_version() {
    use mongodb::bson::doc;
    let Some(uri) = mongo_uri() else { return };
    let cfg = mongo_cfg(&uri);
    drop(store::open(&cfg).await.unwrap());
    // Start-up is idempotent: indexes and meta are already there.
    drop(store::open(&cfg).await.unwrap());
    let db = raw_db(&cfg).await;
    db.collection::<mongodb::bson::Document>("meta")
        .update_one(
            doc! { "_id": "chatd" },
            doc! { "$set": { "schema_version": 999 } },
        )
        .await
        .unwrap();
    let err = store::open(&cfg).await.err().expect("must refuse");
    assert!(err.to_string().contains("schema version 999"), "{err}");
    db.drop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongodb_refuses_another_backends_or_foreign_data() {
    use mongodb::bson::doc;
    let Some(uri) = mongo_uri() else { return };
    // A database whose meta names another backend.
    let cfg = mongo_cfg(&uri);
    drop(store::open(&cfg).await.unwrap());
    let db = raw_db(&cfg).await;
    db.collection::<mongodb::bson::Document>("meta")
        .update_one(
            doc! { "_id": "chatd" },
            doc! { "$set": { "backend": "sqlite" } },
        )
        .await
        .unwrap();
    let err = store::open(&cfg).await.err().expect("must refuse");
    assert!(err.to_string().contains("\"sqlite\" backend"), "{err}");
    db.drop().await.unwrap();

    // A database with someone else's data and no chatd meta at all.
    let cfg = mongo_cfg(&uri);
    let db = raw_db(&cfg).await;
    db.collection::<mongodb::bson::Document>("orders")
        .insert_one(doc! { "sku": 1 })
        .await
        .unwrap();
    let err = store::open(&cfg).await.err().expect("must refuse");
    assert!(err.to_string().contains("no chatd meta"), "{err}");
    let names = db.list_collection_names().await.unwrap();
    assert_eq!(names, vec!["orders".to_owned()], "nothing was created");
    db.drop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongodb_unreachable_is_unavailable_not_a_panic() {
    // Nothing listens on port 1; a short selection timeout keeps this quick.
    let mut cfg = Settings::defaults().store;
    cfg.kind = chatd::config::StoreKind::Mongodb;
    cfg.mongodb.uri =
        "mongodb://127.0.0.1:1/?directConnection=true&serverSelectionTimeoutMS=300".into();
    match store::open(&cfg).await {
        Err(StoreError::Unavailable(_)) => {}
        Err(e) => panic!("expected Unavailable, got {e:?}"),
        Ok(_) => panic!("connected to nothing"),
    }
}

/// A private SecantusDB started by `scripts/start-secantus.sh`, for tests
/// that must stop and restart their server. Killed on drop.
struct OwnServer {
    port: u16,
    storage: std::path::PathBuf,
    pid_file: std::path::PathBuf,
    pid: Option<u32>,
    uri: String,
}

impl OwnServer {
    fn start(dir: &std::path::Path) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut s = OwnServer {
            port,
            storage: dir.join("data"),
            pid_file: dir.join("secantus.pid"),
            pid: None,
            uri: String::new(),
        };
        s.restart();
        s
    }

    fn restart(&mut self) {
        let out = std::process::Command::new("bash")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/scripts/start-secantus.sh"
            ))
            .arg(self.port.to_string())
            .arg(&self.storage)
            .env("SECANTUS_PID_FILE", &self.pid_file)
            .env("SECANTUS_LOG", self.pid_file.with_extension("log"))
            .output()
            .expect("run scripts/start-secantus.sh");
        assert!(
            out.status.success(),
            "start-secantus.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.uri = String::from_utf8(out.stdout).unwrap().trim().to_owned();
        self.pid = Some(
            std::fs::read_to_string(&self.pid_file)
                .unwrap()
                .trim()
                .parse()
                .unwrap(),
        );
    }

    /// SIGKILL, as a crash would, then waits until the process is gone.
    fn kill(&mut self) {
        if let Some(pid) = self.pid.take() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            let proc = std::path::PathBuf::from(format!("/proc/{pid}"));
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while proc.exists() && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn text_msg(
    room: &chatd::domain::RoomId,
    sender: &chatd::domain::UserId,
    cmid: &str,
) -> store::NewMessage {
    store::NewMessage {
        room_id: room.clone(),
        sender_id: sender.clone(),
        client_msg_id: chatd::domain::ClientMsgId::from_trusted(cmid.into()),
        body: chatd::domain::MessageBody::from_trusted(format!("body of {cmid}")),
        reply_to: None,
        attachments: Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongodb_outage_is_unavailable_then_recovers_with_nothing_lost() {
    if mongo_uri().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut srv = tokio::task::block_in_place(|| OwnServer::start(dir.path()));
    let cfg = mongo_cfg(&format!("{}&serverSelectionTimeoutMS=1000", srv.uri));
    let s = store::open(&cfg).await.unwrap();
    let a = store::contract::make_user(&s, "out").await;
    let b = store::contract::make_user(&s, "out").await;
    let (room, _) = s.rooms.create_direct(&a.id, &b.id).await.unwrap();
    let first = s
        .messages
        .append_batch(vec![text_msg(&room.id, &a.id, "before")])
        .await
        .unwrap();
    assert_eq!(first[0].as_ref().unwrap().message.seq, 1);

    tokio::task::block_in_place(|| srv.kill());
    let is_unavailable = |r: Result<(), StoreError>| matches!(r, Err(StoreError::Unavailable(_)));
    assert!(is_unavailable(s.health.ping().await));
    let t = std::time::Instant::now();
    let during = s
        .messages
        .append_batch(vec![text_msg(&room.id, &a.id, "during")])
        .await;
    assert!(
        matches!(during, Err(StoreError::Unavailable(_))),
        "{during:?}"
    );
    // One try and one retry, each bounded by serverSelectionTimeoutMS=1000.
    assert!(
        t.elapsed() < std::time::Duration::from_millis(3500),
        "503 took {:?}",
        t.elapsed()
    );
    assert!(is_unavailable(s.rooms.room(&room.id).await.map(|_| ())));

    // The same store object reconnects by itself once the server is back.
    tokio::task::block_in_place(|| srv.restart());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while s.health.ping().await.is_err() {
        assert!(std::time::Instant::now() < deadline, "no reconnect in 30 s");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // The client resends what got 503: it lands right after what was acked.
    let resent = s
        .messages
        .append_batch(vec![text_msg(&room.id, &a.id, "during")])
        .await
        .unwrap();
    assert_eq!(resent[0].as_ref().unwrap().message.seq, 2);
    let q = store::HistoryQuery {
        before: None,
        after: Some(0),
        limit: 10,
    };
    let bodies: Vec<String> = s
        .messages
        .history(&room.id, q)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.body.as_str().to_owned())
        .collect();
    assert_eq!(bodies, vec!["body of before", "body of during"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongodb_an_append_cut_off_mid_transaction_leaves_no_gap() {
    use mongodb::bson::doc;
    let Some(uri) = mongo_uri() else { return };
    let cfg = mongo_cfg(&uri);
    let s = store::open(&cfg).await.unwrap();
    let a = store::contract::make_user(&s, "cut").await;
    let b = store::contract::make_user(&s, "cut").await;
    let (room, _) = s.rooms.create_direct(&a.id, &b.id).await.unwrap();
    // What a node that dies between the seq $inc and the insert leaves: a
    // transaction that never commits (the server aborts it).
    let client = mongodb::Client::with_uri_str(&uri).await.unwrap();
    let rooms = client
        .database(&cfg.mongodb.database)
        .collection::<mongodb::bson::Document>("rooms");
    let mut session = client.start_session().await.unwrap();
    session.start_transaction().await.unwrap();
    rooms
        .update_one(
            doc! { "_id": room.id.as_str() },
            doc! { "$inc": { "last_seq": 1 } },
        )
        .session(&mut session)
        .await
        .unwrap();
    session.abort_transaction().await.unwrap();
    let r = s
        .messages
        .append_batch(vec![text_msg(&room.id, &a.id, "after-crash")])
        .await
        .unwrap();
    assert_eq!(r[0].as_ref().unwrap().message.seq, 1, "no gap");
    assert_eq!(s.rooms.room(&room.id).await.unwrap().unwrap().last_seq, 1);
    raw_db(&cfg).await.drop().await.unwrap();
}

/// The SQLite writer's cost per message and the database's size per
/// message, through the public API, batched like the room pipeline does
/// (one task per room, each appending its sends in batches; the writer
/// group-commits what all rooms have pending). A measurement, not a check:
/// `cargo test --test store_contract -- --ignored --nocapture sqlite_append_cost`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn sqlite_append_cost() {
    const ROOMS: usize = 20;
    const PER_ROOM: usize = 4000;
    const BATCH: usize = 32;
    for sync in ["full", "off"] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cost.db");
        let mut cfg = Settings::defaults().store;
        cfg.sqlite.path = path.to_string_lossy().into_owned();
        cfg.sqlite.synchronous = sync.into();
        let s = store::open(&cfg).await.unwrap();
        let mut rooms = Vec::new();
        for _ in 0..ROOMS {
            let a = store::contract::make_user(&s, "ca").await;
            let b = store::contract::make_user(&s, "cb").await;
            let (r, _) = s.rooms.create_direct(&a.id, &b.id).await.unwrap();
            rooms.push((r.id, a.id, b.id));
        }
        let size_before = db_bytes(&path);
        let body = "x".repeat(64);
        let cpu_before = writer_cpu_secs();
        let started = std::time::Instant::now();
        let mut tasks = Vec::new();
        for (i, (room, a, b)) in rooms.into_iter().enumerate() {
            let (s, body) = (s.clone(), body.clone());
            tasks.push(tokio::spawn(async move {
                let mut n = 0usize;
                while n < PER_ROOM {
                    let batch = (n..(n + BATCH).min(PER_ROOM))
                        .map(|k| store::NewMessage {
                            room_id: room.clone(),
                            sender_id: if k % 2 == 0 { a.clone() } else { b.clone() },
                            // The benchmark's shape: sender-n-time in hex.
                            client_msg_id: chatd::domain::ClientMsgId::from_trusted(format!(
                                "{:x}-{:x}-{:x}",
                                i * 2 + k % 2,
                                k,
                                1_790_000_000_000_000u64 + k as u64
                            )),
                            body: chatd::domain::MessageBody::from_trusted(body.clone()),
                            reply_to: None,
                            attachments: Vec::new(),
                        })
                        .collect::<Vec<_>>();
                    n += batch.len();
                    for r in s.messages.append_batch(batch).await.unwrap() {
                        assert!(!r.unwrap().duplicate);
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let took = started.elapsed();
        let cpu = writer_cpu_secs() - cpu_before;
        let total = ROOMS * PER_ROOM;
        drop(s);
        let size_after = db_bytes(&path);
        println!(
            "sqlite append, synchronous={sync}: {total} messages of 64 bytes in {ROOMS} rooms, \
             batches of {BATCH}: {:.2} µs/message wall, writer thread CPU {:.2} µs/message, \
             {:.0} bytes/message",
            took.as_secs_f64() * 1e6 / total as f64,
            cpu * 1e6 / total as f64,
            (size_after - size_before) as f64 / total as f64
        );
    }
}

/// CPU time (user + system) of this process's `sqlite-writer` threads, in
/// seconds: the writer's own cost, whatever else the machine is doing.
fn writer_cpu_secs() -> f64 {
    let mut ticks = 0u64;
    for task in std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() != "sqlite-writer" {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        // Fields after the command name: state is 3rd, utime 14th, stime 15th.
        let rest: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, r)| r.split_whitespace().collect())
            .unwrap_or_default();
        ticks += rest
            .get(11)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        ticks += rest
            .get(12)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    // USER_HZ is 100 on Linux.
    ticks as f64 / 100.0
}

/// The database's size with its WAL checkpointed into the main file.
fn db_bytes(path: &std::path::Path) -> i64 {
    let c = rusqlite::Connection::open(path).unwrap();
    c.busy_timeout(std::time::Duration::from_secs(5)).unwrap();
    c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .unwrap();
    c.query_row(
        "SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()",
        [],
        |r| r.get(0),
    )
    .unwrap()
}

/// The schema of chatd's SQLite store before version 2, as it shipped, and rows.
const SCHEMA_V1: &str = include_str!("fixtures/sqlite-schema-1.sql");

/// Every message of a room, oldest first.
async fn all_messages(s: &store::Stores, room: &str) -> Vec<store::Message> {
    let q = store::HistoryQuery {
        before: None,
        after: Some(0),
        limit: 1000,
    };
    s.messages
        .history(&chatd::domain::RoomId::from_trusted(room), q)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_migrates_a_version_1_database_with_nothing_lost() {
    use chatd::domain::{ClientMsgId, MessageBody, MessageId, RoomId, UserId};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v1.db");
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute_batch(SCHEMA_V1)
        .unwrap();
    let mut cfg = Settings::defaults().store;
    cfg.sqlite.path = path.to_string_lossy().into_owned();
    let lite = std::sync::Arc::new(
        chatd::store::sqlite::SqliteStore::open(&cfg.sqlite)
            .await
            .unwrap(),
    );
    let s = store::Stores::from_backend(lite.clone());
    let (alice, bob, carol) = (
        UserId::from_trusted("019ad0000000700080000000000000a1"),
        UserId::from_trusted("019ad0000000700080000000000000b2"),
        UserId::from_trusted("019ad0000000700080000000000000c3"),
    );
    let direct = RoomId::from_trusted("019ad00000007000800000000000d001");
    let team = RoomId::from_trusted("019ad00000007000800000000000e002");

    // Every message as it was: id, seq, sender, client_msg_id, body, time.
    let seen: Vec<_> = all_messages(&s, direct.as_str())
        .await
        .into_iter()
        .map(|m| {
            (
                m.id.to_string(),
                m.seq,
                m.sender_id.to_string(),
                m.client_msg_id.as_str().to_owned(),
                m.body.as_str().to_owned(),
                m.created_at,
            )
        })
        .collect();
    let own = |a: &str, b: i64, c: &str, d: &str, e: &str, f: &str| {
        (a.into(), b, c.into(), d.into(), e.into(), f.into())
    };
    assert_eq!(
        seen,
        vec![
            own(
                "019ad0000000700080000000000f0001",
                1,
                alice.as_str(),
                "c1",
                "hello 👋",
                "2026-01-01T00:03:00.123Z"
            ),
            own(
                "m-legacy-2",
                2,
                bob.as_str(),
                "6f9619ff-8b86-4d11-b42d-00c04fc964ff",
                "hi",
                "2026-01-01T00:03:01Z"
            ),
            own(
                "019ad0000000700080000000000f0003",
                3,
                alice.as_str(),
                "C-Upper",
                "line one\nline \"two\"",
                "2026-01-01T00:03:02.000+01:00"
            ),
        ]
    );
    let group = all_messages(&s, team.as_str()).await;
    assert_eq!(
        group
            .iter()
            .map(|m| (m.seq, m.body.as_str()))
            .collect::<Vec<_>>(),
        vec![(1, "group one"), (2, "group two")]
    );

    // Cursors, roles, blocks, devices, tokens and users are intact.
    let room = s.rooms.room(&direct).await.unwrap().unwrap();
    assert_eq!(room.last_seq, 3);
    let m = room.member(&alice).unwrap();
    assert_eq!((m.delivered_seq, m.read_seq), (3, 2));
    let cursors = s.rooms.cursors_for_user(&bob).await.unwrap();
    assert_eq!(
        cursors
            .iter()
            .map(|c| (c.last_seq, c.delivered_seq, c.read_seq))
            .collect::<Vec<_>>(),
        vec![(3, 1, 1)]
    );
    let t = s.rooms.room(&team).await.unwrap().unwrap();
    assert_eq!(t.member(&carol).unwrap().role, store::Role::Admin);
    assert_eq!(s.users.blocked_by(&carol).await.unwrap(), vec![bob.clone()]);
    assert_eq!(s.users.devices(&alice).await.unwrap()[0].token, "tok-a");
    let (u, hash) = s.users.credentials("alice").await.unwrap().unwrap();
    assert_eq!((u.id, hash.as_str()), (alice.clone(), "$argon2id$a"));
    let (dm, created) = s.rooms.create_direct(&bob, &alice).await.unwrap();
    assert!(!created);
    assert_eq!(dm.id, direct);
    // Bob read up to 1: Alice's message 3 is unread (his own 2 never is).
    let summary = s.rooms.rooms_for_user(&bob).await.unwrap();
    assert_eq!(summary[0].last_message.as_ref().unwrap().seq, 3);
    assert_eq!(summary[0].unread, 1);

    // Resends of old messages stay duplicates (with the old ids); new ones
    // continue the seq.
    let send = |room: &RoomId, from: &UserId, cmid: &str, body: &str| store::NewMessage {
        room_id: room.clone(),
        sender_id: from.clone(),
        client_msg_id: ClientMsgId::from_trusted(cmid.into()),
        body: MessageBody::from_trusted(body.into()),
        reply_to: None,
        attachments: Vec::new(),
    };
    let r = s
        .messages
        .append_batch(vec![
            send(&direct, &alice, "c1", "again"),
            send(
                &direct,
                &bob,
                "6f9619ff-8b86-4d11-b42d-00c04fc964ff",
                "again",
            ),
            send(&direct, &alice, "C-Upper", "again"),
            send(&direct, &alice, "c-upper", "not the same id"),
            send(&team, &alice, "c1", "again"),
        ])
        .await
        .unwrap();
    let r: Vec<_> = r.into_iter().map(Result::unwrap).collect();
    assert_eq!(
        r.iter()
            .map(|a| (a.duplicate, a.message.seq, a.message.id.to_string()))
            .collect::<Vec<_>>()[..3],
        [
            (true, 1, "019ad0000000700080000000000f0001".to_owned()),
            (true, 2, "m-legacy-2".to_owned()),
            (true, 3, "019ad0000000700080000000000f0003".to_owned()),
        ]
    );
    assert!(!r[3].duplicate);
    assert_eq!(r[3].message.seq, 4);
    assert!((r[4].duplicate, r[4].message.seq) == (true, 2));
    assert_eq!(s.rooms.room(&direct).await.unwrap().unwrap().last_seq, 4);

    // Old and new messages are found by (room, id); not through another room.
    for (room, id, seq) in [
        (&direct, "m-legacy-2".to_owned(), 2),
        (&direct, "019ad0000000700080000000000f0001".to_owned(), 1),
        (&direct, r[3].message.id.to_string(), 4),
        (&team, "019ad0000000700080000000000f0005".to_owned(), 2),
    ] {
        let found = lite
            .message_by_id(room, &MessageId::from_trusted(id.as_str()))
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{id} in {room}"));
        assert_eq!((found.seq, found.id.as_str()), (seq, id.as_str()));
    }
    assert!(lite
        .message_by_id(&team, &r[3].message.id)
        .await
        .unwrap()
        .is_none());
    let c = rusqlite::Connection::open(&path).unwrap();
    let v: String = c
        .query_row(
            "SELECT value FROM meta WHERE key = 'schema_version'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(v, chatd::store::sqlite::SCHEMA_VERSION);
    drop(c);

    // And the migrated store exports.
    let out = std::fs::File::create(dir.path().join("v1.jsonl")).unwrap();
    let counts = chatd::store::transfer::export(&cfg, out, false)
        .await
        .unwrap();
    assert_eq!(
        (counts.users, counts.rooms, counts.members, counts.messages),
        (3, 2, 4, 6)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_failed_migration_leaves_the_version_1_file_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v1.db");
    let c = rusqlite::Connection::open(&path).unwrap();
    c.execute_batch(SCHEMA_V1).unwrap();
    // A message whose sender does not exist cannot be keyed: refuse, lose nothing.
    c.execute(
        "INSERT INTO messages VALUES ('orphan', '019ad00000007000800000000000d001', 4,
         'nobody', 'c9', 'lost?', '2026-01-01T00:09:00.000Z')",
        [],
    )
    .unwrap();
    drop(c);
    let mut cfg = Settings::defaults().store;
    cfg.sqlite.path = path.to_string_lossy().into_owned();
    let err = store::open(&cfg).await.err().expect("must refuse");
    assert!(err.to_string().contains("orphan"), "{err}");
    let c = rusqlite::Connection::open(&path).unwrap();
    let (v, n, tables): (String, i64, String) = c
        .query_row(
            "SELECT (SELECT value FROM meta WHERE key = 'schema_version'),
                    (SELECT COUNT(*) FROM messages WHERE room_id IS NOT NULL),
                    (SELECT group_concat(name, ',') FROM
                       (SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name))",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!(v, "1");
    assert_eq!(n, 6);
    assert_eq!(
        tables,
        "blocks,devices,messages,meta,refresh_tokens,room_members,rooms,users"
    );
}

/// Two stores on one file (two writer threads, as two chatd processes
/// sharing it) appending batches to one room: one gap-free seq, every id
/// distinct, every resend a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_two_stores_on_one_file_share_one_gapless_seq() {
    use chatd::domain::{ClientMsgId, MessageBody};
    use chatd::store::NewMessage;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Settings::defaults().store;
    cfg.sqlite.path = dir.path().join("two.db").to_string_lossy().into_owned();
    let n1 = store::open(&cfg).await.unwrap();
    let n2 = store::open(&cfg).await.unwrap();
    let a = store::contract::make_user(&n1, "two").await;
    let b = store::contract::make_user(&n2, "two").await;
    let (room, _) = n1.rooms.create_direct(&a.id, &b.id).await.unwrap();
    let batch = |i: usize| -> Vec<NewMessage> {
        (0..8)
            .map(|k| NewMessage {
                room_id: room.id.clone(),
                sender_id: if k % 2 == 0 {
                    a.id.clone()
                } else {
                    b.id.clone()
                },
                client_msg_id: ClientMsgId::from_trusted(format!("n{i}-{k}")),
                body: MessageBody::from_trusted("x".into()),
                reply_to: None,
                attachments: Vec::new(),
            })
            .collect()
    };
    let mut tasks = Vec::new();
    for i in 0..40 {
        let s = if i % 2 == 0 { n1.clone() } else { n2.clone() };
        let msgs = batch(i);
        tasks.push(tokio::spawn(async move {
            s.messages.append_batch(msgs).await.unwrap()
        }));
    }
    let mut seqs = Vec::new();
    let mut ids = std::collections::HashSet::new();
    for t in tasks {
        for r in t.await.unwrap() {
            let r = r.unwrap();
            assert!(!r.duplicate);
            seqs.push(r.message.seq);
            assert!(ids.insert(r.message.id));
        }
    }
    seqs.sort();
    assert_eq!(seqs, (1..=320).collect::<Vec<_>>());
    let again = n2.messages.append_batch(batch(7)).await.unwrap();
    assert!(again.iter().all(|r| r.as_ref().unwrap().duplicate));
    assert_eq!(
        n1.rooms.room(&room.id).await.unwrap().unwrap().last_seq,
        320
    );
}
