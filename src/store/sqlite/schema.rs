//! The SQLite schema: DDL, the version check and migrations.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension};

use super::{migrate, sql_err};
use crate::store::StoreError;

/// Schema version this build reads and writes (version 1 is migrated).
pub const SCHEMA_VERSION: &str = "2";

/// The tables of version 2. Users and rooms get a compact integer `key`
/// (their rowid) that messages use instead of the 32-character ids; see
/// docs/store-sqlite.md for the encodings of the `BLOB`-declared columns
/// (no affinity: each holds an integer, a 16-byte blob or text as given).
pub(super) const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS users (
    key INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    username TEXT NOT NULL UNIQUE,
    email TEXT NOT NULL UNIQUE,
    display_name TEXT,
    password_hash TEXT NOT NULL,
    created_at TEXT NOT NULL,
    last_seen TEXT,
    notify_push INTEGER NOT NULL DEFAULT 1,
    notify_email INTEGER NOT NULL DEFAULT 1,
    admin INTEGER NOT NULL DEFAULT 0
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
    key INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
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
    room_key INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    sender_key INTEGER NOT NULL,
    id BLOB,
    client_msg_id BLOB NOT NULL,
    body TEXT NOT NULL,
    created_at BLOB NOT NULL,
    PRIMARY KEY (room_key, seq)
) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS messages_client ON messages(room_key, sender_key, client_msg_id);
CREATE UNIQUE INDEX IF NOT EXISTS messages_stored_id ON messages(id) WHERE id IS NOT NULL;
"#;

pub(super) fn open_writer(path: &Path, synchronous: &str) -> Result<Connection, StoreError> {
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
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        )?;
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
    let done = match version.as_deref() {
        None => conn.execute_batch(SCHEMA).and_then(|()| {
            conn.execute(
                "INSERT INTO meta(key, value) VALUES ('schema_version', ?1), ('backend', 'sqlite')",
                [SCHEMA_VERSION],
            )
            .map(drop)
        }),
        Some("1") => {
            tracing::info!(path = %path.display(), "migrating the SQLite schema from version 1 to 2");
            migrate::from_v1(&conn, SCHEMA)
        }
        Some(SCHEMA_VERSION) => Ok(()),
        Some(other) => {
            let _ = conn.execute_batch("ROLLBACK");
            return Err(StoreError::Internal(format!(
                "database schema version {other} is not known to this chatd (expects {SCHEMA_VERSION})"
            )));
        }
    };
    // The lifecycle tables are additive: created whenever missing.
    let done = done.and_then(|()| conn.execute_batch(super::lifecycle::SCHEMA));
    if let Err(e) = done {
        let _ = conn.execute_batch("ROLLBACK");
        return Err(sql_err(e));
    }
    conn.execute_batch("COMMIT").map_err(sql_err)?;
    Ok(conn)
}
