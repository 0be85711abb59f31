//! `chatd export` / `chatd import` carry attachment files: SQLite (files)
//! → SQLite (files) always; SQLite → MongoDB (GridFS) when
//! `CHAT_TEST_MONGODB_URI` is set. A cut-off file or a changed byte is refused.

use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;

use base64::Engine;
use bytes::Bytes;
use chatd::blobs::fs::FsBlobStore;
use chatd::blobs::gridfs::GridFsBlobStore;
use chatd::blobs::transfer::BlobTransfer;
use chatd::blobs::{Attached, AttachmentId, BlobMeta, BlobStore, NewBlob};
use chatd::config::{Settings, StoreConfig};
use chatd::domain::{ClientMsgId, MessageBody, MessageId, RoomId};
use chatd::store::transfer::{self, Counts, Dump, Load, TransferError};
use chatd::store::{self, HistoryQuery, NewMessage, Stores};
use futures_util::StreamExt;
use sha2::Digest;

fn sqlite_cfg(path: &Path) -> StoreConfig {
    let mut cfg = Settings::defaults().store;
    cfg.sqlite.path = path.to_string_lossy().into_owned();
    cfg
}

/// 2.5 MiB of varied bytes: three chunks (1 MiB, 1 MiB, 0.5 MiB).
fn file_bytes() -> Vec<u8> {
    let mut x: u32 = 0x1234_5678;
    (0..(5 * 512 * 1024))
        .map(|_| {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (x >> 24) as u8
        })
        .collect()
}

async fn read_all(b: &dyn BlobStore, id: &AttachmentId, size: u64) -> Vec<u8> {
    let mut s = b.read(id, 0..size).await.unwrap();
    let mut out = Vec::new();
    while let Some(c) = s.next().await {
        out.extend_from_slice(&c.unwrap());
    }
    out
}

/// A store with one message carrying an uploaded attachment, and one upload
/// not (yet) attached.
async fn populate(s: &Stores, b: &dyn BlobStore) -> (RoomId, MessageId, BlobMeta, BlobMeta) {
    let alice = store::contract::make_user(s, "alice").await;
    let bob = store::contract::make_user(s, "bob").await;
    let room = s
        .rooms
        .create_group(&alice.id, "files", std::slice::from_ref(&bob.id))
        .await
        .unwrap();
    let new = |name: &str| NewBlob {
        id: AttachmentId::generate(),
        uploader: alice.id.clone(),
        room_id: room.id.clone(),
        filename: name.into(),
        content_type: "application/octet-stream".into(),
        width: None,
        height: None,
    };
    let body = futures_util::stream::once(async { Ok(Bytes::from(file_bytes())) });
    let meta = b
        .put(new("report.bin"), Box::pin(body), u64::MAX)
        .await
        .unwrap();
    let body = futures_util::stream::once(async { Ok(Bytes::from_static(b"not sent yet")) });
    let loose = b
        .put(new("draft.txt"), Box::pin(body), u64::MAX)
        .await
        .unwrap();
    let appended = s
        .messages
        .append_batch(vec![NewMessage {
            room_id: room.id.clone(),
            sender_id: alice.id.clone(),
            client_msg_id: ClientMsgId::from_trusted("c1".into()),
            body: MessageBody::from_trusted("see attached".into()),
            reply_to: None,
            attachments: vec![meta.public()],
        }])
        .await
        .unwrap();
    let msg = appended.into_iter().next().unwrap().unwrap().message;
    let to = Attached {
        room_id: room.id.clone(),
        message_id: msg.id.clone(),
    };
    let meta = b.mark_attached(&meta.id, &to).await.unwrap();
    (room.id, msg.id, meta, loose)
}

fn dump(b: &Arc<dyn BlobStore>) -> Option<Box<dyn Dump>> {
    Some(Box::new(BlobTransfer(b.clone())))
}

fn load(b: &Arc<dyn BlobStore>) -> Option<Box<dyn Load>> {
    Some(Box::new(BlobTransfer(b.clone())))
}

async fn export_to(cfg: &StoreConfig, b: &Arc<dyn BlobStore>, path: &Path) -> Counts {
    let out = std::fs::File::create(path).unwrap();
    transfer::export_with(cfg, dump(b), out, false)
        .await
        .unwrap()
}

async fn import_from(
    cfg: &StoreConfig,
    b: &Arc<dyn BlobStore>,
    path: &Path,
) -> Result<Counts, TransferError> {
    let f = BufReader::new(std::fs::File::open(path).unwrap());
    transfer::import_with(cfg, load(b), f, None, false).await
}

