//! The store contract suite against every backend available here: SQLite
//! always; MongoDB when `CHAT_TEST_MONGODB_URI` is set (CI sets it, and sets
//! `CHAT_REQUIRE_MONGODB=1` so that a missing URI fails instead of skipping).

use chatd::config::{Settings, StoreConfig};
use chatd::store::{self, StoreError};

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

/// The MongoDB URI under test, or `None` to skip; panics when
/// `CHAT_REQUIRE_MONGODB=1` and no URI is given, so CI cannot skip silently.
fn mongo_uri() -> Option<String> {
    match std::env::var("CHAT_TEST_MONGODB_URI") {
        Ok(u) if !u.trim().is_empty() => Some(u),
        _ => {
            assert!(
                std::env::var("CHAT_REQUIRE_MONGODB").as_deref() != Ok("1"),
                "CHAT_REQUIRE_MONGODB=1 but CHAT_TEST_MONGODB_URI is not set"
            );
            eprintln!("CHAT_TEST_MONGODB_URI is not set: MongoDB test skipped");
            None
        }
    }
}

/// A config for a fresh, uniquely named database on the server under test.
fn mongo_cfg(uri: &str) -> StoreConfig {
    let mut cfg = Settings::defaults().store;
    cfg.kind = "mongodb".into();
    cfg.mongodb.uri = uri.to_owned();
    cfg.mongodb.database = format!(
        "chatd_test_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    cfg
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
    cfg.kind = "mongodb".into();
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
        let total = ROOMS * PER_ROOM;
        drop(s);
        let size_after = db_bytes(&path);
        println!(
            "sqlite append, synchronous={sync}: {total} messages of 64 bytes in {ROOMS} rooms, \
             batches of {BATCH}: {:.2} µs/message, {:.0} bytes/message",
            took.as_secs_f64() * 1e6 / total as f64,
            (size_after - size_before) as f64 / total as f64
        );
    }
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
