//! `chatd export` / `import` on MongoDB alone (the cross-backend round trip
//! is in `tests/transfer.rs`): a cut-off file is refused with the advice to
//! drop the database, a bad line names its line, and a whole file still
//! loads into a fresh database. Runs when `CHAT_TEST_MONGODB_URI` is set.

use std::io::BufReader;
use std::path::Path;

use chatd::config::StoreConfig;
use chatd::domain::{ClientMsgId, MessageBody};
use chatd::store::transfer::{self, Counts, TransferError};
use chatd::store::{self, NewMessage};

#[path = "support/mongo.rs"]
mod mongo_support;
use mongo_support::{drop_db, mongo_cfg, mongo_uri};

async fn import_from(cfg: &StoreConfig, path: &Path) -> Result<Counts, TransferError> {
    let f = std::fs::File::open(path).unwrap();
    transfer::import(cfg, BufReader::new(f), None, false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongodb_import_refuses_cut_off_and_bad_files_and_loads_a_whole_one() {
    let Some(uri) = mongo_uri() else { return };
    let dir = tempfile::tempdir().unwrap();
    let src = mongo_cfg(&uri);
    let s = store::open(&src).await.unwrap();
    let a = store::contract::make_user(&s, "mt").await;
    let b = store::contract::make_user(&s, "mt").await;
    let (room, _) = s.rooms.create_direct(&a.id, &b.id).await.unwrap();
    let m = NewMessage {
        room_id: room.id.clone(),
        sender_id: a.id.clone(),
        client_msg_id: ClientMsgId::from_trusted("c1".into()),
        body: MessageBody::from_trusted("hello".into()),
        reply_to: None,
        attachments: Vec::new(),
    };
    s.messages.append_batch(vec![m]).await.unwrap();
    let whole = dir.path().join("whole.jsonl");
    let counts = transfer::export(&src, std::fs::File::create(&whole).unwrap(), false)
        .await
        .unwrap();
    assert_eq!((counts.users, counts.rooms, counts.messages), (2, 1, 1));

    let text = std::fs::read_to_string(&whole).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let short = dir.path().join("short.jsonl");
    std::fs::write(&short, lines[..lines.len() - 1].join("\n")).unwrap();
    let dst = mongo_cfg(&uri);
    match import_from(&dst, &short).await {
        Err(TransferError::Incomplete(m)) => assert!(m.contains("drop it"), "{m}"),
        other => panic!("{other:?}"),
    }
    drop_db(&dst).await;

    let mut bad = lines.clone();
    bad[2] = "{not json";
    std::fs::write(&short, bad.join("\n")).unwrap();
    let dst = mongo_cfg(&uri);
    match import_from(&dst, &short).await {
        Err(TransferError::Format { line: 3, .. }) => {}
        other => panic!("{other:?}"),
    }
    drop_db(&dst).await;

    let dst = mongo_cfg(&uri);
    assert_eq!(import_from(&dst, &whole).await.unwrap(), counts);
    let again = dir.path().join("again.jsonl");
    let re = transfer::export(&dst, std::fs::File::create(&again).unwrap(), false)
        .await
        .unwrap();
    assert_eq!(re, counts);
    let body = |t: &str| t.lines().skip(1).map(str::to_owned).collect::<Vec<_>>();
    assert_eq!(
        body(&std::fs::read_to_string(&again).unwrap()),
        body(&text),
        "export → import → export gives the same records"
    );
    drop_db(&dst).await;
    drop_db(&src).await;
}
