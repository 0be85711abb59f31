//! The attachment storage contract: one suite every [`BlobStore`] backend
//! passes. Each check is a `pub async fn` over `&dyn BlobStore`; [`run_all`]
//! runs them in order on a fresh store. `tests/blobs_contract.rs` calls it
//! for the files backend and for GridFS.
#![allow(clippy::unwrap_used, missing_docs)]

use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use sha2::Digest;

use super::*;

fn user() -> UserId {
    UserId::generate()
}

fn new_blob(uploader: &UserId, room: &RoomId, name: &str, ct: &str) -> NewBlob {
    NewBlob {
        id: AttachmentId::generate(),
        uploader: uploader.clone(),
        room_id: room.clone(),
        filename: name.into(),
        content_type: ct.into(),
        width: None,
        height: None,
    }
}

/// `data` as a stream of `chunk`-sized pieces.
pub fn chunked(data: &[u8], chunk: usize) -> ByteStream {
    let parts: Vec<Result<Bytes, BlobError>> = data
        .chunks(chunk.max(1))
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    Box::pin(futures_util::stream::iter(parts))
}

/// Deterministic bytes that differ at every offset (no repeating chunks).
pub fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1])
        .collect()
}

/// Everything a stream yields.
pub async fn collect(mut s: ByteStream) -> Result<Vec<u8>, BlobError> {
    let mut out = Vec::new();
    while let Some(c) = s.next().await {
        out.extend_from_slice(&c?);
    }
    Ok(out)
}

/// Runs every check.
pub async fn run_all(s: &dyn BlobStore) {
    put_meta_and_read_back(s).await;
    ranges(s).await;
    refused_uploads_leave_nothing(s).await;
    attach_lifecycle(s).await;
    attach_to_message_is_all_or_nothing(s).await;
    delete_removes_everything(s).await;
    sweep_removes_only_old_unattached(s).await;
}

/// Size and SHA-256 are computed while writing; the bytes come back whole.
pub async fn put_meta_and_read_back(s: &dyn BlobStore) {
    let (u, r) = (user(), RoomId::generate());
    let data = pattern(700 * 1024 + 17);
    let mut nb = new_blob(&u, &r, "big.bin", "application/octet-stream");
    nb.width = Some(640);
    nb.height = Some(480);
    let id = nb.id.clone();
    let meta = s.put(nb, chunked(&data, 10_000), 1 << 30).await.unwrap();
    assert_eq!(meta.id, id);
    assert_eq!(meta.size, data.len() as u64);
    assert_eq!(meta.sha256, hex::encode(sha2::Sha256::digest(&data)));
    assert_eq!((meta.width, meta.height), (Some(640), Some(480)));
    assert!(meta.attached.is_none());
    assert!(!meta.created_at.is_empty());
    let again = s.meta(&id).await.unwrap().expect("stored");
    assert_eq!(again, meta);
    let back = collect(s.read(&id, 0..meta.size).await.unwrap())
        .await
        .unwrap();
    assert!(back == data, "bytes differ");
    assert!(s.meta(&AttachmentId::generate()).await.unwrap().is_none());
    assert!(matches!(
        s.read(&AttachmentId::generate(), 0..1).await,
        Err(BlobError::NotFound)
    ));
}

/// Any byte range, across chunk boundaries too.
pub async fn ranges(s: &dyn BlobStore) {
    let (u, r) = (user(), RoomId::generate());
    let data = pattern(600 * 1024);
    let nb = new_blob(&u, &r, "r.bin", "application/octet-stream");
    let id = nb.id.clone();
    s.put(nb, chunked(&data, 65_536), 1 << 30).await.unwrap();
    let n = data.len() as u64;
    for (a, b) in [
        (0, 1),
        (0, 10),
        (5, 6),
        (1000, 300_000),
        (261_119, 261_121),
        (255 * 1024, 510 * 1024),
        (n - 1, n),
        (17, n),
        (0, n),
    ] {
        let got = collect(s.read(&id, a..b).await.unwrap()).await.unwrap();
        assert!(
            got == data[a as usize..b as usize],
            "range {a}..{b}: {} bytes",
            got.len()
        );
    }
}

