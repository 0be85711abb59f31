//! The embedded SQLite backend: one file in WAL mode.
//!
//! Every write goes to one writer thread (`writer`) that takes all pending
//! writes, runs each in its own savepoint inside ONE transaction, commits,
//! and only then answers each caller: group commit, so "acked means durable"
//! costs one fsync per batch, not per message. Reads run on a small pool of
//! read-only connections in `spawn_blocking`. Several processes may share
//! the file (`BEGIN IMMEDIATE` plus a busy timeout serialise their writers);
//! a room's `seq` is assigned inside the writing transaction, so they never
//! collide.
//!
//! One file per aggregate trait (`users`, `auth`, `rooms`,
//! `messages`); the hot path of appends in `append` with the compact
//! column encodings in `codec`; the DDL in `schema` and older schemas'
//! upgrades in `migrate`; export/import in `dump`. The tables are
//! described in docs/store-sqlite.md.

mod append;
mod auth;
mod codec;
mod dump;
mod lifecycle;
mod messages;
mod migrate;
mod rooms;
mod rows;
mod schema;
mod users;
mod writer;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{Connection, OpenFlags};
use tokio::sync::{mpsc, oneshot};

use super::*;
use crate::config::SqliteConfig;

pub use schema::SCHEMA_VERSION;
use writer::WriteJob;

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
                    match schema::open_writer(&path, synchronous) {
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
            .spawn(move || writer::writer_loop(conn, rx, max_batch))
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
            // Cached statements: the writer runs these for every job.
            let run = |sql: &str| conn.prepare_cached(sql).and_then(|mut st| st.execute([]));
            let r = match run("SAVEPOINT w") {
                Ok(_) => {
                    let r = f(conn);
                    let end = if r.is_ok() {
                        run("RELEASE w")
                    } else {
                        run("ROLLBACK TO w").and_then(|_| run("RELEASE w"))
                    };
                    match end {
                        Ok(_) => r,
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
