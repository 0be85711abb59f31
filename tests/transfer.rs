//! `chatd export` / `chatd import` round trips: SQLite → SQLite always;
//! SQLite → MongoDB → SQLite when `CHAT_TEST_MONGODB_URI` is set (with
//! `CHAT_REQUIRE_MONGODB=1`, a missing URI fails instead of skipping).

use std::io::BufReader;
use std::path::{Path, PathBuf};

use chatd::config::{Settings, StoreConfig};
use chatd::domain::{ClientMsgId, MessageBody, UserId};
use chatd::store::transfer::{self, Counts, TransferError};
use chatd::store::{
    self, CursorKind, NewMessage, NewRefreshToken, NotificationSettings, Role, RotateOutcome,
    Stores,
};

#[path = "support/mongo.rs"]
mod mongo_support;
use mongo_support::{mongo_cfg, mongo_uri};

fn sqlite_cfg(path: &Path) -> StoreConfig {
    let mut cfg = Settings::defaults().store;
    cfg.sqlite.path = path.to_string_lossy().into_owned();
    cfg
}

fn msg(room: &chatd::domain::RoomId, from: &UserId, cmid: &str, body: &str) -> NewMessage {
    NewMessage {
        room_id: room.clone(),
        sender_id: from.clone(),
        client_msg_id: ClientMsgId::from_trusted(cmid.into()),
        body: MessageBody::from_trusted(body.into()),
        reply_to: None,
        attachments: Vec::new(),
    }
}

/// What the populated store holds, to find again after the move.
struct Fixture {
    users: Vec<UserId>,
    spent_refresh: String,
    current_refresh: String,
}

/// A store with every kind of record: users with settings, direct and group
/// rooms with roles and cursors, messages, blocks, devices, refresh tokens.
async fn populate(s: &Stores) -> Fixture {
    let alice = store::contract::make_user(s, "alice").await;
    let bob = store::contract::make_user(s, "bob").await;
    let carol = store::contract::make_user(s, "carol").await;
    let dave = store::contract::make_user(s, "dave").await;
    s.users
        .set_last_seen(&alice.id, "2026-02-03T04:05:06.789Z")
        .await
        .unwrap();
    s.users
        .set_notification_settings(
            &bob.id,
            NotificationSettings {
                push: false,
                email: true,
            },
        )
        .await
        .unwrap();
    let (direct, _) = s.rooms.create_direct(&alice.id, &bob.id).await.unwrap();
    let team = s
        .rooms
        .create_group(&alice.id, "team ✨", &[bob.id.clone(), carol.id.clone()])
        .await
        .unwrap();
    s.rooms
        .add_member(&team.id, &dave.id, Role::Admin)
        .await
        .unwrap();
    s.rooms.create_group(&dave.id, "quiet", &[]).await.unwrap();
    let mut batch: Vec<NewMessage> = (1..=5)
        .map(|i| {
            msg(
                &direct.id,
                &alice.id,
                &format!("d{i}"),
                &format!("hello {i} 👋"),
            )
        })
        .collect();
    batch.push(msg(&team.id, &bob.id, "t1", "line one\nline \"two\""));
    batch.push(msg(&team.id, &dave.id, "t2", "ok"));
    s.messages.append_batch(batch).await.unwrap();
    s.rooms
        .advance_cursor(&direct.id, &bob.id, CursorKind::Read, 3)
        .await
        .unwrap();
    s.rooms
        .advance_cursor(&direct.id, &bob.id, CursorKind::Delivered, 5)
        .await
        .unwrap();
    s.rooms
        .advance_cursor(&team.id, &carol.id, CursorKind::Delivered, 1)
        .await
        .unwrap();
    s.users.block(&carol.id, &dave.id).await.unwrap();
    s.users.block(&dave.id, &alice.id).await.unwrap();
    s.users
        .put_device(&alice.id, "android", "tok-a")
        .await
        .unwrap();
    s.users.put_device(&bob.id, "ios", "tok-b").await.unwrap();
    s.users.put_device(&bob.id, "web", "tok-c").await.unwrap();
    let far = 4_000_000_000;
    s.auth
        .insert_refresh(NewRefreshToken {
            hash: "h-alice-1".into(),
            user_id: alice.id.clone(),
            family_id: "fam-alice".into(),
            expires_at: far,
        })
        .await
        .unwrap();
    let now = 1_900_000_000;
    assert_eq!(
        s.auth
            .rotate_refresh("h-alice-1", "h-alice-2", far, now)
            .await
            .unwrap(),
        RotateOutcome::Rotated(alice.id.clone())
    );
    Fixture {
        users: vec![alice.id, bob.id, carol.id, dave.id],
        spent_refresh: "h-alice-1".into(),
        current_refresh: "h-alice-2".into(),
    }
}

