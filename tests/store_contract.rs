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
