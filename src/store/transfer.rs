//! `chatd export` / `chatd import`: a whole store as JSON lines, so a
//! deployment can move between SQLite and MongoDB (either way).
//!
//! The stream is one JSON object per line: a `header` (format, version,
//! source backend, totals), then every `user`, `room`, `member`, `message`,
//! `block`, `device` and `refresh_token`, then every `attachment` (its
//! metadata) each followed by its `attachment_chunk`s (the file's bytes in
//! base64, at most [`CHUNK_BYTES`] raw bytes each), then an `end` with the
//! counts, so a cut-off file is refused rather than half-loaded.
//!
//! This module owns only the line format. Each backend implements [`Dump`]
//! (send every record in load order into a bounded channel) and [`Load`]
//! (store the records it receives into an empty store); here the header
//! and end lines are written and checked, records counted, lines parsed
//! and numbered, and progress drawn. The attachment records have their own
//! [`Dump`]/[`Load`] on the blob side (`crate::blobs::transfer`), passed to
//! [`export_with`] / [`import_with`].
//!
//! Import only goes into an empty store (of the configured backend, created
//! if needed). Into SQLite it is one transaction: all or nothing. Into
//! MongoDB it is inserted in batches; if it fails, drop the database and
//! run it again.

use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::mongo::MongoStore;
use super::sqlite::SqliteStore;
use super::{Role, RoomKind, StoreError};
use crate::config::{StoreConfig, StoreKind};
use crate::domain::{
    now_rfc3339, ClientMsgId, Email, MessageBody, MessageId, RoomId, UserId, Username,
};

/// The `format` of the header line.
pub const FORMAT: &str = "chatd-export";
/// The version of the line format this build writes and reads.
pub const VERSION: u32 = 1;

/// Most raw bytes in one `attachment_chunk` (1 MiB).
pub const CHUNK_BYTES: usize = 1024 * 1024;

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
    #[error("attachments: {0}")]
    Blob(#[from] crate::blobs::BlobError),
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
    /// Attachment metadata records (absent in exports made before attachments).
    #[serde(default)]
    pub attachments: u64,
    #[serde(default)]
    pub attachment_chunks: u64,
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
            + self.attachments
            + self.attachment_chunks
    }

    /// Adds `other`'s counts to these.
    pub fn add(&mut self, o: &Counts) {
        self.users += o.users;
        self.rooms += o.rooms;
        self.members += o.members;
        self.messages += o.messages;
        self.blocks += o.blocks;
        self.devices += o.devices;
        self.refresh_tokens += o.refresh_tokens;
        self.attachments += o.attachments;
        self.attachment_chunks += o.attachment_chunks;
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
            Record::Attachment(_) => self.attachments += 1,
            Record::AttachmentChunk(_) => self.attachment_chunks += 1,
            Record::Header(_) | Record::End(_) => {}
        }
    }
}

impl std::fmt::Display for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} records: {} users, {} rooms, {} members, {} messages, {} blocks, {} devices, \
             {} refresh tokens, {} attachments ({} chunks)",
            self.total(),
            self.users,
            self.rooms,
            self.members,
            self.messages,
            self.blocks,
            self.devices,
            self.refresh_tokens,
            self.attachments,
            self.attachment_chunks
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
    /// The admin role (absent in exports made before roles existed).
    #[serde(default)]
    pub admin: bool,
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

/// Some bytes of an attachment's file: `data` is standard base64 of at most
/// [`CHUNK_BYTES`] bytes starting at `offset`. The chunks of an attachment
/// follow its `attachment` record in order, without gaps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttachmentChunkRec {
    pub id: crate::blobs::AttachmentId,
    pub offset: u64,
    pub data: String,
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
    /// An attachment's metadata (id, uploader, room, filename, content type,
    /// size, sha256, width, height, created_at, the message it is attached to).
    Attachment(crate::blobs::BlobMeta),
    AttachmentChunk(AttachmentChunkRec),
    End(End),
}

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
pub fn closed() -> TransferError {
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
    export_with(cfg, None, out, progress).await
}

