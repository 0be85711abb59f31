//! Attachments as files under the data directory (the SQLite deployment):
//!
//! ```text
//! attachments/
//!   tmp/<id>.part, tmp/<id>.json.tmp   writes in progress (left by a crash: removed at start once an hour old)
//!   ab/<id>                            the bytes (ab = first two hex digits)
//!   ab/<id>.json                       the metadata; its presence makes the file visible
//!   unattached/<id>                    one marker per upload not yet bound to a message
//!                                      (content: its created_at), read by the sweeper
//! ```
//!
//! Every file is written to `tmp/` and renamed into place, so a reader sees
//! a whole file or none. Changes to metadata go through one lock: this
//! backend belongs to one process (like the SQLite file beside it).

use std::io::SeekFrom;
use std::ops::Range;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::sync::Mutex;

use super::{Attached, AttachmentId, BlobError, BlobMeta, BlobStore, ByteStream, Meter, NewBlob};

/// Chunk size of reads.
const READ_CHUNK: usize = 64 * 1024;

/// Files under one directory.
pub struct FsBlobStore {
    root: PathBuf,
    meta_lock: Mutex<()>,
}

fn io_err(e: std::io::Error) -> BlobError {
    BlobError::Internal(format!("attachment file: {e}"))
}

/// How old a file in `tmp/` must be to count as left by a crash.
pub const STALE_TMP: std::time::Duration = std::time::Duration::from_secs(3600);

/// Removes files of `tmp/` older than [`STALE_TMP`]; a file that another
/// node renames or removes meanwhile is simply gone.
async fn clear_stale(tmp: &std::path::Path) -> std::io::Result<()> {
    let mut dir = tokio::fs::read_dir(tmp).await?;
    while let Some(e) = dir.next_entry().await? {
        let stale = match e.metadata().await {
            Ok(m) => m
                .modified()
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > STALE_TMP),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => false,
            Err(err) => return Err(err),
        };
        if stale {
            match tokio::fs::remove_file(e.path()).await {
                Ok(()) => {}
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => return Err(err),
            }
        }
    }
    Ok(())
}

fn not_found_ok(r: std::io::Result<()>) -> Result<bool, BlobError> {
    match r {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err(e)),
    }
}

impl FsBlobStore {
    /// Creates the directories and clears writes a crash left in `tmp/`
    /// (those older than [`STALE_TMP`]: nodes of a cluster may share the
    /// directory, and another node's upload in progress must survive).
    pub async fn open(root: impl Into<PathBuf>) -> Result<Self, BlobError> {
        Self::open_with(root.into(), true).await
    }

    /// Opens beside a server that may be running (`chatd export` / `import`):
    /// leaves `tmp/` alone, as it may hold uploads in progress.
    pub async fn open_beside(root: impl Into<PathBuf>) -> Result<Self, BlobError> {
        Self::open_with(root.into(), false).await
    }

    async fn open_with(root: PathBuf, clear_tmp: bool) -> Result<Self, BlobError> {
        let tmp = root.join("tmp");
        tokio::fs::create_dir_all(&tmp).await.map_err(io_err)?;
        if clear_tmp {
            clear_stale(&tmp).await.map_err(io_err)?;
        }
        tokio::fs::create_dir_all(root.join("unattached"))
            .await
            .map_err(io_err)?;
        tracing::info!(root = %root.display(), "attachment files ready");
        Ok(Self {
            root,
            meta_lock: Mutex::new(()),
        })
    }

    fn bytes_path(&self, id: &AttachmentId) -> PathBuf {
        self.root.join(&id.as_str()[..2]).join(id.as_str())
    }

    fn meta_path(&self, id: &AttachmentId) -> PathBuf {
        self.root
            .join(&id.as_str()[..2])
            .join(format!("{}.json", id.as_str()))
    }

    fn marker_path(&self, id: &AttachmentId) -> PathBuf {
        self.root.join("unattached").join(id.as_str())
    }

