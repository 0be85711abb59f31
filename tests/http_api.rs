//! Every HTTP row of the contract, happy path and failure rows, against a
//! real node over real HTTP.

mod common;

use common::*;
use serde_json::json;

fn code(v: &serde_json::Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("<no error code>")
}

#[tokio::test]
async fn register_validates_and_refuses_duplicates() {
    let app = spawn_app().await;
    let name = uniq("reg");
    let (s, v) = app
        .post(
            "/api/v1/auth/register",
            None,
            json!({"username": name, "email": format!("{name}@x.io"), "password": "password123", "display_name": "Reggie"}),
        )
        .await;
    assert_eq!(s, 201);
    assert_eq!(v["user"]["username"], name.as_str());
    assert_eq!(v["user"]["display_name"], "Reggie");
    assert!(v["user"]["created_at"].as_str().unwrap().ends_with('Z'));
    assert!(v["expires_in"].as_u64().unwrap() > 0);
    assert!(v["user"].get("password_hash").is_none());

    let (s, v) = app
        .post(
            "/api/v1/auth/register",
            None,
            json!({"username": name, "email": "other@x.io", "password": "password123"}),
        )
        .await;
    assert_eq!((s, code(&v)), (409, "username_taken"));
    let (s, v) = app
        .post("/api/v1/auth/register", None, json!({"username": uniq("o"), "email": format!("{name}@X.io"), "password": "password123"}))
        .await;
    assert_eq!((s, code(&v)), (409, "email_taken"));

    for (body, want) in [
        (
            json!({"username": "ab", "email": "a@b.io", "password": "password123"}),
            "invalid_username",
        ),
        (
            json!({"username": "Bad Name", "email": "a@b.io", "password": "password123"}),
            "invalid_username",
        ),
        (
            json!({"username": uniq("u"), "email": "nope", "password": "password123"}),
            "invalid_email",
        ),
        (
            json!({"username": uniq("u"), "email": "a@b.io", "password": "short"}),
            "invalid_password",
        ),
        (
            json!({"username": uniq("u"), "email": "a@b.io", "password": "x".repeat(129)}),
            "invalid_password",
        ),
        (
            json!({"username": uniq("u"), "email": "a@b.io"}),
            "invalid_request",
        ),
        (
            json!({"username": 5, "email": "a@b.io", "password": "password123"}),
            "invalid_request",
        ),
    ] {
        let (s, v) = app.post("/api/v1/auth/register", None, body.clone()).await;
        assert_eq!((s, code(&v)), (400, want), "{body}");
        assert!(v["error"]["message"].as_str().is_some());
    }
}

