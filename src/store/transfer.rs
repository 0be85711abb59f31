//! `chatd export` / `chatd import`: a whole store as JSON lines, so a
//! deployment can move between SQLite and MongoDB (either way).
//!
//! The stream is one JSON object per line: a `header` (format, version,
//! source backend, totals), then every `user`, `room`, `member`, `message`,
//! `block`, `device` and `refresh_token`, then an `end` with the counts, so
//! a cut-off file is refused rather than half-loaded. Both directions are
//! streamed: a source produces records into a bounded channel, a sink
//! consumes them; SQLite is read and written on a blocking thread, MongoDB
//! through the async driver.
//!
//! Import only goes into an empty store (of the configured backend, created
//! if needed). Into SQLite it is one transaction: all or nothing. Into
//! MongoDB it is inserted in batches; if it fails, drop the database and
//! run it again.

use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, OpenFlags, TransactionBehavior};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::mongo::MongoStore;
use super::sqlite::SqliteStore;
use super::{Role, RoomKind, StoreError};
use crate::config::StoreConfig;
use crate::domain::{
    now_rfc3339, ClientMsgId, Email, MessageBody, MessageId, RoomId, UserId, Username,
};

/// The `format` of the header line.
pub const FORMAT: &str = "chatd-export";
/// The version of the line format this build writes and reads.
pub const VERSION: u32 = 1;

/// Why an export or import failed.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("line {line}: {msg}")]
    Format { line: u64, msg: String },
    #[error("the target store is not empty ({0} has data): import only into an empty store")]
    NotEmpty(String),
    #[error("the export is incomplete: {0}")]
    Incomplete(String),
    #[error("no store to export at {0}")]
    Missing(String),
    #[error("store kind {0:?} cannot be exported or imported (expected sqlite or mongodb)")]
    Kind(String),
}

fn sql(e: rusqlite::Error) -> TransferError {
    TransferError::Store(StoreError::Internal(e.to_string()))
}

/// How many records of each kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub users: u64,
    pub rooms: u64,
    pub members: u64,
    pub messages: u64,
    pub blocks: u64,
    pub devices: u64,
    pub refresh_tokens: u64,
}

impl Counts {
    /// All records.
    pub fn total(&self) -> u64 {
        self.users
            + self.rooms
            + self.members
            + self.messages
            + self.blocks
            + self.devices
            + self.refresh_tokens
    }

    /// Counts one record (header and end lines count for nothing).
    pub(crate) fn count(&mut self, r: &Record) {
        match r {
            Record::User(_) => self.users += 1,
            Record::Room(_) => self.rooms += 1,
            Record::Member(_) => self.members += 1,
            Record::Message(_) => self.messages += 1,
            Record::Block(_) => self.blocks += 1,
            Record::Device(_) => self.devices += 1,
            Record::RefreshToken(_) => self.refresh_tokens += 1,
            Record::Header(_) | Record::End(_) => {}
        }
    }
}

impl std::fmt::Display for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} records: {} users, {} rooms, {} members, {} messages, {} blocks, {} devices, \
             {} refresh tokens",
            self.total(),
            self.users,
            self.rooms,
            self.members,
            self.messages,
            self.blocks,
            self.devices,
            self.refresh_tokens
        )
    }
}

/// First line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Header {
    pub format: String,
    pub version: u32,
    /// Backend the export came from.
    pub source: String,
    pub exported_at: String,
    /// What follows (for progress; the `end` line is what is checked).
    pub totals: Counts,
}

/// Last line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct End {
    pub counts: Counts,
}

/// An account, with its password hash and notification switches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserRec {
    pub id: UserId,
    pub username: Username,
    pub email: Email,
    pub display_name: Option<String>,
    pub password_hash: String,
    pub created_at: String,
    pub last_seen: Option<String>,
    pub notify_push: bool,
    pub notify_email: bool,
}

/// A room with its seq counter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoomRec {
    pub id: RoomId,
    pub kind: RoomKind,
    pub name: Option<String>,
    pub direct_key: Option<String>,
    pub created_at: String,
    pub last_seq: i64,
}

