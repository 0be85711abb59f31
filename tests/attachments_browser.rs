//! Attachments in the web page, in headless Chromium: runs
//! tests/browser/attach.mjs (playwright-core, Debian's /usr/bin/chromium)
//! against a real node. Missing Node, npm packages or Chromium fail the test
//! with a clear message: it never passes silently.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_a_picture_and_a_file_in_the_browser() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    assert!(
        root.join("tests/browser/node_modules/playwright-core")
            .exists(),
        "run `npm install` in tests/browser (scripts/test.sh does it)"
    );
    assert!(
        std::path::Path::new("/usr/bin/chromium").exists(),
        "Debian's chromium is required (apt-get install chromium; .ci/run does it)"
    );
    let app = spawn_app().await;
    let out = root.join("test-output/browser");
    std::fs::create_dir_all(&out).unwrap();
    let child = tokio::process::Command::new("node")
        .arg(root.join("tests/browser/attach.mjs"))
        .env("CHATD_URL", &app.base)
        .env("OUT_DIR", &out)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(180), child)
        .await
        .expect("browser test finishes within 3 minutes")
        .expect("node runs (is Node.js installed?)");
    assert!(
        output.status.success(),
        "attach.mjs failed:\n--- stdout\n{}\n--- stderr\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
