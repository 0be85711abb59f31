//! The hot path: appending one message inside the writer's transaction.

use std::collections::HashSet;

use rusqlite::{params, Connection, OptionalExtension};

use super::messages::{row_message, MSG_COLS};
use super::sql_err;
use crate::domain::now_rfc3339;
use crate::store::*;

/// Appends one message. The outer error is an SQL failure (the caller
/// fails the whole batch); the inner one an expected refusal.
pub(super) fn append_one(
    c: &Connection,
    m: NewMessage,
    members: &mut HashSet<(RoomId, UserId)>,
) -> Result<Result<Appended, StoreError>, StoreError> {
    let existing = c
        .prepare_cached(&format!(
            "SELECT {MSG_COLS} FROM messages WHERE room_id = ?1 AND sender_id = ?2 AND client_msg_id = ?3"
        ))
        .and_then(|mut st| {
            st.query_row(
                params![m.room_id.as_str(), m.sender_id.as_str(), m.client_msg_id.as_str()],
                row_message,
            )
            .optional()
        })
        .map_err(sql_err)?;
    if let Some(message) = existing {
        return Ok(Ok(Appended {
            message,
            duplicate: true,
        }));
    }
    let key = (m.room_id.clone(), m.sender_id.clone());
    if !members.contains(&key) {
        let member: Option<i64> = c
            .prepare_cached("SELECT 1 FROM room_members WHERE room_id = ?1 AND user_id = ?2")
            .and_then(|mut st| {
                st.query_row(params![m.room_id.as_str(), m.sender_id.as_str()], |r| {
                    r.get(0)
                })
                .optional()
            })
            .map_err(sql_err)?;
        if member.is_none() {
            return Ok(Err(StoreError::Forbidden));
        }
        members.insert(key);
    }
    let seq: Option<i64> = c
        .prepare_cached("UPDATE rooms SET last_seq = last_seq + 1 WHERE id = ?1 RETURNING last_seq")
        .and_then(|mut st| st.query_row([m.room_id.as_str()], |r| r.get(0)).optional())
        .map_err(sql_err)?;
    let Some(seq) = seq else {
        return Ok(Err(StoreError::NotFound));
    };
    let message = Message {
        id: MessageId::generate(),
        room_id: m.room_id,
        seq,
        sender_id: m.sender_id,
        client_msg_id: m.client_msg_id,
        body: m.body,
        created_at: now_rfc3339(),
    };
    c.prepare_cached(&format!(
        "INSERT INTO messages({MSG_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"
    ))
    .and_then(|mut st| {
        st.execute(params![
            message.id.as_str(),
            message.room_id.as_str(),
            message.seq,
            message.sender_id.as_str(),
            message.client_msg_id.as_str(),
            message.body.as_str(),
            message.created_at
        ])
    })
    .map_err(sql_err)?;
    Ok(Ok(Appended {
        message,
        duplicate: false,
    }))
}