/// A membership with its cursors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberRec {
    pub room_id: RoomId,
    pub user_id: UserId,
    pub role: Role,
    pub delivered_seq: i64,
    pub read_seq: i64,
    pub joined_at: String,
}

/// A stored message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MessageRec {
    pub id: MessageId,
    pub room_id: RoomId,
    pub seq: i64,
    pub sender_id: UserId,
    pub client_msg_id: ClientMsgId,
    pub body: MessageBody,
    pub created_at: String,
}

/// One user blocking another.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlockRec {
    pub blocker_id: UserId,
    pub blocked_id: UserId,
    pub created_at: String,
}

/// A push device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceRec {
    pub token: String,
    pub user_id: UserId,
    pub platform: String,
    pub created_at: String,
}

/// A refresh token (hashed), so logins survive the move.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RefreshRec {
    pub hash: String,
    pub user_id: UserId,
    pub family_id: String,
    pub expires_at: i64,
    pub used: bool,
}

/// One line of an export.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Record {
    Header(Header),
    User(UserRec),
    Room(RoomRec),
    Member(MemberRec),
    Message(MessageRec),
    Block(BlockRec),
    Device(DeviceRec),
    RefreshToken(RefreshRec),
    End(End),
}

type Tx = mpsc::Sender<Result<Record, TransferError>>;
type Rx = mpsc::Receiver<Result<Record, TransferError>>;
/// Import records with the line they came from.
type LineTx = mpsc::Sender<Result<(u64, Record), TransferError>>;

/// Records sent to a backend's [`Dump`] channel.
pub type RecordTx = tokio::sync::mpsc::Sender<Result<Record, TransferError>>;
/// What a backend's [`Load`] receives: the data records of an import with
/// their line numbers (never the header or end line: the line format is
/// checked here). An `Err` item means the input is bad or cut off: the
/// backend stops, keeps nothing if it can, and returns that error.
pub type LineRx = tokio::sync::mpsc::Receiver<Result<(u64, Record), TransferError>>;

/// A backend's side of `chatd export`.
#[async_trait::async_trait]
pub trait Dump: Send + Sync {
    /// Records of each kind, for the header.
    async fn totals(&self) -> Result<Counts, TransferError>;
    /// Sends every record in load order (users, rooms, members, messages, blocks, devices, refresh tokens).
    async fn dump(&self, tx: RecordTx) -> Result<(), TransferError>;
}

/// A backend's side of `chatd import` (into an empty store).
#[async_trait::async_trait]
pub trait Load: Send + Sync {
    async fn load(&self, rx: LineRx) -> Result<Counts, TransferError>;
}

const CLOSED: &str = "the other side of the transfer stopped";

/// The channel closed early: the other side failed and reports why.
fn closed() -> TransferError {
    TransferError::Incomplete(CLOSED.into())
}

fn is_closed(e: &TransferError) -> bool {
    matches!(e, TransferError::Incomplete(m) if m == CLOSED)
}

// ---- progress ------------------------------------------------------------

/// A one-line progress bar on stderr, drawn only when stderr is a terminal.
struct Progress {
    label: &'static str,
    total: Option<u64>,
    pos: u64,
    records: u64,
    /// What `records` counts ("records", "lines").
    what: &'static str,
    unit_bytes: bool,
    enabled: bool,
    last: Instant,
}

impl Progress {
    fn new(label: &'static str, total: Option<u64>, unit_bytes: bool, wanted: bool) -> Self {
        Self {
            label,
            total,
            pos: 0,
            records: 0,
            what: if unit_bytes { "lines" } else { "records" },
            unit_bytes,
            enabled: wanted && std::io::stderr().is_terminal(),
            last: Instant::now() - Duration::from_secs(1),
        }
    }

    fn update(&mut self, pos: u64, records: u64) {
        self.pos = pos;
        self.records = records;
        if self.enabled && self.last.elapsed() >= Duration::from_millis(200) {
            self.last = Instant::now();
            self.draw();
        }
    }

