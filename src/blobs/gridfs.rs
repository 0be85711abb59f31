//! Attachments in a GridFS bucket (`attachments.files` / `attachments.chunks`)
//! of the MongoDB database the store uses, so every node of a cluster
//! serves every attachment. The metadata lives in the files document's
//! `metadata` field:
//!
//! ```text
//! { _id: "<id>", length, chunkSize, uploadDate, filename,
//!   metadata: { uploader, room_id, content_type, size, sha256, width, height,
//!               created_at, attached: null | { room_id, message_id }, complete } }
//! ```
//!
//! The driver writes the files document when the upload stream closes, with
//! the metadata given when it opened; size and SHA-256 are known only then,
//! so they are set right after with `complete: true`. Until then the file is
//! invisible; one that a crash left incomplete is unattached and old, so the
//! sweeper removes it.

use std::ops::Range;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::io::AsyncWriteExt;
use futures_util::{StreamExt, TryStreamExt};
use mongodb::bson::{doc, Bson, Document};
use mongodb::error::{Error as MongoError, ErrorKind};
use mongodb::gridfs::GridFsBucket;
use mongodb::options::{
    Acknowledgment, ClientOptions, GridFsBucketOptions, IndexOptions, ReadPreference,
    SelectionCriteria, WriteConcern,
};
use mongodb::{Client, Collection, IndexModel};

use super::{Attached, AttachmentId, BlobError, BlobMeta, BlobStore, ByteStream, Meter, NewBlob};
use crate::config::MongoConfig;
use crate::domain::{MessageId, RoomId, UserId};

/// The bucket's name: collections `attachments.files` and `attachments.chunks`.
pub const BUCKET: &str = "attachments";
/// Bytes per chunk document.
const CHUNK_BYTES: u32 = 255 * 1024;

/// A GridFS bucket with chatd's metadata.
pub struct GridFsBlobStore {
    bucket: GridFsBucket,
    files: Collection<Document>,
    chunks: Collection<Document>,
}

fn mongo_err(e: MongoError) -> BlobError {
    match e.kind.as_ref() {
        ErrorKind::Io(_)
        | ErrorKind::ServerSelection { .. }
        | ErrorKind::ConnectionPoolCleared { .. }
        | ErrorKind::Shutdown => {
            tracing::debug!(error = %e, "mongodb unavailable");
            BlobError::Unavailable("mongodb unreachable".into())
        }
        _ => BlobError::Internal(e.to_string()),
    }
}

/// The store's write concern settings, for the bucket's writes.
fn write_concern(cfg: &MongoConfig) -> Result<WriteConcern, BlobError> {
    let w = match cfg.write_concern.trim() {
        "" | "majority" => Acknowledgment::Majority,
        n if n.bytes().all(|b| b.is_ascii_digit()) => match n.parse::<u32>() {
            Ok(n) if n > 0 => Acknowledgment::Nodes(n),
            _ => {
                return Err(BlobError::Internal(format!(
                    "store.mongodb.write_concern {n:?} is not usable"
                )))
            }
        },
        tag => Acknowledgment::Custom(tag.to_owned()),
    };
    let mut wc = WriteConcern::default();
    wc.w = Some(w);
    wc.journal = Some(cfg.journal);
    wc.w_timeout = (cfg.write_timeout_ms > 0).then(|| Duration::from_millis(cfg.write_timeout_ms));
    Ok(wc)
}

fn attached_doc(a: &Attached) -> Document {
    doc! { "room_id": a.room_id.as_str(), "message_id": a.message_id.as_str() }
}

