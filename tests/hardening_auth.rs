//! Issue 16: blocks cover room membership, access tokens only in headers
//! (but for the socket handshakes), login throttling per account, display
//! names without invisible tricks; and `GET /users/me/devices`.

mod common;

use common::*;
use serde_json::{json, Value};

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

/// An id of the right shape that belongs to nobody.
fn nobody() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

async fn room_ids(app: &TestApp, u: &TestUser) -> Vec<String> {
    let (s, v) = app.get("/api/v1/rooms", &u.token).await;
    assert_eq!(s, 200, "{v}");
    v["rooms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn a_blocked_user_cannot_put_the_blocker_in_a_room() {
    let app = spawn_app().await;
    let a = app.register("blk_a").await;
    let b = app.register("blk_b").await;
    let c = app.register("blk_c").await;
    let (s, _) = app
        .put(&format!("/api/v1/users/me/blocks/{}", a.id), &b.token, None)
        .await;
    assert_eq!(s, 204);

    // A group with B: the same answer as a group with a user who does not exist.
    let (s1, blocked) = app
        .post(
            "/api/v1/rooms",
            Some(&a.token),
            json!({"kind": "group", "name": "trap", "members": [c.id, b.id]}),
        )
        .await;
    let (s2, unknown) = app
        .post(
            "/api/v1/rooms",
            Some(&a.token),
            json!({"kind": "group", "name": "trap", "members": [c.id, nobody()]}),
        )
        .await;
    assert_eq!((s1, s2), (404, 404), "{blocked} {unknown}");
    assert_eq!(blocked, unknown);

    // Adding B to A's group: the same answer as adding nobody.
    let g = app.group(&a, &[&c]).await;
    let (s1, blocked) = app
        .post(
            &format!("/api/v1/rooms/{g}/members"),
            Some(&a.token),
            json!({"user_id": b.id}),
        )
        .await;
    let (s2, unknown) = app
        .post(
            &format!("/api/v1/rooms/{g}/members"),
            Some(&a.token),
            json!({"user_id": nobody()}),
        )
        .await;
    assert_eq!((s1, s2), (404, 404), "{blocked} {unknown}");
    assert_eq!(blocked, unknown);

    // A direct room with B: the same answer as with nobody.
    let (s1, blocked) = app
        .post(
            "/api/v1/rooms",
            Some(&a.token),
            json!({"kind": "direct", "peer": b.id}),
        )
        .await;
    let (s2, unknown) = app
        .post(
            "/api/v1/rooms",
            Some(&a.token),
            json!({"kind": "direct", "peer": nobody()}),
        )
        .await;
    assert_eq!((s1, s2), (404, 404), "{blocked} {unknown}");
    assert_eq!(blocked, unknown);

    // Nothing of A's reached B's room list.
    assert!(room_ids(&app, &b).await.is_empty());

    // The blocker may still put the blocked user in a room of their own.
    let own = app.group(&b, &[&a]).await;
    assert!(room_ids(&app, &b).await.contains(&own));
}

#[tokio::test]
async fn a_direct_room_from_before_the_block_is_returned_as_before() {
    let app = spawn_app().await;
    let a = app.register("old_a").await;
    let b = app.register("old_b").await;
    let room = app.direct(&a, &b).await;
    let (s, _) = app
        .put(&format!("/api/v1/users/me/blocks/{}", a.id), &b.token, None)
        .await;
    assert_eq!(s, 204);
    // Asking again answers as before the block: it is not revealed.
    let (s, v) = app
        .post(
            "/api/v1/rooms",
            Some(&a.token),
            json!({"kind": "direct", "peer": b.id}),
        )
        .await;
    assert_eq!((s, v["id"].as_str()), (200, Some(room.as_str())), "{v}");
}

#[tokio::test]
async fn query_tokens_only_open_sockets() {
    let app = spawn_app().await;
    let u = app.register("qtok").await;
    for path in [
        "/api/v1/users/me",
        "/api/v1/rooms",
        "/api/v1/users/me/blocks",
    ] {
        let (s, v) = app
            .req(
                reqwest::Method::GET,
                &format!("{path}?access_token={}", u.token),
                None,
                None,
            )
            .await;
        assert_eq!((s, code(&v)), (401, "unauthorized"), "{path}: {v}");
    }
    // The header still works, and the socket upgrade takes the query token.
    let (s, _) = app.get("/api/v1/users/me", &u.token).await;
    assert_eq!(s, 200);
    let (_ws, ready) = app.ws(&u).await;
    assert_eq!(ready["user_id"], u.id.as_str());
}

async fn login(app: &TestApp, login: &str, password: &str) -> reqwest::Response {
    app.http
        .post(app.url("/api/v1/auth/login"))
        .json(&json!({"login": login, "password": password}))
        .send()
        .await
        .unwrap()
}

/// Asserts a 429 in the envelope with a positive `Retry-After`.
async fn assert_limited(r: reqwest::Response) {
    assert_eq!(r.status(), 429);
    let retry: u64 = r
        .headers()
        .get("retry-after")
        .expect("Retry-After on a 429")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry > 0);
    let v: Value = r.json().await.unwrap();
    assert_eq!(code(&v), "rate_limited");
}

