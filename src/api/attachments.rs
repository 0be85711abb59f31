//! Attachments over HTTP: `POST /rooms/{id}/attachments` takes the raw file
//! as the body (streamed into the blob store, stopped at
//! `limits.attachment_max_bytes`; not bound by the JSON body limit), and
//! `GET /attachments/{id}` serves it with `ETag`, `If-None-Match` and single
//! byte `Range`s.

use std::ops::Range;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::TryStreamExt;
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{ApiResult, AppState, Error, ErrorBody, ErrorDetail, Json, Path, Query};
use crate::auth::AuthUser;
use crate::blobs::ingest::{ingest, Upload};
use crate::blobs::{Attachment, AttachmentId, BlobError, BlobMeta};
use crate::domain::{RoomId, UserId};

/// Routes under `/api/v1`: the upload (without the JSON body limit) and the download.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(upload))
        // The upload enforces its own, larger limit while it streams.
        .layer(DefaultBodyLimit::disable())
        .merge(OpenApiRouter::new().routes(routes!(download)))
}

/// The contract's error for an attachment failure.
pub fn blob_error(e: BlobError) -> Error {
    match e {
        BlobError::NotFound => Error::NotFound("no such attachment".into()),
        BlobError::TooLarge { .. } => Error::PayloadTooLarge,
        BlobError::Empty => Error::BadRequest {
            code: "empty_attachment",
            message: "the upload has no bytes".into(),
        },
        BlobError::Invalid { code, message } => Error::BadRequest { code, message },
        BlobError::Conflict => Error::Conflict(
            "conflict",
            "the attachment belongs to another message".into(),
        ),
        BlobError::Body(m) => Error::bad(format!("reading the upload failed: {m}")),
        BlobError::Unavailable(m) => Error::Unavailable(m),
        BlobError::Internal(m) => Error::Internal(m),
    }
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct UploadParams {
    /// The file's name (paths and control characters are dropped; at most
    /// 255 bytes); default `attachment`.
    filename: Option<String>,
}

/// Whether `user` is a member of room `id`: 404 if the room is missing, 403 if not.
async fn require_member(st: &AppState, id: &RoomId, user: &UserId) -> ApiResult<()> {
    let room = st
        .hub
        .stores
        .rooms
        .room(id)
        .await?
        .ok_or_else(|| Error::NotFound("no such room".into()))?;
    if room.member(user).is_none() {
        return Err(Error::not_member());
    }
    Ok(())
}

/// Uploads a file to a room (members only) as the raw body with its
/// `Content-Type`. The answer goes into a message's `attachments`.
#[utoipa::path(post, path = "/rooms/{id}/attachments", tag = "rooms", security(("bearer" = [])),
    params(("id" = String, Path, description = "room id"), UploadParams),
    request_body(content = String, content_type = "application/octet-stream",
        description = "the raw file; any media type, sent as its `Content-Type` (image types are checked against the bytes)"),
    responses(
        (status = 201, description = "stored", body = Attachment),
        (status = 400, description = "`empty_attachment`, `content_type_mismatch` (the bytes contradict an image type), `invalid_content_type`, `invalid_request`", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 403, description = "`forbidden`: not a member", body = ErrorBody),
        (status = 404, description = "`not_found`: no such room", body = ErrorBody),
        (status = 413, description = "`payload_too_large`: over `limits.attachment_max_bytes`", body = ErrorBody),
        (status = 503, description = "`unavailable`: storage unreachable; retry", body = ErrorBody),
    ))]
#[tracing::instrument(skip_all, fields(user = %user.id))]
async fn upload(
    State(st): State<AppState>,
    user: AuthUser,
    Path(id): Path<String>,
    Query(q): Query<UploadParams>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<(StatusCode, Json<Attachment>)> {
    let room = RoomId::parse(&id).map_err(|_| Error::NotFound("no such room".into()))?;
    require_member(&st, &room, &user.id).await?;
    let max = st.settings.limits.attachment_max_bytes;
    // A declared length over the limit is refused before reading anything.
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max) {
        return Err(Error::PayloadTooLarge);
    }
    let content_type = match headers.get(header::CONTENT_TYPE) {
        None => None,
        Some(v) => Some(v.to_str().map_err(|_| Error::BadRequest {
            code: "invalid_content_type",
            message: "Content-Type must be a media type such as image/png".into(),
        })?),
    };
    let stream = body
        .into_data_stream()
        .map_err(|e| BlobError::Body(e.to_string()));
    let meta = ingest(
        st.blobs.as_ref(),
        Upload {
            uploader: user.id.clone(),
            room_id: room,
            filename: q.filename,
            content_type: content_type.map(str::to_owned),
        },
        Box::pin(stream),
        max,
    )
    .await
    .map_err(blob_error)?;
    metrics::counter!("chatd_attachments_uploaded_total").increment(1);
    Ok((StatusCode::CREATED, Json(meta.public())))
}