/// The moved store and blob store hold the same file, metadata and reference.
async fn check_moved(
    s: &Stores,
    b: &dyn BlobStore,
    (room, msg, meta, loose): &(RoomId, MessageId, BlobMeta, BlobMeta),
) {
    let got = b
        .meta(&meta.id)
        .await
        .unwrap()
        .expect("the attachment moved");
    assert_eq!(&got, meta);
    let bytes = read_all(b, &meta.id, meta.size).await;
    assert_eq!(bytes, file_bytes());
    assert_eq!(hex::encode(sha2::Sha256::digest(&bytes)), meta.sha256);
    assert_eq!(b.meta(&loose.id).await.unwrap().as_ref(), Some(loose));
    assert_eq!(read_all(b, &loose.id, loose.size).await, b"not sent yet");
    // An upload never attached is still the sweeper's.
    let swept = b.unattached_before("9999", 10).await.unwrap();
    assert_eq!(swept, vec![loose.id.clone()]);
    let m = s.messages.message(room, msg).await.unwrap().unwrap();
    assert_eq!(m.attachments, vec![meta.public()]);
    let h = s
        .messages
        .history(
            room,
            HistoryQuery {
                limit: 10,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(h.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_round_trip_carries_attachment_files() {
    let dir = tempfile::tempdir().unwrap();
    let src = sqlite_cfg(&dir.path().join("a/chat.db"));
    std::fs::create_dir_all(dir.path().join("a")).unwrap();
    let s = store::open(&src).await.unwrap();
    let sb: Arc<dyn BlobStore> = Arc::new(
        FsBlobStore::open(dir.path().join("a/attachments"))
            .await
            .unwrap(),
    );
    let fixture = populate(&s, &*sb).await;
    let file = dir.path().join("a.jsonl");
    let counts = export_to(&src, &sb, &file).await;
    assert_eq!((counts.attachments, counts.attachment_chunks), (2, 4));
    let text = std::fs::read_to_string(&file).unwrap();
    let kinds: Vec<String> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["type"].to_string())
        .collect();
    let first = kinds.iter().position(|k| k == "\"attachment\"").unwrap();
    let last_message = kinds.iter().rposition(|k| k == "\"message\"").unwrap();
    assert!(last_message < first, "attachments come after the messages");

    std::fs::create_dir_all(dir.path().join("b")).unwrap();
    let dst = sqlite_cfg(&dir.path().join("b/chat.db"));
    let db: Arc<dyn BlobStore> = Arc::new(
        FsBlobStore::open(dir.path().join("b/attachments"))
            .await
            .unwrap(),
    );
    assert_eq!(import_from(&dst, &db, &file).await.unwrap(), counts);
    let t = store::open(&dst).await.unwrap();
    check_moved(&t, &*db, &fixture).await;

    // Into a blob store that already holds those ids: refused.
    let again = sqlite_cfg(&dir.path().join("c.db"));
    assert!(matches!(
        import_from(&again, &db, &file).await,
        Err(TransferError::NotEmpty(m)) if m.contains("attachment")
    ));
}

/// Rewrites the export through `edit` (on the parsed lines) into `out`.
fn rewrite(src: &Path, out: &Path, edit: impl FnOnce(&mut Vec<serde_json::Value>)) {
    let text = std::fs::read_to_string(src).unwrap();
    let mut lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    edit(&mut lines);
    let body: String = lines.iter().map(|v| format!("{v}\n")).collect();
    std::fs::write(out, body).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_chunk_or_a_changed_byte_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let src = sqlite_cfg(&dir.path().join("chat.db"));
    let s = store::open(&src).await.unwrap();
    let sb: Arc<dyn BlobStore> = Arc::new(FsBlobStore::open(dir.path().join("src")).await.unwrap());
    let (_, _, meta, _) = populate(&s, &*sb).await;
    let file = dir.path().join("a.jsonl");
    export_to(&src, &sb, &file).await;
    let is_chunk =
        |v: &serde_json::Value| v["type"] == "attachment_chunk" && v["id"] == meta.id.as_str();

    let fresh = |n: &str| {
        let cfg = sqlite_cfg(&dir.path().join(format!("{n}.db")));
        let root = dir.path().join(n);
        (cfg, root)
    };
    let engine = base64::engine::general_purpose::STANDARD;

    // The last chunk of the big file cut short (and the end line fixed up).
    let cut = dir.path().join("cut.jsonl");
    rewrite(&file, &cut, |lines| {
        let i = lines.iter().rposition(is_chunk).unwrap();
        let data = engine.decode(lines[i]["data"].as_str().unwrap()).unwrap();
        lines[i]["data"] = engine.encode(&data[..data.len() - 10]).into();
    });
    let (cfg, root) = fresh("cut");
    let b: Arc<dyn BlobStore> = Arc::new(FsBlobStore::open(&root).await.unwrap());
    let err = import_from(&cfg, &b, &cut).await.unwrap_err();
    assert!(
        matches!(&err, TransferError::Incomplete(m) if m.contains(meta.id.as_str())),
        "{err}"
    );
    assert!(b.list().await.unwrap().is_empty(), "nothing stays");
    let t = store::open(&cfg).await.unwrap();
    assert!(t.users.search_users("alice", 10).await.unwrap().is_empty());

    // A chunk missing altogether (counts fixed up): refused by offset.
    let gap = dir.path().join("gap.jsonl");
    rewrite(&file, &gap, |lines| {
        let i = lines.iter().position(is_chunk).unwrap();
        lines.remove(i);
        let end = lines.last_mut().unwrap();
        let n = end["counts"]["attachment_chunks"].as_u64().unwrap();
        end["counts"]["attachment_chunks"] = (n - 1).into();
    });
    let (cfg, root) = fresh("gap");
    let b: Arc<dyn BlobStore> = Arc::new(FsBlobStore::open(&root).await.unwrap());
    let err = import_from(&cfg, &b, &gap).await.unwrap_err();
    assert!(
        matches!(&err, TransferError::Format { msg, .. } if msg.contains("offset")),
        "{err}"
    );

    // One byte changed: the sha256 does not match.
    let flipped = dir.path().join("flipped.jsonl");
    rewrite(&file, &flipped, |lines| {
        let i = lines.iter().position(is_chunk).unwrap();
        let mut data = engine.decode(lines[i]["data"].as_str().unwrap()).unwrap();
        data[7] ^= 1;
        lines[i]["data"] = engine.encode(&data).into();
    });
    let (cfg, root) = fresh("flipped");
    let b: Arc<dyn BlobStore> = Arc::new(FsBlobStore::open(&root).await.unwrap());
    let err = import_from(&cfg, &b, &flipped).await.unwrap_err();
    assert!(err.to_string().contains("sha256"), "{err}");
    assert!(b.list().await.unwrap().is_empty(), "nothing stays");
    let t = store::open(&cfg).await.unwrap();
    assert!(t.users.search_users("alice", 10).await.unwrap().is_empty());

    // The file itself cut off mid-way: no end line.
    let short = dir.path().join("short.jsonl");
    let text = std::fs::read_to_string(&file).unwrap();
    let keep: Vec<&str> = text.lines().collect();
    std::fs::write(&short, keep[..keep.len() - 2].join("\n")).unwrap();
    let (cfg, root) = fresh("short");
    let b: Arc<dyn BlobStore> = Arc::new(FsBlobStore::open(&root).await.unwrap());
    assert!(import_from(&cfg, &b, &short).await.is_err());
    assert!(b.list().await.unwrap().is_empty(), "nothing stays");

    // Without a blob store to load them into, attachment records are refused.
    let (cfg, _) = fresh("plain");
    let f = BufReader::new(std::fs::File::open(&file).unwrap());
    let err = transfer::import(&cfg, f, None, false).await.unwrap_err();
    assert!(err.to_string().contains("attachment"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_to_mongodb_gridfs_carries_attachment_files() {
    let uri = match std::env::var("CHAT_TEST_MONGODB_URI") {
        Ok(u) if !u.trim().is_empty() => u,
        _ => {
            assert!(
                std::env::var("CHAT_REQUIRE_MONGODB").as_deref() != Ok("1"),
                "CHAT_REQUIRE_MONGODB=1 but CHAT_TEST_MONGODB_URI is not set"
            );
            eprintln!("CHAT_TEST_MONGODB_URI is not set: MongoDB test skipped");
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let src = sqlite_cfg(&dir.path().join("chat.db"));
    let s = store::open(&src).await.unwrap();
    let sb: Arc<dyn BlobStore> = Arc::new(
        FsBlobStore::open(dir.path().join("attachments"))
            .await
            .unwrap(),
    );
    let fixture = populate(&s, &*sb).await;
    let file = dir.path().join("a.jsonl");
    let counts = export_to(&src, &sb, &file).await;

    let mut mongo = Settings::defaults().store;
    mongo.kind = chatd::config::StoreKind::Mongodb;
    mongo.mongodb.uri = uri;
    mongo.mongodb.database = format!(
        "chatd_test_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let gb: Arc<dyn BlobStore> = Arc::new(GridFsBlobStore::open(&mongo.mongodb).await.unwrap());
    let loaded = import_from(&mongo, &gb, &file).await;
    let m = store::open(&mongo).await.unwrap();
    let checked = async {
        assert_eq!(loaded.unwrap(), counts);
        check_moved(&m, &*gb, &fixture).await;
        // And back out of GridFS: the same attachment lines.
        let back = dir.path().join("back.jsonl");
        export_to(&mongo, &gb, &back).await;
        let atts = |p: &Path| -> Vec<String> {
            std::fs::read_to_string(p)
                .unwrap()
                .lines()
                .filter(|l| l.contains(r#""type":"attachment"#))
                .map(str::to_owned)
                .collect()
        };
        assert_eq!(atts(&file), atts(&back));
    };
    let r = futures_util::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(checked)).await;
    let client = mongodb::Client::with_uri_str(&mongo.mongodb.uri)
        .await
        .unwrap();
    let _ = client.database(&mongo.mongodb.database).drop().await;
    if let Err(p) = r {
        std::panic::resume_unwind(p);
    }
}
