//! The embedded SQLite backend: one file in WAL mode.
//!
//! Every write goes to one writer thread that takes all pending writes, runs
//! each in its own savepoint inside ONE transaction, commits, and only then
//! answers each caller: group commit, so "acked means durable" costs one
//! fsync per batch, not per message. Reads run on a small pool of read-only
//! connections in `spawn_blocking`. Several processes may share the file
//! (`BEGIN IMMEDIATE` plus a busy timeout serialise their writers); a room's
//! `seq` is assigned inside the writing transaction, so they never collide.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use tokio::sync::{mpsc, oneshot};

use super::*;
use crate::config::SqliteConfig;
use crate::domain::now_rfc3339;

/// Schema version this build reads and writes.
pub const SCHEMA_VERSION: &str = "1";

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS users (
    id TEXT PRIMARY KEY,
    username TEXT NOT NULL UNIQUE,
    email TEXT NOT NULL UNIQUE,
    display_name TEXT,
    password_hash TEXT NOT NULL,
    created_at TEXT NOT NULL,
    last_seen TEXT,
    notify_push INTEGER NOT NULL DEFAULT 1,
    notify_email INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE IF NOT EXISTS refresh_tokens (
    hash TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    family_id TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    used INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS refresh_tokens_family ON refresh_tokens(family_id);
CREATE TABLE IF NOT EXISTS devices (
    token TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    platform TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS devices_user ON devices(user_id);
CREATE TABLE IF NOT EXISTS blocks (
    blocker_id TEXT NOT NULL,
    blocked_id TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (blocker_id, blocked_id)
);
CREATE INDEX IF NOT EXISTS blocks_blocked ON blocks(blocked_id);
CREATE TABLE IF NOT EXISTS rooms (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    name TEXT,
    direct_key TEXT UNIQUE,
    created_at TEXT NOT NULL,
    last_seq INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS room_members (
    room_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    role TEXT NOT NULL,
    delivered_seq INTEGER NOT NULL DEFAULT 0,
    read_seq INTEGER NOT NULL DEFAULT 0,
    joined_at TEXT NOT NULL,
    PRIMARY KEY (room_id, user_id)
);
CREATE INDEX IF NOT EXISTS room_members_user ON room_members(user_id);
CREATE TABLE IF NOT EXISTS messages (
    id TEXT PRIMARY KEY,
    room_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    sender_id TEXT NOT NULL,
    client_msg_id TEXT NOT NULL,
    body TEXT NOT NULL,
    created_at TEXT NOT NULL,
    UNIQUE (room_id, seq),
    UNIQUE (room_id, sender_id, client_msg_id)
);
"#;

type Finish = Box<dyn FnOnce(Result<(), StoreError>) + Send>;
type WriteJob = Box<dyn FnOnce(&Connection) -> Finish + Send>;

/// The SQLite store. Cheap to share behind an `Arc`.
pub struct SqliteStore {
    writer: mpsc::Sender<WriteJob>,
    readers: Arc<ReadPool>,
}

struct ReadPool {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
}

impl ReadPool {
    fn take(&self) -> Result<Connection, StoreError> {
        if let Some(c) = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop() {
            return Ok(c);
        }
        let c = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(internal)?;
        c.busy_timeout(Duration::from_secs(5)).map_err(internal)?;
        Ok(c)
    }

    fn give_back(&self, c: Connection) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < 16 {
            idle.push(c);
        }
    }
}

fn internal(e: impl std::fmt::Display) -> StoreError {
    StoreError::Internal(e.to_string())
}

fn sql_err(e: rusqlite::Error) -> StoreError {
    match &e {
        rusqlite::Error::SqliteFailure(f, _)
            if matches!(
                f.code,
                rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
            ) =>
        {
            StoreError::Unavailable(e.to_string())
        }
        _ => StoreError::Internal(e.to_string()),
    }
}

fn is_unique_violation(e: &rusqlite::Error) -> Option<String> {
    match e {
        rusqlite::Error::SqliteFailure(f, Some(msg))
            if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                || f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY =>
        {
            Some(msg.clone())
        }
        _ => None,
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database file and its schema, and
    /// starts the writer thread.
    pub async fn open(cfg: &SqliteConfig) -> Result<Self, StoreError> {
        let path = PathBuf::from(&cfg.path);
        let synchronous = match cfg.synchronous.as_str() {
            "normal" | "NORMAL" => "NORMAL",
            "off" | "OFF" => "OFF",
            _ => "FULL",
        };
        let conn = tokio::task::spawn_blocking({
            let path = path.clone();
            move || {
                // Nodes that share the file and start together contend for
                // its first opening (switching to WAL needs the file to
                // itself, without the busy handler): retry for a while.
                let deadline = std::time::Instant::now() + Duration::from_secs(10);
                loop {
                    match open_writer(&path, synchronous) {
                        Err(StoreError::Unavailable(_)) if std::time::Instant::now() < deadline => {
                            std::thread::sleep(Duration::from_millis(50));
                        }
                        r => return r,
                    }
                }
            }
        })
        .await
        .map_err(internal)??;
        let (tx, rx) = mpsc::channel::<WriteJob>(8192);
        let max_batch = cfg.max_batch.max(1);
        std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || writer_loop(conn, rx, max_batch))
            .map_err(internal)?;
        Ok(Self {
            writer: tx,
            readers: Arc::new(ReadPool {
                path,
                idle: Mutex::new(Vec::new()),
            }),
        })
    }

    /// Runs `f` in the writer's next group transaction; answers after commit.
    async fn write<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> Result<R, StoreError> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: WriteJob = Box::new(move |conn: &Connection| {
            let r = match conn.execute_batch("SAVEPOINT w") {
                Ok(()) => {
                    let r = f(conn);
                    let end = if r.is_ok() {
                        "RELEASE w"
                    } else {
                        "ROLLBACK TO w; RELEASE w"
                    };
                    match conn.execute_batch(end) {
                        Ok(()) => r,
                        Err(e) => Err(sql_err(e)),
                    }
                }
                Err(e) => Err(sql_err(e)),
            };
            Box::new(move |commit: Result<(), StoreError>| {
                let _ = tx.send(commit.and(r));
            })
        });
        self.writer
            .send(job)
            .await
            .map_err(|_| StoreError::Unavailable("sqlite writer stopped".into()))?;
        rx.await
            .map_err(|_| StoreError::Unavailable("sqlite writer stopped".into()))?
    }

    /// Runs `f` on a read connection in the blocking pool.
    async fn read<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> Result<R, StoreError> + Send + 'static,
    {
        let pool = self.readers.clone();
        tokio::task::spawn_blocking(move || {
            let c = pool.take()?;
            let r = f(&c);
            pool.give_back(c);
            r
        })
        .await
        .map_err(internal)?
    }
}

fn open_writer(path: &Path, synchronous: &str) -> Result<Connection, StoreError> {
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Internal(format!("cannot create {}: {e}", dir.display()))
            })?;
        }
    }
    let conn = Connection::open(path).map_err(sql_err)?;
    conn.set_prepared_statement_cache_capacity(128);
    conn.busy_timeout(Duration::from_secs(5)).map_err(sql_err)?;
    conn.execute_batch(&format!(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous={synchronous}; PRAGMA foreign_keys=OFF;"
    ))
    .map_err(sql_err)?;
    conn.execute_batch("BEGIN IMMEDIATE").map_err(sql_err)?;
    let r = (|| {
        conn.execute_batch(SCHEMA)?;
        let v: Option<String> = conn
            .query_row(
                "SELECT value FROM meta WHERE key='schema_version'",
                [],
                |r| r.get(0),
            )
            .optional()?;
        Ok::<_, rusqlite::Error>(v)
    })();
    let version = match r {
        Ok(v) => v,
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            return Err(sql_err(e));
        }
    };
    match version.as_deref() {
        None => {
            conn.execute(
                "INSERT INTO meta(key, value) VALUES ('schema_version', ?1), ('backend', 'sqlite')",
                [SCHEMA_VERSION],
            )
            .map_err(sql_err)?;
        }
        Some(SCHEMA_VERSION) => {}
        Some(other) => {
            let _ = conn.execute_batch("ROLLBACK");
            return Err(StoreError::Internal(format!(
                "database schema version {other} is not known to this chatd (expects {SCHEMA_VERSION})"
            )));
        }
    }
    conn.execute_batch("COMMIT").map_err(sql_err)?;
    Ok(conn)
}