    /// Writes `data` to `dest` through a temp file and a rename.
    async fn write_atomic(&self, dest: &Path, data: &[u8]) -> Result<(), BlobError> {
        let tmp = self
            .root
            .join("tmp")
            .join(format!("{}.tmp", uuid::Uuid::new_v4().simple()));
        let mut f = tokio::fs::File::create(&tmp).await.map_err(io_err)?;
        let written = async {
            f.write_all(data).await?;
            f.sync_all().await?;
            tokio::fs::rename(&tmp, dest).await
        }
        .await;
        if let Err(e) = written {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(io_err(e));
        }
        Ok(())
    }

    async fn write_meta(&self, meta: &BlobMeta) -> Result<(), BlobError> {
        let json =
            serde_json::to_vec_pretty(meta).map_err(|e| BlobError::Internal(e.to_string()))?;
        self.write_atomic(&self.meta_path(&meta.id), &json).await
    }

    async fn read_meta(&self, id: &AttachmentId) -> Result<Option<BlobMeta>, BlobError> {
        match tokio::fs::read(self.meta_path(id)).await {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| BlobError::Internal(format!("attachment metadata {id}: {e}"))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(e)),
        }
    }

    /// Streams `body` into `part`, returning `(size, sha256)`.
    async fn receive(
        part: &Path,
        mut body: ByteStream,
        max_bytes: u64,
    ) -> Result<(u64, String), BlobError> {
        let mut f = tokio::fs::File::create(part).await.map_err(io_err)?;
        let mut meter = Meter::new(max_bytes);
        while let Some(chunk) = body.next().await {
            let chunk = chunk?;
            meter.feed(&chunk)?;
            f.write_all(&chunk).await.map_err(io_err)?;
        }
        let done = meter.finish()?;
        f.sync_all().await.map_err(io_err)?;
        Ok(done)
    }

    /// Stores `body` under `new.id` with the given creation time and binding;
    /// with `expect`, the bytes must have exactly that size and SHA-256.
    async fn put_as(
        &self,
        new: NewBlob,
        body: ByteStream,
        max_bytes: u64,
        created_at: String,
        attached: Option<Attached>,
        expect: Option<(u64, String)>,
    ) -> Result<BlobMeta, BlobError> {
        let part = self.root.join("tmp").join(format!("{}.part", new.id));
        // A dropped upload (the client went away and the request future with
        // it) must not leave its part behind.
        let _cleanup = RemoveOnDrop(part.clone());
        let received = Self::receive(&part, body, max_bytes).await;
        let received = received.and_then(|r| super::check_expected(&new.id, r, expect));
        let (size, sha256) = match received {
            Ok(r) => r,
            Err(e) => {
                let _ = tokio::fs::remove_file(&part).await;
                return Err(e);
            }
        };
        let meta = BlobMeta {
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
        };
        let placed = async {
            // The marker first: whatever a crash leaves from here on, the
            // sweeper finds.
            if meta.attached.is_none() {
                self.write_atomic(&self.marker_path(&meta.id), meta.created_at.as_bytes())
                    .await?;
            }
            let dir = self.root.join(&meta.id.as_str()[..2]);
            tokio::fs::create_dir_all(&dir).await.map_err(io_err)?;
            tokio::fs::rename(&part, self.bytes_path(&meta.id))
                .await
                .map_err(io_err)?;
            self.write_meta(&meta).await
        }
        .await;
        if let Err(e) = placed {
            let _ = tokio::fs::remove_file(&part).await;
            let _ = self.remove_all(&meta.id).await;
            return Err(e);
        }
        Ok(meta)
    }

    /// Removes the metadata (which hides the file), the bytes and the marker.
    async fn remove_all(&self, id: &AttachmentId) -> Result<bool, BlobError> {
        let had_meta = not_found_ok(tokio::fs::remove_file(self.meta_path(id)).await)?;
        let had_bytes = not_found_ok(tokio::fs::remove_file(self.bytes_path(id)).await)?;
        let had_marker = not_found_ok(tokio::fs::remove_file(self.marker_path(id)).await)?;
        Ok(had_meta || had_bytes || had_marker)
    }
}

