//! The MongoDB backend: the store a cluster of chatd nodes shares.
//!
//! One collection per aggregate (`users`, `rooms`, `members`, `messages`,
//! `refresh_tokens`, `devices`, `blocks`) plus `meta`, which names the
//! backend and schema version; indexes are created idempotently at start.
//! Everything that must change several documents together (an append and its
//! room's `last_seq`, a direct room and its two members, a refresh-token
//! rotation) runs in a multi-document transaction, retried on transient
//! errors. Appends from every room of this node go through one task that
//! group-commits them: one transaction per batch, answered after commit.
//! `docs/store-mongodb.md` describes the schema, the seq design and the
//! write concern.
//!
//! This file opens the store (client, `meta`, indexes) and holds what every
//! part shares; `docs` has the document shapes, `errors` the error
//! mapping, `txn` the transaction runner, `append` the group-commit
//! append, `users`, `auth`, `rooms`, `messages` one aggregate trait each,
//! and `dump` the backend's side of `chatd export` / `import`.

mod append;
mod auth;
mod docs;
mod dump;
mod errors;
mod lifecycle;
mod messages;
mod rooms;
mod txn;
mod users;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::TryStreamExt;
use mongodb::bson::{doc, Bson, Document};
use mongodb::options::{
    Acknowledgment, ClientOptions, IndexOptions, ReadConcern, ReadPreference, SelectionCriteria,
    TransactionOptions, WriteConcern,
};
use mongodb::{Client, Collection, Database, IndexModel};
use tokio::sync::mpsc;

use super::{Room, StoreError, StoreHealth, UserId};
use crate::config::MongoConfig;
use crate::domain::now_rfc3339;
use append::AppendJob;
use docs::{room_of, BlockDoc, DeviceDoc, MemberDoc, MessageDoc, RefreshDoc, RoomDoc, UserDoc};
use errors::{bson_err, is_dup_key, is_unavailable, store_err};

/// Schema version this build reads and writes (kept in `meta`).
pub const SCHEMA_VERSION: i32 = 1;
/// The name this backend writes into `meta.backend`.
pub const BACKEND: &str = "mongodb";
/// `_id` of the one document in `meta`.
const META_ID: &str = "chatd";
/// Attempts at a transaction that keeps meeting write conflicts, and the
/// time after which it stops retrying and reports `Unavailable`.
const TXN_ATTEMPTS: u32 = 64;
const TXN_RETRY_BUDGET: Duration = Duration::from_secs(10);
/// Refresh-token rows go this long after max(expiry, time written).
const REFRESH_PURGE_GRACE_SECS: u64 = 86_400;
/// Defaults for driver timeouts the URI does not set.
const DEFAULT_SERVER_SELECTION_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Collection names (the schema in `docs/store-mongodb.md`).
pub const USERS: &str = "users";
pub const ROOMS: &str = "rooms";
pub const MEMBERS: &str = "members";
pub const MESSAGES: &str = "messages";
pub const REFRESH_TOKENS: &str = "refresh_tokens";
pub const DEVICES: &str = "devices";
pub const BLOCKS: &str = "blocks";

/// The collections, cheap to clone into a transaction body.
#[derive(Clone)]
struct Colls {
    db: Database,
    users: Collection<UserDoc>,
    rooms: Collection<RoomDoc>,
    members: Collection<MemberDoc>,
    messages: Collection<MessageDoc>,
    refresh: Collection<RefreshDoc>,
    devices: Collection<DeviceDoc>,
    blocks: Collection<BlockDoc>,
}

impl Colls {
    fn new(db: Database) -> Self {
        Self {
            users: db.collection(USERS),
            rooms: db.collection(ROOMS),
            members: db.collection(MEMBERS),
            messages: db.collection(MESSAGES),
            refresh: db.collection(REFRESH_TOKENS),
            devices: db.collection(DEVICES),
            blocks: db.collection(BLOCKS),
            db,
        }
    }

    fn raw(&self, name: &str) -> Collection<Document> {
        self.db.collection(name)
    }
}

struct Inner {
    client: Client,
    c: Colls,
    txn_opts: TransactionOptions,
}