/// The `metadata` of a files document back into a [`BlobMeta`].
fn parse_meta(d: &Document) -> Result<BlobMeta, BlobError> {
    let bad = |what: &str| BlobError::Internal(format!("attachment document: bad {what}"));
    let id = d.get_str("_id").map_err(|_| bad("_id"))?;
    let m = d.get_document("metadata").map_err(|_| bad("metadata"))?;
    let s = |k: &str| m.get_str(k).map(str::to_owned).map_err(|_| bad(k));
    let int = |k: &str| -> Option<i64> {
        match m.get(k) {
            Some(Bson::Int32(v)) => Some(i64::from(*v)),
            Some(Bson::Int64(v)) => Some(*v),
            _ => None,
        }
    };
    let attached = match m.get("attached") {
        Some(Bson::Document(a)) => Some(Attached {
            room_id: RoomId::from_trusted(a.get_str("room_id").map_err(|_| bad("attached"))?),
            message_id: MessageId::from_trusted(
                a.get_str("message_id").map_err(|_| bad("attached"))?,
            ),
        }),
        _ => None,
    };
    Ok(BlobMeta {
        id: AttachmentId::parse(id).map_err(|_| bad("_id"))?,
        uploader: UserId::from_trusted(s("uploader")?),
        room_id: RoomId::from_trusted(s("room_id")?),
        filename: d.get_str("filename").unwrap_or_default().to_owned(),
        content_type: s("content_type")?,
        size: int("size")
            .and_then(|v| u64::try_from(v).ok())
            .ok_or_else(|| bad("size"))?,
        sha256: s("sha256")?,
        width: int("width").and_then(|v| u32::try_from(v).ok()),
        height: int("height").and_then(|v| u32::try_from(v).ok()),
        created_at: s("created_at")?,
        attached,
    })
}

impl GridFsBlobStore {
    /// Connects with the store's URI, database and write concern, and makes
    /// the sweeper's index.
    pub async fn open(cfg: &MongoConfig) -> Result<Self, BlobError> {
        let mut opts = ClientOptions::parse(&cfg.uri).await.map_err(mongo_err)?;
        opts.server_selection_timeout
            .get_or_insert(Duration::from_secs(5));
        opts.connect_timeout.get_or_insert(Duration::from_secs(5));
        opts.app_name
            .get_or_insert_with(|| "chatd-attachments".to_owned());
        opts.write_concern = Some(write_concern(cfg)?);
        opts.selection_criteria = Some(SelectionCriteria::ReadPreference(ReadPreference::Primary));
        let client = Client::with_options(opts).map_err(mongo_err)?;
        Self::with_database(client.database(&cfg.database)).await
    }

    /// The bucket in `db` (tests and tools).
    pub async fn with_database(db: mongodb::Database) -> Result<Self, BlobError> {
        let bucket = db.gridfs_bucket(
            GridFsBucketOptions::builder()
                .bucket_name(BUCKET.to_owned())
                .chunk_size_bytes(CHUNK_BYTES)
                .build(),
        );
        let files = db.collection::<Document>(&format!("{BUCKET}.files"));
        let chunks = db.collection::<Document>(&format!("{BUCKET}.chunks"));
        files
            .create_index(
                IndexModel::builder()
                    .keys(doc! { "metadata.attached": 1, "metadata.created_at": 1 })
                    .options(
                        IndexOptions::builder()
                            .name("unattached_by_age".to_owned())
                            .build(),
                    )
                    .build(),
            )
            .await
            .map_err(mongo_err)?;
        // The driver makes this one on its first upload; reads may come first.
        chunks
            .create_index(
                IndexModel::builder()
                    .keys(doc! { "files_id": 1, "n": 1 })
                    .options(IndexOptions::builder().unique(true).build())
                    .build(),
            )
            .await
            .map_err(mongo_err)?;
        Ok(Self {
            bucket,
            files,
            chunks,
        })
    }

    async fn find_meta(&self, id: &AttachmentId) -> Result<Option<BlobMeta>, BlobError> {
        let d = self
            .files
            .find_one(doc! { "_id": id.as_str(), "metadata.complete": true })
            .await
            .map_err(mongo_err)?;
        d.as_ref().map(parse_meta).transpose()
    }

