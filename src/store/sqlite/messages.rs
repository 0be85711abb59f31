//! [`MessageStore`] on SQLite: appends (see [`super::append`]) and history.

use std::collections::HashSet;

use async_trait::async_trait;
use rusqlite::params;

use super::append::append_one;
use super::{sql_err, SqliteStore};
use crate::store::*;

pub(super) const MSG_COLS: &str = "id, room_id, seq, sender_id, client_msg_id, body, created_at";

pub(super) fn row_message(r: &rusqlite::Row<'_>) -> rusqlite::Result<Message> {
    Ok(Message {
        id: MessageId::from_trusted(r.get::<_, String>(0)?),
        room_id: RoomId::from_trusted(r.get::<_, String>(1)?),
        seq: r.get(2)?,
        sender_id: UserId::from_trusted(r.get::<_, String>(3)?),
        client_msg_id: ClientMsgId::from_trusted(r.get(4)?),
        body: MessageBody::from_trusted(r.get(5)?),
        created_at: r.get(6)?,
    })
}

#[async_trait]
impl MessageStore for SqliteStore {
    async fn append_batch(
        &self,
        batch: Vec<NewMessage>,
    ) -> Result<Vec<Result<Appended, StoreError>>, StoreError> {
        self.write(move |c| {
            // Expected refusals (not a member, no such room) happen before
            // any write of that message; an SQL error fails the whole job,
            // whose savepoint rolls back every message of the batch. So a
            // seq bump is never left without its message (no gap), without
            // a savepoint per message.
            let mut out = Vec::with_capacity(batch.len());
            let mut members: HashSet<(RoomId, UserId)> = HashSet::new();
            for m in batch {
                out.push(append_one(c, m, &mut members)?);
            }
            Ok(out)
        })
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
            let sql = if newest_first {
                format!("SELECT {MSG_COLS} FROM messages WHERE room_id = ?1 AND seq < ?2 AND seq > ?3 ORDER BY seq DESC LIMIT ?4")
            } else {
                format!("SELECT {MSG_COLS} FROM messages WHERE room_id = ?1 AND seq < ?2 AND seq > ?3 ORDER BY seq ASC LIMIT ?4")
            };
            let mut st = c.prepare_cached(&sql).map_err(sql_err)?;
            let mut rows = st
                .query_map(params![room.as_str(), before, after, q.limit], row_message)
                .map_err(sql_err)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(sql_err)?;
            if newest_first {
                rows.reverse();
            }
            Ok(rows)
        })
        .await
    }
}
