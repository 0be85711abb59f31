//! The store contract: one suite of behaviour every backend must show.
//! Each check is a plain `pub async fn` over [`Stores`]; [`run_all`] runs
//! them in order on a fresh, empty store. `tests/store_contract.rs` calls it
//! for SQLite (and for MongoDB when configured).
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::HashSet;

use super::*;
use crate::domain::{ClientMsgId, Email, Limits, MessageBody, RoomId, UserId, Username};

fn uniq(prefix: &str) -> String {
    format!(
        "{prefix}{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

/// A new user with a unique name.
pub async fn make_user(s: &Stores, prefix: &str) -> User {
    let name = uniq(prefix);
    s.users
        .create_user(NewUser {
            username: Username::parse(&name, &Limits::default()).unwrap(),
            email: Email::parse(&format!("{name}@example.com")).unwrap(),
            display_name: Some(format!("{prefix} display")),
            password_hash: "$argon2id$fake".into(),
        })
        .await
        .unwrap()
}

fn msg(room: &RoomId, sender: &UserId, cmid: &str, body: &str) -> NewMessage {
    NewMessage::plain(
        room.clone(),
        sender.clone(),
        ClientMsgId::from_trusted(cmid.into()),
        MessageBody::from_trusted(body.into()),
    )
}

async fn append(s: &Stores, m: NewMessage) -> Result<Appended, StoreError> {
    s.messages
        .append_batch(vec![m])
        .await
        .unwrap()
        .pop()
        .unwrap()
}

/// Runs every check.
pub async fn run_all(s: &Stores) {
    users_unique_and_lookup(s).await;
    search_escapes_wildcards(s).await;
    settings_devices_blocks(s).await;
    refresh_rotation_and_reuse(s).await;
    direct_rooms_are_unique(s).await;
    direct_rooms_unique_under_concurrency(s).await;
    groups_membership_and_contacts(s).await;
    append_assigns_seq_and_is_idempotent(s).await;
    append_rejects_non_members_and_unknown_rooms(s).await;
    concurrent_appends_have_no_gaps(s).await;
    resends_in_one_batch_and_after_leaving(s).await;
    history_slices(s).await;
    cursors_only_move_forward(s).await;
    room_summaries(s).await;
    admin_role_is_granted_and_revoked(s).await;
    s.health.ping().await.unwrap();
}

/// The admin role: off at registration, granted and revoked by username,
/// visible on every read of the user; unknown names are `None`.
pub async fn admin_role_is_granted_and_revoked(s: &Stores) {
    let u = make_user(s, "role").await;
    assert!(!u.admin, "registering never grants the role");
    let name = u.username.as_ref().to_owned();
    let g = s.users.set_admin(&name, true).await.unwrap().unwrap();
    assert!(g.admin);
    assert!(s.users.user(&u.id).await.unwrap().unwrap().admin);
    let (cred, _) = s.users.credentials(&name).await.unwrap().unwrap();
    assert!(cred.admin);
    assert!(s.users.admins().await.unwrap().iter().any(|a| a.id == u.id));
    let r = s.users.set_admin(&name, false).await.unwrap().unwrap();
    assert!(!r.admin);
    assert!(!s.users.user(&u.id).await.unwrap().unwrap().admin);
    assert!(!s.users.admins().await.unwrap().iter().any(|a| a.id == u.id));
    assert!(s
        .users
        .set_admin(&uniq("nobody"), true)
        .await
        .unwrap()
        .is_none());
}

pub async fn users_unique_and_lookup(s: &Stores) {
    let u = make_user(s, "u").await;
    assert_eq!(s.users.user(&u.id).await.unwrap().unwrap(), u);
    let dup_name = s
        .users
        .create_user(NewUser {
            username: u.username.clone(),
            email: Email::parse("other@example.com").unwrap(),
            display_name: None,
            password_hash: "x".into(),
        })
        .await;
    assert!(matches!(
        dup_name,
        Err(StoreError::Conflict("username_taken"))
    ));
    let dup_mail = s
        .users
        .create_user(NewUser {
            username: Username::parse(&uniq("v"), &Limits::default()).unwrap(),
            email: u.email.clone(),
            display_name: None,
            password_hash: "x".into(),
        })
        .await;
    assert!(matches!(dup_mail, Err(StoreError::Conflict("email_taken"))));
    let (by_name, hash) = s
        .users
        .credentials(u.username.as_ref())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(by_name.id, u.id);
    assert_eq!(hash, "$argon2id$fake");
    let upper = u.email.as_ref().to_uppercase();
    assert_eq!(
        s.users.credentials(&upper).await.unwrap().unwrap().0.id,
        u.id
    );
    assert!(s.users.credentials("nobody-here").await.unwrap().is_none());
    assert!(s.users.user(&UserId::generate()).await.unwrap().is_none());
    s.users
        .set_last_seen(&u.id, "2026-01-01T00:00:00.000Z")
        .await
        .unwrap();
    assert_eq!(
        s.users
            .user(&u.id)
            .await
            .unwrap()
            .unwrap()
            .last_seen
            .as_deref(),
        Some("2026-01-01T00:00:00.000Z")
    );
}

pub async fn search_escapes_wildcards(s: &Stores) {
    let a = make_user(s, "srch_").await;
    let found = s.users.search_users("srch_", 100).await.unwrap();
    assert!(found.iter().any(|u| u.id == a.id));
    assert!(found
        .iter()
        .all(|u| u.username.as_ref().starts_with("srch_")));
    // '_' is literal, '%' matches nothing special.
    assert!(s.users.search_users("srch%", 100).await.unwrap().is_empty());
    let limited = s.users.search_users("", 1).await.unwrap();
    assert_eq!(limited.len(), 1);
}

pub async fn settings_devices_blocks(s: &Stores) {
    let a = make_user(s, "a").await;
    let b = make_user(s, "b").await;
    assert_eq!(
        s.users.notification_settings(&a.id).await.unwrap(),
        NotificationSettings::default()
    );
    let off = NotificationSettings {
        push: false,
        email: true,
    };
    s.users.set_notification_settings(&a.id, off).await.unwrap();
    assert_eq!(s.users.notification_settings(&a.id).await.unwrap(), off);
    assert!(matches!(
        s.users.notification_settings(&UserId::generate()).await,
        Err(StoreError::NotFound)
    ));

    s.users.put_device(&a.id, "android", "tok-1").await.unwrap();
    s.users.put_device(&a.id, "android", "tok-1").await.unwrap();
    s.users.put_device(&a.id, "web", "tok-2").await.unwrap();
    assert_eq!(s.users.devices(&a.id).await.unwrap().len(), 2);
    // A token moves to the user who registers it last.
    s.users.put_device(&b.id, "ios", "tok-2").await.unwrap();
    assert_eq!(s.users.devices(&a.id).await.unwrap().len(), 1);
    assert_eq!(s.users.devices(&b.id).await.unwrap()[0].platform, "ios");
    assert!(!s.users.delete_device(&a.id, "tok-2").await.unwrap());
    assert!(s.users.delete_device(&a.id, "tok-1").await.unwrap());
    assert!(s.users.devices(&a.id).await.unwrap().is_empty());

    s.users.block(&a.id, &b.id).await.unwrap();
    s.users.block(&a.id, &b.id).await.unwrap();
    assert_eq!(s.users.blocked_by(&a.id).await.unwrap(), vec![b.id.clone()]);
    assert_eq!(
        s.users.blockers_of(&b.id).await.unwrap(),
        vec![a.id.clone()]
    );
    let among = s
        .users
        .blocks_among(&[a.id.clone(), b.id.clone()])
        .await
        .unwrap();
    assert_eq!(among, vec![(a.id.clone(), b.id.clone())]);
    assert!(s
        .users
        .blocks_among(std::slice::from_ref(&a.id))
        .await
        .unwrap()
        .is_empty());
    s.users.unblock(&a.id, &b.id).await.unwrap();
    assert!(s.users.blocked_by(&a.id).await.unwrap().is_empty());
}

pub async fn refresh_rotation_and_reuse(s: &Stores) {
    let u = make_user(s, "r").await;
    let now = 1_000_000;
    s.auth
        .insert_refresh(NewRefreshToken {
            hash: uniq("h1"),
            user_id: u.id.clone(),
            family_id: "fam-a".into(),
            expires_at: now + 100,
        })
        .await
        .unwrap();
    // Unknown and expired tokens are invalid.
    assert_eq!(
        s.auth
            .rotate_refresh("nope", "n", now + 100, now)
            .await
            .unwrap(),
        RotateOutcome::Invalid
    );
    let h1 = uniq("t1");
    s.auth
        .insert_refresh(NewRefreshToken {
            hash: h1.clone(),
            user_id: u.id.clone(),
            family_id: uniq("fam"),
            expires_at: now + 100,
        })
        .await
        .unwrap();
    let h2 = uniq("t2");
    assert_eq!(
        s.auth
            .rotate_refresh(&h1, &h2, now + 200, now)
            .await
            .unwrap(),
        RotateOutcome::Rotated(u.id.clone())
    );
    // Reusing the spent token revokes the family, including the new one.
    assert_eq!(
        s.auth
            .rotate_refresh(&h1, &uniq("t3"), now + 200, now)
            .await
            .unwrap(),
        RotateOutcome::Reused
    );
    assert_eq!(
        s.auth
            .rotate_refresh(&h2, &uniq("t4"), now + 200, now)
            .await
            .unwrap(),
        RotateOutcome::Invalid
    );
    // Expiry.
    let h5 = uniq("t5");
    s.auth
        .insert_refresh(NewRefreshToken {
            hash: h5.clone(),
            user_id: u.id.clone(),
            family_id: uniq("fam"),
            expires_at: now + 10,
        })
        .await
        .unwrap();
    assert_eq!(
        s.auth
            .rotate_refresh(&h5, &uniq("t6"), now + 200, now + 11)
            .await
            .unwrap(),
        RotateOutcome::Invalid
    );
    // Logout revokes.
    let h7 = uniq("t7");
    s.auth
        .insert_refresh(NewRefreshToken {
            hash: h7.clone(),
            user_id: u.id.clone(),
            family_id: uniq("fam"),
            expires_at: now + 100,
        })
        .await
        .unwrap();
    assert!(s.auth.revoke_refresh(&h7).await.unwrap());
    assert!(!s.auth.revoke_refresh(&h7).await.unwrap());
    assert_eq!(
        s.auth
            .rotate_refresh(&h7, &uniq("t8"), now + 200, now)
            .await
            .unwrap(),
        RotateOutcome::Invalid
    );
}

pub async fn direct_rooms_are_unique(s: &Stores) {
    let a = make_user(s, "d").await;
    let b = make_user(s, "d").await;
    let (r1, created1) = s.rooms.create_direct(&a.id, &b.id).await.unwrap();
    let (r2, created2) = s.rooms.create_direct(&b.id, &a.id).await.unwrap();
    assert!(created1);
    assert!(!created2);
    assert_eq!(r1.id, r2.id);
    assert_eq!(r1.kind, RoomKind::Direct);
    assert_eq!(r1.members.len(), 2);
    assert_eq!(r1.last_seq, 0);
    assert!(matches!(
        s.rooms.create_direct(&a.id, &UserId::generate()).await,
        Err(StoreError::NotFound)
    ));
}

pub async fn direct_rooms_unique_under_concurrency(s: &Stores) {
    let a = make_user(s, "c").await;
    let b = make_user(s, "c").await;
    let mut tasks = Vec::new();
    for i in 0..16 {
        let (s, a, b) = (s.clone(), a.id.clone(), b.id.clone());
        tasks.push(tokio::spawn(async move {
            if i % 2 == 0 {
                s.rooms.create_direct(&a, &b).await
            } else {
                s.rooms.create_direct(&b, &a).await
            }
        }));
    }
    let mut ids = HashSet::new();
    let mut created = 0;
    for t in tasks {
        let (room, c) = t.await.unwrap().unwrap();
        ids.insert(room.id);
        created += c as usize;
    }
    assert_eq!(ids.len(), 1, "one direct room per pair");
    assert_eq!(created, 1);
}

pub async fn groups_membership_and_contacts(s: &Stores) {
    let o = make_user(s, "o").await;
    let m1 = make_user(s, "m").await;
    let m2 = make_user(s, "m").await;
    let g = s
        .rooms
        .create_group(&o.id, "team", std::slice::from_ref(&m1.id))
        .await
        .unwrap();
    assert_eq!(g.kind, RoomKind::Group);
    assert_eq!(g.name.as_deref(), Some("team"));
    assert_eq!(g.member(&o.id).unwrap().role, Role::Owner);
    assert_eq!(g.member(&m1.id).unwrap().role, Role::Member);
    assert!(g.member(&m2.id).is_none());
    s.rooms
        .add_member(&g.id, &m2.id, Role::Member)
        .await
        .unwrap();
    s.rooms
        .add_member(&g.id, &m2.id, Role::Member)
        .await
        .unwrap();
    let g2 = s.rooms.room(&g.id).await.unwrap().unwrap();
    assert_eq!(g2.members.len(), 3);
    let contacts: HashSet<UserId> = s.rooms.contacts(&o.id).await.unwrap().into_iter().collect();
    assert_eq!(
        contacts,
        [m1.id.clone(), m2.id.clone()].into_iter().collect()
    );
    assert!(s.rooms.remove_member(&g.id, &m2.id).await.unwrap());
    assert!(!s.rooms.remove_member(&g.id, &m2.id).await.unwrap());
    assert!(s.rooms.contacts(&m2.id).await.unwrap().is_empty());
    assert!(matches!(
        s.rooms
            .add_member(&g.id, &UserId::generate(), Role::Member)
            .await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        s.rooms
            .create_group(&o.id, "x", &[UserId::generate()])
            .await,
        Err(StoreError::NotFound)
    ));
    assert!(s.rooms.room(&RoomId::generate()).await.unwrap().is_none());
}

pub async fn append_assigns_seq_and_is_idempotent(s: &Stores) {
    let a = make_user(s, "s").await;
    let b = make_user(s, "s").await;
    let (room, _) = s.rooms.create_direct(&a.id, &b.id).await.unwrap();
    let r = s
        .messages
        .append_batch(vec![
            msg(&room.id, &a.id, "c1", "one"),
            msg(&room.id, &b.id, "c1", "two"),
            msg(&room.id, &a.id, "c2", "three"),
        ])
        .await
        .unwrap();
    let seqs: Vec<i64> = r.iter().map(|x| x.as_ref().unwrap().message.seq).collect();
    assert_eq!(seqs, vec![1, 2, 3]);
    assert!(r.iter().all(|x| !x.as_ref().unwrap().duplicate));
    let again = append(s, msg(&room.id, &a.id, "c1", "one, resent"))
        .await
        .unwrap();
    assert!(again.duplicate);
    assert_eq!(again.message.seq, 1);
    assert_eq!(again.message.body.as_str(), "one");
    assert_eq!(again.message.id, r[0].as_ref().unwrap().message.id);
    assert_eq!(s.rooms.room(&room.id).await.unwrap().unwrap().last_seq, 3);
}

pub async fn append_rejects_non_members_and_unknown_rooms(s: &Stores) {
    let a = make_user(s, "n").await;
    let b = make_user(s, "n").await;
    let x = make_user(s, "n").await;
    let (room, _) = s.rooms.create_direct(&a.id, &b.id).await.unwrap();
    let r = s
        .messages
        .append_batch(vec![
            msg(&room.id, &x.id, "c", "intruder"),
            msg(&room.id, &a.id, "c", "ok"),
            msg(&RoomId::generate(), &a.id, "c", "nowhere"),
        ])
        .await
        .unwrap();
    assert!(matches!(r[0], Err(StoreError::Forbidden)));
    assert_eq!(
        r[1].as_ref().unwrap().message.seq,
        1,
        "a refused append leaves no gap"
    );
    assert!(matches!(
        r[2],
        Err(StoreError::Forbidden) | Err(StoreError::NotFound)
    ));
}

/// A resend inside the batch that first stored the message is its
/// duplicate (and takes no seq); a sender who left the room still gets its
/// earlier message back for a resend, but cannot store a new one.
pub async fn resends_in_one_batch_and_after_leaving(s: &Stores) {
    let a = make_user(s, "rs").await;
    let b = make_user(s, "rs").await;
    let room = s
        .rooms
        .create_group(&a.id, "resends", std::slice::from_ref(&b.id))
        .await
        .unwrap();
    let r = s
        .messages
        .append_batch(vec![
            msg(&room.id, &b.id, "x1", "first"),
            msg(&room.id, &b.id, "x1", "first, resent at once"),
            msg(&room.id, &a.id, "x1", "same cmid, other sender"),
        ])
        .await
        .unwrap();
    let r: Vec<Appended> = r.into_iter().map(Result::unwrap).collect();
    assert_eq!(
        r.iter()
            .map(|x| (x.message.seq, x.duplicate))
            .collect::<Vec<_>>(),
        vec![(1, false), (1, true), (2, false)]
    );
    assert_eq!(r[1].message.id, r[0].message.id);
    assert_eq!(r[1].message.body.as_str(), "first");
    assert!(s.rooms.remove_member(&room.id, &b.id).await.unwrap());
    let again = append(s, msg(&room.id, &b.id, "x1", "after leaving")).await;
    let again = again.unwrap();
    assert!(again.duplicate);
    assert_eq!(again.message.id, r[0].message.id);
    assert!(matches!(
        append(s, msg(&room.id, &b.id, "x2", "new")).await,
        Err(StoreError::Forbidden)
    ));
    assert_eq!(s.rooms.room(&room.id).await.unwrap().unwrap().last_seq, 2);
}

pub async fn concurrent_appends_have_no_gaps(s: &Stores) {
    let a = make_user(s, "g").await;
    let b = make_user(s, "g").await;
    let (room, _) = s.rooms.create_direct(&a.id, &b.id).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..40 {
        let (s, room, a) = (s.clone(), room.id.clone(), a.id.clone());
        tasks.push(tokio::spawn(async move {
            append(&s, msg(&room, &a, &format!("p{i}"), "x"))
                .await
                .unwrap()
                .message
                .seq
        }));
    }
    let mut seqs = Vec::new();
    for t in tasks {
        seqs.push(t.await.unwrap());
    }
    seqs.sort();
    assert_eq!(seqs, (1..=40).collect::<Vec<_>>());
}

pub async fn history_slices(s: &Stores) {
    let a = make_user(s, "h").await;
    let b = make_user(s, "h").await;
    let (room, _) = s.rooms.create_direct(&a.id, &b.id).await.unwrap();
    let batch = (1..=10)
        .map(|i| msg(&room.id, &a.id, &format!("h{i}"), &format!("m{i}")))
        .collect();
    s.messages.append_batch(batch).await.unwrap();
    let seqs = |v: Vec<Message>| v.into_iter().map(|m| m.seq).collect::<Vec<_>>();
    let q = |before, after, limit| HistoryQuery {
        before,
        after,
        limit,
    };
    assert_eq!(
        seqs(
            s.messages
                .history(&room.id, q(None, None, 3))
                .await
                .unwrap()
        ),
        vec![8, 9, 10]
    );
    assert_eq!(
        seqs(
            s.messages
                .history(&room.id, q(Some(5), None, 3))
                .await
                .unwrap()
        ),
        vec![2, 3, 4]
    );
    assert_eq!(
        seqs(
            s.messages
                .history(&room.id, q(None, Some(5), 3))
                .await
                .unwrap()
        ),
        vec![6, 7, 8]
    );
    assert_eq!(
        seqs(
            s.messages
                .history(&room.id, q(Some(5), Some(2), 10))
                .await
                .unwrap()
        ),
        vec![3, 4]
    );
    assert!(s
        .messages
        .history(&room.id, q(None, Some(10), 10))
        .await
        .unwrap()
        .is_empty());
    assert!(s
        .messages
        .history(&RoomId::generate(), q(None, None, 10))
        .await
        .unwrap()
        .is_empty());
    let m = &s
        .messages
        .history(&room.id, q(None, Some(0), 1))
        .await
        .unwrap()[0];
    assert_eq!(m.body.as_str(), "m1");
    assert_eq!(m.sender_id, a.id);
    assert_eq!(m.room_id, room.id);
}

pub async fn cursors_only_move_forward(s: &Stores) {
    let a = make_user(s, "k").await;
    let b = make_user(s, "k").await;
    let x = make_user(s, "k").await;
    let (room, _) = s.rooms.create_direct(&a.id, &b.id).await.unwrap();
    let batch = (1..=5)
        .map(|i| msg(&room.id, &a.id, &format!("k{i}"), "x"))
        .collect();
    s.messages.append_batch(batch).await.unwrap();
    let (m, moved) = s
        .rooms
        .advance_cursor(&room.id, &b.id, CursorKind::Delivered, 3)
        .await
        .unwrap();
    assert!(moved);
    assert_eq!((m.delivered_seq, m.read_seq), (3, 0));
    let (m, moved) = s
        .rooms
        .advance_cursor(&room.id, &b.id, CursorKind::Delivered, 2)
        .await
        .unwrap();
    assert!(!moved);
    assert_eq!(m.delivered_seq, 3);
    // Beyond the end clamps to last_seq; read moves delivered too.
    let (m, moved) = s
        .rooms
        .advance_cursor(&room.id, &b.id, CursorKind::Read, 99)
        .await
        .unwrap();
    assert!(moved);
    assert_eq!((m.delivered_seq, m.read_seq), (5, 5));
    assert!(matches!(
        s.rooms
            .advance_cursor(&room.id, &x.id, CursorKind::Read, 1)
            .await,
        Err(StoreError::Forbidden)
    ));
    let cursors = s.rooms.cursors_for_user(&b.id).await.unwrap();
    let c = cursors.iter().find(|c| c.room_id == room.id).unwrap();
    assert_eq!((c.last_seq, c.delivered_seq, c.read_seq), (5, 5, 5));
}

pub async fn room_summaries(s: &Stores) {
    let a = make_user(s, "y").await;
    let b = make_user(s, "y").await;
    let (room, _) = s.rooms.create_direct(&a.id, &b.id).await.unwrap();
    let empty = s.rooms.create_group(&a.id, "quiet", &[]).await.unwrap();
    let batch = vec![
        msg(&room.id, &a.id, "y1", "from a"),
        msg(&room.id, &b.id, "y2", "from b"),
        msg(&room.id, &b.id, "y3", "from b again"),
    ];
    s.messages.append_batch(batch).await.unwrap();
    let list = s.rooms.rooms_for_user(&a.id).await.unwrap();
    assert_eq!(list.len(), 2);
    let d = list.iter().find(|r| r.room.id == room.id).unwrap();
    assert_eq!(d.unread, 2, "own messages are not unread");
    assert_eq!(d.last_message.as_ref().unwrap().seq, 3);
    let q = list.iter().find(|r| r.room.id == empty.id).unwrap();
    assert!(q.last_message.is_none());
    assert_eq!(q.unread, 0);
    s.rooms
        .advance_cursor(&room.id, &a.id, CursorKind::Read, 2)
        .await
        .unwrap();
    let list = s.rooms.rooms_for_user(&a.id).await.unwrap();
    assert_eq!(
        list.iter().find(|r| r.room.id == room.id).unwrap().unread,
        1
    );
    // A blocked sender's messages are neither last nor unread.
    s.users.block(&a.id, &b.id).await.unwrap();
    let list = s.rooms.rooms_for_user(&a.id).await.unwrap();
    let d = list.iter().find(|r| r.room.id == room.id).unwrap();
    assert_eq!(d.unread, 0);
    assert_eq!(d.last_message.as_ref().unwrap().seq, 1);
    s.users.unblock(&a.id, &b.id).await.unwrap();
}