    /// Stores `body` under `new.id` with the given creation time and binding;
    /// with `expect`, the bytes must have exactly that size and SHA-256.
    async fn put_as(
        &self,
        new: NewBlob,
        mut body: ByteStream,
        max_bytes: u64,
        created_at: String,
        attached: Option<Attached>,
        expect: Option<(u64, String)>,
    ) -> Result<BlobMeta, BlobError> {
        let mut metadata = doc! {
            "uploader": new.uploader.as_str(),
            "room_id": new.room_id.as_str(),
            "content_type": &new.content_type,
            "created_at": &created_at,
            "attached": attached.as_ref().map_or(Bson::Null, |a| Bson::Document(attached_doc(a))),
            "complete": false,
        };
        if let Some(w) = new.width {
            metadata.insert("width", i64::from(w));
        }
        if let Some(h) = new.height {
            metadata.insert("height", i64::from(h));
        }
        let mut up = self
            .bucket
            .open_upload_stream(&new.filename)
            .id(Bson::String(new.id.to_string()))
            .metadata(metadata)
            .await
            .map_err(mongo_err)?;
        let mut meter = Meter::new(max_bytes);
        let written: Result<(u64, String), BlobError> = async {
            while let Some(chunk) = body.next().await {
                let chunk = chunk?;
                meter.feed(&chunk)?;
                up.write_all(&chunk)
                    .await
                    .map_err(|e| BlobError::Internal(format!("gridfs write: {e}")))?;
            }
            let (size, sha256) = std::mem::replace(&mut meter, Meter::new(0)).finish()?;
            up.close()
                .await
                .map_err(|e| BlobError::Unavailable(format!("gridfs close: {e}")))?;
            Ok((size, sha256))
        }
        .await;
        let written = written.and_then(|r| super::check_expected(&new.id, r, expect));
        let (size, sha256) = match written {
            Ok(r) => r,
            Err(e) => {
                // Discards the chunks written so far (closed streams have none
                // pending; their document is removed below).
                let _ = up.abort().await;
                let _ = self.remove(&new.id, doc! { "_id": new.id.as_str() }).await;
                return Err(e);
            }
        };
        let done = self
            .files
            .update_one(
                doc! { "_id": new.id.as_str() },
                doc! { "$set": {
                    "metadata.size": i64::try_from(size).unwrap_or(i64::MAX),
                    "metadata.sha256": &sha256,
                    "metadata.complete": true,
                } },
            )
            .await
            .map_err(mongo_err);
        if let Err(e) = done {
            let _ = self.remove(&new.id, doc! { "_id": new.id.as_str() }).await;
            return Err(e);
        }
        Ok(BlobMeta {
            id: new.id,
            uploader: new.uploader,
            room_id: new.room_id,
            filename: new.filename,
            content_type: new.content_type,
            size,
            sha256,
            width: new.width,
            height: new.height,
            created_at,
            attached,
        })
    }

    /// Removes the files document (which hides the file) matching `filter`,
    /// then its chunks; `true` if a document was removed.
    async fn remove(&self, id: &AttachmentId, filter: Document) -> Result<bool, BlobError> {
        let r = self.files.delete_one(filter).await.map_err(mongo_err)?;
        if r.deleted_count == 0 {
            return Ok(false);
        }
        self.chunks
            .delete_many(doc! { "files_id": id.as_str() })
            .await
            .map_err(mongo_err)?;
        Ok(true)
    }
}

