//! The admin page end to end in headless Chromium: runs tests/browser/admin.mjs
//! (playwright-core, Debian's /usr/bin/chromium) against a real node with a
//! connected test user. Screenshots land in test-output/admin/. Missing Node,
//! npm packages or Chromium fail the test with a clear message.

mod common;

use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message as WsMessage;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_sees_and_acts_on_a_connected_user_in_the_browser() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let script = root.join("tests/browser/admin.mjs");
    assert!(
        root.join("tests/browser/node_modules/playwright-core")
            .exists(),
        "run `npm install` in tests/browser (scripts/test.sh does it)"
    );
    assert!(
        std::path::Path::new("/usr/bin/chromium").exists(),
        "Debian's chromium is required (apt-get install chromium; .ci/run does it)"
    );
    // Sockets that the script does not read from stay open for the whole run.
    let app = spawn_app_with(|s| s.ws.idle_timeout_secs = 600).await;
    let _admin = app.register_admin("admin").await;
    let user = app.register("watched").await;
    let peer = app.register("peer").await;
    let room = app.direct(&user, &peer).await;
    let (mut ws, _) = app.ws(&user).await;
    let ack = ws.send_msg(&room, "hello-admin", "hello").await;
    assert_eq!(ack["type"], "ack", "{ack}");
    // Keep reading (and so answering the server's close) while the page runs.
    let reader = tokio::spawn(async move {
        while let Some(m) = ws.stream.next().await {
            match m {
                Ok(WsMessage::Close(f)) => return f.map(|f| u16::from(f.code)),
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
        None
    });

    let out = root.join("test-output/admin");
    std::fs::create_dir_all(&out).unwrap();
    for e in std::fs::read_dir(&out).unwrap().flatten() {
        if e.path()
            .extension()
            .is_some_and(|x| x == "png" || x == "txt")
        {
            let _ = std::fs::remove_file(e.path());
        }
    }
    let child = tokio::process::Command::new("node")
        .arg(&script)
        .env("CHATD_URL", &app.base)
        .env("OUT_DIR", &out)
        .env("ADMIN_LOGIN", "admin")
        .env("ADMIN_PASSWORD", "password123")
        .env("USER_LOGIN", &peer.username)
        .env("USER_PASSWORD", "password123")
        .env("USER_ID", &user.id)
        .env("ROOM_ID", &room)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(240), child)
        .await
        .expect("the admin browser test finishes within 4 minutes")
        .expect("node runs (is Node.js installed?)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "admin.mjs failed:\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    // The page's "Disconnect user" closed the user's socket (4001 kicked).
    let code = tokio::time::timeout(WAIT, reader)
        .await
        .expect("the user's socket closed")
        .unwrap();
    assert_eq!(code, Some(4001));
    let shots = std::fs::read_dir(&out)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "png"))
        })
        .count();
    assert!(shots > 0, "screenshots were written to {}", out.display());
}
