//! What an upload goes through before its bytes are stored: the file name
//! is sanitised, the content type parsed, the first bytes read to check an
//! image type against its magic bytes (`infer`) and to find its width and
//! height (`imagesize`); then the whole body streams into the store, which
//! stops at the size limit.

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;

use super::{AttachmentId, BlobError, BlobMeta, BlobStore, ByteStream, NewBlob};
use crate::domain::{RoomId, UserId};

/// Longest file name kept, in bytes (cut at a character boundary).
pub const FILENAME_MAX_BYTES: usize = 255;
/// Bytes read before deciding about the type and dimensions: enough for the
/// headers of every common image format (JPEG metadata before the frame
/// header included).
const HEAD_BYTES: usize = 256 * 1024;
/// Longest `Content-Type` accepted.
const CONTENT_TYPE_MAX: usize = 255;

/// An upload as it arrives.
#[derive(Debug, Clone)]
pub struct Upload {
    pub uploader: UserId,
    pub room_id: RoomId,
    /// The raw `?filename=`; `None` or empty becomes `attachment`.
    pub filename: Option<String>,
    /// The raw `Content-Type`; `None` becomes `application/octet-stream`.
    pub content_type: Option<String>,
}

/// A file name safe to store and to put into a header: no path (only what
/// follows the last `/` or `\`), no control characters, no leading dots,
/// at most [`FILENAME_MAX_BYTES`]; `attachment` when nothing is left.
pub fn sanitize_filename(raw: &str) -> String {
    let base = raw.rsplit(['/', '\\']).next().unwrap_or("");
    let cleaned: String = base
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let cleaned = cleaned.trim().trim_start_matches('.').trim();
    let mut out = String::new();
    for c in cleaned.chars() {
        if out.len() + c.len_utf8() > FILENAME_MAX_BYTES {
            break;
        }
        out.push(c);
    }
    let out = out.trim_end().to_owned();
    if out.is_empty() {
        "attachment".to_owned()
    } else {
        out
    }
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
}

/// A `type/subtype[; params]` media type, its type and subtype lowercased;
/// `None` means `application/octet-stream`.
pub fn normalize_content_type(raw: Option<&str>) -> Result<String, BlobError> {
    let Some(raw) = raw.map(str::trim).filter(|s| !s.is_empty()) else {
        return Ok("application/octet-stream".to_owned());
    };
    let bad = || {
        BlobError::invalid(
            "invalid_content_type",
            "Content-Type must be a media type such as image/png",
        )
    };
    if raw.len() > CONTENT_TYPE_MAX
        || raw
            .bytes()
            .any(|b| !(b == b'\t' || (b' '..=b'~').contains(&b)))
    {
        return Err(bad());
    }
    let (essence, params) = match raw.split_once(';') {
        Some((e, p)) => (e.trim(), Some(p.trim())),
        None => (raw, None),
    };
    let (ty, sub) = essence.split_once('/').ok_or_else(bad)?;
    if !is_token(ty) || !is_token(sub) {
        return Err(bad());
    }
    let essence = format!("{}/{}", ty.to_ascii_lowercase(), sub.to_ascii_lowercase());
    Ok(match params.filter(|p| !p.is_empty()) {
        Some(p) => format!("{essence}; {p}"),
        None => essence,
    })
}

/// The media type without parameters.
fn essence(content_type: &str) -> &str {
    content_type.split(';').next().unwrap_or("").trim()
}

/// Other names of the image types `infer` reports.
fn canonical_image(essence: &str) -> &str {
    match essence {
        "image/jpg" | "image/pjpeg" => "image/jpeg",
        "image/x-png" => "image/png",
        "image/x-icon" => "image/vnd.microsoft.icon",
        "image/x-ms-bmp" | "image/x-bmp" => "image/bmp",
        "image/heic" => "image/heif",
        other => other,
    }
}

/// Checks an `image/*` type against the first bytes; width and height of an
/// image when its header is within `head`.
pub fn check_image(
    content_type: &str,
    head: &[u8],
) -> Result<(Option<u32>, Option<u32>), BlobError> {
    let claimed = essence(content_type);
    if !claimed.starts_with("image/") {
        return Ok((None, None));
    }
    let detected = infer::get(head);
    if claimed == "image/svg+xml" {
        // Text: nothing to measure, but a binary format is not SVG.
        return match detected {
            Some(t) if t.matcher_type() != infer::MatcherType::Text => {
                Err(mismatch(claimed, Some(t.mime_type())))
            }
            _ => Ok((None, None)),
        };
    }
    match detected {
        Some(t)
            if t.matcher_type() == infer::MatcherType::Image
                && t.mime_type() == canonical_image(claimed) => {}
        other => return Err(mismatch(claimed, other.map(|t| t.mime_type()))),
    }
    Ok(match imagesize::blob_size(head) {
        Ok(s) => (u32::try_from(s.width).ok(), u32::try_from(s.height).ok()),
        Err(_) => (None, None),
    })
}