/// Too large, empty or a failing body: an error, and no trace afterwards.
pub async fn refused_uploads_leave_nothing(s: &dyn BlobStore) {
    let (u, r) = (user(), RoomId::generate());
    let far = "9999-12-31T23:59:59.999Z";

    let nb = new_blob(&u, &r, "big", "application/octet-stream");
    let id = nb.id.clone();
    let err = s
        .put(nb, chunked(&pattern(300 * 1024), 4096), 100 * 1024)
        .await
        .unwrap_err();
    assert!(
        matches!(err, BlobError::TooLarge { max } if max == 100 * 1024),
        "{err:?}"
    );
    assert!(s.meta(&id).await.unwrap().is_none());
    assert!(!s
        .unattached_before(far, 100_000)
        .await
        .unwrap()
        .contains(&id));

    let nb = new_blob(&u, &r, "empty", "text/plain");
    let id = nb.id.clone();
    let err = s.put(nb, chunked(&[], 1), 1000).await.unwrap_err();
    assert!(matches!(err, BlobError::Empty), "{err:?}");
    assert!(s.meta(&id).await.unwrap().is_none());

    let nb = new_blob(&u, &r, "cut", "text/plain");
    let id = nb.id.clone();
    let body: ByteStream = Box::pin(futures_util::stream::iter(vec![
        Ok(Bytes::from_static(b"some bytes")),
        Err(BlobError::Body("connection reset".into())),
    ]));
    let err = s.put(nb, body, 1000).await.unwrap_err();
    assert!(matches!(err, BlobError::Body(_)), "{err:?}");
    assert!(s.meta(&id).await.unwrap().is_none());
    assert!(!s
        .unattached_before(far, 100_000)
        .await
        .unwrap()
        .contains(&id));

    // Exactly the limit is fine.
    let nb = new_blob(&u, &r, "exact", "text/plain");
    let m = s.put(nb, chunked(&pattern(1000), 300), 1000).await.unwrap();
    assert_eq!(m.size, 1000);
}

/// Binding to a message: idempotent, exclusive, reversible; bound files
/// are not the sweeper's.
pub async fn attach_lifecycle(s: &dyn BlobStore) {
    let (u, r) = (user(), RoomId::generate());
    let far = "9999-12-31T23:59:59.999Z";
    let nb = new_blob(&u, &r, "a.txt", "text/plain");
    let id = nb.id.clone();
    s.put(nb, chunked(b"hello", 2), 100).await.unwrap();
    assert!(s
        .unattached_before(far, 100_000)
        .await
        .unwrap()
        .contains(&id));
    assert!(!s
        .unattached_before("2000-01-01T00:00:00.000Z", 100_000)
        .await
        .unwrap()
        .contains(&id));

    let to = Attached {
        room_id: r.clone(),
        message_id: MessageId::generate(),
    };
    let m = s.mark_attached(&id, &to).await.unwrap();
    assert_eq!(m.attached.as_ref(), Some(&to));
    assert_eq!(
        s.meta(&id).await.unwrap().unwrap().attached,
        Some(to.clone())
    );
    // The same message again: fine; another: Conflict.
    s.mark_attached(&id, &to).await.unwrap();
    let other = Attached {
        room_id: r.clone(),
        message_id: MessageId::generate(),
    };
    assert!(matches!(
        s.mark_attached(&id, &other).await,
        Err(BlobError::Conflict)
    ));
    assert!(matches!(
        s.mark_attached(&AttachmentId::generate(), &to).await,
        Err(BlobError::NotFound)
    ));
    assert!(!s
        .unattached_before(far, 100_000)
        .await
        .unwrap()
        .contains(&id));
    assert!(!s.delete_unattached(&id).await.unwrap());
    assert!(s.meta(&id).await.unwrap().is_some(), "bound files stay");

    // Detach only from the message it is bound to.
    assert!(!s.detach(&id, &other).await.unwrap());
    assert!(s.detach(&id, &to).await.unwrap());
    assert!(s.meta(&id).await.unwrap().unwrap().attached.is_none());
    assert!(s
        .unattached_before(far, 100_000)
        .await
        .unwrap()
        .contains(&id));
    assert!(s.delete_unattached(&id).await.unwrap());
    assert!(s.meta(&id).await.unwrap().is_none());
}

