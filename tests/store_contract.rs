//! The store contract suite against every backend available here: SQLite
//! always; MongoDB when `CHAT_TEST_MONGODB_URI` is set (CI sets it).

use chatd::config::Settings;
use chatd::store;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_passes_the_store_contract() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Settings::defaults().store;
    cfg.sqlite.path = dir
        .path()
        .join("contract.db")
        .to_string_lossy()
        .into_owned();
    let stores = store::open(&cfg).await.unwrap();
    store::contract::run_all(&stores).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_refuses_an_unknown_schema_version() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.db");
    let mut cfg = Settings::defaults().store;
    cfg.sqlite.path = path.to_string_lossy().into_owned();
    drop(store::open(&cfg).await.unwrap());
    let c = rusqlite::Connection::open(&path).unwrap();
    c.execute(
        "UPDATE meta SET value = '999' WHERE key = 'schema_version'",
        [],
    )
    .unwrap();
    drop(c);
    let err = store::open(&cfg).await.err().expect("must refuse");
    assert!(err.to_string().contains("schema version 999"), "{err}");
}
