//! The blob store's side of `chatd export` / `chatd import`: every
//! attachment as an `attachment` record (its [`BlobMeta`]) followed by its
//! file in `attachment_chunk` records (see `crate::store::transfer`, which
//! owns the line format).
//!
//! Import restores each attachment with its id and metadata through
//! [`BlobStore::restore`], which checks the bytes against the record's size
//! and SHA-256. The target must not hold any of the ids. One attachment is
//! held in memory while it is read (attachments are bounded by the upload
//! limit). If the import fails, the attachments it restored are removed.

use std::sync::Arc;

use async_trait::async_trait;
use base64::Engine;
use bytes::Bytes;
use futures_util::StreamExt;

use super::{AttachmentId, BlobError, BlobMeta, BlobStore};
use crate::store::transfer::{
    AttachmentChunkRec, Counts, Dump, LineRx, Load, Record, RecordTx, TransferError, CHUNK_BYTES,
};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// The blob store that goes with the configured store, for export/import
/// (like [`super::open`], but a files store's writes in progress are kept).
pub async fn open(settings: &crate::config::Settings) -> Result<Arc<dyn BlobStore>, BlobError> {
    match settings.store.kind {
        crate::config::StoreKind::Mongodb => super::open(settings).await,
        crate::config::StoreKind::Sqlite => Ok(Arc::new(
            super::fs::FsBlobStore::open_beside(settings.data_dir().join("attachments")).await?,
        )),
    }
}

/// A blob store as the extra [`Dump`] / [`Load`] of a transfer.
pub struct BlobTransfer(pub Arc<dyn BlobStore>);

fn chunks_of(size: u64) -> u64 {
    size.div_ceil(CHUNK_BYTES as u64)
}

#[async_trait]
impl Dump for BlobTransfer {
    async fn totals(&self) -> Result<Counts, TransferError> {
        let all = self.0.list().await?;
        Ok(Counts {
            attachments: all.len() as u64,
            attachment_chunks: all.iter().map(|m| chunks_of(m.size)).sum(),
            ..Counts::default()
        })
    }

    async fn dump(&self, tx: RecordTx) -> Result<(), TransferError> {
        for meta in self.0.list().await? {
            let (id, size) = (meta.id.clone(), meta.size);
            send(&tx, Record::Attachment(meta)).await?;
            let mut bytes = self.0.read(&id, 0..size).await?;
            let mut buf: Vec<u8> = Vec::with_capacity(CHUNK_BYTES.min(size as usize));
            let mut offset = 0u64;
            loop {
                let next = bytes.next().await.transpose()?;
                let mut rest: &[u8] = next.as_deref().unwrap_or_default();
                while !rest.is_empty() {
                    let take = rest.len().min(CHUNK_BYTES - buf.len());
                    buf.extend_from_slice(&rest[..take]);
                    rest = &rest[take..];
                    if buf.len() == CHUNK_BYTES {
                        offset = send_chunk(&tx, &id, offset, &mut buf).await?;
                    }
                }
                if next.is_none() {
                    break;
                }
            }
            if !buf.is_empty() {
                offset = send_chunk(&tx, &id, offset, &mut buf).await?;
            }
            if offset != size {
                return Err(BlobError::Internal(format!(
                    "attachment {id}: read {offset} bytes, its metadata says {size}"
                ))
                .into());
            }
        }
        Ok(())
    }
}

async fn send(tx: &RecordTx, r: Record) -> Result<(), TransferError> {
    tx.send(Ok(r))
        .await
        .map_err(|_| crate::store::transfer::closed())
}

/// Sends `buf` as the chunk at `offset`, empties it; the next offset.
async fn send_chunk(
    tx: &RecordTx,
    id: &AttachmentId,
    offset: u64,
    buf: &mut Vec<u8>,
) -> Result<u64, TransferError> {
    let next = offset + buf.len() as u64;
    let rec = AttachmentChunkRec {
        id: id.clone(),
        offset,
        data: B64.encode(&buf),
    };
    buf.clear();
    send(tx, Record::AttachmentChunk(rec)).await?;
    Ok(next)
}