#[tokio::test]
async fn malformed_and_oversized_bodies_get_the_envelope() {
    let app = spawn_app().await;
    let r = app
        .http
        .post(app.url("/api/v1/auth/register"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(code(&v), "invalid_request");

    let r = app
        .http
        .post(app.url("/api/v1/auth/register"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400, "missing content type");

    let huge = "x".repeat(200_000);
    let r = app
        .http
        .post(app.url("/api/v1/auth/login"))
        .header("content-type", "application/json")
        .body(format!("{{\"login\":\"{huge}\",\"password\":\"p\"}}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(code(&v), "payload_too_large");

    let (s, v) = app
        .req(reqwest::Method::GET, "/api/v1/nope", None, None)
        .await;
    assert_eq!((s, code(&v)), (404, "not_found"));
    let (s, v) = app
        .req(reqwest::Method::DELETE, "/api/v1/auth/login", None, None)
        .await;
    assert_eq!((s, code(&v)), (405, "method_not_allowed"));
}

#[tokio::test]
async fn login_by_name_or_email_and_failures_look_alike() {
    let app = spawn_app().await;
    let u = app.register("log").await;
    let (s, v) = app
        .post(
            "/api/v1/auth/login",
            None,
            json!({"login": u.username, "password": "password123"}),
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(v["user"]["id"], u.id.as_str());
    assert!(v["access_token"].is_string() && v["refresh_token"].is_string());
    let (s, _) = app
        .post(
            "/api/v1/auth/login",
            None,
            json!({"login": format!("{}@EXAMPLE.com", u.username), "password": "password123"}),
        )
        .await;
    assert_eq!(s, 200);

    let (s1, wrong) = app
        .post(
            "/api/v1/auth/login",
            None,
            json!({"login": u.username, "password": "wrongpass1"}),
        )
        .await;
    let (s2, unknown) = app
        .post(
            "/api/v1/auth/login",
            None,
            json!({"login": "nobody-at-all", "password": "wrongpass1"}),
        )
        .await;
    assert_eq!((s1, s2), (401, 401));
    assert_eq!(
        wrong, unknown,
        "unknown user and wrong password answer alike"
    );
    assert_eq!(code(&wrong), "invalid_credentials");
}

#[tokio::test]
async fn login_attempts_are_limited() {
    let app = spawn_app_with(|s| s.auth.login_max_failures = 3).await;
    let u = app.register("lim").await;
    for _ in 0..3 {
        let (s, _) = app
            .post(
                "/api/v1/auth/login",
                None,
                json!({"login": u.username, "password": "wrongpass1"}),
            )
            .await;
        assert_eq!(s, 401);
    }
    let r = app
        .http
        .post(app.url("/api/v1/auth/login"))
        .json(&json!({"login": u.username, "password": "password123"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry > 0);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(code(&v), "rate_limited");
}

#[tokio::test]
async fn refresh_rotates_and_reuse_revokes_the_login() {
    let app = spawn_app().await;
    let u = app.register("ref").await;
    let (s, v) = app
        .post(
            "/api/v1/auth/refresh",
            None,
            json!({"refresh_token": u.refresh}),
        )
        .await;
    assert_eq!(s, 200);
    let r2 = v["refresh_token"].as_str().unwrap().to_owned();
    assert_ne!(r2, u.refresh);
    let (s, _) = app
        .get("/api/v1/users/me", v["access_token"].as_str().unwrap())
        .await;
    assert_eq!(s, 200);
    // The old token stops working, and presenting it revokes the new one too.
    let (s, v) = app
        .post(
            "/api/v1/auth/refresh",
            None,
            json!({"refresh_token": u.refresh}),
        )
        .await;
    assert_eq!(s, 401, "{v}");
    let (s, _) = app
        .post("/api/v1/auth/refresh", None, json!({"refresh_token": r2}))
        .await;
    assert_eq!(s, 401);
    let (s, _) = app
        .post(
            "/api/v1/auth/refresh",
            None,
            json!({"refresh_token": "garbage"}),
        )
        .await;
    assert_eq!(s, 401);
}

#[tokio::test]
async fn logout_revokes_the_refresh_token() {
    let app = spawn_app().await;
    let u = app.register("out").await;
    let (s, _) = app
        .post(
            "/api/v1/auth/logout",
            None,
            json!({"refresh_token": u.refresh}),
        )
        .await;
    assert_eq!(s, 401, "logout needs the access token");
    let (s, _) = app
        .post(
            "/api/v1/auth/logout",
            Some(&u.token),
            json!({"refresh_token": u.refresh}),
        )
        .await;
    assert_eq!(s, 204);
    let (s, _) = app
        .post(
            "/api/v1/auth/refresh",
            None,
            json!({"refresh_token": u.refresh}),
        )
        .await;
    assert_eq!(s, 401);
}

#[tokio::test]
async fn bad_and_expired_tokens_get_401() {
    let app = spawn_app().await;
    let u = app.register("tok").await;
    let (s, v) = app
        .req(reqwest::Method::GET, "/api/v1/users/me", None, None)
        .await;
    assert_eq!((s, code(&v)), (401, "unauthorized"));
    let (s, _) = app.get("/api/v1/users/me", "not-a-jwt").await;
    assert_eq!(s, 401);
    let now = chrono::Utc::now().timestamp();
    let expired = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub": u.id, "usr": u.username, "iat": now - 7200, "exp": now - 3600}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let (s, _) = app.get("/api/v1/users/me", &expired).await;
    assert_eq!(s, 401);
    let forged = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub": u.id, "usr": "admin", "iat": now, "exp": now + 600}),
        &jsonwebtoken::EncodingKey::from_secret(b"some-other-secret-some-other-secret"),
    )
    .unwrap();
    let (s, _) = app.get("/api/v1/users/me", &forged).await;
    assert_eq!(s, 401);
}

#[tokio::test]
async fn profiles_and_search() {
    let app = spawn_app().await;
    let a = app.register("prof").await;
    let b = app.register("prof").await;
    let (s, me) = app.get("/api/v1/users/me", &a.token).await;
    assert_eq!(s, 200);
    assert_eq!(me["email"], format!("{}@example.com", a.username));
    let (s, p) = app.get(&format!("/api/v1/users/{}", b.id), &a.token).await;
    assert_eq!(s, 200);
    assert_eq!(p["username"], b.username.as_str());
    assert_eq!(p["online"], false);
    assert!(p.get("email").is_none(), "public profile hides e-mail");
    assert!(p.as_object().unwrap().contains_key("last_seen"));
    let (s, _) = app.get("/api/v1/users/0000000000nope", &a.token).await;
    assert_eq!(s, 404);
    let (s, _) = app.get("/api/v1/users/bad%20id", &a.token).await;
    assert_eq!(s, 404);

    let (s, v) = app.get("/api/v1/users?q=prof", &a.token).await;
    assert_eq!(s, 200);
    let names: Vec<&str> = v["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["username"].as_str().unwrap())
        .collect();
    assert!(names.contains(&a.username.as_str()) && names.contains(&b.username.as_str()));
    let (s, v) = app
        .get(&format!("/api/v1/users?q={}", b.username), &a.token)
        .await;
    assert_eq!(s, 200);
    assert_eq!(v["users"].as_array().unwrap().len(), 1);
    let (s, v) = app.get("/api/v1/users?q=", &a.token).await;
    assert_eq!((s, code(&v)), (400, "invalid_request"));

    // Online while a socket is open.
    let (_ws, _) = app.ws(&b).await;
    let (_, p) = app.get(&format!("/api/v1/users/{}", b.id), &a.token).await;
    assert_eq!(p["online"], true);
}

#[tokio::test]
async fn devices_and_notification_settings() {
    let app = spawn_app().await;
    let u = app.register("dev").await;
    let (s, _) = app
        .put(
            "/api/v1/users/me/devices",
            &u.token,
            Some(json!({"platform": "android", "token": "fcm-tok-1"})),
        )
        .await;
    assert_eq!(s, 204);
    let uid = chatd::domain::UserId::parse(&u.id).unwrap();
    assert_eq!(app.hub.stores.users.devices(&uid).await.unwrap().len(), 1);
    let (s, v) = app
        .put(
            "/api/v1/users/me/devices",
            &u.token,
            Some(json!({"platform": "palm", "token": "x"})),
        )
        .await;
    assert_eq!((s, code(&v)), (400, "invalid_platform"));
    let (s, v) = app
        .put(
            "/api/v1/users/me/devices",
            &u.token,
            Some(json!({"platform": "web", "token": ""})),
        )
        .await;
    assert_eq!((s, code(&v)), (400, "invalid_token"));
    let (s, _) = app
        .delete("/api/v1/users/me/devices/fcm-tok-1", &u.token)
        .await;
    assert_eq!(s, 204);
    assert!(app.hub.stores.users.devices(&uid).await.unwrap().is_empty());

    let (s, v) = app
        .put(
            "/api/v1/users/me/notification-settings",
            &u.token,
            Some(json!({"push": false, "email": true})),
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(v, json!({"push": false, "email": true}));
    let (s, _) = app
        .put(
            "/api/v1/users/me/notification-settings",
            &u.token,
            Some(json!({"push": "no"})),
        )
        .await;
    assert_eq!(s, 400);
}

#[tokio::test]
async fn blocks_list_and_validation() {
    let app = spawn_app().await;
    let a = app.register("blk").await;
    let b = app.register("blk").await;
    let (s, _) = app
        .put(&format!("/api/v1/users/me/blocks/{}", b.id), &a.token, None)
        .await;
    assert_eq!(s, 204);
    let (s, v) = app.get("/api/v1/users/me/blocks", &a.token).await;
    assert_eq!(s, 200);
    assert_eq!(v["users"][0]["id"], b.id.as_str());
    let (s, v) = app
        .put(&format!("/api/v1/users/me/blocks/{}", a.id), &a.token, None)
        .await;
    assert_eq!((s, code(&v)), (400, "cannot_block_self"));
    let (s, _) = app
        .put("/api/v1/users/me/blocks/0123456789abcdef", &a.token, None)
        .await;
    assert_eq!(s, 404);
    let (s, _) = app
        .delete(&format!("/api/v1/users/me/blocks/{}", b.id), &a.token)
        .await;
    assert_eq!(s, 204);
    let (_, v) = app.get("/api/v1/users/me/blocks", &a.token).await;
    assert!(v["users"].as_array().unwrap().is_empty());
}

#[tokio::test]
async fn direct_rooms_are_never_duplicated() {
    let app = spawn_app().await;
    let a = app.register("dr").await;
    let b = app.register("dr").await;
    let (s1, r1) = app
        .post(
            "/api/v1/rooms",
            Some(&a.token),
            json!({"kind": "direct", "peer": b.id}),
        )
        .await;
    let (s2, r2) = app
        .post(
            "/api/v1/rooms",
            Some(&b.token),
            json!({"kind": "direct", "peer": a.id}),
        )
        .await;
    assert_eq!((s1, s2), (201, 200));
    assert_eq!(r1["id"], r2["id"]);
    assert_eq!(r1["kind"], "direct");
    assert_eq!(r1["last_seq"], 0);
    assert_eq!(r1["members"].as_array().unwrap().len(), 2);

    // Concurrent creation by both sides: one room.
    let c = app.register("dr").await;
    let d = app.register("dr").await;
    let mut tasks = Vec::new();
    for i in 0..10 {
        let (http, url) = (app.http.clone(), app.url("/api/v1/rooms"));
        let (me, peer) = if i % 2 == 0 {
            (c.clone(), d.clone())
        } else {
            (d.clone(), c.clone())
        };
        tasks.push(tokio::spawn(async move {
            let r = http
                .post(url)
                .bearer_auth(me.token)
                .json(&json!({"kind": "direct", "peer": peer.id}))
                .send()
                .await
                .unwrap();
            let s = r.status().as_u16();
            let v: serde_json::Value = r.json().await.unwrap();
            (s, v["id"].as_str().unwrap().to_owned())
        }));
    }
    let mut ids = std::collections::HashSet::new();
    let mut created = 0;
    for t in tasks {
        let (s, id) = t.await.unwrap();
        created += (s == 201) as u32;
        ids.insert(id);
    }
    assert_eq!((ids.len(), created), (1, 1));

    let (s, v) = app
        .post(
            "/api/v1/rooms",
            Some(&a.token),
            json!({"kind": "direct", "peer": a.id}),
        )
        .await;
    assert_eq!((s, code(&v)), (400, "invalid_peer"));
    let (s, _) = app
        .post(
            "/api/v1/rooms",
            Some(&a.token),
            json!({"kind": "direct", "peer": "0123456789abcdef"}),
        )
        .await;
    assert_eq!(s, 404);
    let (s, _) = app
        .post("/api/v1/rooms", Some(&a.token), json!({"kind": "circle"}))
        .await;
    assert_eq!(s, 400);
}

#[tokio::test]
async fn groups_members_and_permissions() {
    let app = spawn_app().await;
    let o = app.register("grp").await;
    let m = app.register("grp").await;
    let x = app.register("grp").await;
    let room = app.group(&o, &[&m]).await;
    let (s, v) = app.get(&format!("/api/v1/rooms/{room}"), &m.token).await;
    assert_eq!(s, 200);
    assert_eq!(v["kind"], "group");
    assert_eq!(v["name"], "team");
    let members = v["members"].as_array().unwrap();
    assert_eq!(members.len(), 2);
    let owner = members
        .iter()
        .find(|e| e["user_id"] == o.id.as_str())
        .unwrap();
    assert_eq!(owner["role"], "owner");
    assert_eq!(owner["delivered_seq"], 0);
    assert_eq!(owner["read_seq"], 0);

    let (s, _) = app.get(&format!("/api/v1/rooms/{room}"), &x.token).await;
    assert_eq!(s, 403, "non-members cannot read a room");
    let (s, _) = app.get("/api/v1/rooms/0123456789abcdef", &x.token).await;
    assert_eq!(s, 404);
    let (s, _) = app
        .post(
            &format!("/api/v1/rooms/{room}/members"),
            Some(&m.token),
            json!({"user_id": x.id}),
        )
        .await;
    assert_eq!(s, 403, "plain members cannot add");
    let (s, _) = app
        .post(
            &format!("/api/v1/rooms/{room}/members"),
            Some(&x.token),
            json!({"user_id": x.id}),
        )
        .await;
    assert_eq!(s, 403, "outsiders cannot add themselves");
    let (s, _) = app
        .post(
            &format!("/api/v1/rooms/{room}/members"),
            Some(&o.token),
            json!({"user_id": x.id}),
        )
        .await;
    assert_eq!(s, 204);
    let (s, _) = app
        .get(&format!("/api/v1/rooms/{room}/messages"), &x.token)
        .await;
    assert_eq!(s, 200, "a new member can read");
    let (s, _) = app
        .delete(&format!("/api/v1/rooms/{room}/members/{}", o.id), &m.token)
        .await;
    assert_eq!(s, 403, "nobody removes the owner");
    let (s, _) = app
        .delete(&format!("/api/v1/rooms/{room}/members/{}", x.id), &o.token)
        .await;
    assert_eq!(s, 204);
    let (s, _) = app
        .get(&format!("/api/v1/rooms/{room}/messages"), &x.token)
        .await;
    assert_eq!(s, 403, "a removed member cannot read");
    let (s, _) = app
        .delete(&format!("/api/v1/rooms/{room}/members/{}", m.id), &m.token)
        .await;
    assert_eq!(s, 204, "members may leave");

    let d = app.direct(&o, &x).await;
    let (s, v) = app
        .post(
            &format!("/api/v1/rooms/{d}/members"),
            Some(&o.token),
            json!({"user_id": m.id}),
        )
        .await;
    assert_eq!((s, code(&v)), (400, "not_a_group"));

    let (s, v) = app
        .post(
            "/api/v1/rooms",
            Some(&o.token),
            json!({"kind": "group", "name": "  ", "members": []}),
        )
        .await;
    assert_eq!((s, code(&v)), (400, "invalid_room_name"));
    let (s, _) = app
        .post(
            "/api/v1/rooms",
            Some(&o.token),
            json!({"kind": "group", "name": "g", "members": ["0123456789abcdef"]}),
        )
        .await;
    assert_eq!(s, 404);
}

#[tokio::test]
async fn group_size_is_limited() {
    let app = spawn_app_with(|s| s.limits.group_max_members = 3).await;
    let o = app.register("cap").await;
    let a = app.register("cap").await;
    let b = app.register("cap").await;
    let c = app.register("cap").await;
    let (s, v) = app
        .post(
            "/api/v1/rooms",
            Some(&o.token),
            json!({"kind": "group", "name": "g", "members": [a.id, b.id, c.id]}),
        )
        .await;
    assert_eq!((s, code(&v)), (400, "too_many_members"));
    let room = app.group(&o, &[&a, &b]).await;
    let (s, v) = app
        .post(
            &format!("/api/v1/rooms/{room}/members"),
            Some(&o.token),
            json!({"user_id": c.id}),
        )
        .await;
    assert_eq!((s, code(&v)), (400, "too_many_members"));
}

#[tokio::test]
async fn http_send_history_and_room_list() {
    let app = spawn_app().await;
    let a = app.register("hs").await;
    let b = app.register("hs").await;
    let x = app.register("hs").await;
    let room = app.direct(&a, &b).await;
    let mut ids = Vec::new();
    for i in 1..=12 {
        let (s, v) = app
            .post(
                &format!("/api/v1/rooms/{room}/messages"),
                Some(&a.token),
                json!({"client_msg_id": format!("c{i}"), "body": format!("  hello {i}  ")}),
            )
            .await;
        assert_eq!(s, 201, "{v}");
        assert_eq!(v["seq"], i);
        assert_eq!(v["body"], format!("hello {i}"), "bodies are trimmed");
        assert_eq!(v["room_id"], room.as_str());
        assert_eq!(v["sender_id"], a.id.as_str());
        ids.push(v["id"].as_str().unwrap().to_owned());
    }
    // Idempotent resend.
    let (s, v) = app
        .post(
            &format!("/api/v1/rooms/{room}/messages"),
            Some(&a.token),
            json!({"client_msg_id": "c3", "body": "other"}),
        )
        .await;
    assert_eq!(s, 201);
    assert_eq!(
        (v["id"].as_str().unwrap(), v["seq"].as_i64().unwrap()),
        (ids[2].as_str(), 3)
    );
    assert_eq!(app.history(&b, &room).await.len(), 12);

    let seqs = |v: &serde_json::Value| {
        v["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["seq"].as_i64().unwrap())
            .collect::<Vec<_>>()
    };
    let (_, v) = app
        .get(&format!("/api/v1/rooms/{room}/messages?limit=3"), &b.token)
        .await;
    assert_eq!(seqs(&v), vec![10, 11, 12]);
    let (_, v) = app
        .get(
            &format!("/api/v1/rooms/{room}/messages?before=10&limit=3"),
            &b.token,
        )
        .await;
    assert_eq!(seqs(&v), vec![7, 8, 9]);
    let (_, v) = app
        .get(
            &format!("/api/v1/rooms/{room}/messages?after=2&limit=2"),
            &b.token,
        )
        .await;
    assert_eq!(seqs(&v), vec![3, 4]);
    let (s, v) = app
        .get(
            &format!("/api/v1/rooms/{room}/messages?limit=101"),
            &b.token,
        )
        .await;
    assert_eq!((s, code(&v)), (400, "invalid_limit"));
    let (s, _) = app
        .get(
            &format!("/api/v1/rooms/{room}/messages?limit=abc"),
            &b.token,
        )
        .await;
    assert_eq!(s, 400);
    let (s, _) = app
        .get(&format!("/api/v1/rooms/{room}/messages"), &x.token)
        .await;
    assert_eq!(s, 403);

    // Failure rows of a send.
    let (s, v) = app
        .post(
            &format!("/api/v1/rooms/{room}/messages"),
            Some(&x.token),
            json!({"client_msg_id": "z", "body": "hi"}),
        )
        .await;
    assert_eq!((s, code(&v)), (403, "forbidden"));
    let (s, v) = app
        .post(
            &format!("/api/v1/rooms/{room}/messages"),
            Some(&a.token),
            json!({"client_msg_id": "z", "body": "x".repeat(4001)}),
        )
        .await;
    assert_eq!((s, code(&v)), (400, "body_too_long"));
    let (s, _) = app
        .post(
            &format!("/api/v1/rooms/{room}/messages"),
            Some(&a.token),
            json!({"client_msg_id": "z", "body": "   "}),
        )
        .await;
    assert_eq!(s, 400);
    let (s, _) = app
        .post(
            &format!("/api/v1/rooms/{room}/messages"),
            Some(&a.token),
            json!({"client_msg_id": "", "body": "x"}),
        )
        .await;
    assert_eq!(s, 400);
    let (s, _) = app
        .post(
            "/api/v1/rooms/0123456789abcdef/messages",
            Some(&a.token),
            json!({"client_msg_id": "z", "body": "x"}),
        )
        .await;
    assert_eq!(s, 404);
    let (s, _) = app
        .post(
            &format!("/api/v1/rooms/{room}/messages"),
            Some(&a.token),
            json!({"client_msg_id": 7, "body": "x"}),
        )
        .await;
    assert_eq!(s, 400);

    let (s, v) = app.get("/api/v1/rooms", &b.token).await;
    assert_eq!(s, 200);
    let r = &v["rooms"][0];
    assert_eq!(r["id"], room.as_str());
    assert_eq!(r["unread"], 12);
    assert_eq!(r["last_seq"], 12);
    assert_eq!(r["last_message"]["seq"], 12);
    let (_, v) = app.get("/api/v1/rooms", &a.token).await;
    assert_eq!(v["rooms"][0]["unread"], 0, "own messages are not unread");
}

#[tokio::test]
async fn health_and_readiness() {
    let app = spawn_app().await;
    let (s, v) = app.req(reqwest::Method::GET, "/healthz", None, None).await;
    assert_eq!((s, v["status"].as_str()), (200, Some("ok")));
    let (s, v) = app.req(reqwest::Method::GET, "/readyz", None, None).await;
    assert_eq!(s, 200);
    assert_eq!(v["store"], "sqlite");
    assert_eq!(v["broker"], "inprocess");
}
