//! The store contract for message lifecycle (replies, attachments on a
//! message, edits, deletes, reactions, change numbers and cursors): run by
//! [`super::contract::run_all`] on every backend.
#![allow(clippy::unwrap_used, missing_docs)]

use super::contract::make_user;
use super::*;
use crate::domain::{ClientMsgId, Emoji, MessageBody, MessageId};

fn new(room: &RoomId, from: &UserId, cmid: &str, body: &str) -> NewMessage {
    NewMessage::plain(
        room.clone(),
        from.clone(),
        ClientMsgId::from_trusted(cmid.to_owned()),
        MessageBody::from_trusted(body.to_owned()),
    )
}

async fn append(s: &Stores, m: NewMessage) -> Appended {
    s.messages
        .append_batch(vec![m])
        .await
        .unwrap()
        .pop()
        .unwrap()
        .unwrap()
}

fn attachment(id: &str) -> Attachment {
    Attachment {
        id: id.to_owned(),
        filename: "cat.png".into(),
        content_type: "image/png".into(),
        size: 1234,
        sha256: "ab".repeat(32),
        width: Some(3),
        height: Some(2),
    }
}

fn react(user: &UserId, emoji: &str, on: bool, max: usize) -> MessageChange {
    MessageChange::React {
        user: user.clone(),
        emoji: Emoji::parse(emoji).unwrap(),
        on,
        max_distinct: max,
    }
}

async fn change(s: &Stores, room: &RoomId, id: &MessageId, c: MessageChange) -> ChangeOutcome {
    s.messages.change_message(room, id, c).await.unwrap()
}

fn changed(o: ChangeOutcome) -> (Message, i64) {
    match o {
        ChangeOutcome::Changed(m, n) => (m, n),
        other => panic!("expected a change, got {other:?}"),
    }
}

/// Runs every lifecycle check.
pub async fn run_all(s: &Stores) {
    replies_and_attachments_are_stored_with_the_message(s).await;
    edits_deletes_reactions_and_changes(s).await;
    change_cursors_only_move_forward(s).await;
}

