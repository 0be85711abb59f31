//! `chatd export` / `chatd import`: a whole store as JSON lines, so a
//! deployment can move between SQLite and MongoDB (either way).
//!
//! The stream is one JSON object per line: a `header` (format, version,
//! source backend, totals), then every `user`, `room`, `member`, `message`,
//! `block`, `device` and `refresh_token`, then an `end` with the counts, so
//! a cut-off file is refused rather than half-loaded.
//!
//! This module owns only the line format. Each backend implements [`Dump`]
//! (send every record in load order into a bounded channel) and [`Load`]
//! (store the records it receives into an empty store); here the header
//! and end lines are written and checked, records counted, lines parsed
//! and numbered, and progress drawn.
//!
//! Import only goes into an empty store (of the configured backend, created
//! if needed). Into SQLite it is one transaction: all or nothing. Into
//! MongoDB it is inserted in batches; if it fails, drop the database and
//! run it again.

use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use futures_util::TryStreamExt;
use mongodb::bson::{doc, Document};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::mongo::{self, MongoStore};
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

/// Records per MongoDB `insertMany`.
const MONGO_BATCH: usize = 1000;

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

fn mongo_err(e: mongodb::error::Error) -> TransferError {
    TransferError::Store(mongo::store_err(e))
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
    /// Lifecycle state: reply, attachments, edit, tombstone, reactions
    /// (absent on a plain message).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x: Option<crate::store::lifecycle::Extras>,
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

type Tx = RecordTx;
/// Records sent to a backend's [`Dump`] channel.
pub type RecordTx = tokio::sync::mpsc::Sender<Result<Record, TransferError>>;
/// Import records with the line they came from.
type LineTx = mpsc::Sender<Result<(u64, Record), TransferError>>;
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
pub(crate) fn closed() -> TransferError {
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
    let (source, backend) = dumper(cfg).await?;
    let head = header(source, backend.totals().await?);
    let (tx, rx) = mpsc::channel(1024);
    let (done, finished) = tokio::sync::oneshot::channel();
    let writer =
        tokio::task::spawn_blocking(move || write_lines(head, rx, finished, out, progress));
    let dumped = backend.dump(tx).await;
    let _ = done.send(dumped.is_ok());
    let written = writer
        .await
        .map_err(|e| TransferError::Store(StoreError::Internal(e.to_string())))?;
    match (dumped, written) {
        (Ok(()), w) => w,
        // The writer failed first (disk full, closed pipe): that is the cause.
        (Err(_), Err(w)) if !is_closed(&w) => Err(w),
        (Err(e), _) => Err(e),
    }
}

/// The configured backend's [`Dump`] and its name for the header.
async fn dumper(cfg: &StoreConfig) -> Result<(&'static str, Box<dyn Dump>), TransferError> {
    match cfg.kind.as_str() {
        "sqlite" => {
            if !Path::new(&cfg.sqlite.path).exists() {
                return Err(TransferError::Missing(cfg.sqlite.path.clone()));
            }
            // Opening checks the schema version (migrating an older one).
            Ok(("sqlite", Box::new(SqliteStore::open(&cfg.sqlite).await?)))
        }
        "mongodb" => Ok(("mongodb", Box::new(MongoGlue(cfg.clone())))),
        other => Err(TransferError::Kind(other.to_owned())),
    }
}

/// Writes the header, every record the backend sends (counting them) and,
/// once `finished` says the backend sent all, the end line.
fn write_lines<W: Write>(
    head: Record,
    mut rx: mpsc::Receiver<Result<Record, TransferError>>,
    finished: tokio::sync::oneshot::Receiver<bool>,
    out: W,
    progress: bool,
) -> Result<Counts, TransferError> {
    let mut out = std::io::BufWriter::new(out);
    let mut counts = Counts::default();
    let mut bar = Progress::new("export", None, false, progress);
    if let Record::Header(h) = &head {
        bar.total = Some(h.totals.total());
    }
    let line = |out: &mut std::io::BufWriter<W>, r: &Record| -> Result<(), TransferError> {
        serde_json::to_writer(&mut *out, r)
            .map_err(|e| TransferError::Io(std::io::Error::other(e)))?;
        out.write_all(b"\n")?;
        Ok(())
    };
    line(&mut out, &head)?;
    while let Some(r) = rx.blocking_recv() {
        let r = r?;
        if matches!(r, Record::Header(_) | Record::End(_)) {
            return Err(TransferError::Incomplete(
                "the backend sent a header or end line of its own".into(),
            ));
        }
        counts.count(&r);
        line(&mut out, &r)?;
        let n = counts.total();
        bar.update(n, n);
    }
    if finished.blocking_recv() != Ok(true) {
        return Err(closed());
    }
    line(&mut out, &Record::End(End { counts }))?;
    out.flush()?;
    bar.finish();
    Ok(counts)
}

pub(crate) fn header(source: &str, totals: Counts) -> Record {
    Record::Header(Header {
        format: FORMAT.into(),
        version: VERSION,
        source: source.into(),
        exported_at: now_rfc3339(),
        totals,
    })
}

async fn mongo_source(cfg: &StoreConfig, tx: Tx) -> Result<(), TransferError> {
    // Opening checks meta (backend, schema version).
    let store = MongoStore::open(&cfg.mongodb).await?;
    let db = store.database().clone();
    let count = |name: &'static str| {
        let db = db.clone();
        async move {
            db.collection::<Document>(name)
                .count_documents(doc! {})
                .await
                .map_err(mongo_err)
        }
    };
    let totals = Counts {
        users: count(mongo::USERS).await?,
        rooms: count(mongo::ROOMS).await?,
        members: count(mongo::MEMBERS).await?,
        messages: count(mongo::MESSAGES).await?,
        blocks: count(mongo::BLOCKS).await?,
        devices: count(mongo::DEVICES).await?,
        refresh_tokens: count(mongo::REFRESH_TOKENS).await?,
    };
    let send = |r: Record| {
        let tx = tx.clone();
        async move { tx.send(Ok(r)).await.map_err(|_| closed()) }
    };
    send(header("mongodb", totals)).await?;
    let mut counts = Counts::default();

    macro_rules! each {
        ($coll:expr, $ty:ty, $sort:expr, |$d:ident| $rec:expr) => {{
            let mut cur = db
                .collection::<$ty>($coll)
                .find(doc! {})
                .sort($sort)
                .await
                .map_err(mongo_err)?;
            while let Some($d) = cur.try_next().await.map_err(mongo_err)? {
                let r = $rec;
                counts.count(&r);
                send(r).await?;
            }
        }};
    }
    each!(mongo::USERS, mongo::UserDoc, doc! { "_id": 1 }, |d| {
        Record::User(UserRec {
            id: d.id,
            username: d.username,
            email: d.email,
            display_name: d.display_name,
            password_hash: d.password_hash,
            created_at: d.created_at,
            last_seen: d.last_seen,
            notify_push: d.notify_push,
            notify_email: d.notify_email,
        })
    });
    each!(mongo::ROOMS, mongo::RoomDoc, doc! { "_id": 1 }, |d| {
        Record::Room(RoomRec {
            id: d.id,
            kind: d.kind,
            name: d.name,
            direct_key: d.direct_key,
            created_at: d.created_at,
            last_seq: d.last_seq,
        })
    });
    each!(
        mongo::MEMBERS,
        mongo::MemberDoc,
        doc! { "room_id": 1, "user_id": 1 },
        |d| {
            Record::Member(MemberRec {
                room_id: d.room_id,
                user_id: d.user_id,
                role: d.role,
                delivered_seq: d.delivered_seq,
                read_seq: d.read_seq,
                joined_at: d.joined_at,
            })
        }
    );
    each!(
        mongo::MESSAGES,
        mongo::MessageDoc,
        doc! { "room_id": 1, "seq": 1 },
        |d| {
            Record::Message(MessageRec {
                id: d.id,
                room_id: d.room_id,
                seq: d.seq,
                sender_id: d.sender_id,
                client_msg_id: d.client_msg_id,
                body: d.body,
                created_at: d.created_at,
                x: d.x,
            })
        }
    );
    each!(
        mongo::BLOCKS,
        mongo::BlockDoc,
        doc! { "blocker_id": 1, "blocked_id": 1 },
        |d| {
            Record::Block(BlockRec {
                blocker_id: d.blocker_id,
                blocked_id: d.blocked_id,
                created_at: d.created_at,
            })
        }
    );
    each!(mongo::DEVICES, mongo::DeviceDoc, doc! { "_id": 1 }, |d| {
        Record::Device(DeviceRec {
            token: d.token,
            user_id: d.user_id,
            platform: d.platform,
            created_at: d.created_at,
        })
    });
    each!(
        mongo::REFRESH_TOKENS,
        mongo::RefreshDoc,
        doc! { "_id": 1 },
        |d| {
            Record::RefreshToken(RefreshRec {
                hash: d.hash,
                user_id: d.user_id,
                family_id: d.family_id,
                expires_at: d.expires_at,
                used: d.used,
            })
        }
    );
    send(Record::End(End { counts })).await?;
    Ok(())
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
    let (body_tx, body_rx) = mpsc::channel(1024);
    let load = async {
        match cfg.kind.as_str() {
            // Opening creates the file and schema (or checks an existing one).
            "sqlite" => SqliteStore::open(&cfg.sqlite).await?.load(body_rx).await,
            "mongodb" => MongoGlue(cfg.clone()).load(body_rx).await,
            other => Err(TransferError::Kind(other.to_owned())),
        }
    };
    let (loaded, ()) = tokio::join!(load, check_lines(rx, body_tx));
    // The reader stops by itself once the checker drops its end.
    let _ = reader.await;
    loaded
}

