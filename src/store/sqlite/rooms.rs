//! [`RoomStore`] on SQLite: rooms, membership, cursors.

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension};

use super::rows::{room_key, row_message, MSG_COLS};
use super::users::ids;
use super::{sql_err, SqliteStore};
use crate::domain::now_rfc3339;
use crate::store::*;

fn load_room(c: &Connection, id: &str) -> Result<Option<Room>, StoreError> {
    let head = c
        .query_row(
            "SELECT id, kind, name, created_at, last_seq FROM rooms WHERE id = ?1",
            [id],
            |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Option<String>>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, i64>(4)?,
                ))
            },
        )
        .optional()
        .map_err(sql_err)?;
    let Some((id, kind, name, created_at, last_seq)) = head else {
        return Ok(None);
    };
    let mut st = c
        .prepare_cached(
            "SELECT user_id, role, delivered_seq, read_seq FROM room_members
             WHERE room_id = ?1 ORDER BY joined_at, user_id",
        )
        .map_err(sql_err)?;
    let members = st
        .query_map([&id], |r| {
            Ok(Member {
                user_id: UserId::from_trusted(r.get::<_, String>(0)?),
                role: Role::from_str_lossy(&r.get::<_, String>(1)?),
                delivered_seq: r.get(2)?,
                read_seq: r.get(3)?,
            })
        })
        .map_err(sql_err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(sql_err)?;
    Ok(Some(Room {
        id: RoomId::from_trusted(id),
        kind: if kind == "direct" {
            RoomKind::Direct
        } else {
            RoomKind::Group
        },
        name,
        members,
        created_at,
        last_seq,
    }))
}

fn insert_member(
    c: &Connection,
    room: &str,
    user: &str,
    role: Role,
    now: &str,
) -> Result<(), StoreError> {
    c.execute(
        "INSERT OR IGNORE INTO room_members(room_id, user_id, role, joined_at) VALUES (?1, ?2, ?3, ?4)",
        params![room, user, role.as_str(), now],
    )
    .map_err(sql_err)?;
    Ok(())
}

#[async_trait]
impl RoomStore for SqliteStore {
    async fn create_direct(&self, a: &UserId, b: &UserId) -> Result<(Room, bool), StoreError> {
        let (a, b) = (a.clone(), b.clone());
        self.write(move |c| {
            let (lo, hi) = if a <= b { (&a, &b) } else { (&b, &a) };
            let key = format!("{lo}:{hi}");
            for u in [&a, &b] {
                let exists: Option<i64> = c
                    .query_row("SELECT 1 FROM users WHERE id = ?1", [u.as_str()], |r| r.get(0))
                    .optional()
                    .map_err(sql_err)?;
                if exists.is_none() {
                    return Err(StoreError::NotFound);
                }
            }
            let id = RoomId::generate();
            let now = now_rfc3339();
            let n = c
                .execute(
                    "INSERT OR IGNORE INTO rooms(id, kind, name, direct_key, created_at) VALUES (?1, 'direct', NULL, ?2, ?3)",
                    params![id.as_str(), key, now],
                )
                .map_err(sql_err)?;
            let created = n == 1;
            let room_id: String = if created {
                insert_member(c, id.as_str(), a.as_str(), Role::Member, &now)?;
                insert_member(c, id.as_str(), b.as_str(), Role::Member, &now)?;
                id.as_str().to_owned()
            } else {
                c.query_row("SELECT id FROM rooms WHERE direct_key = ?1", [&key], |r| r.get(0))
                    .map_err(sql_err)?
            };
            let room = load_room(c, &room_id)?.ok_or(StoreError::NotFound)?;
            Ok((room, created))
        })
        .await
    }

