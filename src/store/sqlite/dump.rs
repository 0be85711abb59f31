//! `chatd export` / `chatd import` on SQLite: [`Dump`] reads every table in
//! load order in one read transaction (a consistent snapshot even while
//! chatd runs); [`Load`] inserts into an empty database in ONE transaction,
//! so a failed or cut-off import leaves nothing behind.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::types::Value;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, TransactionBehavior};

use super::codec::{enc_cmid, enc_id, enc_time, parse_derived};
use super::rows::{row_message, MSG_COLS};
use super::SqliteStore;
use crate::domain::{Email, RoomId, UserId, Username};
use crate::store::transfer::{
    closed, BlockRec, Counts, DeviceRec, Dump, LineRx, Load, MemberRec, MessageRec, Record,
    RecordTx, RefreshRec, RoomRec, TransferError, UserRec,
};
use crate::store::{Role, RoomKind, StoreError};

/// The tables in load order, as counted for the header.
const TABLES: [&str; 7] = [
    "users",
    "rooms",
    "room_members",
    "messages",
    "blocks",
    "devices",
    "refresh_tokens",
];

fn sql(e: rusqlite::Error) -> TransferError {
    TransferError::Store(StoreError::Internal(e.to_string()))
}

fn joined(e: tokio::task::JoinError) -> TransferError {
    TransferError::Store(StoreError::Internal(e.to_string()))
}

impl SqliteStore {
    fn read_only(&self) -> Result<Connection, TransferError> {
        let c = Connection::open_with_flags(&self.readers.path, OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(sql)?;
        c.busy_timeout(Duration::from_secs(5)).map_err(sql)?;
        Ok(c)
    }
}

#[async_trait]
impl Dump for SqliteStore {
    async fn totals(&self) -> Result<Counts, TransferError> {
        let c = self.read_only()?;
        tokio::task::spawn_blocking(move || {
            let mut n = TABLES.iter().map(|t| {
                c.query_row(&format!("SELECT COUNT(*) FROM {t}"), [], |r| {
                    r.get::<_, i64>(0)
                })
                .map(|n| n as u64)
                .map_err(sql)
            });
            let mut next = || n.next().unwrap_or(Ok(0));
            Ok(Counts {
                users: next()?,
                rooms: next()?,
                members: next()?,
                messages: next()?,
                blocks: next()?,
                devices: next()?,
                refresh_tokens: next()?,
                attachments: 0,
                attachment_chunks: 0,
            })
        })
        .await
        .map_err(joined)?
    }

