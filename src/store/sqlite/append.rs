//! The hot path: a batch of appends inside the writer's transaction.
//!
//! Per message the writer does two B-tree writes: the row (keyed
//! `(room_key, seq)`, so a room's messages append at its end) and the entry
//! of the unique `(room_key, sender_key, client_msg_id)` index, which is
//! also the idempotency check (`ON CONFLICT DO NOTHING`; the existing row
//! is read only when the insert did nothing). Per room and batch it reads
//! the room's key and `last_seq` once and writes `last_seq` once; per
//! (room, sender) and batch it checks the membership once. The message id
//! is not stored: it is derived from `(created_at, room_key, seq)`
//! ([`super::codec::derived_id`]).

use std::collections::HashMap;

use rusqlite::{params, Connection, OptionalExtension};

use super::codec::{derived_id, enc_cmid, enc_id, render_ms};
use super::rows::{row_message, MSG_COLS};
use super::sql_err;
use crate::store::*;

/// A room as the batch sees it: its key and the next seq to assign.
struct Slot {
    key: i64,
    next: Seq,
    dirty: bool,
}

/// Appends a batch. The outer error is an SQL failure (the caller fails
/// the whole job, whose savepoint rolls back every message of the batch,
/// so no seq is ever left without its message); the inner ones are
/// expected refusals, decided before that message writes anything.
pub(super) fn append_batch(
    c: &Connection,
    batch: Vec<NewMessage>,
) -> Result<Vec<Result<Appended, StoreError>>, StoreError> {
    let mut rooms: HashMap<RoomId, Option<Slot>> = HashMap::new();
    // (room, sender) → the sender's key when a member.
    let mut members: HashMap<(RoomId, UserId), Option<i64>> = HashMap::new();
    let mut out = Vec::with_capacity(batch.len());
    // Prepared once per batch: the statement cache hashes the SQL per call.
    let mut insert = c
        .prepare_cached(
            "INSERT INTO messages(room_key, seq, sender_key, id, client_msg_id, body, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT (room_key, sender_key, client_msg_id) DO NOTHING",
        )
        .map_err(sql_err)?;
    for m in batch {
        out.push(append_one(c, &mut insert, m, &mut rooms, &mut members).map_err(sql_err)?);
    }
    let mut bump = c
        .prepare_cached("UPDATE rooms SET last_seq = ?2 WHERE key = ?1")
        .map_err(sql_err)?;
    for slot in rooms.values().flatten().filter(|s| s.dirty) {
        bump.execute(params![slot.key, slot.next - 1])
            .map_err(sql_err)?;
    }
    Ok(out)
}

fn append_one(
    c: &Connection,
    insert: &mut rusqlite::CachedStatement<'_>,
    m: NewMessage,
    rooms: &mut HashMap<RoomId, Option<Slot>>,
    members: &mut HashMap<(RoomId, UserId), Option<i64>>,
) -> rusqlite::Result<Result<Appended, StoreError>> {
    let member_key = (m.room_id.clone(), m.sender_id.clone());
    let sender_key = match members.get(&member_key) {
        Some(k) => *k,
        None => {
            let k: Option<i64> = c
                .prepare_cached(
                    "SELECT u.key FROM room_members m JOIN users u ON u.id = m.user_id
                     WHERE m.room_id = ?1 AND m.user_id = ?2",
                )?
                .query_row(params![m.room_id.as_str(), m.sender_id.as_str()], |r| {
                    r.get(0)
                })
                .optional()?;
            members.insert(member_key, k);
            k
        }
    };
    let Some(sender_key) = sender_key else {
        // A resend by someone no longer in the room still gets its ack.
        return Ok(match existing_of_non_member(c, &m)? {
            Some(message) => Ok(Appended {
                message,
                duplicate: true,
            }),
            None => Err(StoreError::Forbidden),
        });
    };
    if !rooms.contains_key(&m.room_id) {
        let slot = c
            .prepare_cached("SELECT key, last_seq FROM rooms WHERE id = ?1")?
            .query_row([m.room_id.as_str()], |r| {
                Ok(Slot {
                    key: r.get(0)?,
                    next: r.get::<_, i64>(1)? + 1,
                    dirty: false,
                })
            })
            .optional()?;
        rooms.insert(m.room_id.clone(), slot);
    }
    let Some(Some(slot)) = rooms.get_mut(&m.room_id) else {
        return Ok(Err(StoreError::NotFound));
    };
    let now = chrono::Utc::now().timestamp_millis();
    let seq = slot.next;
    // An id that cannot be derived (a key or seq too large) is stored.
    let (id, stored_id) = match derived_id(now, slot.key, seq) {
        Some(id) => (id, None),
        None => {
            let id = uuid::Uuid::now_v7().simple().to_string();
            let stored = enc_id(&id);
            (id, Some(stored))
        }
    };
    let inserted = insert.execute(params![
        slot.key,
        seq,
        sender_key,
        stored_id,
        enc_cmid(m.client_msg_id.as_str()),
        m.body.as_str(),
        now
    ])?;
    if inserted == 0 {
        let message = c
            .prepare_cached(&format!(
                "SELECT {MSG_COLS} FROM messages m JOIN users u ON u.key = m.sender_key
                 WHERE m.room_key = ?1 AND m.sender_key = ?2 AND m.client_msg_id = ?3"
            ))?
            .query_row(
                params![slot.key, sender_key, enc_cmid(m.client_msg_id.as_str())],
                |r| row_message(r, &m.room_id, slot.key),
            )?;
        let mut message = message;
        super::lifecycle::decorate(c, slot.key, std::slice::from_mut(&mut message))?;
        return Ok(Ok(Appended {
            message,
            duplicate: true,
        }));
    }
    let extras = crate::store::lifecycle::Extras::of_new(&m);
    super::lifecycle::insert_new(c, slot.key, seq, &extras)?;
    slot.next += 1;
    slot.dirty = true;
    let created_at = render_ms(now).unwrap_or_else(crate::domain::now_rfc3339);
    Ok(Ok(Appended {
        message: {
            let mut message = Message::new_plain(
                MessageId::from_trusted(id),
                m.room_id,
                seq,
                m.sender_id,
                m.client_msg_id,
                m.body,
                created_at,
            );
            extras.present(&mut message);
            message
        },
        duplicate: false,
    }))
}

/// The message a sender who is not (or no longer) a member stored under
/// this `client_msg_id`, if any. Off the hot path.
fn existing_of_non_member(c: &Connection, m: &NewMessage) -> rusqlite::Result<Option<Message>> {
    let keys: Option<(i64, i64)> = c
        .query_row(
            "SELECT r.key, u.key FROM rooms r, users u WHERE r.id = ?1 AND u.id = ?2",
            params![m.room_id.as_str(), m.sender_id.as_str()],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let Some((room_key, sender_key)) = keys else {
        return Ok(None);
    };
    c.prepare_cached(&format!(
        "SELECT {MSG_COLS} FROM messages m JOIN users u ON u.key = m.sender_key
         WHERE m.room_key = ?1 AND m.sender_key = ?2 AND m.client_msg_id = ?3"
    ))?
    .query_row(
        params![room_key, sender_key, enc_cmid(m.client_msg_id.as_str())],
        |r| row_message(r, &m.room_id, room_key),
    )
    .optional()
}