/// An attachment being read: its record's line, metadata and bytes so far.
struct Pending {
    line: u64,
    meta: BlobMeta,
    bytes: Vec<u8>,
}

#[async_trait]
impl Load for BlobTransfer {
    async fn load(&self, mut rx: LineRx) -> Result<Counts, TransferError> {
        let mut restored = Vec::new();
        let loaded = self.load_all(&mut rx, &mut restored).await;
        if loaded.is_err() {
            for id in &restored {
                if let Err(e) = self.0.delete(id).await {
                    tracing::warn!(%id, error = %e, "could not remove an imported attachment");
                }
            }
        }
        loaded
    }
}

impl BlobTransfer {
    async fn load_all(
        &self,
        rx: &mut LineRx,
        restored: &mut Vec<AttachmentId>,
    ) -> Result<Counts, TransferError> {
        let mut counts = Counts::default();
        let mut pending: Option<Pending> = None;
        while let Some(item) = rx.recv().await {
            let (line, r) = item?;
            let bad = |msg: String| TransferError::Format { line, msg };
            match r {
                Record::Attachment(meta) => {
                    if let Some(p) = pending.take() {
                        restored.push(self.finish(p).await?);
                    }
                    if restored.contains(&meta.id) || self.0.meta(&meta.id).await?.is_some() {
                        return Err(TransferError::NotEmpty(format!("attachment {}", meta.id)));
                    }
                    counts.attachments += 1;
                    let cap = usize::try_from(meta.size)
                        .unwrap_or(0)
                        .min(64 * CHUNK_BYTES);
                    pending = Some(Pending {
                        line,
                        meta,
                        bytes: Vec::with_capacity(cap),
                    });
                }
                Record::AttachmentChunk(c) => {
                    let Some(p) = pending.as_mut().filter(|p| p.meta.id == c.id) else {
                        return Err(bad(format!(
                            "a chunk of attachment {} that does not follow its attachment record",
                            c.id
                        )));
                    };
                    if c.offset != p.bytes.len() as u64 {
                        return Err(bad(format!(
                            "attachment {}: a chunk at offset {} where {} was expected",
                            c.id,
                            c.offset,
                            p.bytes.len()
                        )));
                    }
                    let data = B64
                        .decode(c.data.as_bytes())
                        .map_err(|e| bad(format!("attachment {}: bad base64: {e}", c.id)))?;
                    if data.len() > CHUNK_BYTES {
                        return Err(bad(format!(
                            "attachment {}: a chunk of {} bytes (at most {CHUNK_BYTES})",
                            c.id,
                            data.len()
                        )));
                    }
                    if p.bytes.len() as u64 + data.len() as u64 > p.meta.size {
                        return Err(bad(format!(
                            "attachment {}: more bytes than its size {}",
                            c.id, p.meta.size
                        )));
                    }
                    p.bytes.extend_from_slice(&data);
                    counts.attachment_chunks += 1;
                }
                _ => return Err(bad("not an attachment record".into())),
            }
        }
        if let Some(p) = pending.take() {
            restored.push(self.finish(p).await?);
        }
        Ok(counts)
    }

    /// Stores a completely read attachment (checking size and SHA-256).
    async fn finish(&self, p: Pending) -> Result<AttachmentId, TransferError> {
        let id = p.meta.id.clone();
        if p.bytes.len() as u64 != p.meta.size {
            return Err(TransferError::Incomplete(format!(
                "attachment {id} (line {}): {} of its {} bytes",
                p.line,
                p.bytes.len(),
                p.meta.size
            )));
        }
        let body = futures_util::stream::once(async move { Ok(Bytes::from(p.bytes)) });
        self.0.restore(p.meta, Box::pin(body)).await?;
        Ok(id)
    }
}
