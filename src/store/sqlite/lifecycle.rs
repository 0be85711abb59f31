//! Message lifecycle on SQLite (docs/lifecycle.md): the `message_extras`
//! table beside the compact `messages` rows, the per-room change counter and
//! the members' change cursors.
//!
//! The tables are additive (created on open when missing, whatever the
//! schema version), so a database of schema 2 gains them without a
//! migration. A plain message has no extras row: the hot path is unchanged.

use std::collections::HashMap;

use rusqlite::{params, Connection, OptionalExtension};

use super::rows::{room_key, row_message, MSG_COLS};
use super::{sql_err, SqliteStore};
use crate::store::lifecycle::{apply, Applied, Extras};
use crate::store::*;

/// DDL of the lifecycle tables (run on every open, after the main schema).
pub(super) const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS message_extras (
    room_key INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    extras TEXT NOT NULL,
    change_seq INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (room_key, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS message_extras_changes
    ON message_extras(room_key, change_seq) WHERE change_seq > 0;
CREATE TABLE IF NOT EXISTS room_changes (
    room_key INTEGER PRIMARY KEY,
    change_seq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS change_cursors (
    room_key INTEGER NOT NULL,
    user_id TEXT NOT NULL,
    change_seq INTEGER NOT NULL,
    PRIMARY KEY (room_key, user_id)
) WITHOUT ROWID;
"#;

fn parse_extras(s: &str) -> rusqlite::Result<Extras> {
    serde_json::from_str(s).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })
}

/// The extras in column `i` of a `LEFT JOIN message_extras` row (export).
pub(super) fn extras_column(r: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<Option<Extras>> {
    r.get::<_, Option<String>>(i)?
        .map(|s| parse_extras(&s))
        .transpose()
}

fn json(x: &Extras) -> String {
    // Serializing plain strings and numbers cannot fail.
    serde_json::to_string(x).unwrap_or_default()
}

/// Stores the extras of a just appended message (inside the append's
/// transaction); nothing for a plain one.
pub(super) fn insert_new(
    c: &Connection,
    room_key: i64,
    seq: Seq,
    extras: &Extras,
) -> rusqlite::Result<()> {
    if extras.is_empty() {
        return Ok(());
    }
    c.prepare_cached(
        "INSERT OR REPLACE INTO message_extras(room_key, seq, extras, change_seq) VALUES (?1, ?2, ?3, 0)",
    )?
    .execute(params![room_key, seq, json(extras)])?;
    Ok(())
}

/// Fills the lifecycle fields of messages of one room (ascending or not)
/// from their extras rows: one range read.
pub(super) fn decorate(
    c: &Connection,
    room_key: i64,
    msgs: &mut [Message],
) -> rusqlite::Result<()> {
    let (Some(lo), Some(hi)) = (
        msgs.iter().map(|m| m.seq).min(),
        msgs.iter().map(|m| m.seq).max(),
    ) else {
        return Ok(());
    };
    let mut st = c.prepare_cached(
        "SELECT seq, extras FROM message_extras WHERE room_key = ?1 AND seq >= ?2 AND seq <= ?3",
    )?;
    let found: HashMap<i64, String> = st
        .query_map(params![room_key, lo, hi], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    if found.is_empty() {
        return Ok(());
    }
    for m in msgs.iter_mut() {
        if let Some(x) = found.get(&m.seq) {
            parse_extras(x)?.present(m);
        }
    }
    Ok(())
}

/// The message at `(room_key, seq)` in its current state.
fn load(c: &Connection, room: &RoomId, key: i64, seq: Seq) -> rusqlite::Result<Message> {
    let mut m = c
        .prepare_cached(&format!(
            "SELECT {MSG_COLS} FROM messages m JOIN users u ON u.key = m.sender_key
             WHERE m.room_key = ?1 AND m.seq = ?2"
        ))?
        .query_row(params![key, seq], |r| row_message(r, room, key))?;
    decorate(c, key, std::slice::from_mut(&mut m))?;
    Ok(m)
}

impl SqliteStore {
    /// [`MessageStore::message`].
    pub(super) async fn lc_message(
        &self,
        room: &RoomId,
        id: &MessageId,
    ) -> Result<Option<Message>, StoreError> {
        let Some(m) = self.message_by_id(room, id).await? else {
            return Ok(None);
        };
        let room = room.clone();
        self.read(move |c| {
            let Some(key) = room_key(c, &room)? else {
                return Ok(None);
            };
            let mut m = m;
            decorate(c, key, std::slice::from_mut(&mut m)).map_err(sql_err)?;
            Ok(Some(m))
        })
        .await
    }

    /// [`MessageStore::change_message`]: read, apply, write back and stamp
    /// the change number in one writer transaction.
    pub(super) async fn lc_change(
        &self,
        room: &RoomId,
        id: &MessageId,
        change: MessageChange,
    ) -> Result<ChangeOutcome, StoreError> {
        let Some(found) = self.message_by_id(room, id).await? else {
            return Err(StoreError::NotFound);
        };
        let room = room.clone();
        let seq = found.seq;
        self.write(move |c| {
            let Some(key) = room_key(c, &room)? else {
                return Err(StoreError::NotFound);
            };
            let run = || -> rusqlite::Result<ChangeOutcome> {
                let stored: Option<String> = c
                    .prepare_cached(
                        "SELECT extras FROM message_extras WHERE room_key = ?1 AND seq = ?2",
                    )?
                    .query_row(params![key, seq], |r| r.get(0))
                    .optional()?;
                let mut extras = match stored {
                    Some(s) => parse_extras(&s)?,
                    None => Extras::default(),
                };
                match apply(&mut extras, &change) {
                    Applied::Noop => Ok(ChangeOutcome::Unchanged(load(c, &room, key, seq)?)),
                    Applied::Refused(o) => Ok(o),
                    Applied::Write { body, .. } => {
                        if let Some(b) = body {
                            c.prepare_cached(
                                "UPDATE messages SET body = ?3 WHERE room_key = ?1 AND seq = ?2",
                            )?
                            .execute(params![key, seq, b.as_str()])?;
                        }
                        let n: i64 = c
                            .prepare_cached(
                                "INSERT INTO room_changes(room_key, change_seq) VALUES (?1, 1)
                                 ON CONFLICT (room_key) DO UPDATE SET change_seq = change_seq + 1
                                 RETURNING change_seq",
                            )?
                            .query_row([key], |r| r.get(0))?;
                        c.prepare_cached(
                            "INSERT OR REPLACE INTO message_extras(room_key, seq, extras, change_seq)
                             VALUES (?1, ?2, ?3, ?4)",
                        )?
                        .execute(params![key, seq, json(&extras), n])?;
                        Ok(ChangeOutcome::Changed(load(c, &room, key, seq)?, n))
                    }
                }
            };
            run().map_err(sql_err)
        })
        .await
    }

    /// [`MessageStore::changes_since`].
    pub(super) async fn lc_changes_since(
        &self,
        room: &RoomId,
        after: i64,
        limit: u32,
    ) -> Result<Vec<(i64, Message)>, StoreError> {
        let room = room.clone();
        self.read(move |c| {
            let Some(key) = room_key(c, &room)? else {
                return Ok(Vec::new());
            };
            let mut st = c
                .prepare_cached(&format!(
                    "SELECT {MSG_COLS}, e.change_seq, e.extras FROM message_extras e
                     JOIN messages m ON m.room_key = e.room_key AND m.seq = e.seq
                     JOIN users u ON u.key = m.sender_key
                     WHERE e.room_key = ?1 AND e.change_seq > ?2
                     ORDER BY e.change_seq LIMIT ?3"
                ))
                .map_err(sql_err)?;
            let rows = st
                .query_map(params![key, after, limit], |r| {
                    let mut m = row_message(r, &room, key)?;
                    let n: i64 = r.get(6)?;
                    parse_extras(&r.get::<_, String>(7)?)?.present(&mut m);
                    Ok((n, m))
                })
                .map_err(sql_err)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(sql_err)?;
            Ok(rows)
        })
        .await
    }

    /// [`MessageStore::change_cursor`].
    pub(super) async fn lc_change_cursor(
        &self,
        room: &RoomId,
        user: &UserId,
    ) -> Result<i64, StoreError> {
        let (room, user) = (room.clone(), user.clone());
        self.read(move |c| {
            let Some(key) = room_key(c, &room)? else {
                return Ok(0);
            };
            c.prepare_cached(
                "SELECT change_seq FROM change_cursors WHERE room_key = ?1 AND user_id = ?2",
            )
            .and_then(|mut st| {
                st.query_row(params![key, user.as_str()], |r| r.get(0))
                    .optional()
            })
            .map(|v| v.unwrap_or(0))
            .map_err(sql_err)
        })
        .await
    }

    /// [`MessageStore::advance_change_cursor`].
    pub(super) async fn lc_advance_change_cursor(
        &self,
        room: &RoomId,
        user: &UserId,
        to: i64,
    ) -> Result<(), StoreError> {
        let (room, user) = (room.clone(), user.clone());
        self.write(move |c| {
            let Some(key) = room_key(c, &room)? else {
                return Err(StoreError::NotFound);
            };
            c.prepare_cached(
                "INSERT INTO change_cursors(room_key, user_id, change_seq) VALUES (?1, ?2, ?3)
                 ON CONFLICT (room_key, user_id) DO UPDATE
                 SET change_seq = max(change_seq, excluded.change_seq)",
            )
            .and_then(|mut st| st.execute(params![key, user.as_str(), to]))
            .map_err(sql_err)?;
            Ok(())
        })
        .await
    }
}