/// Checks the line format (header, counts, end line) and passes the data
/// records on to the backend; a bad or cut-off input reaches the backend
/// as an `Err` item, after which nothing more is sent.
async fn check_lines(mut rx: LineRx, tx: LineTx) {
    if let Err(e) = check_header(rx.recv().await) {
        let _ = tx.send(Err(e)).await;
        return;
    }
    let mut body = Body::default();
    while let Some(item) = rx.recv().await {
        let next = item.and_then(|(line, r)| Ok(body.next(line, r)?.map(|r| (line, r))));
        match next {
            Ok(Some(x)) => {
                if tx.send(Ok(x)).await.is_err() {
                    return;
                }
            }
            Ok(None) => {}
            Err(e) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
        }
    }
    if !body.ended {
        let _ = tx
            .send(Err(TransferError::Incomplete("no end line".into())))
            .await;
    }
}

/// Until the MongoDB backend implements [`Dump`] and [`Load`] itself:
/// `mongo_source`/`mongo_sink` behind the traits (their own header and end
/// lines are dropped on the way out and made up on the way in).
struct MongoGlue(StoreConfig);

#[async_trait::async_trait]
impl Dump for MongoGlue {
    async fn totals(&self) -> Result<Counts, TransferError> {
        // Only for the progress bar; mongo_source counts inside its own header.
        Ok(Counts::default())
    }