fn writer_loop(conn: Connection, mut rx: mpsc::Receiver<WriteJob>, max_batch: usize) {
    let mut batch: Vec<WriteJob> = Vec::with_capacity(max_batch);
    let mut finishes: Vec<Finish> = Vec::with_capacity(max_batch);
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        let began = begin_immediate(&conn);
        if let Err(e) = began {
            for job in batch.drain(..) {
                // The job never ran; tell its caller the store is unavailable.
                let f = job(&conn);
                f(Err(e.clone()));
            }
            continue;
        }
        for job in batch.drain(..) {
            finishes.push(job(&conn));
        }
        let commit = conn.execute_batch("COMMIT").map_err(sql_err);
        if commit.is_err() {
            let _ = conn.execute_batch("ROLLBACK");
        }
        metrics::histogram!("chatd_store_batch_size").record(finishes.len() as f64);
        for f in finishes.drain(..) {
            f(commit.clone());
        }
    }
}

fn begin_immediate(conn: &Connection) -> Result<(), StoreError> {
    // busy_timeout covers most contention; a few retries cover the rest.
    let mut last = None;
    for _ in 0..5 {
        match conn.execute_batch("BEGIN IMMEDIATE") {
            Ok(()) => return Ok(()),
            Err(e) => last = Some(sql_err(e)),
        }
    }
    Err(last.unwrap_or_else(|| StoreError::Unavailable("cannot begin".into())))
}