/// The MongoDB store. Cheap to share behind an `Arc`.
pub struct MongoStore {
    inner: Arc<Inner>,
    appender: mpsc::Sender<AppendJob>,
}

/// The write concern the config asks for.
pub fn write_concern(cfg: &MongoConfig) -> Result<WriteConcern, StoreError> {
    let w = cfg.write_concern.trim();
    let w = match w {
        "" | "majority" => Acknowledgment::Majority,
        n if n.bytes().all(|b| b.is_ascii_digit()) => {
            let n: u32 = n.parse().map_err(|_| {
                StoreError::Internal(format!("store.mongodb.write_concern {n:?} is too large"))
            })?;
            if n == 0 {
                return Err(StoreError::Internal(
                    "store.mongodb.write_concern 0 (unacknowledged) is not allowed".into(),
                ));
            }
            Acknowledgment::Nodes(n)
        }
        tag => Acknowledgment::Custom(tag.to_owned()),
    };
    let mut wc = WriteConcern::default();
    wc.w = Some(w);
    wc.journal = Some(cfg.journal);
    wc.w_timeout = (cfg.write_timeout_ms > 0).then(|| Duration::from_millis(cfg.write_timeout_ms));
    Ok(wc)
}

impl MongoStore {
    /// Connects, checks `meta` (refusing another backend's or an unknown
    /// schema's database), creates collections and indexes, and starts the
    /// append task.
    pub async fn open(cfg: &MongoConfig) -> Result<Self, StoreError> {
        let wc = write_concern(cfg)?;
        let mut opts = ClientOptions::parse(&cfg.uri).await.map_err(|e| {
            if is_unavailable(&e) {
                StoreError::Unavailable(format!("store.mongodb.uri: {e}"))
            } else {
                StoreError::Internal(format!("store.mongodb.uri is not usable: {e}"))
            }
        })?;
        opts.server_selection_timeout
            .get_or_insert(DEFAULT_SERVER_SELECTION_TIMEOUT);
        opts.connect_timeout.get_or_insert(DEFAULT_CONNECT_TIMEOUT);
        opts.app_name.get_or_insert_with(|| "chatd".to_owned());
        opts.write_concern = Some(wc.clone());
        // Reads must see this node's own acknowledged writes: primary only.
        opts.selection_criteria = Some(SelectionCriteria::ReadPreference(ReadPreference::Primary));
        let client = Client::with_options(opts).map_err(store_err)?;
        let db = client.database(&cfg.database);
        let c = Colls::new(db);

        let fresh = check_meta(&c).await?;
        create_indexes(&c).await?;
        lifecycle::create_indexes(&c).await?;
        if fresh {
            write_meta(&c).await?;
        }

        let mut txn_opts = TransactionOptions::default();
        txn_opts.read_concern = Some(ReadConcern::snapshot());
        txn_opts.write_concern = Some(wc);
        txn_opts.selection_criteria =
            Some(SelectionCriteria::ReadPreference(ReadPreference::Primary));
        let inner = Arc::new(Inner {
            client,
            c,
            txn_opts,
        });
        let (tx, rx) = mpsc::channel(8192);
        tokio::spawn(append::appender(inner.clone(), rx));
        tracing::info!(database = %cfg.database, "mongodb store ready");
        Ok(Self {
            inner,
            appender: tx,
        })
    }
}

/// Returns `true` when the database is empty and needs its `meta` written.
async fn check_meta(c: &Colls) -> Result<bool, StoreError> {
    let meta = c.raw("meta");
    if let Some(d) = meta
        .find_one(doc! { "_id": META_ID })
        .await
        .map_err(store_err)?
    {
        validate_meta(&d, c.db.name())?;
        return Ok(false);
    }
    let names = c.db.list_collection_names().await.map_err(store_err)?;
    for name in names.iter().filter(|n| !n.starts_with("system.")) {
        if c.raw(name)
            .find_one(doc! {})
            .await
            .map_err(store_err)?
            .is_some()
        {
            return Err(StoreError::Internal(format!(
                "database {:?} holds data (collection {name:?}) but no chatd meta document: \
                 refusing to mix chatd's data with it",
                c.db.name()
            )));
        }
    }
    Ok(true)
}

