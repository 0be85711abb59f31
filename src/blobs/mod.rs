//! Attachments: the bytes and metadata of uploaded files, kept apart from
//! the message store.
//!
//! - [`BlobStore`]: one async trait over both backends: [`fs`] (files under
//!   the data directory, used with the SQLite store) and [`gridfs`] (a GridFS
//!   bucket in the MongoDB database, so every node of a cluster serves every
//!   attachment). [`open`] picks by `store.kind`.
//! - [`ingest`]: what an upload goes through before it is stored: filename
//!   sanitising, content type checked against the bytes for images,
//!   width/height, the size limit while streaming.
//! - [`attach_to_message`] / [`check_attachable`]: the operations the message
//!   side uses to bind uploads to a message.
//! - [`sweeper`]: removes uploads never attached to a message.
//! - [`contract`]: the one suite every backend passes.
//!
//! docs/attachments.md describes the storage layout of both backends.

pub mod contract;
pub mod fs;
pub mod gridfs;
pub mod ingest;
pub mod sweeper;
pub mod transfer;

use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::Stream;
use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::config::Settings;
use crate::domain::{MessageId, RoomId, UserId};

/// A stream of bytes in or out of a blob store.
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, BlobError>> + Send>>;

/// What can go wrong with an attachment.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BlobError {
    /// No such attachment (or not completely stored).
    #[error("no such attachment")]
    NotFound,
    /// The upload is larger than the limit; nothing was stored.
    #[error("the attachment is larger than {max} bytes")]
    TooLarge { max: u64 },
    /// The upload has no bytes; nothing was stored.
    #[error("the attachment is empty")]
    Empty,
    /// Refused input; `code` is the contract's snake_case code.
    #[error("{message}")]
    Invalid { code: &'static str, message: String },
    /// The attachment is already bound to another message.
    #[error("the attachment belongs to another message")]
    Conflict,
    /// Reading the uploaded body failed (the client went away).
    #[error("reading the upload failed: {0}")]
    Body(String),
    /// The backend cannot be reached now; retry.
    #[error("attachment storage unavailable: {0}")]
    Unavailable(String),
    /// Anything else; details are for the log.
    #[error("attachment storage error: {0}")]
    Internal(String),
}

impl BlobError {
    /// An [`BlobError::Invalid`].
    pub fn invalid(code: &'static str, message: impl Into<String>) -> Self {
        BlobError::Invalid {
            code,
            message: message.into(),
        }
    }
}

/// An attachment id: 32 lowercase hex digits (a random UUID). The strict
/// form keeps ids safe as file names.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct AttachmentId(Arc<str>);

impl AttachmentId {
    /// A new random id.
    pub fn generate() -> Self {
        Self(uuid::Uuid::new_v4().simple().to_string().into())
    }

    /// Accepts exactly 32 lowercase hex digits.
    pub fn parse(s: &str) -> Result<Self, BlobError> {
        if s.len() == 32 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            Ok(Self(s.into()))
        } else {
            Err(BlobError::NotFound)
        }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for AttachmentId {
    type Error = BlobError;
    fn try_from(s: String) -> Result<Self, BlobError> {
        Self::parse(&s)
    }
}

impl From<AttachmentId> for String {
    fn from(id: AttachmentId) -> String {
        id.0.to_string()
    }
}

impl std::fmt::Display for AttachmentId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::fmt::Debug for AttachmentId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AttachmentId({})", self.0)
    }
}

/// The message an attachment is bound to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attached {
    pub room_id: RoomId,
    pub message_id: MessageId,
}

/// Everything kept about a stored attachment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobMeta {
    pub id: AttachmentId,
    pub uploader: UserId,
    /// The room it was uploaded to.
    pub room_id: RoomId,
    pub filename: String,
    pub content_type: String,
    pub size: u64,
    /// Lowercase hex SHA-256 of the bytes.
    pub sha256: String,
    pub width: Option<u32>,
    pub height: Option<u32>,
    /// RFC 3339 UTC with milliseconds (sorts as text).
    pub created_at: String,
    pub attached: Option<Attached>,
}

impl BlobMeta {
    /// The contract's `attachment` object.
    pub fn public(&self) -> Attachment {
        Attachment {
            id: self.id.to_string(),
            filename: self.filename.clone(),
            content_type: self.content_type.clone(),
            size: self.size,
            sha256: self.sha256.clone(),
            width: self.width,
            height: self.height,
        }
    }
}

