//! Attachments over HTTP against a real node (files backend): upload and
//! download, Range, ETag, limits, content checks, access, and the sweeper.

mod common;

use std::time::{Duration, Instant};

use chatd::blobs::{self, AttachmentId, BlobStore};
use chatd::domain::{MessageId, RoomId, UserId};
use common::*;
use serde_json::Value;
use sha2::Digest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn crc32(data: &[u8]) -> u32 {
    let mut c = 0xffff_ffffu32;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// A valid RGBA PNG of `w`×`h` (zlib with one stored block).
fn png(w: u32, h: u32) -> Vec<u8> {
    let mut raw = Vec::new();
    for y in 0..h {
        raw.push(0);
        for x in 0..w {
            raw.extend_from_slice(&[(x * 40) as u8, (y * 40) as u8, 200, 255]);
        }
    }
    let (mut a, mut b) = (1u32, 0u32);
    for &x in &raw {
        a = (a + u32::from(x)) % 65521;
        b = (b + a) % 65521;
    }
    let mut z = vec![0x78, 0x01, 0x01];
    let len = raw.len() as u16;
    z.extend_from_slice(&len.to_le_bytes());
    z.extend_from_slice(&(!len).to_le_bytes());
    z.extend_from_slice(&raw);
    z.extend_from_slice(&((b << 16) | a).to_be_bytes());
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |ty: &[u8], data: &[u8]| {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut td = ty.to_vec();
        td.extend_from_slice(data);
        out.extend_from_slice(&td);
        out.extend_from_slice(&crc32(&td).to_be_bytes());
    };
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 6, 0, 0, 0]);
    chunk(b"IHDR", &ihdr);
    chunk(b"IDAT", &z);
    chunk(b"IEND", &[]);
    out
}

fn pct(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

async fn upload(
    app: &TestApp,
    token: &str,
    room: &str,
    filename: &str,
    content_type: Option<&str>,
    bytes: Vec<u8>,
) -> (u16, Value) {
    let mut r = app
        .http
        .post(app.url(&format!(
            "/api/v1/rooms/{room}/attachments?filename={}",
            pct(filename)
        )))
        .bearer_auth(token)
        .body(bytes);
    if let Some(ct) = content_type {
        r = r.header("content-type", ct);
    }
    let resp = r.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}")),
    )
}

async fn download(
    app: &TestApp,
    token: &str,
    id: &str,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let mut r = app
        .http
        .get(app.url(&format!("/api/v1/attachments/{id}")))
        .bearer_auth(token);
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    r.send().await.unwrap()
}

/// The files backend of a node, opened beside it (to bind uploads to a
/// message the way the message side will).
async fn blob_store(app: &TestApp) -> blobs::fs::FsBlobStore {
    blobs::fs::FsBlobStore::open(app.dir.path().join("attachments"))
        .await
        .unwrap()
}

async fn attach(app: &TestApp, id: &str, room: &str, uploader: &str) {
    let s = blob_store(app).await;
    blobs::attach_to_message(
        &s,
        &[AttachmentId::parse(id).unwrap()],
        &RoomId::parse(room).unwrap(),
        &MessageId::generate(),
        &UserId::parse(uploader).unwrap(),
    )
    .await
    .unwrap();
}

fn header<'a>(r: &'a reqwest::Response, name: &str) -> &'a str {
    r.headers()
        .get(name)
        .unwrap_or_else(|| panic!("no {name}"))
        .to_str()
        .unwrap()
}

