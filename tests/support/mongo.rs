//! MongoDB settings shared by the store-level tests (included with
//! `#[path = "support/mongo.rs"] mod mongo_support;`).
#![allow(dead_code)]

use chatd::config::{Settings, StoreConfig};

/// The MongoDB URI under test, or `None` to skip; panics when
/// `CHAT_REQUIRE_MONGODB=1` and no URI is given, so CI cannot skip silently.
pub fn mongo_uri() -> Option<String> {
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

/// A config for a fresh, uniquely named database on the server under test.
pub fn mongo_cfg(uri: &str) -> StoreConfig {
    let mut cfg = Settings::defaults().store;
    cfg.kind = chatd::config::StoreKind::Mongodb;
    cfg.mongodb.uri = uri.to_owned();
    cfg.mongodb.database = format!(
        "chatd_test_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    cfg
}

/// Drops the test's database.
pub async fn drop_db(cfg: &StoreConfig) {
    mongodb::Client::with_uri_str(&cfg.mongodb.uri)
        .await
        .unwrap()
        .database(&cfg.mongodb.database)
        .drop()
        .await
        .unwrap();
}