const USER_COLS: &str = "id, username, email, display_name, created_at, last_seen";

fn row_user(r: &rusqlite::Row<'_>) -> rusqlite::Result<User> {
    Ok(User {
        id: UserId::from_trusted(r.get::<_, String>(0)?),
        username: Username::from_trusted(r.get(1)?),
        email: Email::from_trusted(r.get(2)?),
        display_name: r.get(3)?,
        created_at: r.get(4)?,
        last_seen: r.get(5)?,
    })
}

const MSG_COLS: &str = "id, room_id, seq, sender_id, client_msg_id, body, created_at";

fn row_message(r: &rusqlite::Row<'_>) -> rusqlite::Result<Message> {
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
impl UserStore for SqliteStore {
    async fn create_user(&self, new: NewUser) -> Result<User, StoreError> {
        self.write(move |c| {
            let user = User {
                id: UserId::generate(),
                username: new.username,
                email: new.email,
                display_name: new.display_name,
                created_at: now_rfc3339(),
                last_seen: None,
            };
            let r = c.execute(
                "INSERT INTO users(id, username, email, display_name, password_hash, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    user.id.as_str(),
                    user.username.as_ref(),
                    user.email.as_ref(),
                    user.display_name,
                    new.password_hash,
                    user.created_at
                ],
            );
            match r {
                Ok(_) => Ok(user),
                Err(e) => match is_unique_violation(&e) {
                    Some(m) if m.contains("username") => {
                        Err(StoreError::Conflict("username_taken"))
                    }
                    Some(m) if m.contains("email") => Err(StoreError::Conflict("email_taken")),
                    _ => Err(sql_err(e)),
                },
            }
        })
        .await
    }

    async fn user(&self, id: &UserId) -> Result<Option<User>, StoreError> {
        let id = id.clone();
        self.read(move |c| {
            c.query_row(
                &format!("SELECT {USER_COLS} FROM users WHERE id = ?1"),
                [id.as_str()],
                row_user,
            )
            .optional()
            .map_err(sql_err)
        })
        .await
    }

    async fn credentials(&self, login: &str) -> Result<Option<(User, String)>, StoreError> {
        let login = login.trim().to_lowercase();
        self.read(move |c| {
            c.query_row(
                &format!(
                    "SELECT {USER_COLS}, password_hash FROM users WHERE username = ?1 OR email = ?1"
                ),
                [login],
                |r| Ok((row_user(r)?, r.get::<_, String>(6)?)),
            )
            .optional()
            .map_err(sql_err)
        })
        .await
    }

    async fn search_users(&self, prefix: &str, limit: u32) -> Result<Vec<User>, StoreError> {
        // Escape LIKE wildcards so a prefix matches literally.
        let mut pat = String::with_capacity(prefix.len() + 1);
        for ch in prefix.to_lowercase().chars() {
            if matches!(ch, '%' | '_' | '\\') {
                pat.push('\\');
            }
            pat.push(ch);
        }
        pat.push('%');
        self.read(move |c| {
            let mut st = c
                .prepare_cached(&format!(
                    "SELECT {USER_COLS} FROM users WHERE username LIKE ?1 ESCAPE '\\'
                     ORDER BY username LIMIT ?2"
                ))
                .map_err(sql_err)?;
            let rows = st
                .query_map(params![pat, limit], row_user)
                .map_err(sql_err)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(sql_err)?;
            Ok(rows)
        })
        .await
    }

    async fn set_last_seen(&self, id: &UserId, at: &str) -> Result<(), StoreError> {
        let (id, at) = (id.clone(), at.to_owned());
        self.write(move |c| {
            c.execute(
                "UPDATE users SET last_seen = ?2 WHERE id = ?1",
                params![id.as_str(), at],
            )
            .map_err(sql_err)?;
            Ok(())
        })
        .await
    }

    async fn notification_settings(&self, id: &UserId) -> Result<NotificationSettings, StoreError> {
        let id = id.clone();
        self.read(move |c| {
            c.query_row(
                "SELECT notify_push, notify_email FROM users WHERE id = ?1",
                [id.as_str()],
                |r| {
                    Ok(NotificationSettings {
                        push: r.get(0)?,
                        email: r.get(1)?,
                    })
                },
            )
            .optional()
            .map_err(sql_err)?
            .ok_or(StoreError::NotFound)
        })
        .await
    }

    async fn set_notification_settings(
        &self,
        id: &UserId,
        s: NotificationSettings,
    ) -> Result<(), StoreError> {
        let id = id.clone();
        self.write(move |c| {
            let n = c
                .execute(
                    "UPDATE users SET notify_push = ?2, notify_email = ?3 WHERE id = ?1",
                    params![id.as_str(), s.push, s.email],
                )
                .map_err(sql_err)?;
            if n == 0 {
                return Err(StoreError::NotFound);
            }
            Ok(())
        })
        .await
    }

    async fn put_device(&self, id: &UserId, platform: &str, token: &str) -> Result<(), StoreError> {
        let (id, platform, token) = (id.clone(), platform.to_owned(), token.to_owned());
        self.write(move |c| {
            c.execute(
                "INSERT INTO devices(token, user_id, platform, created_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(token) DO UPDATE SET user_id = excluded.user_id, platform = excluded.platform",
                params![token, id.as_str(), platform, now_rfc3339()],
            )
            .map_err(sql_err)?;
            Ok(())
        })
        .await
    }

    async fn delete_device(&self, id: &UserId, token: &str) -> Result<bool, StoreError> {
        let (id, token) = (id.clone(), token.to_owned());
        self.write(move |c| {
            let n = c
                .execute(
                    "DELETE FROM devices WHERE token = ?1 AND user_id = ?2",
                    params![token, id.as_str()],
                )
                .map_err(sql_err)?;
            Ok(n > 0)
        })
        .await
    }

    async fn devices(&self, id: &UserId) -> Result<Vec<Device>, StoreError> {
        let id = id.clone();
        self.read(move |c| {
            let mut st = c
                .prepare_cached(
                    "SELECT platform, token, created_at FROM devices WHERE user_id = ?1 ORDER BY created_at",
                )
                .map_err(sql_err)?;
            let rows = st
                .query_map([id.as_str()], |r| {
                    Ok(Device {
                        platform: r.get(0)?,
                        token: r.get(1)?,
                        created_at: r.get(2)?,
                    })
                })
                .map_err(sql_err)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(sql_err)?;
            Ok(rows)
        })
        .await
    }

    async fn block(&self, blocker: &UserId, blocked: &UserId) -> Result<(), StoreError> {
        let (a, b) = (blocker.clone(), blocked.clone());
        self.write(move |c| {
            c.execute(
                "INSERT OR IGNORE INTO blocks(blocker_id, blocked_id, created_at) VALUES (?1, ?2, ?3)",
                params![a.as_str(), b.as_str(), now_rfc3339()],
            )
            .map_err(sql_err)?;
            Ok(())
        })
        .await
    }

    async fn unblock(&self, blocker: &UserId, blocked: &UserId) -> Result<(), StoreError> {
        let (a, b) = (blocker.clone(), blocked.clone());
        self.write(move |c| {
            c.execute(
                "DELETE FROM blocks WHERE blocker_id = ?1 AND blocked_id = ?2",
                params![a.as_str(), b.as_str()],
            )
            .map_err(sql_err)?;
            Ok(())
        })
        .await
    }

    async fn blocked_by(&self, blocker: &UserId) -> Result<Vec<UserId>, StoreError> {
        let a = blocker.clone();
        self.read(move |c| {
            ids(
                c,
                "SELECT blocked_id FROM blocks WHERE blocker_id = ?1 ORDER BY created_at",
                a.as_str(),
            )
        })
        .await
    }

    async fn blockers_of(&self, user: &UserId) -> Result<Vec<UserId>, StoreError> {
        let a = user.clone();
        self.read(move |c| {
            ids(
                c,
                "SELECT blocker_id FROM blocks WHERE blocked_id = ?1",
                a.as_str(),
            )
        })
        .await
    }

    async fn blocks_among(&self, users: &[UserId]) -> Result<Vec<(UserId, UserId)>, StoreError> {
        let list = serde_json::to_string(users).map_err(internal)?;
        self.read(move |c| {
            let mut st = c
                .prepare_cached(
                    "SELECT blocker_id, blocked_id FROM blocks
                     WHERE blocker_id IN (SELECT value FROM json_each(?1))
                       AND blocked_id IN (SELECT value FROM json_each(?1))",
                )
                .map_err(sql_err)?;
            let rows = st
                .query_map([list], |r| {
                    Ok((
                        UserId::from_trusted(r.get::<_, String>(0)?),
                        UserId::from_trusted(r.get::<_, String>(1)?),
                    ))
                })
                .map_err(sql_err)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(sql_err)?;
            Ok(rows)
        })
        .await
    }
}