#[tokio::test]
async fn upload_and_download_round_trip() {
    let app = spawn_app().await;
    let (alice, bob, carol) = (
        app.register("al").await,
        app.register("bo").await,
        app.register("ca").await,
    );
    let room = app.direct(&alice, &bob).await;
    let data = b"hello attachments, bytes 0123456789".to_vec();
    let (s, a) = upload(
        &app,
        &alice.token,
        &room,
        "../notes ü.txt",
        Some("text/plain; charset=utf-8"),
        data.clone(),
    )
    .await;
    assert_eq!(s, 201, "{a}");
    let id = a["id"].as_str().unwrap().to_owned();
    assert_eq!(a["filename"], "notes ü.txt");
    assert_eq!(a["content_type"], "text/plain; charset=utf-8");
    assert_eq!(a["size"], data.len());
    assert_eq!(a["sha256"], hex::encode(sha2::Sha256::digest(&data)));
    assert!(a.get("width").is_none() && a.get("height").is_none(), "{a}");

    let r = download(&app, &alice.token, &id, &[]).await;
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(header(&r, "content-type"), "text/plain; charset=utf-8");
    assert_eq!(header(&r, "content-length"), data.len().to_string());
    assert_eq!(
        header(&r, "content-disposition"),
        "attachment; filename=\"notes _.txt\"; filename*=UTF-8''notes%20%C3%BC.txt"
    );
    assert_eq!(
        header(&r, "etag"),
        format!("\"{}\"", a["sha256"].as_str().unwrap())
    );
    assert_eq!(header(&r, "accept-ranges"), "bytes");
    assert_eq!(header(&r, "x-content-type-options"), "nosniff");
    assert_eq!(r.bytes().await.unwrap().to_vec(), data);

    // Not yet posted: only the uploader reads it.
    let r = download(&app, &bob.token, &id, &[]).await;
    assert_eq!(r.status().as_u16(), 403);
    attach(&app, &id, &room, &alice.id).await;
    let r = download(&app, &bob.token, &id, &[]).await;
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.bytes().await.unwrap().to_vec(), data);
    let r = download(&app, &carol.token, &id, &[]).await;
    assert_eq!(r.status().as_u16(), 403);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "forbidden");
}

#[tokio::test]
async fn ranges_etags_and_not_modified() {
    let app = spawn_app().await;
    let (alice, bob) = (app.register("al").await, app.register("bo").await);
    let room = app.direct(&alice, &bob).await;
    let data: Vec<u8> = (0..100u8).collect();
    let (s, a) = upload(&app, &alice.token, &room, "r.bin", None, data.clone()).await;
    assert_eq!(s, 201, "{a}");
    assert_eq!(a["content_type"], "application/octet-stream");
    let id = a["id"].as_str().unwrap();
    let etag = format!("\"{}\"", a["sha256"].as_str().unwrap());

    let r = download(&app, &alice.token, id, &[("range", "bytes=2-5")]).await;
    assert_eq!(r.status().as_u16(), 206);
    assert_eq!(header(&r, "content-range"), "bytes 2-5/100");
    assert_eq!(header(&r, "content-length"), "4");
    assert_eq!(r.bytes().await.unwrap().to_vec(), data[2..6]);

    let r = download(&app, &alice.token, id, &[("range", "bytes=-3")]).await;
    assert_eq!(r.status().as_u16(), 206);
    assert_eq!(header(&r, "content-range"), "bytes 97-99/100");
    assert_eq!(r.bytes().await.unwrap().to_vec(), data[97..]);

    let r = download(&app, &alice.token, id, &[("range", "bytes=90-")]).await;
    assert_eq!(r.status().as_u16(), 206);
    assert_eq!(r.bytes().await.unwrap().to_vec(), data[90..]);

    let r = download(&app, &alice.token, id, &[("range", "bytes=100-")]).await;
    assert_eq!(r.status().as_u16(), 416);
    assert_eq!(header(&r, "content-range"), "bytes */100");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "range_not_satisfiable");

    // If-Range with another representation: the whole file.
    let r = download(
        &app,
        &alice.token,
        id,
        &[("range", "bytes=2-5"), ("if-range", "\"other\"")],
    )
    .await;
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.bytes().await.unwrap().len(), 100);

    let r = download(&app, &alice.token, id, &[("if-none-match", &etag)]).await;
    assert_eq!(r.status().as_u16(), 304);
    assert_eq!(header(&r, "etag"), etag);
    assert!(r.bytes().await.unwrap().is_empty());
    let r = download(
        &app,
        &alice.token,
        id,
        &[("if-none-match", "\"something-else\"")],
    )
    .await;
    assert_eq!(r.status().as_u16(), 200);
}