/// The contract's `attachment`: what clients see (and what a message carries).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Attachment {
    /// Attachment id (32 hex digits).
    pub id: String,
    /// Sanitised file name.
    pub filename: String,
    /// Media type as uploaded (checked against the bytes for images).
    pub content_type: String,
    /// Bytes.
    pub size: u64,
    /// Lowercase hex SHA-256 of the bytes (also the download's ETag).
    pub sha256: String,
    /// Pixels, for images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<u32>,
    /// Pixels, for images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height: Option<u32>,
}

/// Input of [`BlobStore::put`]: the metadata known before the bytes are read.
#[derive(Debug, Clone)]
pub struct NewBlob {
    pub id: AttachmentId,
    pub uploader: UserId,
    pub room_id: RoomId,
    pub filename: String,
    pub content_type: String,
    pub width: Option<u32>,
    pub height: Option<u32>,
}

/// Bytes and metadata of attachments.
#[async_trait]
pub trait BlobStore: Send + Sync {
    /// `"files"` or `"gridfs"`.
    fn backend(&self) -> &'static str;

    /// Stores `body` (read to its end) under `new.id`, computing size and
    /// SHA-256 while writing. More than `max_bytes`: `TooLarge`; no bytes:
    /// `Empty`; a failing body: `Body`. On any error nothing stays visible.
    async fn put(
        &self,
        new: NewBlob,
        body: ByteStream,
        max_bytes: u64,
    ) -> Result<BlobMeta, BlobError>;

    /// Stores `body` under `meta.id` keeping all of `meta` (creation time,
    /// binding), for `chatd import`. The bytes must have exactly `meta.size`
    /// and `meta.sha256` (`Invalid` with code `checksum_mismatch` otherwise);
    /// on any error nothing stays visible.
    async fn restore(&self, meta: BlobMeta, body: ByteStream) -> Result<BlobMeta, BlobError>;

    /// The metadata of every completely stored attachment, by id (for
    /// `chatd export`).
    async fn list(&self) -> Result<Vec<BlobMeta>, BlobError>;

    /// The metadata of a completely stored attachment.
    async fn meta(&self, id: &AttachmentId) -> Result<Option<BlobMeta>, BlobError>;

    /// The bytes in `range` (already clipped to the size by the caller).
    async fn read(&self, id: &AttachmentId, range: Range<u64>) -> Result<ByteStream, BlobError>;

    /// Binds the attachment to a message: idempotent for the same message,
    /// `Conflict` when bound to another, `NotFound` when missing.
    async fn mark_attached(&self, id: &AttachmentId, to: &Attached) -> Result<BlobMeta, BlobError>;

    /// Undoes [`mark_attached`](Self::mark_attached) if it is bound to `from`
    /// (for a send that failed after binding); `false` otherwise.
    async fn detach(&self, id: &AttachmentId, from: &Attached) -> Result<bool, BlobError>;

    /// Removes the bytes and metadata; `false` if there was nothing.
    async fn delete(&self, id: &AttachmentId) -> Result<bool, BlobError>;

    /// Removes it only if it is still not bound to a message (the sweeper's
    /// delete: an attach that wins the race keeps the file); `true` if removed.
    async fn delete_unattached(&self, id: &AttachmentId) -> Result<bool, BlobError>;

    /// Ids of uploads not bound to a message and created before `before`
    /// (RFC 3339), at most `limit`; includes uploads a crash left incomplete.
    async fn unattached_before(
        &self,
        before: &str,
        limit: usize,
    ) -> Result<Vec<AttachmentId>, BlobError>;
}

/// Opens the backend that goes with the configured store: files under the
/// data directory with SQLite, GridFS in the same database with MongoDB.
pub async fn open(settings: &Settings) -> Result<Arc<dyn BlobStore>, BlobError> {
    match settings.store.kind.as_str() {
        "mongodb" => Ok(Arc::new(
            gridfs::GridFsBlobStore::open(&settings.store.mongodb).await?,
        )),
        _ => Ok(Arc::new(
            fs::FsBlobStore::open(settings.data_dir().join("attachments")).await?,
        )),
    }
}