fn ids(c: &Connection, sql: &str, arg: &str) -> Result<Vec<UserId>, StoreError> {
    let mut st = c.prepare_cached(sql).map_err(sql_err)?;
    let rows = st
        .query_map([arg], |r| Ok(UserId::from_trusted(r.get::<_, String>(0)?)))
        .map_err(sql_err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(sql_err)?;
    Ok(rows)
}

#[async_trait]
impl AuthStore for SqliteStore {
    async fn insert_refresh(&self, t: NewRefreshToken) -> Result<(), StoreError> {
        self.write(move |c| {
            c.execute(
                "INSERT INTO refresh_tokens(hash, user_id, family_id, expires_at) VALUES (?1, ?2, ?3, ?4)",
                params![t.hash, t.user_id.as_str(), t.family_id, t.expires_at],
            )
            .map_err(sql_err)?;
            Ok(())
        })
        .await
    }

    async fn rotate_refresh(
        &self,
        old_hash: &str,
        new_hash: &str,
        new_expires_at: i64,
        now: i64,
    ) -> Result<RotateOutcome, StoreError> {
        let (old, new) = (old_hash.to_owned(), new_hash.to_owned());
        self.write(move |c| {
            let row = c
                .query_row(
                    "SELECT user_id, family_id, expires_at, used FROM refresh_tokens WHERE hash = ?1",
                    [&old],
                    |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, i64>(2)?,
                            r.get::<_, bool>(3)?,
                        ))
                    },
                )
                .optional()
                .map_err(sql_err)?;
            let Some((user, family, expires_at, used)) = row else {
                return Ok(RotateOutcome::Invalid);
            };
            if used {
                c.execute("DELETE FROM refresh_tokens WHERE family_id = ?1", [&family])
                    .map_err(sql_err)?;
                return Ok(RotateOutcome::Reused);
            }
            if expires_at <= now {
                return Ok(RotateOutcome::Invalid);
            }
            c.execute("UPDATE refresh_tokens SET used = 1 WHERE hash = ?1", [&old])
                .map_err(sql_err)?;
            c.execute(
                "INSERT INTO refresh_tokens(hash, user_id, family_id, expires_at) VALUES (?1, ?2, ?3, ?4)",
                params![new, user, family, new_expires_at],
            )
            .map_err(sql_err)?;
            // Spent tokens are kept only to detect reuse; drop the expired ones.
            c.execute("DELETE FROM refresh_tokens WHERE expires_at <= ?1", [now])
                .map_err(sql_err)?;
            Ok(RotateOutcome::Rotated(UserId::from_trusted(user)))
        })
        .await
    }

    async fn revoke_refresh(&self, hash: &str) -> Result<bool, StoreError> {
        let hash = hash.to_owned();
        self.write(move |c| {
            let family: Option<String> = c
                .query_row(
                    "SELECT family_id FROM refresh_tokens WHERE hash = ?1",
                    [&hash],
                    |r| r.get(0),
                )
                .optional()
                .map_err(sql_err)?;
            let Some(family) = family else {
                return Ok(false);
            };
            c.execute("DELETE FROM refresh_tokens WHERE family_id = ?1", [&family])
                .map_err(sql_err)?;
            Ok(true)
        })
        .await
    }
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
                    .query_map([user.as_str()], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
                    .map_err(sql_err)?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(sql_err)?;
                rows
            };
            let mut out = Vec::with_capacity(room_ids.len());
            for (rid, read_seq) in room_ids {
                let Some(room) = load_room(c, &rid)? else { continue };
                let last_message = c
                    .query_row(
                        &format!(
                            "SELECT {MSG_COLS} FROM messages WHERE room_id = ?1 AND sender_id NOT IN
                             (SELECT blocked_id FROM blocks WHERE blocker_id = ?2) ORDER BY seq DESC LIMIT 1"
                        ),
                        params![rid, user.as_str()],
                        row_message,
                    )
                    .optional()
                    .map_err(sql_err)?;
                let unread: i64 = c
                    .query_row(
                        "SELECT COUNT(*) FROM messages WHERE room_id = ?1 AND seq > ?2 AND sender_id != ?3
                         AND sender_id NOT IN (SELECT blocked_id FROM blocks WHERE blocker_id = ?3)",
                        params![rid, read_seq, user.as_str()],
                        |r| r.get(0),
                    )
                    .map_err(sql_err)?;
                out.push(RoomSummary {
                    room,
                    last_message,
                    unread,
                });
            }
            out.sort_by(|x, y| {
                let tx = x.last_message.as_ref().map(|m| m.created_at.as_str()).unwrap_or(&x.room.created_at);
                let ty = y.last_message.as_ref().map(|m| m.created_at.as_str()).unwrap_or(&y.room.created_at);
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

/// Appends one message. The outer error is an SQL failure (the caller
/// fails the whole batch); the inner one an expected refusal.
fn append_one(
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

#[async_trait]
impl StoreHealth for SqliteStore {
    async fn ping(&self) -> Result<(), StoreError> {
        self.read(|c| c.query_row("SELECT 1", [], |_| Ok(())).map_err(sql_err))
            .await
    }

    fn backend(&self) -> &'static str {
        "sqlite"
    }
}