    fn draw(&self) {
        let mut line = format!("\r{} ", self.label);
        if let Some(total) = self.total.filter(|t| *t > 0) {
            let frac = (self.pos as f64 / total as f64).clamp(0.0, 1.0);
            let filled = (frac * 30.0).round() as usize;
            line.push_str(&format!(
                "[{}{}] {:>3}% ",
                "#".repeat(filled),
                "-".repeat(30 - filled),
                (frac * 100.0).round()
            ));
        }
        if self.unit_bytes {
            line.push_str(&format!("{:.1} MiB, ", self.pos as f64 / (1024.0 * 1024.0)));
        }
        line.push_str(&format!("{} {}", self.records, self.what));
        let mut err = std::io::stderr().lock();
        let _ = err.write_all(line.as_bytes());
        let _ = err.flush();
    }

    fn finish(&mut self) {
        if self.enabled {
            if let Some(t) = self.total {
                self.pos = t;
            }
            self.draw();
            eprintln!();
        }
    }
}

// ---- export --------------------------------------------------------------

/// Writes the whole configured store to `out` as JSON lines; `progress`
/// draws a bar on stderr when it is a terminal. Returns what was written.
pub async fn export<W>(cfg: &StoreConfig, out: W, progress: bool) -> Result<Counts, TransferError>
where
    W: Write + Send + 'static,
{
    let (tx, rx) = mpsc::channel(1024);
    let writer = tokio::task::spawn_blocking(move || write_lines(rx, out, progress));
    let source = match cfg.kind.as_str() {
        "sqlite" => sqlite_source(cfg, tx).await,
        "mongodb" => match MongoStore::open(&cfg.mongodb).await {
            // Opening checks meta (backend, schema version).
            Ok(store) => dump_source(&store, "mongodb", tx).await,
            Err(e) => Err(e.into()),
        },
        other => Err(TransferError::Kind(other.to_owned())),
    };
    let written = writer
        .await
        .map_err(|e| TransferError::Store(StoreError::Internal(e.to_string())))?;
    match (source, written) {
        (Ok(()), w) => w,
        // The writer failed first (disk full, closed pipe): that is the cause.
        (Err(e), Err(w)) if is_closed(&e) => Err(w),
        (Err(e), _) => Err(e),
    }
}

fn write_lines<W: Write>(mut rx: Rx, out: W, progress: bool) -> Result<Counts, TransferError> {
    let mut out = std::io::BufWriter::new(out);
    let mut counts = Counts::default();
    let mut bar = Progress::new("export", None, false, progress);
    let mut ended = false;
    while let Some(r) = rx.blocking_recv() {
        let r = r?;
        match &r {
            Record::Header(h) => bar.total = Some(h.totals.total()),
            Record::End(e) => {
                if e.counts != counts {
                    return Err(TransferError::Incomplete(format!(
                        "the source said {:?} but sent {counts:?}",
                        e.counts
                    )));
                }
                ended = true;
            }
            _ => counts.count(&r),
        }
        serde_json::to_writer(&mut out, &r)
            .map_err(|e| TransferError::Io(std::io::Error::other(e)))?;
        out.write_all(b"\n")?;
        let n = counts.total();
        bar.update(n, n);
    }
    out.flush()?;
    bar.finish();
    if !ended {
        return Err(closed());
    }
    Ok(counts)
}

fn header(source: &str, totals: Counts) -> Record {
    Record::Header(Header {
        format: FORMAT.into(),
        version: VERSION,
        source: source.into(),
        exported_at: now_rfc3339(),
        totals,
    })
}

async fn sqlite_source(cfg: &StoreConfig, tx: Tx) -> Result<(), TransferError> {
    let path = cfg.sqlite.path.clone();
    if !Path::new(&path).exists() {
        return Err(TransferError::Missing(path));
    }
    // Opening checks the schema version (and finishes any pending WAL).
    drop(SqliteStore::open(&cfg.sqlite).await?);
    tokio::task::spawn_blocking(move || {
        let c =
            Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(sql)?;
        c.busy_timeout(Duration::from_secs(5)).map_err(sql)?;
        // One read transaction: a consistent snapshot even if chatd runs.
        c.execute_batch("BEGIN").map_err(sql)?;
        let r = sqlite_read_all(&c, &tx);
        let _ = c.execute_batch("COMMIT");
        r
    })
    .await
    .map_err(|e| TransferError::Store(StoreError::Internal(e.to_string())))?
}