fn mismatch(claimed: &str, detected: Option<&str>) -> BlobError {
    let what = match detected {
        Some(d) => format!("the bytes are {d}"),
        None => "the bytes are not an image of a known type".to_owned(),
    };
    BlobError::invalid(
        "content_type_mismatch",
        format!("Content-Type is {claimed} but {what}"),
    )
}

/// Validates and stores an upload, reading `body` as it streams (never more
/// than the first [`HEAD_BYTES`] plus one chunk in memory).
pub async fn ingest(
    store: &dyn BlobStore,
    up: Upload,
    mut body: ByteStream,
    max_bytes: u64,
) -> Result<BlobMeta, BlobError> {
    let filename = sanitize_filename(up.filename.as_deref().unwrap_or(""));
    let content_type = normalize_content_type(up.content_type.as_deref())?;
    let want = HEAD_BYTES.min(usize::try_from(max_bytes.saturating_add(1)).unwrap_or(HEAD_BYTES));
    let mut head = BytesMut::new();
    let mut ended = false;
    while head.len() < want {
        match body.next().await {
            Some(chunk) => head.extend_from_slice(&chunk?),
            None => {
                ended = true;
                break;
            }
        }
    }
    if head.len() as u64 > max_bytes {
        return Err(BlobError::TooLarge { max: max_bytes });
    }
    if head.is_empty() {
        return Err(BlobError::Empty);
    }
    let (width, height) = check_image(&content_type, &head)?;
    let head: Bytes = head.freeze();
    let first = futures_util::stream::once(async move { Ok::<_, BlobError>(head) });
    let rest: ByteStream = if ended {
        Box::pin(first)
    } else {
        Box::pin(first.chain(body))
    };
    let new = NewBlob {
        id: AttachmentId::generate(),
        uploader: up.uploader,
        room_id: up.room_id,
        filename,
        content_type,
        width,
        height,
    };
    store.put(new, rest, max_bytes).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filenames_lose_paths_and_controls() {
        assert_eq!(sanitize_filename("../../etc/passwd"), "passwd");
        assert_eq!(sanitize_filename("C:\\x\\y.txt"), "y.txt");
        assert_eq!(sanitize_filename("a\u{0}b\nc.png"), "a b c.png");
        assert_eq!(sanitize_filename(".."), "attachment");
        assert_eq!(sanitize_filename(""), "attachment");
        assert_eq!(sanitize_filename(".hidden"), "hidden");
        let long = "é".repeat(300);
        let s = sanitize_filename(&long);
        assert!(s.len() <= FILENAME_MAX_BYTES && s.chars().all(|c| c == 'é'));
    }

    #[test]
    fn content_types_parse() {
        assert_eq!(
            normalize_content_type(None).unwrap(),
            "application/octet-stream"
        );
        assert_eq!(
            normalize_content_type(Some("Image/PNG")).unwrap(),
            "image/png"
        );
        assert_eq!(
            normalize_content_type(Some("text/plain;charset=utf-8")).unwrap(),
            "text/plain; charset=utf-8"
        );
        assert!(normalize_content_type(Some("nonsense")).is_err());
        assert!(normalize_content_type(Some("a/b\u{7f}")).is_err());
    }

    #[test]
    fn images_are_checked() {
        let png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x03\0\0\0\x02\x08\x06\0\0\0\0\0\0\0";
        assert_eq!(check_image("image/png", png).unwrap(), (Some(3), Some(2)));
        assert!(matches!(
            check_image("image/jpeg", png),
            Err(BlobError::Invalid {
                code: "content_type_mismatch",
                ..
            })
        ));
        assert!(check_image("image/png", b"hello").is_err());
        assert_eq!(check_image("text/plain", b"hello").unwrap(), (None, None));
        assert_eq!(
            check_image("image/svg+xml", b"<svg/>").unwrap(),
            (None, None)
        );
        assert!(check_image("image/svg+xml", png).is_err());
    }
}