    async fn create_group(
        &self,
        owner: &UserId,
        name: &str,
        members: &[UserId],
    ) -> Result<Room, StoreError> {
        let (owner, name, members) = (owner.clone(), name.to_owned(), members.to_vec());
        self.write(move |c| {
            for u in std::iter::once(&owner).chain(members.iter()) {
                let exists: Option<i64> = c
                    .query_row("SELECT 1 FROM users WHERE id = ?1", [u.as_str()], |r| {
                        r.get(0)
                    })
                    .optional()
                    .map_err(sql_err)?;
                if exists.is_none() {
                    return Err(StoreError::NotFound);
                }
            }
            let id = RoomId::generate();
            let now = now_rfc3339();
            c.execute(
                "INSERT INTO rooms(id, kind, name, created_at) VALUES (?1, 'group', ?2, ?3)",
                params![id.as_str(), name, now],
            )
            .map_err(sql_err)?;
            insert_member(c, id.as_str(), owner.as_str(), Role::Owner, &now)?;
            for m in &members {
                insert_member(c, id.as_str(), m.as_str(), Role::Member, &now)?;
            }
            load_room(c, id.as_str())?.ok_or(StoreError::NotFound)
        })
        .await
    }

    async fn room(&self, id: &RoomId) -> Result<Option<Room>, StoreError> {
        let id = id.clone();
        self.read(move |c| load_room(c, id.as_str())).await
    }

    async fn rooms_for_user(&self, user: &UserId) -> Result<Vec<RoomSummary>, StoreError> {
        let user = user.clone();
        self.read(move |c| {
            let room_ids = {
                let mut st = c
                    .prepare_cached("SELECT room_id, read_seq FROM room_members WHERE user_id = ?1")
                    .map_err(sql_err)?;
                let rows = st
                    .query_map([user.as_str()], |r| {
                        Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
                    })
                    .map_err(sql_err)?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(sql_err)?;
                rows
            };
            let mut out = Vec::with_capacity(room_ids.len());
            for (rid, read_seq) in room_ids {
                let Some(room) = load_room(c, &rid)? else {
                    continue;
                };
                let Some(key) = room_key(c, &room.id)? else {
                    continue;
                };
                // Senders as keys, so neither query joins users per message.
                let hidden = "SELECT u.key FROM blocks b JOIN users u ON u.id = b.blocked_id
                              WHERE b.blocker_id = ?2";
                let last_message = c
                    .prepare_cached(&format!(
                        "SELECT {MSG_COLS} FROM messages m JOIN users u ON u.key = m.sender_key
                         WHERE m.room_key = ?1 AND m.sender_key NOT IN ({hidden})
                         ORDER BY m.seq DESC LIMIT 1"
                    ))
                    .and_then(|mut st| {
                        st.query_row(params![key, user.as_str()], |r| {
                            row_message(r, &room.id, key)
                        })
                        .optional()
                    })
                    .map_err(sql_err)?;
                let mut last_message = last_message;
                if let Some(m) = last_message.as_mut() {
                    super::lifecycle::decorate(c, key, std::slice::from_mut(m)).map_err(sql_err)?;
                }
                let unread: i64 = c
                    .prepare_cached(&format!(
                        "SELECT COUNT(*) FROM messages m WHERE m.room_key = ?1 AND m.seq > ?3
                         AND m.sender_key != (SELECT key FROM users WHERE id = ?2)
                         AND m.sender_key NOT IN ({hidden})"
                    ))
                    .and_then(|mut st| {
                        st.query_row(params![key, user.as_str(), read_seq], |r| r.get(0))
                    })
                    .map_err(sql_err)?;
                out.push(RoomSummary {
                    room,
                    last_message,
                    unread,
                });
            }
            out.sort_by(|x, y| {
                let tx = x
                    .last_message
                    .as_ref()
                    .map(|m| m.created_at.as_str())
                    .unwrap_or(&x.room.created_at);
                let ty = y
                    .last_message
                    .as_ref()
                    .map(|m| m.created_at.as_str())
                    .unwrap_or(&y.room.created_at);
                ty.cmp(tx)
            });
            Ok(out)
        })
        .await
    }