#[tokio::test]
async fn size_limit_is_413_and_the_json_limit_does_not_apply() {
    let app = spawn_app_with(|s| {
        s.limits.attachment_max_bytes = 300 * 1024;
        s.http.max_body_bytes = 1024;
    })
    .await;
    let (alice, bob) = (app.register("al").await, app.register("bo").await);
    let room = app.direct(&alice, &bob).await;
    // Over the JSON body limit, within the attachment limit.
    let (s, a) = upload(
        &app,
        &alice.token,
        &room,
        "ok.bin",
        None,
        vec![7; 300 * 1024],
    )
    .await;
    assert_eq!(s, 201, "{a}");
    assert_eq!(a["size"], 300 * 1024);
    let (s, v) = upload(
        &app,
        &alice.token,
        &room,
        "big.bin",
        None,
        vec![7; 300 * 1024 + 1],
    )
    .await;
    assert_eq!(s, 413, "{v}");
    assert_eq!(v["error"]["code"], "payload_too_large");
}

/// Sends a chunked upload of `total` bytes and never ends it: the answer
/// must come anyway, once the limit is passed.
async fn unterminated_chunked_upload(
    app: &TestApp,
    token: &str,
    room: &str,
    total: usize,
) -> String {
    let stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let (mut rd, mut wr) = tokio::io::split(stream);
    let head = format!(
        "POST /api/v1/rooms/{room}/attachments?filename=s.bin HTTP/1.1\r\nHost: t\r\n\
         Authorization: Bearer {token}\r\nContent-Type: application/octet-stream\r\n\
         Transfer-Encoding: chunked\r\n\r\n"
    );
    let writer = tokio::spawn(async move {
        wr.write_all(head.as_bytes()).await?;
        let piece = vec![b'x'; 16 * 1024];
        let mut sent = 0;
        while sent < total {
            let n = piece.len().min(total - sent);
            wr.write_all(format!("{n:x}\r\n").as_bytes()).await?;
            wr.write_all(&piece[..n]).await?;
            wr.write_all(b"\r\n").await?;
            sent += n;
        }
        wr.flush().await?;
        // Keep the request open: no terminating chunk.
        Ok::<_, std::io::Error>(wr)
    });
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(WAIT, rd.read(&mut buf))
        .await
        .expect("an answer before the body ends")
        .unwrap();
    drop(writer);
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test]
async fn streaming_uploads_stop_at_the_limit() {
    let app = spawn_app_with(|s| s.limits.attachment_max_bytes = 300 * 1024).await;
    let (alice, bob) = (app.register("al").await, app.register("bo").await);
    let room = app.direct(&alice, &bob).await;
    // Past the limit within the first bytes read, and well after them.
    for total in [300 * 1024 + 1, 420 * 1024] {
        let answer = unterminated_chunked_upload(&app, &alice.token, &room, total).await;
        assert!(answer.starts_with("HTTP/1.1 413"), "{total}: {answer}");
        assert!(answer.contains("payload_too_large"), "{answer}");
    }
    // Nothing was kept.
    let s = blob_store(&app).await;
    let far = "9999-12-31T23:59:59.999Z";
    assert!(s.unattached_before(far, 10).await.unwrap().is_empty());
}