#[tokio::test]
async fn username_and_email_count_as_one_account() {
    let app = spawn_app_with(|s| s.auth.login_max_failures = 5).await;
    let u = app.register("acct").await;
    let email = format!("{}@EXAMPLE.com", u.username.to_uppercase());
    for login_as in [&u.username, &u.username, &u.username, &email, &email] {
        assert_eq!(login(&app, login_as, "wrongpass1").await.status(), 401);
    }
    assert_limited(login(&app, &u.username, "password123").await).await;
    assert_limited(login(&app, &format!("{}@example.com", u.username), "password123").await).await;
    // Unknown logins count by their text.
    for _ in 0..5 {
        assert_eq!(login(&app, "Ghost", "wrongpass1").await.status(), 401);
    }
    assert_limited(login(&app, "ghost", "wrongpass1").await).await;
}

#[tokio::test]
async fn one_address_does_not_lock_out_its_neighbours() {
    let app = spawn_app().await;
    // Five users behind one address each lock their own account.
    for i in 0..5 {
        let u = app.register(&format!("nat{i}_")).await;
        for _ in 0..5 {
            assert_eq!(login(&app, &u.username, "wrongpass1").await.status(), 401);
        }
        assert_limited(login(&app, &u.username, "password123").await).await;
    }
    // A neighbour's correct login still works.
    let n = app.register("neigh").await;
    assert_eq!(login(&app, &n.username, "password123").await.status(), 200);
}

#[tokio::test]
async fn the_address_limit_answers_429_with_retry_after() {
    let app = spawn_app_with(|s| s.auth.login_address_max_failures = 3).await;
    for i in 0..3 {
        let r = login(&app, &format!("nobody{i}"), "wrongpass1").await;
        assert_eq!(r.status(), 401);
    }
    assert_limited(login(&app, "nobody9", "wrongpass1").await).await;
}

async fn register_with_name(app: &TestApp, display_name: &str) -> (u16, Value) {
    let name = uniq("dn");
    app.post(
        "/api/v1/auth/register",
        None,
        json!({"username": name, "email": format!("{name}@example.com"),
               "password": "password123", "display_name": display_name}),
    )
    .await
}

#[tokio::test]
async fn display_names_refuse_invisible_tricks_and_are_nfc() {
    let app = spawn_app().await;
    for bad in [
        "admin\u{202E}gnp.exe",
        "\u{200B}",
        "\u{FEFF}",
        "a\u{2066}b",
        "x\u{0007}",
        " \u{200B} ",
        "\u{3164}",
    ] {
        let (s, v) = register_with_name(&app, bad).await;
        assert_eq!((s, code(&v)), (400, "invalid_display_name"), "{bad:?}: {v}");
    }
    let (s, v) = register_with_name(&app, "Jose\u{0301} 👩\u{200D}💻").await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["user"]["display_name"], "Jos\u{00E9} 👩\u{200D}💻");
}

#[tokio::test]
async fn devices_can_be_listed() {
    let app = spawn_app().await;
    let u = app.register("devl").await;
    let (s, v) = app.get("/api/v1/users/me/devices", &u.token).await;
    assert_eq!((s, v.clone()), (200, json!({"devices": []})));
    for (p, t) in [("android", "tok-a"), ("web", "tok-w")] {
        let (s, _) = app
            .put(
                "/api/v1/users/me/devices",
                &u.token,
                Some(json!({"platform": p, "token": t})),
            )
            .await;
        assert_eq!(s, 204);
    }
    let (s, v) = app.get("/api/v1/users/me/devices", &u.token).await;
    assert_eq!(s, 200, "{v}");
    let mut got: Vec<(String, String)> = v["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            assert!(d["created_at"].is_string(), "{d}");
            (
                d["platform"].as_str().unwrap().to_owned(),
                d["token"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        vec![
            ("android".to_owned(), "tok-a".to_owned()),
            ("web".to_owned(), "tok-w".to_owned())
        ]
    );
    // Another user sees only their own.
    let other = app.register("devo").await;
    let (_, v) = app.get("/api/v1/users/me/devices", &other.token).await;
    assert_eq!(v, json!({"devices": []}));
    let (s, v) = app
        .req(reqwest::Method::GET, "/api/v1/users/me/devices", None, None)
        .await;
    assert_eq!((s, code(&v)), (401, "unauthorized"));
}