    async fn dump(&self, tx: RecordTx) -> Result<(), TransferError> {
        let (itx, mut irx) = mpsc::channel(1024);
        let forward = async move {
            while let Some(r) = irx.recv().await {
                if matches!(r, Ok(Record::Header(_) | Record::End(_))) {
                    continue;
                }
                if tx.send(r).await.is_err() {
                    return Err(closed());
                }
            }
            Ok(())
        };
        let (a, b) = tokio::join!(mongo_source(&self.0, itx), forward);
        a.and(b)
    }
}

#[async_trait::async_trait]
impl Load for MongoGlue {
    async fn load(&self, mut rx: LineRx) -> Result<Counts, TransferError> {
        let (itx, irx) = mpsc::channel(1024);
        let forward = async move {
            if itx
                .send(Ok((1, header("mongodb", Counts::default()))))
                .await
                .is_err()
            {
                return;
            }
            let (mut counts, mut last) = (Counts::default(), 1);
            while let Some(item) = rx.recv().await {
                let failed = item.is_err();
                if let Ok((line, r)) = &item {
                    counts.count(r);
                    last = *line;
                }
                if itx.send(item).await.is_err() || failed {
                    return;
                }
            }
            let _ = itx.send(Ok((last + 1, Record::End(End { counts })))).await;
        };
        let (r, ()) = tokio::join!(mongo_sink(&self.0, irx), forward);
        r
    }
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
pub(crate) fn check_header(
    first: Option<Result<(u64, Record), TransferError>>,
) -> Result<(), TransferError> {
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
pub(crate) struct Body {
    counts: Counts,
    ended: bool,
}

impl Body {
    /// `Some(record)` to store, `None` for the end line.
    pub(crate) fn next(&mut self, line: u64, r: Record) -> Result<Option<Record>, TransferError> {
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

/// Per-collection buffers of documents waiting for an `insertMany`.
#[derive(Default)]
struct MongoBatches {
    users: Vec<mongo::UserDoc>,
    rooms: Vec<mongo::RoomDoc>,
    members: Vec<mongo::MemberDoc>,
    messages: Vec<mongo::MessageDoc>,
    blocks: Vec<mongo::BlockDoc>,
    devices: Vec<mongo::DeviceDoc>,
    refresh: Vec<mongo::RefreshDoc>,
}

impl MongoBatches {
    fn push(&mut self, r: Record) {
        match r {
            Record::User(u) => self.users.push(mongo::UserDoc {
                id: u.id,
                username: u.username,
                email: u.email,
                display_name: u.display_name,
                password_hash: u.password_hash,
                created_at: u.created_at,
                last_seen: u.last_seen,
                notify_push: u.notify_push,
                notify_email: u.notify_email,
            }),
            Record::Room(r) => self.rooms.push(mongo::RoomDoc {
                id: r.id,
                kind: r.kind,
                name: r.name,
                direct_key: r.direct_key,
                created_at: r.created_at,
                last_seq: r.last_seq,
            }),
            Record::Member(m) => self.members.push(mongo::MemberDoc {
                id: format!("{}:{}", m.room_id, m.user_id),
                room_id: m.room_id,
                user_id: m.user_id,
                role: m.role,
                delivered_seq: m.delivered_seq,
                read_seq: m.read_seq,
                joined_at: m.joined_at,
            }),
            Record::Message(m) => self.messages.push(mongo::MessageDoc {
                id: m.id,
                room_id: m.room_id,
                seq: m.seq,
                sender_id: m.sender_id,
                client_msg_id: m.client_msg_id,
                body: m.body,
                created_at: m.created_at,
                x: m.x,
                cs: None,
            }),
            Record::Block(b) => self.blocks.push(mongo::BlockDoc {
                id: format!("{}:{}", b.blocker_id, b.blocked_id),
                blocker_id: b.blocker_id,
                blocked_id: b.blocked_id,
                created_at: b.created_at,
            }),
            Record::Device(d) => self.devices.push(mongo::DeviceDoc {
                token: d.token,
                user_id: d.user_id,
                platform: d.platform,
                created_at: d.created_at,
            }),
            Record::RefreshToken(t) => {
                let mut d = mongo::RefreshDoc::new(t.hash, t.user_id, t.family_id, t.expires_at);
                d.used = t.used;
                self.refresh.push(d);
            }
            Record::Header(_) | Record::End(_) => {}
        }
    }

    /// Inserts every buffer that holds `min` or more documents.
    async fn flush(&mut self, db: &mongodb::Database, min: usize) -> Result<(), TransferError> {
        async fn put<T: Serialize + Send + Sync>(
            db: &mongodb::Database,
            name: &str,
            buf: &mut Vec<T>,
            min: usize,
        ) -> Result<(), TransferError> {
            if !buf.is_empty() && buf.len() >= min {
                db.collection::<T>(name)
                    .insert_many(buf.drain(..))
                    .await
                    .map_err(mongo_err)?;
            }
            Ok(())
        }
        put(db, mongo::USERS, &mut self.users, min).await?;
        put(db, mongo::ROOMS, &mut self.rooms, min).await?;
        put(db, mongo::MEMBERS, &mut self.members, min).await?;
        put(db, mongo::MESSAGES, &mut self.messages, min).await?;
        put(db, mongo::BLOCKS, &mut self.blocks, min).await?;
        put(db, mongo::DEVICES, &mut self.devices, min).await?;
        put(db, mongo::REFRESH_TOKENS, &mut self.refresh, min).await?;
        Ok(())
    }
}

async fn mongo_sink(cfg: &StoreConfig, mut rx: LineRx) -> Result<Counts, TransferError> {
    // Creates collections, indexes and meta (or checks them).
    let store = MongoStore::open(&cfg.mongodb).await?;
    let db = store.database().clone();
    for name in [
        mongo::USERS,
        mongo::ROOMS,
        mongo::MEMBERS,
        mongo::MESSAGES,
        mongo::BLOCKS,
        mongo::DEVICES,
        mongo::REFRESH_TOKENS,
    ] {
        if db
            .collection::<Document>(name)
            .find_one(doc! {})
            .await
            .map_err(mongo_err)?
            .is_some()
        {
            return Err(TransferError::NotEmpty(name.into()));
        }
    }
    check_header(rx.recv().await)?;
    let mut batches = MongoBatches::default();
    let mut body = Body::default();
    while let Some(item) = rx.recv().await {
        let (line, r) = item?;
        if let Some(r) = body.next(line, r)? {
            batches.push(r);
            batches.flush(&db, MONGO_BATCH).await?;
        }
    }
    if !body.ended {
        return Err(TransferError::Incomplete(
            "no end line (what was read is in the database: drop it before importing again)".into(),
        ));
    }
    batches.flush(&db, 1).await?;
    Ok(body.counts)
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
