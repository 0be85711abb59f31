//! The admin role cannot be squatted (issue 16 point 8): it is stored with
//! the user and granted by the operator (`chatd admin grant|revoke`);
//! `admin.usernames` only covers accounts that exist when the node starts.

mod common;

use std::process::Command;

use common::{spawn_app_with, TestApp};

async fn admin_status(app: &TestApp, token: &str) -> u16 {
    app.get("/admin/v1/cluster", token).await.0
}

fn chatd(app: &TestApp, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_chatd"))
        .env("CHAT__STORE__KIND", "sqlite")
        .env(
            "CHAT__STORE__SQLITE__PATH",
            app.dir.path().join("chat.db").to_string_lossy().as_ref(),
        )
        .env("RUST_LOG", "error")
        .args(args)
        .output()
        .expect("run chatd")
}

#[tokio::test]
async fn a_configured_admin_name_registered_later_gets_no_role() {
    let app = spawn_app_with(|s| s.admin.usernames = vec!["boss".into(), "root".into()]).await;
    let squatter = app.register_named("boss").await;
    assert_eq!(admin_status(&app, &squatter.token).await, 403);
    let me = app.get("/api/v1/users/me", &squatter.token).await;
    assert_eq!(me.0, 200, "{}", me.1);
}

#[tokio::test]
async fn admin_usernames_grants_accounts_that_exist_at_start() {
    let first = spawn_app_with(|_| {}).await;
    let ops = first.register_named("ops").await;
    assert_eq!(admin_status(&first, &ops.token).await, 403);
    // A second node on the same store, configured with the name.
    let path = first.dir.path().join("chat.db");
    let second = spawn_app_with(move |s| {
        s.store.sqlite.path = path.to_string_lossy().into_owned();
        s.admin.usernames = vec!["ops".into()];
    })
    .await;
    assert_eq!(admin_status(&second, &ops.token).await, 200);
    // Stored with the user: the first node sees it too, without a restart.
    assert_eq!(admin_status(&first, &ops.token).await, 200);
}

#[tokio::test]
async fn the_operator_grants_and_revokes_with_the_command() {
    let app = spawn_app_with(|_| {}).await;
    let carol = app.register_named("carol").await;
    assert_eq!(admin_status(&app, &carol.token).await, 403);

    let out = chatd(&app, &["admin", "grant", "carol"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(admin_status(&app, &carol.token).await, 200);

    let out = chatd(&app, &["admin", "list"]);
    assert!(String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l == "carol"));

    let out = chatd(&app, &["admin", "revoke", "carol"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(admin_status(&app, &carol.token).await, 403);

    let out = chatd(&app, &["admin", "grant", "nobody-here"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no account"));
}