/// [`attach_to_message`] checks every id first and binds all or none.
pub async fn attach_to_message_is_all_or_nothing(s: &dyn BlobStore) {
    let (u, r) = (user(), RoomId::generate());
    let mine = new_blob(&u, &r, "mine.txt", "text/plain");
    let mine_id = mine.id.clone();
    s.put(mine, chunked(b"mine", 4), 100).await.unwrap();
    let theirs = new_blob(&user(), &r, "theirs.txt", "text/plain");
    let theirs_id = theirs.id.clone();
    s.put(theirs, chunked(b"theirs", 4), 100).await.unwrap();
    let elsewhere = new_blob(&u, &RoomId::generate(), "else.txt", "text/plain");
    let elsewhere_id = elsewhere.id.clone();
    s.put(elsewhere, chunked(b"else", 4), 100).await.unwrap();
    let msg = MessageId::generate();

    for bad in [&theirs_id, &elsewhere_id] {
        let err = attach_to_message(s, &[mine_id.clone(), bad.clone()], &r, &msg, &u)
            .await
            .unwrap_err();
        assert!(matches!(err, BlobError::Invalid { .. }), "{err:?}");
        assert!(s.meta(&mine_id).await.unwrap().unwrap().attached.is_none());
    }
    let err = attach_to_message(s, &[mine_id.clone(), mine_id.clone()], &r, &msg, &u)
        .await
        .unwrap_err();
    assert!(matches!(err, BlobError::Invalid { .. }), "{err:?}");
    assert!(matches!(
        parse_ids(&["../x".into()]),
        Err(BlobError::Invalid {
            code: "invalid_request",
            ..
        })
    ));
    assert_eq!(
        parse_ids(&[mine_id.to_string()]).unwrap(),
        vec![mine_id.clone()]
    );
    let err = attach_to_message(s, &[AttachmentId::generate()], &r, &msg, &u)
        .await
        .unwrap_err();
    assert!(matches!(err, BlobError::NotFound), "{err:?}");

    let out = attach_to_message(s, std::slice::from_ref(&mine_id), &r, &msg, &u)
        .await
        .unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].id, mine_id.to_string());
    assert_eq!(out[0].size, 4);
    // Once bound, it cannot go with another message.
    let err = attach_to_message(s, &[mine_id], &r, &MessageId::generate(), &u)
        .await
        .unwrap_err();
    assert!(matches!(err, BlobError::Conflict), "{err:?}");
}

/// `delete` removes bytes and metadata, bound or not; twice is `false`.
pub async fn delete_removes_everything(s: &dyn BlobStore) {
    let (u, r) = (user(), RoomId::generate());
    let nb = new_blob(&u, &r, "d.bin", "application/octet-stream");
    let id = nb.id.clone();
    s.put(nb, chunked(&pattern(300 * 1024), 50_000), 1 << 20)
        .await
        .unwrap();
    let to = Attached {
        room_id: r,
        message_id: MessageId::generate(),
    };
    s.mark_attached(&id, &to).await.unwrap();
    assert!(s.delete(&id).await.unwrap());
    assert!(s.meta(&id).await.unwrap().is_none());
    assert!(matches!(s.read(&id, 0..1).await, Err(BlobError::NotFound)));
    assert!(!s.delete(&id).await.unwrap());
}

/// [`sweeper::sweep_once`] removes old unattached uploads and keeps bound
/// ones and fresh ones.
pub async fn sweep_removes_only_old_unattached(s: &dyn BlobStore) {
    let (u, r) = (user(), RoomId::generate());
    let old = new_blob(&u, &r, "old.txt", "text/plain");
    let old_id = old.id.clone();
    s.put(old, chunked(b"old", 3), 100).await.unwrap();
    let bound = new_blob(&u, &r, "bound.txt", "text/plain");
    let bound_id = bound.id.clone();
    s.put(bound, chunked(b"bound", 3), 100).await.unwrap();
    s.mark_attached(
        &bound_id,
        &Attached {
            room_id: r.clone(),
            message_id: MessageId::generate(),
        },
    )
    .await
    .unwrap();
    let removed = sweeper::sweep_once(s, Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(removed, 0, "nothing is an hour old");
    let far = "9999-12-31T23:59:59.999Z";
    assert!(sweeper::sweep_before(s, far).await.unwrap() >= 1);
    assert!(s.meta(&old_id).await.unwrap().is_none());
    assert!(s.meta(&bound_id).await.unwrap().is_some());
}