#[async_trait]
impl BlobStore for GridFsBlobStore {
    fn backend(&self) -> &'static str {
        "gridfs"
    }

    async fn put(
        &self,
        new: NewBlob,
        body: ByteStream,
        max_bytes: u64,
    ) -> Result<BlobMeta, BlobError> {
        let now = crate::domain::now_rfc3339();
        self.put_as(new, body, max_bytes, now, None, None).await
    }

    async fn restore(&self, meta: BlobMeta, body: ByteStream) -> Result<BlobMeta, BlobError> {
        let (new, created_at, attached, expect) = super::split_meta(meta);
        self.put_as(new, body, u64::MAX, created_at, attached, Some(expect))
            .await
    }

    async fn list(&self) -> Result<Vec<BlobMeta>, BlobError> {
        let mut cursor = self
            .files
            .find(doc! { "metadata.complete": true })
            .sort(doc! { "_id": 1 })
            .await
            .map_err(mongo_err)?;
        let mut out = Vec::new();
        while let Some(d) = cursor.try_next().await.map_err(mongo_err)? {
            out.push(parse_meta(&d)?);
        }
        Ok(out)
    }

    async fn meta(&self, id: &AttachmentId) -> Result<Option<BlobMeta>, BlobError> {
        self.find_meta(id).await
    }

    async fn read(&self, id: &AttachmentId, range: Range<u64>) -> Result<ByteStream, BlobError> {
        let d = self
            .files
            .find_one(doc! { "_id": id.as_str(), "metadata.complete": true })
            .await
            .map_err(mongo_err)?
            .ok_or(BlobError::NotFound)?;
        let chunk = match d.get("chunkSize") {
            Some(Bson::Int32(v)) if *v > 0 => *v as u64,
            Some(Bson::Int64(v)) if *v > 0 => *v as u64,
            _ => u64::from(CHUNK_BYTES),
        };
        if range.start >= range.end {
            return Ok(Box::pin(futures_util::stream::empty()));
        }
        let first = range.start / chunk;
        let last = (range.end - 1) / chunk;
        let cursor = self
            .chunks
            .find(doc! {
                "files_id": id.as_str(),
                "n": { "$gte": first as i64, "$lte": last as i64 },
            })
            .sort(doc! { "n": 1 })
            // A few chunks per batch bound the memory of one download.
            .batch_size(4)
            .await
            .map_err(mongo_err)?;
        let mut expect = first;
        let stream = cursor.map_err(mongo_err).and_then(move |c| {
            let n = match c.get("n") {
                Some(Bson::Int32(v)) => *v as u64,
                Some(Bson::Int64(v)) => *v as u64,
                _ => u64::MAX,
            };
            let out = if n != expect {
                Err(BlobError::Internal(format!(
                    "gridfs chunk {expect} missing"
                )))
            } else {
                expect += 1;
                match c.get("data") {
                    Some(Bson::Binary(b)) => {
                        let base = n * chunk;
                        let from = range.start.saturating_sub(base) as usize;
                        let to = (range.end - base).min(b.bytes.len() as u64) as usize;
                        Ok(Bytes::copy_from_slice(&b.bytes[from.min(to)..to]))
                    }
                    _ => Err(BlobError::Internal("gridfs chunk without data".into())),
                }
            };
            futures_util::future::ready(out)
        });
        Ok(Box::pin(stream))
    }

    async fn mark_attached(&self, id: &AttachmentId, to: &Attached) -> Result<BlobMeta, BlobError> {
        let r = self
            .files
            .update_one(
                doc! {
                    "_id": id.as_str(),
                    "metadata.complete": true,
                    "metadata.attached": Bson::Null,
                },
                doc! { "$set": { "metadata.attached": attached_doc(to) } },
            )
            .await
            .map_err(mongo_err)?;
        let meta = self.find_meta(id).await?.ok_or(BlobError::NotFound)?;
        if r.matched_count == 0 && meta.attached.as_ref() != Some(to) {
            return Err(BlobError::Conflict);
        }
        Ok(meta)
    }

    async fn detach(&self, id: &AttachmentId, from: &Attached) -> Result<bool, BlobError> {
        let r = self
            .files
            .update_one(
                doc! {
                    "_id": id.as_str(),
                    "metadata.attached.room_id": from.room_id.as_str(),
                    "metadata.attached.message_id": from.message_id.as_str(),
                },
                doc! { "$set": { "metadata.attached": Bson::Null } },
            )
            .await
            .map_err(mongo_err)?;
        Ok(r.modified_count > 0)
    }

    async fn delete(&self, id: &AttachmentId) -> Result<bool, BlobError> {
        let removed = self.remove(id, doc! { "_id": id.as_str() }).await?;
        if !removed {
            // Chunks of an upload whose document never got written.
            self.chunks
                .delete_many(doc! { "files_id": id.as_str() })
                .await
                .map_err(mongo_err)?;
        }
        Ok(removed)
    }

    async fn delete_unattached(&self, id: &AttachmentId) -> Result<bool, BlobError> {
        self.remove(
            id,
            doc! { "_id": id.as_str(), "metadata.attached": Bson::Null },
        )
        .await
    }

    async fn unattached_before(
        &self,
        before: &str,
        limit: usize,
    ) -> Result<Vec<AttachmentId>, BlobError> {
        let mut cursor = self
            .files
            .find(doc! {
                "metadata.attached": Bson::Null,
                "metadata.created_at": { "$lt": before },
            })
            .projection(doc! { "_id": 1 })
            .limit(i64::try_from(limit).unwrap_or(i64::MAX))
            .await
            .map_err(mongo_err)?;
        let mut out = Vec::new();
        while let Some(d) = cursor.try_next().await.map_err(mongo_err)? {
            if let Ok(id) = d.get_str("_id").map(AttachmentId::parse) {
                out.extend(id.ok());
            }
        }
        Ok(out)
    }
}