fn validate_meta(d: &Document, db: &str) -> Result<(), StoreError> {
    let backend = d.get_str("backend").unwrap_or("");
    if backend != BACKEND {
        return Err(StoreError::Internal(format!(
            "database {db:?} holds data of the {backend:?} backend, not {BACKEND:?}: refusing to start"
        )));
    }
    let version = match d.get("schema_version") {
        Some(Bson::Int32(v)) => i64::from(*v),
        Some(Bson::Int64(v)) => *v,
        Some(Bson::String(s)) => s.parse().unwrap_or(-1),
        _ => -1,
    };
    if version != i64::from(SCHEMA_VERSION) {
        return Err(StoreError::Internal(format!(
            "database schema version {version} is not known to this chatd (expects {SCHEMA_VERSION})"
        )));
    }
    Ok(())
}

async fn write_meta(c: &Colls) -> Result<(), StoreError> {
    let meta = c.raw("meta");
    let r = meta
        .insert_one(doc! {
            "_id": META_ID,
            "backend": BACKEND,
            "schema_version": SCHEMA_VERSION,
            "created_at": now_rfc3339(),
        })
        .await;
    match r {
        Ok(_) => Ok(()),
        // Another node started at the same moment and wrote it first.
        Err(e) if is_dup_key(&e) => {
            let d = meta
                .find_one(doc! { "_id": META_ID })
                .await
                .map_err(store_err)?
                .ok_or_else(|| StoreError::Internal("meta vanished".into()))?;
            validate_meta(&d, c.db.name())
        }
        Err(e) => Err(store_err(e)),
    }
}

fn index(keys: Document, name: &str, unique: bool) -> IndexModel {
    let mut o = IndexOptions::default();
    o.name = Some(name.to_owned());
    if unique {
        o.unique = Some(true);
    }
    IndexModel::builder().keys(keys).options(o).build()
}

/// Creates every collection's indexes; `createIndexes` with an identical
/// spec is a no-op, so this runs at every start.
async fn create_indexes(c: &Colls) -> Result<(), StoreError> {
    let mut direct = IndexOptions::default();
    direct.name = Some("rooms_direct_key_unique".into());
    direct.unique = Some(true);
    direct.partial_filter_expression = Some(doc! { "direct_key": { "$type": "string" } });
    let mut ttl = IndexOptions::default();
    ttl.name = Some("refresh_purge_ttl".into());
    ttl.expire_after = Some(Duration::from_secs(REFRESH_PURGE_GRACE_SECS));

    let plan: Vec<(&str, Vec<IndexModel>)> = vec![
        (
            USERS,
            vec![
                index(doc! { "username": 1 }, "users_username_unique", true),
                index(doc! { "email": 1 }, "users_email_unique", true),
            ],
        ),
        (
            ROOMS,
            vec![IndexModel::builder()
                .keys(doc! { "direct_key": 1 })
                .options(direct)
                .build()],
        ),
        (
            MEMBERS,
            vec![
                index(doc! { "user_id": 1, "room_id": 1 }, "members_user", false),
                index(
                    doc! { "room_id": 1, "joined_at": 1, "user_id": 1 },
                    "members_room_order",
                    false,
                ),
            ],
        ),
        (
            MESSAGES,
            vec![
                index(
                    doc! { "room_id": 1, "seq": 1 },
                    "messages_room_seq_unique",
                    true,
                ),
                index(
                    doc! { "room_id": 1, "sender_id": 1, "client_msg_id": 1 },
                    "messages_idempotency_unique",
                    true,
                ),
            ],
        ),
        (
            REFRESH_TOKENS,
            vec![
                index(doc! { "family_id": 1 }, "refresh_family", false),
                IndexModel::builder()
                    .keys(doc! { "purge_at": 1 })
                    .options(ttl)
                    .build(),
            ],
        ),
        (
            DEVICES,
            vec![index(
                doc! { "user_id": 1, "created_at": 1 },
                "devices_user",
                false,
            )],
        ),
        (
            BLOCKS,
            vec![
                index(
                    doc! { "blocker_id": 1, "created_at": 1 },
                    "blocks_blocker",
                    false,
                ),
                index(doc! { "blocked_id": 1 }, "blocks_blocked", false),
            ],
        ),
    ];
    for (coll, models) in plan {
        c.raw(coll).create_indexes(models).await.map_err(|e| {
            if is_unavailable(&e) {
                store_err(e)
            } else {
                StoreError::Internal(format!("cannot create the indexes of {coll}: {e}"))
            }
        })?;
    }
    // `meta` exists even before its document is written.
    Ok(())
}