#[tokio::test]
async fn bad_uploads_are_refused() {
    let app = spawn_app().await;
    let (alice, bob, carol) = (
        app.register("al").await,
        app.register("bo").await,
        app.register("ca").await,
    );
    let room = app.direct(&alice, &bob).await;

    let (s, v) = upload(
        &app,
        &alice.token,
        &room,
        "e.txt",
        Some("text/plain"),
        vec![],
    )
    .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (400, Some("empty_attachment")),
        "{v}"
    );

    let (s, v) = upload(
        &app,
        &alice.token,
        &room,
        "x.png",
        Some("image/png"),
        b"not a png at all".to_vec(),
    )
    .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (400, Some("content_type_mismatch")),
        "{v}"
    );
    let (s, v) = upload(
        &app,
        &alice.token,
        &room,
        "x.jpg",
        Some("image/jpeg"),
        png(2, 2),
    )
    .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (400, Some("content_type_mismatch")),
        "{v}"
    );
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("image/png"),
        "{v}"
    );
    let (s, v) = upload(
        &app,
        &alice.token,
        &room,
        "x",
        Some("nonsense"),
        b"abc".to_vec(),
    )
    .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (400, Some("invalid_content_type")),
        "{v}"
    );

    let (s, v) = upload(&app, &carol.token, &room, "c.txt", None, b"hi".to_vec()).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (403, Some("forbidden")),
        "{v}"
    );
    let other_room = RoomId::generate().to_string();
    let (s, v) = upload(
        &app,
        &alice.token,
        &other_room,
        "c.txt",
        None,
        b"hi".to_vec(),
    )
    .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (404, Some("not_found")),
        "{v}"
    );
    let r = app
        .http
        .post(app.url(&format!("/api/v1/rooms/{room}/attachments")))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);

    for id in [
        AttachmentId::generate().to_string(),
        "../../etc".into(),
        "XYZ".into(),
    ] {
        let r = download(&app, &alice.token, &id, &[]).await;
        assert_eq!(r.status().as_u16(), 404, "{id}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "not_found");
    }
}

#[tokio::test]
async fn images_record_width_and_height() {
    let app = spawn_app().await;
    let (alice, bob) = (app.register("al").await, app.register("bo").await);
    let room = app.direct(&alice, &bob).await;
    let img = png(3, 2);
    let (s, a) = upload(
        &app,
        &alice.token,
        &room,
        "pic.png",
        Some("image/png"),
        img.clone(),
    )
    .await;
    assert_eq!(s, 201, "{a}");
    assert_eq!(
        (a["width"].as_u64(), a["height"].as_u64()),
        (Some(3), Some(2))
    );
    assert_eq!(a["content_type"], "image/png");
    let r = download(&app, &alice.token, a["id"].as_str().unwrap(), &[]).await;
    assert_eq!(header(&r, "content-type"), "image/png");
    assert_eq!(r.bytes().await.unwrap().to_vec(), img);
}