pub async fn replies_and_attachments_are_stored_with_the_message(s: &Stores) {
    let a = make_user(s, "lca").await;
    let b = make_user(s, "lcb").await;
    let room = s
        .rooms
        .create_group(&a.id, "lc", std::slice::from_ref(&b.id))
        .await
        .unwrap();
    let first = append(s, new(&room.id, &a.id, "c1", "hello")).await.message;
    assert_eq!(first.reply_to, None);
    assert!(first.attachments.is_empty() && first.reactions.is_empty());
    assert!(!first.deleted && first.edited_at.is_none());

    let mut m = new(&room.id, &b.id, "c2", "");
    m.reply_to = Some(first.id.clone());
    m.attachments = vec![attachment(&"1".repeat(32))];
    let second = append(s, m.clone()).await;
    assert!(!second.duplicate);
    assert_eq!(second.message.reply_to.as_ref(), Some(&first.id));
    assert_eq!(
        second.message.attachments,
        vec![attachment(&"1".repeat(32))]
    );
    // A resend answers the stored message, extras included.
    let again = append(s, m).await;
    assert!(again.duplicate);
    assert_eq!(again.message, second.message);

    let h = s
        .messages
        .history(
            &room.id,
            HistoryQuery {
                limit: 10,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(h, vec![first.clone(), second.message.clone()]);
    let one = s
        .messages
        .message(&room.id, &second.message.id)
        .await
        .unwrap();
    assert_eq!(one.as_ref(), Some(&second.message));
    // Another room's id is not found here.
    let other = s.rooms.create_group(&a.id, "other", &[]).await.unwrap();
    assert_eq!(
        s.messages.message(&other.id, &first.id).await.unwrap(),
        None
    );
    let summaries = s.rooms.rooms_for_user(&a.id).await.unwrap();
    let sum = summaries.iter().find(|r| r.room.id == room.id).unwrap();
    assert_eq!(sum.last_message.as_ref(), Some(&second.message));
}

pub async fn edits_deletes_reactions_and_changes(s: &Stores) {
    let a = make_user(s, "lce").await;
    let b = make_user(s, "lcf").await;
    let room = s
        .rooms
        .create_group(&a.id, "lc", std::slice::from_ref(&b.id))
        .await
        .unwrap();
    let m1 = append(s, new(&room.id, &a.id, "e1", "first")).await.message;
    let mut n2 = new(&room.id, &a.id, "e2", "second");
    n2.attachments = vec![attachment(&"2".repeat(32))];
    let m2 = append(s, n2).await.message;
    assert!(s
        .messages
        .changes_since(&room.id, 0, 10)
        .await
        .unwrap()
        .is_empty());

    // Edit.
    let body = MessageBody::from_trusted("first, edited".into());
    let at = "2026-01-01T00:00:00.000Z".to_owned();
    let (e, n_edit) = changed(
        change(
            s,
            &room.id,
            &m1.id,
            MessageChange::Edit {
                body,
                at: at.clone(),
            },
        )
        .await,
    );
    assert_eq!(e.body.as_str(), "first, edited");
    assert_eq!(e.edited_at.as_deref(), Some(at.as_str()));
    assert_eq!(
        (e.id.clone(), e.seq, e.created_at.clone()),
        (m1.id.clone(), m1.seq, m1.created_at.clone())
    );

    // Reactions: idempotent, counted, limited, removable.
    let (r, _) = changed(change(s, &room.id, &m1.id, react(&b.id, "👍", true, 2)).await);
    assert_eq!(r.reactions.len(), 1);
    assert!(matches!(
        change(s, &room.id, &m1.id, react(&b.id, "👍", true, 2)).await,
        ChangeOutcome::Unchanged(_)
    ));
    let (r, _) = changed(change(s, &room.id, &m1.id, react(&a.id, "👍", true, 2)).await);
    assert_eq!(r.reactions[0].count, 2);
    assert_eq!(r.reactions[0].users, vec![b.id.clone(), a.id.clone()]);
    changed(change(s, &room.id, &m1.id, react(&a.id, "🎉", true, 2)).await);
    assert_eq!(
        change(s, &room.id, &m1.id, react(&a.id, "🔥", true, 2)).await,
        ChangeOutcome::TooManyReactions
    );
    let (r, n_react) = changed(change(s, &room.id, &m1.id, react(&b.id, "👍", false, 2)).await);
    assert_eq!(r.reactions.len(), 2);
    assert_eq!(
        (r.reactions[0].count, r.reactions[0].users.clone()),
        (1, vec![a.id.clone()])
    );
    assert!(n_react > n_edit);
    assert!(matches!(
        change(s, &room.id, &m1.id, react(&b.id, "🎉", false, 2)).await,
        ChangeOutcome::Unchanged(_)
    ));

    // Delete: a tombstone keeps the seq; later changes are refused.
    let (d, n_del) = changed(change(s, &room.id, &m2.id, MessageChange::Delete).await);
    assert!(d.deleted);
    assert_eq!(d.body.as_str(), "");
    assert!(d.attachments.is_empty() && d.reactions.is_empty());
    assert_eq!(d.seq, m2.seq);
    assert!(matches!(
        change(s, &room.id, &m2.id, MessageChange::Delete).await,
        ChangeOutcome::Unchanged(_)
    ));
    let body = MessageBody::from_trusted("zombie".into());
    assert_eq!(
        change(s, &room.id, &m2.id, MessageChange::Edit { body, at }).await,
        ChangeOutcome::Gone
    );
    assert_eq!(
        change(s, &room.id, &m2.id, react(&a.id, "👍", true, 2)).await,
        ChangeOutcome::Gone
    );

    // History and the change feed show the current state.
    let h = s
        .messages
        .history(
            &room.id,
            HistoryQuery {
                limit: 10,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(h[0], r);
    assert_eq!(h[1], d);
    let feed = s.messages.changes_since(&room.id, 0, 10).await.unwrap();
    assert_eq!(feed, vec![(n_react, r.clone()), (n_del, d.clone())]);
    let feed = s
        .messages
        .changes_since(&room.id, n_react, 10)
        .await
        .unwrap();
    assert_eq!(feed, vec![(n_del, d.clone())]);
    assert_eq!(
        s.messages
            .changes_since(&room.id, 0, 1)
            .await
            .unwrap()
            .len(),
        1
    );

    // Unknown messages, or a message of another room, are not found.
    let ghost = MessageId::from_trusted("0".repeat(32));
    let e = s
        .messages
        .change_message(&room.id, &ghost, MessageChange::Delete)
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::NotFound), "{e:?}");
    let other = s.rooms.create_group(&a.id, "elsewhere", &[]).await.unwrap();
    let e = s
        .messages
        .change_message(&other.id, &m1.id, MessageChange::Delete)
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::NotFound), "{e:?}");
    // Nothing of it changed m1.
    assert!(
        !s.messages
            .message(&room.id, &m1.id)
            .await
            .unwrap()
            .unwrap()
            .deleted
    );
}

pub async fn change_cursors_only_move_forward(s: &Stores) {
    let a = make_user(s, "lcc").await;
    let room = s.rooms.create_group(&a.id, "lc", &[]).await.unwrap();
    assert_eq!(s.messages.change_cursor(&room.id, &a.id).await.unwrap(), 0);
    s.messages
        .advance_change_cursor(&room.id, &a.id, 5)
        .await
        .unwrap();
    s.messages
        .advance_change_cursor(&room.id, &a.id, 3)
        .await
        .unwrap();
    assert_eq!(s.messages.change_cursor(&room.id, &a.id).await.unwrap(), 5);
}