    async fn cursors_for_user(&self, user: &UserId) -> Result<Vec<RoomCursor>, StoreError> {
        let user = user.clone();
        self.read(move |c| {
            let mut st = c
                .prepare_cached(
                    "SELECT m.room_id, r.last_seq, m.delivered_seq, m.read_seq
                     FROM room_members m JOIN rooms r ON r.id = m.room_id
                     WHERE m.user_id = ?1 ORDER BY m.room_id",
                )
                .map_err(sql_err)?;
            let rows = st
                .query_map([user.as_str()], |r| {
                    Ok(RoomCursor {
                        room_id: RoomId::from_trusted(r.get::<_, String>(0)?),
                        last_seq: r.get(1)?,
                        delivered_seq: r.get(2)?,
                        read_seq: r.get(3)?,
                    })
                })
                .map_err(sql_err)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(sql_err)?;
            Ok(rows)
        })
        .await
    }

    async fn add_member(&self, room: &RoomId, user: &UserId, role: Role) -> Result<(), StoreError> {
        let (room, user) = (room.clone(), user.clone());
        self.write(move |c| {
            let exists: Option<i64> = c
                .query_row("SELECT 1 FROM users WHERE id = ?1", [user.as_str()], |r| {
                    r.get(0)
                })
                .optional()
                .map_err(sql_err)?;
            if exists.is_none() {
                return Err(StoreError::NotFound);
            }
            insert_member(c, room.as_str(), user.as_str(), role, &now_rfc3339())
        })
        .await
    }

    async fn remove_member(&self, room: &RoomId, user: &UserId) -> Result<bool, StoreError> {
        let (room, user) = (room.clone(), user.clone());
        self.write(move |c| {
            let n = c
                .execute(
                    "DELETE FROM room_members WHERE room_id = ?1 AND user_id = ?2",
                    params![room.as_str(), user.as_str()],
                )
                .map_err(sql_err)?;
            Ok(n > 0)
        })
        .await
    }

    async fn advance_cursor(
        &self,
        room: &RoomId,
        user: &UserId,
        kind: CursorKind,
        up_to: Seq,
    ) -> Result<(Member, bool), StoreError> {
        let (room, user) = (room.clone(), user.clone());
        self.write(move |c| {
            let before = c
                .query_row(
                    "SELECT m.role, m.delivered_seq, m.read_seq, r.last_seq FROM room_members m
                     JOIN rooms r ON r.id = m.room_id WHERE m.room_id = ?1 AND m.user_id = ?2",
                    params![room.as_str(), user.as_str()],
                    |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, i64>(1)?,
                            r.get::<_, i64>(2)?,
                            r.get::<_, i64>(3)?,
                        ))
                    },
                )
                .optional()
                .map_err(sql_err)?;
            let Some((role, delivered, read, last_seq)) = before else {
                return Err(StoreError::Forbidden);
            };
            let target = up_to.min(last_seq).max(0);
            let (nd, nr) = match kind {
                CursorKind::Delivered => (delivered.max(target), read),
                CursorKind::Read => (delivered.max(target), read.max(target)),
            };
            let moved = match kind {
                CursorKind::Delivered => nd > delivered,
                CursorKind::Read => nr > read,
            };
            if nd != delivered || nr != read {
                c.execute(
                    "UPDATE room_members SET delivered_seq = ?3, read_seq = ?4 WHERE room_id = ?1 AND user_id = ?2",
                    params![room.as_str(), user.as_str(), nd, nr],
                )
                .map_err(sql_err)?;
            }
            Ok((
                Member {
                    user_id: user.clone(),
                    role: Role::from_str_lossy(&role),
                    delivered_seq: nd,
                    read_seq: nr,
                },
                moved,
            ))
        })
        .await
    }

    async fn contacts(&self, user: &UserId) -> Result<Vec<UserId>, StoreError> {
        let user = user.clone();
        self.read(move |c| {
            ids(
                c,
                "SELECT DISTINCT o.user_id FROM room_members me
                 JOIN room_members o ON o.room_id = me.room_id
                 WHERE me.user_id = ?1 AND o.user_id != ?1",
                user.as_str(),
            )
        })
        .await
    }
}
