//! The web page end to end in headless Chromium: runs tests/browser/e2e.mjs
//! (playwright-core, Debian's /usr/bin/chromium) against a real node.
//! Screenshots land in test-output/browser/. Missing Node, npm packages or
//! Chromium fail the test with a clear message: it never passes silently.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_people_chat_in_the_browser() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let script = root.join("tests/browser/e2e.mjs");
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
        .arg(&script)
        .env("CHATD_URL", &app.base)
        .env("OUT_DIR", &out)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(300), child)
        .await
        .expect("browser test finishes within 5 minutes")
        .expect("node runs (is Node.js installed?)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "e2e.mjs failed:\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    let shots = std::fs::read_dir(&out)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "png"))
        })
        .count();
    assert!(shots > 0, "screenshots were written to {}", out.display());
}