/// A [`BlobMeta`] as what [`BlobStore::restore`] passes to a backend's
/// put: the upload, its creation time, its binding and `(size, sha256)`.
pub(crate) fn split_meta(m: BlobMeta) -> (NewBlob, String, Option<Attached>, (u64, String)) {
    let new = NewBlob {
        id: m.id,
        uploader: m.uploader,
        room_id: m.room_id,
        filename: m.filename,
        content_type: m.content_type,
        width: m.width,
        height: m.height,
    };
    (new, m.created_at, m.attached, (m.size, m.sha256))
}

/// `got` (size, sha256) if it is what `expect` says (or nothing is expected).
pub(crate) fn check_expected(
    id: &AttachmentId,
    got: (u64, String),
    expect: Option<(u64, String)>,
) -> Result<(u64, String), BlobError> {
    match expect {
        Some(want) if want != got => Err(BlobError::invalid(
            "checksum_mismatch",
            format!(
                "attachment {id}: the bytes are {} bytes with sha256 {}, but the record says {} bytes with sha256 {}",
                got.0, got.1, want.0, want.1
            ),
        )),
        _ => Ok(got),
    }
}

/// Size, SHA-256 and the limit of bytes passing through a `put`.
pub(crate) struct Meter {
    hasher: sha2::Sha256,
    size: u64,
    max: u64,
}

impl Meter {
    pub(crate) fn new(max: u64) -> Self {
        Self {
            hasher: sha2::Sha256::new(),
            size: 0,
            max,
        }
    }

    /// Counts and hashes a chunk; `TooLarge` once past the limit.
    pub(crate) fn feed(&mut self, chunk: &[u8]) -> Result<(), BlobError> {
        self.size += chunk.len() as u64;
        if self.size > self.max {
            return Err(BlobError::TooLarge { max: self.max });
        }
        self.hasher.update(chunk);
        Ok(())
    }

    /// `(size, sha256 hex)`; `Empty` for no bytes.
    pub(crate) fn finish(self) -> Result<(u64, String), BlobError> {
        if self.size == 0 {
            return Err(BlobError::Empty);
        }
        Ok((self.size, hex::encode(self.hasher.finalize())))
    }
}

/// Parses the `attachments: [ids]` of a send: a malformed id is
/// `invalid_request` (an unknown well-formed one is `NotFound` later).
pub fn parse_ids(raw: &[String]) -> Result<Vec<AttachmentId>, BlobError> {
    raw.iter()
        .map(|s| {
            AttachmentId::parse(s).map_err(|_| {
                BlobError::invalid("invalid_request", format!("malformed attachment id {s:?}"))
            })
        })
        .collect()
}

/// The metadata of each id if every one may go with a message `uploader`
/// sends to `room`: uploaded by `uploader` to `room`, and not bound to
/// another message. Checks only; binds nothing.
pub async fn check_attachable(
    store: &dyn BlobStore,
    ids: &[AttachmentId],
    room: &RoomId,
    uploader: &UserId,
) -> Result<Vec<BlobMeta>, BlobError> {
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        if out.iter().any(|m: &BlobMeta| &m.id == id) {
            return Err(BlobError::invalid(
                "invalid_request",
                format!("attachment {id} is listed twice"),
            ));
        }
        let meta = store.meta(id).await?.ok_or(BlobError::NotFound)?;
        if &meta.uploader != uploader || &meta.room_id != room {
            return Err(BlobError::invalid(
                "invalid_request",
                format!("attachment {id} was not uploaded by you to this room"),
            ));
        }
        if meta.attached.is_some() {
            return Err(BlobError::Conflict);
        }
        out.push(meta);
    }
    Ok(out)
}

/// Binds every id to `(room, message_id)` after [`check_attachable`]; all or
/// nothing: on a failure the ones already bound are released again.
pub async fn attach_to_message(
    store: &dyn BlobStore,
    ids: &[AttachmentId],
    room: &RoomId,
    message_id: &MessageId,
    uploader: &UserId,
) -> Result<Vec<Attachment>, BlobError> {
    check_attachable(store, ids, room, uploader).await?;
    let to = Attached {
        room_id: room.clone(),
        message_id: message_id.clone(),
    };
    let mut done: Vec<BlobMeta> = Vec::with_capacity(ids.len());
    for id in ids {
        match store.mark_attached(id, &to).await {
            Ok(m) => done.push(m),
            Err(e) => {
                for m in &done {
                    if let Err(e) = store.detach(&m.id, &to).await {
                        tracing::warn!(id = %m.id, error = %e, "could not release an attachment");
                    }
                }
                return Err(e);
            }
        }
    }
    Ok(done.iter().map(BlobMeta::public).collect())
}