/// [`export`], then the records of `extra` (the blob store's attachments)
/// after the store's.
pub async fn export_with<W>(
    cfg: &StoreConfig,
    extra: Option<Box<dyn Dump>>,
    out: W,
    progress: bool,
) -> Result<Counts, TransferError>
where
    W: Write + Send + 'static,
{
    let (source, backend) = dumper(cfg).await?;
    let mut totals = backend.totals().await?;
    if let Some(x) = &extra {
        totals.add(&x.totals().await?);
    }
    let head = header(source, totals);
    let (tx, rx) = mpsc::channel(1024);
    let (done, finished) = tokio::sync::oneshot::channel();
    let writer =
        tokio::task::spawn_blocking(move || write_lines(head, rx, finished, out, progress));
    // Moves `tx` in: the writer sees the channel close once both are done.
    let dumped = async move {
        backend.dump(tx.clone()).await?;
        match extra {
            Some(x) => x.dump(tx).await,
            None => Ok(()),
        }
    }
    .await;
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
    match cfg.kind {
        StoreKind::Sqlite => {
            if !Path::new(&cfg.sqlite.path).exists() {
                return Err(TransferError::Missing(cfg.sqlite.path.clone()));
            }
            // Opening checks the schema version (migrating an older one).
            Ok(("sqlite", Box::new(SqliteStore::open(&cfg.sqlite).await?)))
        }
        StoreKind::Mongodb => Ok(("mongodb", Box::new(MongoStore::open(&cfg.mongodb).await?))),
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
    import_with(cfg, None, input, size, progress).await
}

/// [`import`], with the `attachment` and `attachment_chunk` records going to
/// `extra` (the blob store's [`Load`]); without it they are refused. The
/// store's load is only finished (committed, for SQLite) once `extra`'s
/// succeeded.
pub async fn import_with<R>(
    cfg: &StoreConfig,
    extra: Option<Box<dyn Load>>,
    input: R,
    size: Option<u64>,
    progress: bool,
) -> Result<Counts, TransferError>
where
    R: BufRead + Send + 'static,
{
    // Opening creates the file and schema (or checks an existing one), before
    // the side writes anything beside it.
    let target: Box<dyn Load> = match cfg.kind {
        StoreKind::Sqlite => Box::new(SqliteStore::open(&cfg.sqlite).await?),
        StoreKind::Mongodb => Box::new(MongoStore::open(&cfg.mongodb).await?),
    };
    let (tx, rx) = mpsc::channel(1024);
    let reader = tokio::task::spawn_blocking(move || read_lines(input, tx, size, progress));
    let (body_tx, body_rx) = mpsc::channel(1024);
    let (side, side_load) = match extra {
        Some(x) => {
            let (stx, srx) = mpsc::channel(64);
            let (done_tx, done_rx) = tokio::sync::oneshot::channel();
            let load = async move {
                let r = x.load(srx).await;
                let _ = done_tx.send(r.is_ok());
                Some(r)
            };
            (
                Some((stx, done_rx)),
                futures_util::future::Either::Left(load),
            )
        }
        None => (None, futures_util::future::Either::Right(async { None })),
    };
    let load = target.load(body_rx);
    let (loaded, side_loaded, ()) = tokio::join!(load, side_load, check_lines(rx, body_tx, side));
    // The reader stops by itself once the checker drops its end.
    let _ = reader.await;
    match (loaded, side_loaded) {
        (Ok(mut c), Some(Ok(s))) => {
            c.add(&s);
            Ok(c)
        }
        (Ok(c), None) => Ok(c),
        // The side failed first (the store was told to stop): that is the cause.
        (Err(e), Some(Err(s))) if is_closed(&e) && !is_closed(&s) => Err(s),
        (Err(e), _) => Err(e),
        (Ok(_), Some(Err(s))) => Err(s),
    }
}

/// Where the attachment records of an import go, and whether they loaded.
type Side = Option<(LineTx, tokio::sync::oneshot::Receiver<bool>)>;

fn is_attachment(r: &Record) -> bool {
    matches!(r, Record::Attachment(_) | Record::AttachmentChunk(_))
}

/// Checks the line format (header, counts, end line) and passes the data
/// records on to the backend; a bad or cut-off input reaches the backend
/// as an `Err` item, after which nothing more is sent.
///
/// Attachment records go to `side` (refused without one); once the input is
/// read, the store's channel is closed only after the side loaded all, and
/// the store is told to stop if it failed.
async fn check_lines(mut rx: LineRx, tx: LineTx, side: Side) {
    let (side_tx, side_done) = match side {
        Some((t, d)) => (Some(t), Some(d)),
        None => (None, None),
    };
    if let Err(e) = check_header(rx.recv().await) {
        fail(&tx, side_tx.as_ref(), e).await;
        return;
    }
    let mut body = Body::default();
    while let Some(item) = rx.recv().await {
        let next = item.and_then(|(line, r)| Ok(body.next(line, r)?.map(|r| (line, r))));
        match next {
            Ok(Some((line, r))) if is_attachment(&r) => {
                let Some(s) = &side_tx else {
                    let line_err = TransferError::Format {
                        line,
                        msg: "attachment records, but no attachment storage to load them into"
                            .into(),
                    };
                    fail(&tx, None, line_err).await;
                    return;
                };
                if s.send(Ok((line, r))).await.is_err() {
                    // The side failed and reports why; the store keeps nothing.
                    let _ = tx.send(Err(closed())).await;
                    return;
                }
            }
            Ok(Some(x)) => {
                if tx.send(Ok(x)).await.is_err() {
                    if let Some(s) = &side_tx {
                        let _ = s.send(Err(closed())).await;
                    }
                    return;
                }
            }
            Ok(None) => {}
            Err(e) => {
                fail(&tx, side_tx.as_ref(), e).await;
                return;
            }
        }
    }
    if !body.ended {
        let cut = TransferError::Incomplete("no end line".into());
        fail(&tx, side_tx.as_ref(), cut).await;
        return;
    }
    drop(side_tx);
    if let Some(done) = side_done {
        if done.await != Ok(true) {
            let _ = tx.send(Err(closed())).await;
        }
    }
}

/// Sends `e` to the store's load and tells the side to stop.
async fn fail(tx: &LineTx, side: Option<&LineTx>, e: TransferError) {
    if let Some(s) = side {
        let _ = s.send(Err(closed())).await;
    }
    let _ = tx.send(Err(e)).await;
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
