//! [`MessageStore`] on SQLite: appends (see [`super::append`]) and history.

use async_trait::async_trait;
use rusqlite::{params, OptionalExtension};

use super::codec::{enc_id, parse_derived};
use super::rows::{room_key, row_message, MSG_COLS};
use super::{sql_err, SqliteStore};
use crate::store::*;

impl SqliteStore {
    /// One message of a room by its id, without scanning the room: a
    /// derived id (every message appended by schema 2) names its row's
    /// primary key `(room_key, seq)`; any other id (migrated or imported
    /// messages) is found through the partial index on stored ids.
    pub async fn message_by_id(
        &self,
        room: &RoomId,
        id: &MessageId,
    ) -> Result<Option<Message>, StoreError> {
        let (room, id) = (room.clone(), id.clone());
        self.read(move |c| {
            let Some(key) = room_key(c, &room)? else {
                return Ok(None);
            };
            if let Some((ms, rk, seq)) = parse_derived(id.as_str()).filter(|d| d.1 == key) {
                let found = c
                    .prepare_cached(&format!(
                        "SELECT {MSG_COLS} FROM messages m JOIN users u ON u.key = m.sender_key
                         WHERE m.room_key = ?1 AND m.seq = ?2 AND m.id IS NULL AND m.created_at = ?3"
                    ))
                    .and_then(|mut st| {
                        st.query_row(params![rk, seq, ms], |r| row_message(r, &room, key))
                            .optional()
                    })
                    .map_err(sql_err)?;
                if found.is_some() {
                    return Ok(found);
                }
            }
            c.prepare_cached(&format!(
                "SELECT {MSG_COLS} FROM messages m JOIN users u ON u.key = m.sender_key
                 WHERE m.id = ?1 AND m.room_key = ?2"
            ))
            .and_then(|mut st| {
                st.query_row(params![enc_id(id.as_str()), key], |r| row_message(r, &room, key))
                    .optional()
            })
            .map_err(sql_err)
        })
        .await
    }
}

#[async_trait]
impl MessageStore for SqliteStore {
    async fn append_batch(
        &self,
        batch: Vec<NewMessage>,
    ) -> Result<Vec<Result<Appended, StoreError>>, StoreError> {
        self.write(move |c| super::append::append_batch(c, batch))
            .await
    }

    async fn history(&self, room: &RoomId, q: HistoryQuery) -> Result<Vec<Message>, StoreError> {
        let room = room.clone();
        self.read(move |c| {
            let before = q.before.unwrap_or(i64::MAX);
            let after = q.after.unwrap_or(0);
            // Only `before` (or nothing): the newest page; otherwise the
            // oldest page after `after`. Either way answered ascending.
            let newest_first = q.after.is_none();
            let Some(key) = room_key(c, &room)? else {
                return Ok(Vec::new());
            };
            let order = if newest_first { "DESC" } else { "ASC" };
            let sql = format!(
                "SELECT {MSG_COLS} FROM messages m JOIN users u ON u.key = m.sender_key
                 WHERE m.room_key = ?1 AND m.seq < ?2 AND m.seq > ?3 ORDER BY m.seq {order} LIMIT ?4"
            );
            let mut st = c.prepare_cached(&sql).map_err(sql_err)?;
            let mut rows = st
                .query_map(params![key, before, after, q.limit], |r| {
                    row_message(r, &room, key)
                })
                .map_err(sql_err)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(sql_err)?;
            if newest_first {
                rows.reverse();
            }
            super::lifecycle::decorate(c, key, &mut rows).map_err(sql_err)?;
            Ok(rows)
        })
        .await
    }

    async fn message(&self, room: &RoomId, id: &MessageId) -> Result<Option<Message>, StoreError> {
        self.lc_message(room, id).await
    }

    async fn change_message(
        &self,
        room: &RoomId,
        id: &MessageId,
        change: MessageChange,
    ) -> Result<ChangeOutcome, StoreError> {
        self.lc_change(room, id, change).await
    }

    async fn changes_since(
        &self,
        room: &RoomId,
        after: i64,
        limit: u32,
    ) -> Result<Vec<(i64, Message)>, StoreError> {
        self.lc_changes_since(room, after, limit).await
    }

    async fn change_cursor(&self, room: &RoomId, user: &UserId) -> Result<i64, StoreError> {
        self.lc_change_cursor(room, user).await
    }

    async fn advance_change_cursor(
        &self,
        room: &RoomId,
        user: &UserId,
        to: i64,
    ) -> Result<(), StoreError> {
        self.lc_advance_change_cursor(room, user, to).await
    }
}