/// The uploader, or a member of the room of the message it is attached to.
async fn may_read(st: &AppState, meta: &BlobMeta, user: &UserId) -> ApiResult<()> {
    if &meta.uploader == user {
        return Ok(());
    }
    let Some(at) = &meta.attached else {
        return Err(Error::Forbidden(
            "only the uploader may read an attachment not yet posted".into(),
        ));
    };
    match st.stores.rooms.room(&at.room_id).await? {
        Some(room) if room.member(user).is_some() => Ok(()),
        _ => Err(Error::not_member()),
    }
}

/// What a `Range` header asks of a file of `size` bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum RangeAsk {
    /// No usable range: the whole file (multiple ranges are served whole too).
    Full,
    /// One satisfiable range.
    Part(Range<u64>),
    /// A range that starts past the end: 416.
    Unsatisfiable,
}

/// Parses `bytes=a-b`, `bytes=a-` and `bytes=-n`; anything malformed is
/// ignored (RFC 9110: a server may ignore `Range`).
pub fn parse_range(h: &str, size: u64) -> RangeAsk {
    let Some((unit, spec)) = h.trim().split_once('=') else {
        return RangeAsk::Full;
    };
    if !unit.trim().eq_ignore_ascii_case("bytes") || spec.contains(',') {
        return RangeAsk::Full;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeAsk::Full;
    };
    let (a, b) = (a.trim(), b.trim());
    let num = |s: &str| {
        (!s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()))
            .then(|| s.parse::<u64>().ok())
            .flatten()
    };
    match (a.is_empty(), num(a), num(b)) {
        (true, _, Some(0)) => RangeAsk::Unsatisfiable,
        (true, _, Some(n)) => RangeAsk::Part(size - n.min(size)..size),
        (false, Some(start), _) if start >= size => {
            if b.is_empty() || num(b).is_some_and(|end| end >= start) {
                RangeAsk::Unsatisfiable
            } else {
                RangeAsk::Full
            }
        }
        (false, Some(start), None) if b.is_empty() => RangeAsk::Part(start..size),
        (false, Some(start), Some(end)) if end >= start => {
            RangeAsk::Part(start..end.saturating_add(1).min(size))
        }
        _ => RangeAsk::Full,
    }
}

/// `attachment; filename="ascii"; filename*=UTF-8''percent-encoded` (RFC 6266 / 8187).
pub fn content_disposition(filename: &str) -> String {
    let ascii: String = filename
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '"' && c != '\\' || c == ' ' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let mut encoded = String::new();
    for b in filename.bytes() {
        if b.is_ascii_alphanumeric() || b"!#$&+-.^_`|~".contains(&b) {
            encoded.push(b as char);
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    format!("attachment; filename=\"{ascii}\"; filename*=UTF-8''{encoded}")
}

/// Whether an `If-None-Match` / `If-Range` list names `etag` (weak comparison).
fn etag_matches(list: &str, etag: &str) -> bool {
    list.split(',').any(|t| {
        let t = t.trim();
        t == "*" || t.trim_start_matches("W/") == etag
    })
}

fn header_value(s: &str) -> ApiResult<HeaderValue> {
    HeaderValue::from_str(s).map_err(|e| Error::Internal(format!("header value: {e}")))
}

/// Downloads an attachment: the uploader, or members of the room of the
/// message it is attached to.
#[utoipa::path(get, path = "/attachments/{id}", tag = "rooms", security(("bearer" = [])),
    params(
        ("id" = String, Path, description = "attachment id"),
        ("Range" = Option<String>, Header, description = "one range: `bytes=a-b`, `bytes=a-` or `bytes=-n`"),
        ("If-None-Match" = Option<String>, Header, description = "the ETag held: 304 if unchanged"),
    ),
    responses(
        (status = 200, description = "the bytes, with `Content-Type`, `Content-Length`, `Content-Disposition`, `ETag` (the quoted sha256), `Accept-Ranges`", body = String, content_type = "application/octet-stream"),
        (status = 206, description = "the requested range, with `Content-Range`", body = String, content_type = "application/octet-stream"),
        (status = 304, description = "not modified (`If-None-Match` matched)"),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 403, description = "`forbidden`: neither the uploader nor a member of the room where it was posted", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
        (status = 416, description = "`range_not_satisfiable`, with `Content-Range: bytes */size`", body = ErrorBody),
        (status = 503, description = "`unavailable`: storage unreachable; retry", body = ErrorBody),
    ))]