#[tokio::test]
async fn unattached_uploads_are_swept() {
    let app = spawn_app_with(|s| s.limits.attachment_unattached_ttl_secs = 3).await;
    let (alice, bob) = (app.register("al").await, app.register("bo").await);
    let room = app.direct(&alice, &bob).await;
    let (_, kept) = upload(
        &app,
        &alice.token,
        &room,
        "kept.txt",
        None,
        b"kept".to_vec(),
    )
    .await;
    let kept = kept["id"].as_str().unwrap().to_owned();
    attach(&app, &kept, &room, &alice.id).await;
    let (_, gone) = upload(
        &app,
        &alice.token,
        &room,
        "gone.txt",
        None,
        b"gone".to_vec(),
    )
    .await;
    let gone = gone["id"].as_str().unwrap().to_owned();
    let path = app
        .dir
        .path()
        .join("attachments")
        .join(&gone[..2])
        .join(&gone);
    assert!(path.exists());
    // Gone for clients (404) and from the disk; the metadata goes first.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = download(&app, &alice.token, &gone, &[]).await;
        if r.status().as_u16() == 404 && !path.exists() {
            break;
        }
        assert!(Instant::now() < deadline, "not swept in 20 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = download(&app, &alice.token, &kept, &[]).await;
    assert_eq!(r.status().as_u16(), 200, "an attached file stays");
}

/// The MongoDB URI under test, or `None` to skip; panics when
/// `CHAT_REQUIRE_MONGODB=1` and no URI is given.
fn mongo_uri() -> Option<String> {
    match std::env::var("CHAT_TEST_MONGODB_URI") {
        Ok(u) if !u.trim().is_empty() => Some(u),
        _ => {
            assert!(
                std::env::var("CHAT_REQUIRE_MONGODB").as_deref() != Ok("1"),
                "CHAT_REQUIRE_MONGODB=1 but CHAT_TEST_MONGODB_URI is not set"
            );
            eprintln!("CHAT_TEST_MONGODB_URI is not set: MongoDB test skipped");
            None
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_mongodb_every_node_serves_every_attachment() {
    let Some(uri) = mongo_uri() else { return };
    let db = format!(
        "chatd_att_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let mongo = |s: &mut chatd::config::Settings| {
        s.store.kind = chatd::config::StoreKind::Mongodb;
        s.store.mongodb.uri = uri.clone();
        s.store.mongodb.database = db.clone();
    };
    let n1 = spawn_app_with(mongo).await;
    let n2 = spawn_app_with(mongo).await;
    let (alice, bob) = (n1.register("al").await, n1.register("bo").await);
    let room = n1.direct(&alice, &bob).await;
    let img = png(4, 3);
    let (s, a) = upload(
        &n1,
        &alice.token,
        &room,
        "p.png",
        Some("image/png"),
        img.clone(),
    )
    .await;
    assert_eq!(s, 201, "{a}");
    assert_eq!(
        (a["width"].as_u64(), a["height"].as_u64()),
        (Some(4), Some(3))
    );
    let id = a["id"].as_str().unwrap().to_owned();
    let r = download(&n2, &alice.token, &id, &[]).await;
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(
        header(&r, "etag"),
        format!("\"{}\"", a["sha256"].as_str().unwrap())
    );
    assert_eq!(r.bytes().await.unwrap().to_vec(), img);
    let r = download(&n2, &alice.token, &id, &[("range", "bytes=8-15")]).await;
    assert_eq!(r.status().as_u16(), 206);
    assert_eq!(r.bytes().await.unwrap().to_vec(), img[8..16]);
    // Bound to a message on one node, readable by the room's members on the other.
    let store = blobs::gridfs::GridFsBlobStore::open(&n1.hub.settings.store.mongodb)
        .await
        .unwrap();
    blobs::attach_to_message(
        &store,
        &[AttachmentId::parse(&id).unwrap()],
        &RoomId::parse(&room).unwrap(),
        &MessageId::generate(),
        &UserId::parse(&alice.id).unwrap(),
    )
    .await
    .unwrap();
    let r = download(&n2, &bob.token, &id, &[]).await;
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.bytes().await.unwrap().to_vec(), img);
    let (s, v) = upload(&n2, &alice.token, &room, "e", None, vec![]).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (400, Some("empty_attachment"))
    );
    mongodb::Client::with_uri_str(&uri)
        .await
        .unwrap()
        .database(&db)
        .drop()
        .await
        .unwrap();
}

#[tokio::test]
async fn an_upload_cut_off_leaves_no_partial_file() {
    let app = spawn_app().await;
    let (alice, bob) = (app.register("al").await, app.register("bo").await);
    let room = app.direct(&alice, &bob).await;
    let tmp = app.dir.path().join("attachments").join("tmp");
    let parts = || std::fs::read_dir(&tmp).unwrap().count();
    let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let head = format!(
        "POST /api/v1/rooms/{room}/attachments?filename=cut.bin HTTP/1.1\r\nHost: t\r\n\
         Authorization: Bearer {}\r\nContent-Type: application/octet-stream\r\n\
         Content-Length: 2000000\r\n\r\n",
        alice.token
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&vec![b'x'; 600 * 1024]).await.unwrap();
    stream.flush().await.unwrap();
    // The upload is being written ...
    let deadline = Instant::now() + WAIT;
    while parts() == 0 {
        assert!(Instant::now() < deadline, "no partial file appeared");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ... when the client goes away.
    drop(stream);
    let deadline = Instant::now() + WAIT;
    while parts() > 0 {
        assert!(Instant::now() < deadline, "the partial file stayed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let s = blob_store(&app).await;
    assert!(s
        .unattached_before("9999-12-31T23:59:59.999Z", 10)
        .await
        .unwrap()
        .is_empty());
}