/// Removes a file when dropped (nothing happens once it was renamed away).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[async_trait]
impl BlobStore for FsBlobStore {
    fn backend(&self) -> &'static str {
        "files"
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
        let mut out = Vec::new();
        let mut dirs = tokio::fs::read_dir(&self.root).await.map_err(io_err)?;
        while let Some(d) = dirs.next_entry().await.map_err(io_err)? {
            let name = d.file_name().to_string_lossy().into_owned();
            if name.len() != 2 || !d.file_type().await.map_err(io_err)?.is_dir() {
                continue;
            }
            let mut files = tokio::fs::read_dir(d.path()).await.map_err(io_err)?;
            while let Some(f) = files.next_entry().await.map_err(io_err)? {
                let fname = f.file_name().to_string_lossy().into_owned();
                let Some(Ok(id)) = fname.strip_suffix(".json").map(AttachmentId::parse) else {
                    continue;
                };
                out.extend(self.read_meta(&id).await?);
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    async fn meta(&self, id: &AttachmentId) -> Result<Option<BlobMeta>, BlobError> {
        self.read_meta(id).await
    }

    async fn read(&self, id: &AttachmentId, range: Range<u64>) -> Result<ByteStream, BlobError> {
        if self.read_meta(id).await?.is_none() {
            return Err(BlobError::NotFound);
        }
        let mut f = match tokio::fs::File::open(self.bytes_path(id)).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(BlobError::NotFound),
            Err(e) => return Err(io_err(e)),
        };
        f.seek(SeekFrom::Start(range.start)).await.map_err(io_err)?;
        let limited = f.take(range.end.saturating_sub(range.start));
        let stream = tokio_util::io::ReaderStream::with_capacity(limited, READ_CHUNK)
            .map(|r| r.map_err(io_err));
        Ok(Box::pin(stream))
    }

    async fn mark_attached(&self, id: &AttachmentId, to: &Attached) -> Result<BlobMeta, BlobError> {
        let _g = self.meta_lock.lock().await;
        let mut meta = self.read_meta(id).await?.ok_or(BlobError::NotFound)?;
        match &meta.attached {
            Some(a) if a == to => {}
            Some(_) => return Err(BlobError::Conflict),
            None => {
                meta.attached = Some(to.clone());
                self.write_meta(&meta).await?;
            }
        }
        not_found_ok(tokio::fs::remove_file(self.marker_path(id)).await)?;
        Ok(meta)
    }

    async fn detach(&self, id: &AttachmentId, from: &Attached) -> Result<bool, BlobError> {
        let _g = self.meta_lock.lock().await;
        let Some(mut meta) = self.read_meta(id).await? else {
            return Ok(false);
        };
        if meta.attached.as_ref() != Some(from) {
            return Ok(false);
        }
        meta.attached = None;
        self.write_atomic(&self.marker_path(id), meta.created_at.as_bytes())
            .await?;
        self.write_meta(&meta).await?;
        Ok(true)
    }

    async fn delete(&self, id: &AttachmentId) -> Result<bool, BlobError> {
        let _g = self.meta_lock.lock().await;
        self.remove_all(id).await
    }

    async fn delete_unattached(&self, id: &AttachmentId) -> Result<bool, BlobError> {
        let _g = self.meta_lock.lock().await;
        if let Some(meta) = self.read_meta(id).await? {
            if meta.attached.is_some() {
                // A crash between binding and removing the marker left it.
                not_found_ok(tokio::fs::remove_file(self.marker_path(id)).await)?;
                return Ok(false);
            }
        }
        self.remove_all(id).await
    }

    async fn unattached_before(
        &self,
        before: &str,
        limit: usize,
    ) -> Result<Vec<AttachmentId>, BlobError> {
        let mut out = Vec::new();
        let mut dir = tokio::fs::read_dir(self.root.join("unattached"))
            .await
            .map_err(io_err)?;
        while let Some(e) = dir.next_entry().await.map_err(io_err)? {
            if out.len() >= limit {
                break;
            }
            let name = e.file_name();
            let Ok(id) = AttachmentId::parse(&name.to_string_lossy()) else {
                continue;
            };
            let created = match tokio::fs::read_to_string(e.path()).await {
                Ok(s) if !s.trim().is_empty() => s.trim().to_owned(),
                // An empty marker (a crash mid-write): the file's own time.
                _ => match e.metadata().await.and_then(|m| m.modified()) {
                    Ok(t) => chrono::DateTime::<chrono::Utc>::from(t)
                        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                    Err(_) => continue,
                },
            };
            if created.as_str() < before {
                out.push(id);
            }
        }
        Ok(out)
    }
}