fn sqlite_read_all(c: &Connection, tx: &Tx) -> Result<(), TransferError> {
    let count = |table: &str| -> Result<u64, TransferError> {
        c.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| {
            r.get::<_, i64>(0)
        })
        .map(|n| n as u64)
        .map_err(sql)
    };
    let totals = Counts {
        users: count("users")?,
        rooms: count("rooms")?,
        members: count("room_members")?,
        messages: count("messages")?,
        blocks: count("blocks")?,
        devices: count("devices")?,
        refresh_tokens: count("refresh_tokens")?,
    };
    let send = |r: Record| tx.blocking_send(Ok(r)).map_err(|_| closed());
    send(header("sqlite", totals))?;
    let mut counts = Counts::default();
    let mut each = |q: &str,
                    f: &dyn Fn(&rusqlite::Row<'_>) -> rusqlite::Result<Record>|
     -> Result<(), TransferError> {
        let mut st = c.prepare(q).map_err(sql)?;
        let mut rows = st.query([]).map_err(sql)?;
        while let Some(row) = rows.next().map_err(sql)? {
            let r = f(row).map_err(sql)?;
            counts.count(&r);
            send(r)?;
        }
        Ok(())
    };
    each(
        "SELECT id, username, email, display_name, password_hash, created_at, last_seen,
                notify_push, notify_email FROM users ORDER BY id",
        &|r| {
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
            }))
        },
    )?;
    each(
        "SELECT id, kind, name, direct_key, created_at, last_seq FROM rooms ORDER BY id",
        &|r| {
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
    each(
        "SELECT room_id, user_id, role, delivered_seq, read_seq, joined_at FROM room_members
         ORDER BY room_id, user_id",
        &|r| {
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
    each(
        "SELECT id, room_id, seq, sender_id, client_msg_id, body, created_at FROM messages
         ORDER BY room_id, seq",
        &|r| {
            Ok(Record::Message(MessageRec {
                id: MessageId::from_trusted(r.get::<_, String>(0)?),
                room_id: RoomId::from_trusted(r.get::<_, String>(1)?),
                seq: r.get(2)?,
                sender_id: UserId::from_trusted(r.get::<_, String>(3)?),
                client_msg_id: ClientMsgId::from_trusted(r.get(4)?),
                body: MessageBody::from_trusted(r.get(5)?),
                created_at: r.get(6)?,
            }))
        },
    )?;
    each(
        "SELECT blocker_id, blocked_id, created_at FROM blocks ORDER BY blocker_id, blocked_id",
        &|r| {
            Ok(Record::Block(BlockRec {
                blocker_id: UserId::from_trusted(r.get::<_, String>(0)?),
                blocked_id: UserId::from_trusted(r.get::<_, String>(1)?),
                created_at: r.get(2)?,
            }))
        },
    )?;
    each(
        "SELECT token, user_id, platform, created_at FROM devices ORDER BY token",
        &|r| {
            Ok(Record::Device(DeviceRec {
                token: r.get(0)?,
                user_id: UserId::from_trusted(r.get::<_, String>(1)?),
                platform: r.get(2)?,
                created_at: r.get(3)?,
            }))
        },
    )?;
    each(
        "SELECT hash, user_id, family_id, expires_at, used FROM refresh_tokens ORDER BY hash",
        &|r| {
            Ok(Record::RefreshToken(RefreshRec {
                hash: r.get(0)?,
                user_id: UserId::from_trusted(r.get::<_, String>(1)?),
                family_id: r.get(2)?,
                expires_at: r.get(3)?,
                used: r.get(4)?,
            }))
        },
    )?;
    send(Record::End(End { counts }))?;
    Ok(())
}

/// A backend's dump framed as an export: the header with its totals, every
/// record it sends, then the end line with what was sent.
async fn dump_source(d: &dyn Dump, source: &str, tx: Tx) -> Result<(), TransferError> {
    let totals = d.totals().await?;
    tx.send(Ok(header(source, totals)))
        .await
        .map_err(|_| closed())?;
    let (records, mut rx) = mpsc::channel(1024);
    let relay = async {
        let mut counts = Counts::default();
        while let Some(r) = rx.recv().await {
            if let Ok(r) = &r {
                counts.count(r);
            }
            tx.send(r).await.map_err(|_| closed())?;
        }
        Ok::<_, TransferError>(counts)
    };
    let (dumped, relayed) = tokio::join!(d.dump(records), relay);
    // A relay that stopped (the writer failed) is the cause of any dump error.
    let counts = relayed?;
    dumped?;
    tx.send(Ok(Record::End(End { counts })))
        .await
        .map_err(|_| closed())
}

// ---- import --------------------------------------------------------------

/// Loads a JSON-lines export from `input` into the configured store, which
/// must be empty. `size` (bytes, when known) scales the progress bar.
pub async fn import<R>(
    cfg: &StoreConfig,
    input: R,
    size: Option<u64>,
    progress: bool,
) -> Result<Counts, TransferError>
where
    R: BufRead + Send + 'static,
{
    let (tx, rx) = mpsc::channel(1024);
    let reader = tokio::task::spawn_blocking(move || read_lines(input, tx, size, progress));
    let sunk = match cfg.kind.as_str() {
        "sqlite" => sqlite_sink(cfg, rx).await,
        "mongodb" => match MongoStore::open(&cfg.mongodb).await {
            // Creates collections, indexes and meta (or checks them).
            Ok(store) => load_sink(&store, rx).await,
            Err(e) => Err(e.into()),
        },
        other => Err(TransferError::Kind(other.to_owned())),
    };
    // The reader stops by itself once the sink drops its end.
    let _ = reader.await;
    sunk
}

fn read_lines<R: BufRead>(mut input: R, tx: LineTx, size: Option<u64>, progress: bool) {
    let mut bar = Progress::new("import", size, true, progress);
    let mut line = String::new();
    let (mut n, mut bytes) = (0u64, 0u64);
    loop {
        line.clear();
        let got = match input.read_line(&mut line) {
            Ok(0) => break,
            Ok(k) => k,
            Err(e) => {
                let _ = tx.blocking_send(Err(e.into()));
                return;
            }
        };
        n += 1;
        bytes += got as u64;
        if line.trim().is_empty() {
            continue;
        }
        let r = serde_json::from_str::<Record>(&line)
            .map(|r| (n, r))
            .map_err(|e| TransferError::Format {
                line: n,
                msg: e.to_string(),
            });
        let failed = r.is_err();
        if tx.blocking_send(r).is_err() || failed {
            return;
        }
        bar.update(bytes, n);
    }
    bar.finish();
}

/// Reads the header and checks it is an export this build can load.
fn check_header(first: Option<Result<(u64, Record), TransferError>>) -> Result<(), TransferError> {
    match first {
        None => Err(TransferError::Incomplete("the input is empty".into())),
        Some(Err(e)) => Err(e),
        Some(Ok((_, Record::Header(h)))) if h.format == FORMAT && h.version == VERSION => Ok(()),
        Some(Ok((line, Record::Header(h)))) => Err(TransferError::Format {
            line,
            msg: format!(
                "format {:?} version {} is not {FORMAT:?} version {VERSION}",
                h.format, h.version
            ),
        }),
        Some(Ok((line, _))) => Err(TransferError::Format {
            line,
            msg: "the first line must be the header".into(),
        }),
    }
}

/// Follows the body of an import: counts records, refuses a second header
/// or anything after the end line, checks the end line's counts.
#[derive(Default)]
struct Body {
    counts: Counts,
    ended: bool,
}

impl Body {
    /// `Some(record)` to store, `None` for the end line.
    fn next(&mut self, line: u64, r: Record) -> Result<Option<Record>, TransferError> {
        let bad = |msg: &str| TransferError::Format {
            line,
            msg: msg.into(),
        };
        if self.ended {
            return Err(bad("records after the end line"));
        }
        match r {
            Record::Header(_) => Err(bad("a second header")),
            Record::End(e) => {
                check_end(&e, &self.counts)?;
                self.ended = true;
                Ok(None)
            }
            r => {
                self.counts.count(&r);
                Ok(Some(r))
            }
        }
    }
}

fn check_end(end: &End, counts: &Counts) -> Result<(), TransferError> {
    if &end.counts != counts {
        return Err(TransferError::Incomplete(format!(
            "the end line says {:?} but the file holds {counts:?}",
            end.counts
        )));
    }
    Ok(())
}

async fn sqlite_sink(cfg: &StoreConfig, mut rx: LineRx) -> Result<Counts, TransferError> {
    // Creates the file and schema (or checks an existing one's version).
    drop(SqliteStore::open(&cfg.sqlite).await?);
    let path = cfg.sqlite.path.clone();
    tokio::task::spawn_blocking(move || {
        let mut c = Connection::open(&path).map_err(sql)?;
        c.busy_timeout(Duration::from_secs(5)).map_err(sql)?;
        for table in [
            "users",
            "rooms",
            "room_members",
            "messages",
            "blocks",
            "devices",
            "refresh_tokens",
        ] {
            let any: bool = c
                .query_row(&format!("SELECT EXISTS(SELECT 1 FROM {table})"), [], |r| {
                    r.get(0)
                })
                .map_err(sql)?;
            if any {
                return Err(TransferError::NotEmpty(table.into()));
            }
        }
        check_header(rx.blocking_recv())?;
        // One transaction: a failed or cut-off import leaves nothing behind.
        let t = c
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql)?;
        let mut body = Body::default();
        while let Some(item) = rx.blocking_recv() {
            let (line, r) = item?;
            if let Some(r) = body.next(line, r)? {
                sqlite_insert(&t, r).map_err(sql)?;
            }
        }
        if !body.ended {
            return Err(TransferError::Incomplete("no end line".into()));
        }
        t.commit().map_err(sql)?;
        Ok(body.counts)
    })
    .await
    .map_err(|e| TransferError::Store(StoreError::Internal(e.to_string())))?
}

fn sqlite_insert(c: &Connection, r: Record) -> rusqlite::Result<()> {
    match r {
        Record::User(u) => c
            .prepare_cached(
                "INSERT INTO users(id, username, email, display_name, password_hash, created_at,
                 last_seen, notify_push, notify_email) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?
            .execute(params![
                u.id.as_str(),
                u.username.as_ref(),
                u.email.as_ref(),
                u.display_name,
                u.password_hash,
                u.created_at,
                u.last_seen,
                u.notify_push,
                u.notify_email
            ]),
        Record::Room(r) => c
            .prepare_cached(
                "INSERT INTO rooms(id, kind, name, direct_key, created_at, last_seq)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(params![
                r.id.as_str(),
                r.kind.as_str(),
                r.name,
                r.direct_key,
                r.created_at,
                r.last_seq
            ]),
        Record::Member(m) => c
            .prepare_cached(
                "INSERT INTO room_members(room_id, user_id, role, delivered_seq, read_seq, joined_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(params![
                m.room_id.as_str(),
                m.user_id.as_str(),
                m.role.as_str(),
                m.delivered_seq,
                m.read_seq,
                m.joined_at
            ]),
        Record::Message(m) => c
            .prepare_cached(
                "INSERT INTO messages(id, room_id, seq, sender_id, client_msg_id, body, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?
            .execute(params![
                m.id.as_str(),
                m.room_id.as_str(),
                m.seq,
                m.sender_id.as_str(),
                m.client_msg_id.as_str(),
                m.body.as_str(),
                m.created_at
            ]),
        Record::Block(b) => c
            .prepare_cached(
                "INSERT INTO blocks(blocker_id, blocked_id, created_at) VALUES (?1, ?2, ?3)",
            )?
            .execute(params![
                b.blocker_id.as_str(),
                b.blocked_id.as_str(),
                b.created_at
            ]),
        Record::Device(d) => c
            .prepare_cached(
                "INSERT INTO devices(token, user_id, platform, created_at) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![d.token, d.user_id.as_str(), d.platform, d.created_at]),
        Record::RefreshToken(t) => c
            .prepare_cached(
                "INSERT INTO refresh_tokens(hash, user_id, family_id, expires_at, used)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![
                t.hash,
                t.user_id.as_str(),
                t.family_id,
                t.expires_at,
                t.used
            ]),
        Record::Header(_) | Record::End(_) => Ok(0),
    }
    .map(|_| ())
}

/// Feeds a backend's [`Load`] with the body of an import: the header is
/// checked first, then each line in turn ([`Body`]); a missing end line or
/// a bad line reaches the loader as an error, so it stores nothing more.
async fn load_sink(l: &dyn Load, rx: LineRx) -> Result<Counts, TransferError> {
    let (tx, body) = mpsc::channel(1024);
    let (loaded, ()) = tokio::join!(l.load(body), checked_lines(rx, tx));
    loaded
}

async fn checked_lines(mut rx: LineRx, tx: LineTx) {
    if let Err(e) = check_header(rx.recv().await) {
        let _ = tx.send(Err(e)).await;
        return;
    }
    let mut body = Body::default();
    while let Some(item) = rx.recv().await {
        let next = item.and_then(|(line, r)| Ok(body.next(line, r)?.map(|r| (line, r))));
        let sent = match next {
            Ok(None) => continue,
            Ok(Some(r)) => tx.send(Ok(r)).await,
            Err(e) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
        };
        if sent.is_err() {
            return;
        }
    }
    if !body.ended {
        let _ = tx
            .send(Err(TransferError::Incomplete("no end line".into())))
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_tagged_json_lines() {
        let r = Record::Block(BlockRec {
            blocker_id: UserId::from_trusted("a"),
            blocked_id: UserId::from_trusted("b"),
            created_at: "t".into(),
        });
        let line = serde_json::to_string(&r).unwrap();
        assert_eq!(
            line,
            r#"{"type":"block","blocker_id":"a","blocked_id":"b","created_at":"t"}"#
        );
        assert_eq!(serde_json::from_str::<Record>(&line).unwrap(), r);
        let h = header("sqlite", Counts::default());
        let back: Record = serde_json::from_str(&serde_json::to_string(&h).unwrap()).unwrap();
        assert_eq!(back, h);
    }

    #[test]
    fn the_body_is_checked_line_by_line() {
        let user = Record::Device(DeviceRec {
            token: "t".into(),
            user_id: UserId::from_trusted("u"),
            platform: "web".into(),
            created_at: "c".into(),
        });
        let mut b = Body::default();
        assert!(b.next(2, user.clone()).unwrap().is_some());
        let wrong = End {
            counts: Counts::default(),
        };
        assert!(matches!(
            b.next(3, Record::End(wrong)),
            Err(TransferError::Incomplete(_))
        ));
        let right = End { counts: b.counts };
        assert!(b.next(3, Record::End(right)).unwrap().is_none());
        assert!(matches!(
            b.next(4, user),
            Err(TransferError::Format { line: 4, .. })
        ));
        let mut b = Body::default();
        assert!(b.next(2, header("x", Counts::default())).is_err());
    }

    #[test]
    fn headers_are_checked() {
        assert!(check_header(Some(Ok((1, header("x", Counts::default()))))).is_ok());
        assert!(check_header(None).is_err());
        let mut h = header("x", Counts::default());
        if let Record::Header(ref mut h) = h {
            h.version = VERSION + 1;
        }
        assert!(check_header(Some(Ok((1, h)))).is_err());
        let end = Record::End(End {
            counts: Counts::default(),
        });
        assert!(check_header(Some(Ok((1, end)))).is_err());
    }
}