    async fn dump(&self, tx: RecordTx) -> Result<(), TransferError> {
        let c = self.read_only()?;
        tokio::task::spawn_blocking(move || {
            // One read transaction: a consistent snapshot even if chatd runs.
            c.execute_batch("BEGIN").map_err(sql)?;
            let r = read_all(&c, &tx);
            let _ = c.execute_batch("COMMIT");
            r
        })
        .await
        .map_err(joined)?
    }
}

/// Sends the rows of `q` as records made by `f`.
fn each(
    c: &Connection,
    tx: &RecordTx,
    q: &str,
    args: impl rusqlite::Params,
    f: impl Fn(&rusqlite::Row<'_>) -> rusqlite::Result<Record>,
) -> Result<(), TransferError> {
    let mut st = c.prepare_cached(q).map_err(sql)?;
    let mut rows = st.query(args).map_err(sql)?;
    while let Some(row) = rows.next().map_err(sql)? {
        tx.blocking_send(Ok(f(row).map_err(sql)?))
            .map_err(|_| closed())?;
    }
    Ok(())
}

fn read_all(c: &Connection, tx: &RecordTx) -> Result<(), TransferError> {
    each(
        c,
        tx,
        "SELECT id, username, email, display_name, password_hash, created_at, last_seen,
                notify_push, notify_email, admin FROM users ORDER BY id",
        [],
        |r| {
            Ok(Record::User(UserRec {
                id: UserId::from_trusted(r.get::<_, String>(0)?),
                username: Username::from_trusted(r.get(1)?),
                email: Email::from_trusted(r.get(2)?),
                display_name: r.get(3)?,
                password_hash: r.get(4)?,
                created_at: r.get(5)?,
                last_seen: r.get(6)?,
                notify_push: r.get(7)?,
                notify_email: r.get(8)?,
                admin: r.get(9)?,
            }))
        },
    )?;
    let mut rooms = Vec::new();
    each(
        c,
        tx,
        "SELECT id, kind, name, direct_key, created_at, last_seq FROM rooms ORDER BY id",
        [],
        |r| {
            Ok(Record::Room(RoomRec {
                id: RoomId::from_trusted(r.get::<_, String>(0)?),
                kind: if r.get::<_, String>(1)? == "direct" {
                    RoomKind::Direct
                } else {
                    RoomKind::Group
                },
                name: r.get(2)?,
                direct_key: r.get(3)?,
                created_at: r.get(4)?,
                last_seq: r.get(5)?,
            }))
        },
    )?;
    {
        let mut st = c
            .prepare("SELECT id, key FROM rooms ORDER BY id")
            .map_err(sql)?;
        let rows = st
            .query_map([], |r| {
                Ok((RoomId::from_trusted(r.get::<_, String>(0)?), r.get(1)?))
            })
            .map_err(sql)?;
        for row in rows {
            rooms.push(row.map_err(sql)?);
        }
    }
    each(
        c,
        tx,
        "SELECT room_id, user_id, role, delivered_seq, read_seq, joined_at FROM room_members
         ORDER BY room_id, user_id",
        [],
        |r| {
            Ok(Record::Member(MemberRec {
                room_id: RoomId::from_trusted(r.get::<_, String>(0)?),
                user_id: UserId::from_trusted(r.get::<_, String>(1)?),
                role: Role::from_str_lossy(&r.get::<_, String>(2)?),
                delivered_seq: r.get(3)?,
                read_seq: r.get(4)?,
                joined_at: r.get(5)?,
            }))
        },
    )?;
    // Room by room (in id order), each by seq: the primary key's order, no sort.
    let q = format!(
        "SELECT {MSG_COLS}, e.extras FROM messages m JOIN users u ON u.key = m.sender_key
         LEFT JOIN message_extras e ON e.room_key = m.room_key AND e.seq = m.seq
         WHERE m.room_key = ?1 ORDER BY m.seq"
    );
    for (room, key) in &rooms {
        each(c, tx, &q, [key], |r| {
            let m = row_message(r, room, *key)?;
            Ok(Record::Message(MessageRec {
                id: m.id,
                room_id: m.room_id,
                seq: m.seq,
                sender_id: m.sender_id,
                client_msg_id: m.client_msg_id,
                body: m.body,
                created_at: m.created_at,
                x: super::lifecycle::extras_column(r, 6)?,
            }))
        })?;
    }
    each(
        c,
        tx,
        "SELECT blocker_id, blocked_id, created_at FROM blocks ORDER BY blocker_id, blocked_id",
        [],
        |r| {
            Ok(Record::Block(BlockRec {
                blocker_id: UserId::from_trusted(r.get::<_, String>(0)?),
                blocked_id: UserId::from_trusted(r.get::<_, String>(1)?),
                created_at: r.get(2)?,
            }))
        },
    )?;
    each(
        c,
        tx,
        "SELECT token, user_id, platform, created_at FROM devices ORDER BY token",
        [],
        |r| {
            Ok(Record::Device(DeviceRec {
                token: r.get(0)?,
                user_id: UserId::from_trusted(r.get::<_, String>(1)?),
                platform: r.get(2)?,
                created_at: r.get(3)?,
            }))
        },
    )?;
    each(
        c,
        tx,
        "SELECT hash, user_id, family_id, expires_at, used FROM refresh_tokens ORDER BY hash",
        [],
        |r| {
            Ok(Record::RefreshToken(RefreshRec {
                hash: r.get(0)?,
                user_id: UserId::from_trusted(r.get::<_, String>(1)?),
                family_id: r.get(2)?,
                expires_at: r.get(3)?,
                used: r.get(4)?,
            }))
        },
    )
}

#[async_trait]
impl Load for SqliteStore {
    async fn load(&self, mut rx: LineRx) -> Result<Counts, TransferError> {
        let path = self.readers.path.clone();
        tokio::task::spawn_blocking(move || {
            let mut c = Connection::open(&path).map_err(sql)?;
            c.busy_timeout(Duration::from_secs(5)).map_err(sql)?;
            for table in TABLES {
                let any: bool = c
                    .query_row(&format!("SELECT EXISTS(SELECT 1 FROM {table})"), [], |r| {
                        r.get(0)
                    })
                    .map_err(sql)?;
                if any {
                    return Err(TransferError::NotEmpty(table.into()));
                }
            }
            // One transaction: a failed or cut-off import leaves nothing behind.
            let t = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(sql)?;
            let mut keys = Keys::default();
            let mut counts = Counts::default();
            while let Some(item) = rx.blocking_recv() {
                let (line, r) = item?;
                counts.count(&r);
                insert(&t, &mut keys, line, r)?;
            }
            t.commit().map_err(sql)?;
            Ok(counts)
        })
        .await
        .map_err(joined)?
    }
}

/// Keys of the users and rooms loaded so far, for their messages.
#[derive(Default)]
struct Keys {
    users: HashMap<UserId, i64>,
    rooms: HashMap<RoomId, i64>,
}

fn insert(c: &Connection, keys: &mut Keys, line: u64, r: Record) -> Result<(), TransferError> {
    match r {
        Record::User(u) => {
            c.prepare_cached(
                "INSERT INTO users(id, username, email, display_name, password_hash, created_at,
                 last_seen, notify_push, notify_email, admin)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            )
            .and_then(|mut st| {
                st.execute(params![
                    u.id.as_str(),
                    u.username.as_ref(),
                    u.email.as_ref(),
                    u.display_name,
                    u.password_hash,
                    u.created_at,
                    u.last_seen,
                    u.notify_push,
                    u.notify_email,
                    u.admin
                ])
            })
            .map_err(sql)?;
            keys.users.insert(u.id, c.last_insert_rowid());
        }
        Record::Room(r) => {
            c.prepare_cached(
                "INSERT INTO rooms(id, kind, name, direct_key, created_at, last_seq)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )
            .and_then(|mut st| {
                st.execute(params![
                    r.id.as_str(),
                    r.kind.as_str(),
                    r.name,
                    r.direct_key,
                    r.created_at,
                    r.last_seq
                ])
            })
            .map_err(sql)?;
            keys.rooms.insert(r.id, c.last_insert_rowid());
        }
        Record::Member(m) => {
            c.prepare_cached(
                "INSERT INTO room_members(room_id, user_id, role, delivered_seq, read_seq, joined_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )
            .and_then(|mut st| {
                st.execute(params![
                    m.room_id.as_str(),
                    m.user_id.as_str(),
                    m.role.as_str(),
                    m.delivered_seq,
                    m.read_seq,
                    m.joined_at
                ])
            })
            .map_err(sql)?;
        }
        Record::Message(m) => {
            let unknown = |what: &str| TransferError::Format {
                line,
                msg: format!("message {} names an unknown {what}", m.id),
            };
            let room_key = *keys.rooms.get(&m.room_id).ok_or_else(|| unknown("room"))?;
            let sender_key = match keys.users.get(&m.sender_id) {
                Some(k) => *k,
                None => c
                    .query_row(
                        "SELECT key FROM users WHERE id = ?1",
                        [m.sender_id.as_str()],
                        |r| r.get(0),
                    )
                    .optional()
                    .map_err(sql)?
                    .ok_or_else(|| unknown("sender"))?,
            };
            let created_at = enc_time(&m.created_at);
            // An id this database would derive for the row is not stored.
            let derived = match (parse_derived(m.id.as_str()), &created_at) {
                (Some((ms, rk, seq)), Value::Integer(t)) => {
                    ms == *t && rk == room_key && seq == m.seq
                }
                _ => false,
            };
            let id = (!derived).then(|| enc_id(m.id.as_str()));
            c.prepare_cached(
                "INSERT INTO messages(room_key, seq, sender_key, id, client_msg_id, body, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )
            .and_then(|mut st| {
                st.execute(params![
                    room_key,
                    m.seq,
                    sender_key,
                    id,
                    enc_cmid(m.client_msg_id.as_str()),
                    m.body.as_str(),
                    created_at
                ])
            })
            .map_err(sql)?;
            if let Some(x) = &m.x {
                super::lifecycle::insert_new(c, room_key, m.seq, x).map_err(sql)?;
            }
        }
        Record::Block(b) => {
            c.prepare_cached(
                "INSERT INTO blocks(blocker_id, blocked_id, created_at) VALUES (?1, ?2, ?3)",
            )
            .and_then(|mut st| {
                st.execute(params![
                    b.blocker_id.as_str(),
                    b.blocked_id.as_str(),
                    b.created_at
                ])
            })
            .map_err(sql)?;
        }
        Record::Device(d) => {
            c.prepare_cached(
                "INSERT INTO devices(token, user_id, platform, created_at) VALUES (?1, ?2, ?3, ?4)",
            )
            .and_then(|mut st| {
                st.execute(params![
                    d.token,
                    d.user_id.as_str(),
                    d.platform,
                    d.created_at
                ])
            })
            .map_err(sql)?;
        }
        Record::RefreshToken(t) => {
            c.prepare_cached(
                "INSERT INTO refresh_tokens(hash, user_id, family_id, expires_at, used)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .and_then(|mut st| {
                st.execute(params![
                    t.hash,
                    t.user_id.as_str(),
                    t.family_id,
                    t.expires_at,
                    t.used
                ])
            })
            .map_err(sql)?;
        }
        Record::Header(_) | Record::End(_) | Record::Attachment(_) | Record::AttachmentChunk(_) => {
        }
    }
    Ok(())
}