async fn export_to(cfg: &StoreConfig, path: &Path) -> Counts {
    transfer::export(cfg, std::fs::File::create(path).unwrap(), false)
        .await
        .unwrap()
}

async fn import_from(cfg: &StoreConfig, path: &Path) -> Result<Counts, TransferError> {
    let f = std::fs::File::open(path).unwrap();
    transfer::import(cfg, BufReader::new(f), None, false).await
}

/// The data lines of an export (the header names the source and time).
fn body(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap();
    let lines: Vec<String> = text.lines().map(str::to_owned).collect();
    assert!(lines[0].starts_with(r#"{"type":"header","format":"chatd-export","version":1"#));
    assert!(lines.last().unwrap().starts_with(r#"{"type":"end""#));
    lines[1..].to_vec()
}

/// Everything the traits show about the fixture's users, for comparing
/// stores. (`Debug` because summaries hold `f64`-free but big structs.)
async fn view(s: &Stores, f: &Fixture) -> String {
    let mut out = String::new();
    for u in &f.users {
        let mut rooms = s.rooms.rooms_for_user(u).await.unwrap();
        rooms.sort_by(|a, b| a.room.id.cmp(&b.room.id));
        out.push_str(&format!(
            "{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n",
            s.users.user(u).await.unwrap(),
            s.users.notification_settings(u).await.unwrap(),
            s.users.devices(u).await.unwrap(),
            s.users.blocked_by(u).await.unwrap(),
            s.users.blockers_of(u).await.unwrap(),
            rooms,
            s.rooms.cursors_for_user(u).await.unwrap(),
        ));
        for r in rooms {
            let q = store::HistoryQuery {
                before: None,
                after: Some(0),
                limit: 100,
            };
            out.push_str(&format!(
                "{:?}\n",
                s.messages.history(&r.room.id, q).await.unwrap()
            ));
        }
    }
    out
}

/// The moved store works, not only reads: seqs continue, resends stay
/// idempotent, a spent refresh token is still caught, logins still work.
async fn still_works(s: &Stores, f: &Fixture) {
    let alice = &f.users[0];
    let bob = &f.users[1];
    let (direct, created) = s.rooms.create_direct(bob, alice).await.unwrap();
    assert!(!created, "the direct room moved with its key");
    let r = s
        .messages
        .append_batch(vec![
            msg(&direct.id, alice, "d1", "resent"),
            msg(&direct.id, bob, "new", "after the move"),
        ])
        .await
        .unwrap();
    let a0 = r[0].as_ref().unwrap();
    assert!(a0.duplicate);
    assert_eq!(a0.message.seq, 1);
    assert_eq!(r[1].as_ref().unwrap().message.seq, 6);
    let user = s.users.user(alice).await.unwrap().unwrap();
    let (who, hash) = s
        .users
        .credentials(user.username.as_ref())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((&who.id, hash.as_str()), (alice, "$argon2id$fake"));
    assert_eq!(
        s.auth
            .rotate_refresh(&f.spent_refresh, "h-x", 4_000_000_000, 1_900_000_001)
            .await
            .unwrap(),
        RotateOutcome::Reused
    );
    assert_eq!(
        s.auth
            .rotate_refresh(&f.current_refresh, "h-y", 4_000_000_000, 1_900_000_001)
            .await
            .unwrap(),
        RotateOutcome::Invalid,
        "reuse revoked the family, as before the move"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_round_trip_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let src = sqlite_cfg(&dir.path().join("a.db"));
    let s = store::open(&src).await.unwrap();
    let f = populate(&s).await;
    let before = view(&s, &f).await;
    for marker in [
        "hello 5 👋",
        "team ✨",
        "tok-c",
        "Admin",
        "read_seq: 3",
        "push: false",
    ] {
        assert!(before.contains(marker), "the view shows {marker:?}");
    }
    let a = dir.path().join("a.jsonl");
    let counts = export_to(&src, &a).await;
    assert_eq!(
        (counts.users, counts.rooms, counts.members, counts.messages),
        (4, 3, 7, 7)
    );
    assert_eq!(
        (counts.blocks, counts.devices, counts.refresh_tokens),
        (2, 3, 2)
    );

    let dst = sqlite_cfg(&dir.path().join("b.db"));
    assert_eq!(import_from(&dst, &a).await.unwrap(), counts);
    let b = dir.path().join("b.jsonl");
    export_to(&dst, &b).await;
    assert_eq!(body(&a), body(&b));
    let t = store::open(&dst).await.unwrap();
    assert_eq!(view(&t, &f).await, before);
    still_works(&t, &f).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_refuses_a_full_store_and_a_cut_off_file() {
    let dir = tempfile::tempdir().unwrap();
    let src = sqlite_cfg(&dir.path().join("a.db"));
    let s = store::open(&src).await.unwrap();
    populate(&s).await;
    let a = dir.path().join("a.jsonl");
    export_to(&src, &a).await;
    assert!(matches!(
        import_from(&src, &a).await,
        Err(TransferError::NotEmpty(_))
    ));

    // Without its end line the file is refused and nothing is stored.
    let text = std::fs::read_to_string(&a).unwrap();
    let cut: Vec<&str> = text.lines().collect();
    let short = dir.path().join("short.jsonl");
    std::fs::write(&short, cut[..cut.len() - 1].join("\n")).unwrap();
    let dst = sqlite_cfg(&dir.path().join("b.db"));
    assert!(matches!(
        import_from(&dst, &short).await,
        Err(TransferError::Incomplete(_))
    ));
    // A line lost in the middle: the end line's counts do not match.
    let mut holed = cut.clone();
    holed.remove(3);
    std::fs::write(&short, holed.join("\n")).unwrap();
    assert!(matches!(
        import_from(&dst, &short).await,
        Err(TransferError::Incomplete(_))
    ));
    // Garbage is reported with its line number.
    let mut bad = cut.clone();
    bad[2] = "{not json";
    std::fs::write(&short, bad.join("\n")).unwrap();
    match import_from(&dst, &short).await {
        Err(TransferError::Format { line: 3, .. }) => {}
        other => panic!("{other:?}"),
    }
    // After all that the target is still empty: a full import goes in.
    import_from(&dst, &a).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_to_mongodb_and_back_keeps_everything() {
    let Some(uri) = mongo_uri() else { return };
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| -> PathBuf { dir.path().join(n) };

    let lite = sqlite_cfg(&p("a.db"));
    let s = store::open(&lite).await.unwrap();
    let f = populate(&s).await;
    let before = view(&s, &f).await;
    let counts = export_to(&lite, &p("a.jsonl")).await;

    let mongo = mongo_cfg(&uri);
    assert_eq!(import_from(&mongo, &p("a.jsonl")).await.unwrap(), counts);
    assert!(matches!(
        import_from(&mongo, &p("a.jsonl")).await,
        Err(TransferError::NotEmpty(_))
    ));
    let m = store::open(&mongo).await.unwrap();
    assert_eq!(view(&m, &f).await, before, "SQLite → MongoDB");
    assert_eq!(export_to(&mongo, &p("b.jsonl")).await, counts);
    assert_eq!(body(&p("a.jsonl")), body(&p("b.jsonl")));

    let back = sqlite_cfg(&p("c.db"));
    assert_eq!(import_from(&back, &p("b.jsonl")).await.unwrap(), counts);
    let c = store::open(&back).await.unwrap();
    assert_eq!(view(&c, &f).await, before, "MongoDB → SQLite");
    export_to(&back, &p("c.jsonl")).await;
    assert_eq!(body(&p("a.jsonl")), body(&p("c.jsonl")));

    still_works(&m, &f).await;
    still_works(&c, &f).await;
    mongodb::Client::with_uri_str(&uri)
        .await
        .unwrap()
        .database(&mongo.mongodb.database)
        .drop()
        .await
        .unwrap();
}