impl Inner {
    async fn load_room(&self, id: &str) -> Result<Option<Room>, StoreError> {
        let Some(r) = self
            .c
            .rooms
            .find_one(doc! { "_id": id })
            .await
            .map_err(store_err)?
        else {
            return Ok(None);
        };
        let members: Vec<MemberDoc> = self
            .c
            .members
            .find(doc! { "room_id": id })
            .sort(doc! { "joined_at": 1, "user_id": 1 })
            .await
            .map_err(store_err)?
            .try_collect()
            .await
            .map_err(store_err)?;
        Ok(Some(room_of(r, members)))
    }

    async fn users_exist(&self, ids: &[&UserId]) -> Result<bool, StoreError> {
        let distinct: HashSet<&str> = ids.iter().map(|u| u.as_str()).collect();
        let list: Vec<&str> = distinct.iter().copied().collect();
        let n = self
            .c
            .users
            .count_documents(doc! { "_id": { "$in": list } })
            .await
            .map_err(store_err)?;
        Ok(n as usize == distinct.len())
    }

    async fn block_ids(
        &self,
        filter: Document,
        field: &str,
        sort: Option<Document>,
    ) -> Result<Vec<UserId>, StoreError> {
        let docs: Vec<Document> = self
            .c
            .raw(BLOCKS)
            .find(filter)
            .projection(doc! { field: 1 })
            .sort(sort.unwrap_or_default())
            .await
            .map_err(store_err)?
            .try_collect()
            .await
            .map_err(store_err)?;
        docs.iter()
            .map(|d| d.get_str(field).map(UserId::from_trusted).map_err(bson_err))
            .collect()
    }
}

#[async_trait]
impl StoreHealth for MongoStore {
    async fn ping(&self) -> Result<(), StoreError> {
        self.inner
            .c
            .db
            .run_command(doc! { "ping": 1 })
            .await
            .map_err(store_err)?;
        Ok(())
    }

    fn backend(&self) -> &'static str {
        BACKEND
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(w: &str, journal: bool, timeout: u64) -> MongoConfig {
        MongoConfig {
            uri: String::new(),
            database: String::new(),
            write_concern: w.into(),
            journal,
            write_timeout_ms: timeout,
        }
    }

    #[test]
    fn write_concern_from_config() {
        let d = crate::config::Settings::defaults().store.mongodb;
        let wc = write_concern(&d).unwrap();
        assert_eq!(wc.w, Some(Acknowledgment::Majority));
        assert_eq!(wc.journal, Some(true));
        assert_eq!(wc.w_timeout, Some(Duration::from_secs(10)));
        let wc = write_concern(&cfg("2", false, 0)).unwrap();
        assert_eq!(wc.w, Some(Acknowledgment::Nodes(2)));
        assert_eq!(wc.journal, Some(false));
        assert_eq!(wc.w_timeout, None);
        assert_eq!(
            write_concern(&cfg("dc2", true, 0)).unwrap().w,
            Some(Acknowledgment::Custom("dc2".into()))
        );
        assert!(write_concern(&cfg("0", true, 0)).is_err());
    }

    #[test]
    fn meta_is_checked() {
        let ok = doc! { "_id": META_ID, "backend": BACKEND, "schema_version": SCHEMA_VERSION };
        assert!(validate_meta(&ok, "db").is_ok());
        let other = doc! { "backend": "sqlite", "schema_version": 1 };
        assert!(validate_meta(&other, "db")
            .unwrap_err()
            .to_string()
            .contains("\"sqlite\" backend"));
        let newer = doc! { "backend": BACKEND, "schema_version": 2_i64 };
        assert!(validate_meta(&newer, "db")
            .unwrap_err()
            .to_string()
            .contains("schema version 2"));
    }
}