#[tracing::instrument(skip_all, fields(user = %user.id))]
async fn download(
    State(st): State<AppState>,
    user: AuthUser,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let id = AttachmentId::parse(&id).map_err(blob_error)?;
    let meta = st
        .blobs
        .meta(&id)
        .await
        .map_err(blob_error)?
        .ok_or_else(|| blob_error(BlobError::NotFound))?;
    may_read(&st, &meta, &user.id).await?;
    let etag = format!("\"{}\"", meta.sha256);
    let etag_value = header_value(&etag)?;
    let hv = |name: header::HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    if hv(header::IF_NONE_MATCH).is_some_and(|l| etag_matches(l, &etag)) {
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag_value)]).into_response());
    }
    // If-Range: a range only for the representation the client holds.
    let range_ok = hv(header::IF_RANGE).is_none_or(|l| etag_matches(l, &etag));
    let ask = match hv(header::RANGE) {
        Some(r) if range_ok => parse_range(r, meta.size),
        _ => RangeAsk::Full,
    };
    let (status, range) = match ask {
        RangeAsk::Full => (StatusCode::OK, 0..meta.size),
        RangeAsk::Part(r) => (StatusCode::PARTIAL_CONTENT, r),
        RangeAsk::Unsatisfiable => {
            let body = ErrorBody {
                error: ErrorDetail {
                    code: "range_not_satisfiable",
                    message: format!("the attachment has {} bytes", meta.size),
                },
            };
            return Ok((
                StatusCode::RANGE_NOT_SATISFIABLE,
                [(
                    header::CONTENT_RANGE,
                    header_value(&format!("bytes */{}", meta.size))?,
                )],
                axum::Json(body),
            )
                .into_response());
        }
    };
    let stream = st
        .blobs
        .read(&id, range.clone())
        .await
        .map_err(blob_error)?;
    let mut resp = Response::new(Body::from_stream(stream));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, header_value(&meta.content_type)?);
    h.insert(
        header::CONTENT_LENGTH,
        HeaderValue::from(range.end - range.start),
    );
    h.insert(
        header::CONTENT_DISPOSITION,
        header_value(&content_disposition(&meta.filename))?,
    );
    h.insert(header::ETAG, etag_value);
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, no-cache"),
    );
    // Never render an upload as a page of this origin.
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("sandbox; default-src 'none'"),
    );
    if status == StatusCode::PARTIAL_CONTENT {
        h.insert(
            header::CONTENT_RANGE,
            header_value(&format!(
                "bytes {}-{}/{}",
                range.start,
                range.end - 1,
                meta.size
            ))?,
        );
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse() {
        assert_eq!(parse_range("bytes=0-9", 100), RangeAsk::Part(0..10));
        assert_eq!(parse_range("bytes=90-", 100), RangeAsk::Part(90..100));
        assert_eq!(parse_range("bytes=-10", 100), RangeAsk::Part(90..100));
        assert_eq!(parse_range("bytes=-1000", 100), RangeAsk::Part(0..100));
        assert_eq!(parse_range("bytes=50-1000", 100), RangeAsk::Part(50..100));
        assert_eq!(parse_range("bytes=100-", 100), RangeAsk::Unsatisfiable);
        assert_eq!(parse_range("bytes=100-200", 100), RangeAsk::Unsatisfiable);
        assert_eq!(parse_range("bytes=-0", 100), RangeAsk::Unsatisfiable);
        assert_eq!(parse_range("bytes=5-1", 100), RangeAsk::Full);
        assert_eq!(parse_range("bytes=0-1,5-6", 100), RangeAsk::Full);
        assert_eq!(parse_range("items=0-1", 100), RangeAsk::Full);
        assert_eq!(parse_range("bytes=x-1", 100), RangeAsk::Full);
    }

    #[test]
    fn dispositions_encode() {
        assert_eq!(
            content_disposition("a b.txt"),
            "attachment; filename=\"a b.txt\"; filename*=UTF-8''a%20b.txt"
        );
        assert_eq!(
            content_disposition("Grüße \"x\".pdf"),
            "attachment; filename=\"Gr__e _x_.pdf\"; filename*=UTF-8''Gr%C3%BC%C3%9Fe%20%22x%22.pdf"
        );
    }
}
