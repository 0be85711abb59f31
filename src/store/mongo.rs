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

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt, TryStreamExt};
use mongodb::bson::{doc, Bson, DateTime, Document};
use mongodb::error::{
    Error as MongoError, ErrorKind, WriteFailure, TRANSIENT_TRANSACTION_ERROR,
    UNKNOWN_TRANSACTION_COMMIT_RESULT,
};
use mongodb::options::{
    Acknowledgment, ClientOptions, IndexOptions, ReadConcern, ReadPreference, ReturnDocument,
    SelectionCriteria, TransactionOptions, WriteConcern,
};
use mongodb::{Client, ClientSession, Collection, Database, IndexModel};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use super::*;
use crate::config::MongoConfig;
use crate::domain::now_rfc3339;

/// Schema version this build reads and writes (kept in `meta`).
pub const SCHEMA_VERSION: i32 = 1;
/// The name this backend writes into `meta.backend`.
pub const BACKEND: &str = "mongodb";
/// `_id` of the one document in `meta`.
const META_ID: &str = "chatd";
/// Most messages committed in one append transaction.
const MAX_APPEND_BATCH: usize = 512;
/// Attempts at a transaction that keeps meeting write conflicts, and the
/// time after which it stops retrying and reports `Unavailable`.
const TXN_ATTEMPTS: u32 = 64;
const TXN_RETRY_BUDGET: Duration = Duration::from_secs(10);
/// Refresh-token rows go this long after max(expiry, time written).
const REFRESH_PURGE_GRACE_SECS: u64 = 86_400;
/// Defaults for driver timeouts the URI does not set.
const DEFAULT_SERVER_SELECTION_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

const DUPLICATE_KEY: i32 = 11000;

/// Collection names (the schema in `docs/store-mongodb.md`).
pub const USERS: &str = "users";
pub const ROOMS: &str = "rooms";
pub const MEMBERS: &str = "members";
pub const MESSAGES: &str = "messages";
pub const REFRESH_TOKENS: &str = "refresh_tokens";
pub const DEVICES: &str = "devices";
pub const BLOCKS: &str = "blocks";

/// Server error codes that mean "not now" rather than "never": no primary,
/// shutting down, timed out, write concern not met in time.
const UNAVAILABLE_CODES: &[i32] = &[
    6,     // HostUnreachable
    7,     // HostNotFound
    50,    // MaxTimeMSExpired
    64,    // WriteConcernFailed
    89,    // NetworkTimeout
    91,    // ShutdownInProgress
    112,   // WriteConflict
    189,   // PrimarySteppedDown
    251,   // NoSuchTransaction
    262,   // ExceededTimeLimit
    9001,  // SocketException
    10107, // NotWritablePrimary
    11600, // InterruptedAtShutdown
    11602, // InterruptedDueToReplStateChange
    13435, // NotPrimaryNoSecondaryOk
    13436, // NotPrimaryOrSecondary
];

// ---- documents -------------------------------------------------------------

/// `users`: one document per account.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserDoc {
    #[serde(rename = "_id")]
    pub id: UserId,
    pub username: Username,
    pub email: Email,
    pub display_name: Option<String>,
    pub password_hash: String,
    pub created_at: String,
    pub last_seen: Option<String>,
    pub notify_push: bool,
    pub notify_email: bool,
}

impl From<UserDoc> for User {
    fn from(d: UserDoc) -> Self {
        User {
            id: d.id,
            username: d.username,
            email: d.email,
            display_name: d.display_name,
            created_at: d.created_at,
            last_seen: d.last_seen,
        }
    }
}

/// `rooms`: one document per room; `last_seq` is the room's seq counter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoomDoc {
    #[serde(rename = "_id")]
    pub id: RoomId,
    pub kind: RoomKind,
    pub name: Option<String>,
    /// `"{lo}:{hi}"` of the two user ids; only direct rooms have one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_key: Option<String>,
    pub created_at: String,
    pub last_seq: Seq,
}

/// `members`: one document per (room, user), `_id` = `"{room}:{user}"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberDoc {
    #[serde(rename = "_id")]
    pub id: String,
    pub room_id: RoomId,
    pub user_id: UserId,
    pub role: Role,
    pub delivered_seq: Seq,
    pub read_seq: Seq,
    pub joined_at: String,
}

impl From<MemberDoc> for Member {
    fn from(d: MemberDoc) -> Self {
        Member {
            user_id: d.user_id,
            role: d.role,
            delivered_seq: d.delivered_seq,
            read_seq: d.read_seq,
        }
    }
}

/// `messages`: the append log of every room.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MessageDoc {
    #[serde(rename = "_id")]
    pub id: MessageId,
    pub room_id: RoomId,
    pub seq: Seq,
    pub sender_id: UserId,
    pub client_msg_id: ClientMsgId,
    pub body: MessageBody,
    pub created_at: String,
}

impl From<MessageDoc> for Message {
    fn from(d: MessageDoc) -> Self {
        Message {
            id: d.id,
            room_id: d.room_id,
            seq: d.seq,
            sender_id: d.sender_id,
            client_msg_id: d.client_msg_id,
            body: d.body,
            created_at: d.created_at,
        }
    }
}

impl From<Message> for MessageDoc {
    fn from(m: Message) -> Self {
        MessageDoc {
            id: m.id,
            room_id: m.room_id,
            seq: m.seq,
            sender_id: m.sender_id,
            client_msg_id: m.client_msg_id,
            body: m.body,
            created_at: m.created_at,
        }
    }
}

/// `refresh_tokens`: `_id` is the token's hash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RefreshDoc {
    #[serde(rename = "_id")]
    pub hash: String,
    pub user_id: UserId,
    pub family_id: String,
    /// Unix seconds.
    pub expires_at: i64,
    pub used: bool,
    /// The TTL index removes the row `REFRESH_PURGE_GRACE_SECS` after this.
    pub purge_at: DateTime,
}

impl RefreshDoc {
    /// A current (unused) token; `purge_at` follows from `expires_at`.
    pub fn new(hash: String, user_id: UserId, family_id: String, expires_at: i64) -> Self {
        // Never purge before the row was written: a caller's clock that
        // says "already expired" must not make the row vanish mid-rotation.
        let now_ms = chrono::Utc::now().timestamp_millis();
        let purge_ms = expires_at.saturating_mul(1000).max(now_ms);
        RefreshDoc {
            hash,
            user_id,
            family_id,
            expires_at,
            used: false,
            purge_at: DateTime::from_millis(purge_ms),
        }
    }
}

/// `devices`: `_id` is the push token (a token belongs to one user).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceDoc {
    #[serde(rename = "_id")]
    pub token: String,
    pub user_id: UserId,
    pub platform: String,
    pub created_at: String,
}

impl From<DeviceDoc> for Device {
    fn from(d: DeviceDoc) -> Self {
        Device {
            platform: d.platform,
            token: d.token,
            created_at: d.created_at,
        }
    }
}

/// `blocks`: `_id` = `"{blocker}:{blocked}"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlockDoc {
    #[serde(rename = "_id")]
    pub id: String,
    pub blocker_id: UserId,
    pub blocked_id: UserId,
    pub created_at: String,
}

fn pair_key(a: &str, b: &str) -> String {
    // Ids are [A-Za-z0-9_-], so ':' cannot occur inside one.
    format!("{a}:{b}")
}

fn direct_key(a: &UserId, b: &UserId) -> String {
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    pair_key(lo.as_str(), hi.as_str())
}

/// Escapes a literal for a MongoDB (PCRE) regular expression. Escaping any
/// ASCII punctuation is always allowed; letters, digits and non-ASCII stay.
fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 2);
    for ch in s.chars() {
        if ch.is_ascii() && !ch.is_ascii_alphanumeric() && ch != '_' {
            out.push('\\');
        }
        out.push(ch);
    }
    out
}

// ---- errors ----------------------------------------------------------------

fn code_of(e: &MongoError) -> Option<i32> {
    match e.kind.as_ref() {
        ErrorKind::Command(c) => Some(c.code),
        ErrorKind::Write(WriteFailure::WriteError(w)) => Some(w.code),
        ErrorKind::Write(WriteFailure::WriteConcernError(w)) => Some(w.code),
        ErrorKind::InsertMany(m) => m
            .write_errors
            .as_ref()
            .and_then(|v| v.first().map(|w| w.code))
            .or(m.write_concern_error.as_ref().map(|w| w.code)),
        _ => None,
    }
}

fn is_dup_key(e: &MongoError) -> bool {
    match e.kind.as_ref() {
        ErrorKind::InsertMany(m) => m
            .write_errors
            .as_ref()
            .is_some_and(|v| v.iter().any(|w| w.code == DUPLICATE_KEY)),
        _ => code_of(e) == Some(DUPLICATE_KEY),
    }
}

/// The server cannot be reached at all (as opposed to refusing a command).
fn is_connectivity(e: &MongoError) -> bool {
    matches!(
        e.kind.as_ref(),
        ErrorKind::Io(_)
            | ErrorKind::ConnectionPoolCleared { .. }
            | ErrorKind::ServerSelection { .. }
            | ErrorKind::DnsResolve { .. }
    )
}

fn is_unavailable(e: &MongoError) -> bool {
    is_connectivity(e)
        || matches!(
            e.kind.as_ref(),
            ErrorKind::Shutdown | ErrorKind::Write(WriteFailure::WriteConcernError(_))
        )
        || matches!(e.kind.as_ref(), ErrorKind::InsertMany(m) if m.write_concern_error.is_some())
        || code_of(e).is_some_and(|c| UNAVAILABLE_CODES.contains(&c))
        || e.contains_label(TRANSIENT_TRANSACTION_ERROR)
        || e.contains_label(UNKNOWN_TRANSACTION_COMMIT_RESULT)
        || e.contains_label(mongodb::error::RETRYABLE_WRITE_ERROR)
}

/// Maps a driver error: connection trouble is `Unavailable` (503 upstream).
/// The `Unavailable` text may reach clients, so it names the cause without
/// addresses or topology; the whole driver error goes to the debug log.
pub(crate) fn store_err(e: MongoError) -> StoreError {
    if is_unavailable(&e) {
        tracing::debug!(error = %e, "mongodb unavailable");
        StoreError::Unavailable(unavailable_reason(&e))
    } else {
        StoreError::Internal(e.to_string())
    }
}

fn unavailable_reason(e: &MongoError) -> String {
    let code_name = |code: i32, name: &str| format!("mongodb answered {name} ({code})");
    match e.kind.as_ref() {
        ErrorKind::Io(io) => format!("mongodb connection failed: {}", io.kind()),
        ErrorKind::ServerSelection { .. } => {
            "mongodb unreachable (no server selected in time)".into()
        }
        ErrorKind::ConnectionPoolCleared { .. } => "mongodb connection lost".into(),
        ErrorKind::DnsResolve { .. } => "mongodb host name did not resolve".into(),
        ErrorKind::Shutdown => "mongodb client shut down".into(),
        ErrorKind::Command(c) => code_name(c.code, &c.code_name),
        ErrorKind::Write(WriteFailure::WriteConcernError(w)) => {
            format!("mongodb write concern not met ({})", w.code_name)
        }
        ErrorKind::Write(WriteFailure::WriteError(w)) => {
            code_name(w.code, w.code_name.as_deref().unwrap_or("WriteError"))
        }
        _ if e.contains_label(UNKNOWN_TRANSACTION_COMMIT_RESULT) => {
            "mongodb commit outcome unknown".into()
        }
        _ => "mongodb unavailable".into(),
    }
}

fn bson_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Internal(format!("bson: {e}"))
}

/// Whether a failed transaction body may simply run again: a write conflict
/// (labelled transient), or a unique key another transaction committed
/// after our snapshot (the retry reads it and takes the other branch).
fn txn_retryable(e: &MongoError) -> bool {
    e.contains_label(TRANSIENT_TRANSACTION_ERROR) || is_dup_key(e)
}

fn backoff_delay(attempt: u32) -> Duration {
    let cap_ms = 2u64.saturating_pow(attempt.min(6)).min(64);
    Duration::from_millis(rand::random_range(1..=cap_ms))
}

// ---- the store -------------------------------------------------------------

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

type AppendReply = Result<Vec<Result<Appended, StoreError>>, StoreError>;

struct AppendJob {
    batch: Vec<NewMessage>,
    reply: oneshot::Sender<AppendReply>,
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
        tokio::spawn(appender(inner.clone(), rx));
        tracing::info!(database = %cfg.database, "mongodb store ready");
        Ok(Self {
            inner,
            appender: tx,
        })
    }
}

impl MongoStore {
    /// The database, for whole-store tools (`chatd export` / `import`).
    pub fn database(&self) -> &Database {
        &self.inner.c.db
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
    /// Runs `body` in a transaction and commits it, retrying the whole
    /// transaction on write conflicts and the commit when its outcome is
    /// unknown, within `TXN_RETRY_BUDGET`. `body` must only touch the
    /// database through the session.
    async fn transaction<T, F>(&self, mut body: F) -> Result<T, StoreError>
    where
        T: Send,
        F: for<'s> FnMut(&'s mut ClientSession) -> BoxFuture<'s, mongodb::error::Result<T>> + Send,
    {
        let started = Instant::now();
        let may_retry = |e: &MongoError, attempt: u32| {
            let ok = txn_retryable(e)
                && attempt < TXN_ATTEMPTS
                && started.elapsed() < TXN_RETRY_BUDGET
                // The driver labels a lost server "transient" too; one more
                // try covers a failover, more would only delay the 503.
                && (!is_connectivity(e) || attempt < 2);
            if ok {
                metrics::counter!("chatd_store_txn_retries_total").increment(1);
            }
            ok
        };
        let mut session = self.client.start_session().await.map_err(store_err)?;
        let mut attempt = 0u32;
        'txn: loop {
            attempt += 1;
            session
                .start_transaction()
                .with_options(self.txn_opts.clone())
                .await
                .map_err(store_err)?;
            let value = match body(&mut session).await {
                Ok(v) => v,
                Err(e) => {
                    let retry = may_retry(&e, attempt);
                    if is_connectivity(&e) {
                        // Aborting would wait for the lost server once more;
                        // dropping the session aborts in the background.
                        if retry {
                            session = self.client.start_session().await.map_err(store_err)?;
                        }
                    } else {
                        let _ = session.abort_transaction().await;
                    }
                    if retry {
                        tokio::time::sleep(backoff_delay(attempt)).await;
                        continue 'txn;
                    }
                    return Err(store_err(e));
                }
            };
            let mut commit_tries = 0u32;
            loop {
                match session.commit_transaction().await {
                    Ok(()) => return Ok(value),
                    // Committing again is safe: the server answers with the
                    // first commit's outcome.
                    Err(e)
                        if e.contains_label(UNKNOWN_TRANSACTION_COMMIT_RESULT)
                            && commit_tries < if is_connectivity(&e) { 1 } else { 2 }
                            && started.elapsed() < TXN_RETRY_BUDGET =>
                    {
                        commit_tries += 1;
                    }
                    Err(e) if may_retry(&e, attempt) => {
                        tokio::time::sleep(backoff_delay(attempt)).await;
                        continue 'txn;
                    }
                    Err(e) => return Err(store_err(e)),
                }
            }
        }
    }

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

fn room_of(r: RoomDoc, members: Vec<MemberDoc>) -> Room {
    Room {
        id: r.id,
        kind: r.kind,
        name: r.name,
        members: members.into_iter().map(Member::from).collect(),
        created_at: r.created_at,
        last_seq: r.last_seq,
    }
}

fn member_doc(room: &RoomId, user: &UserId, role: Role, now: &str) -> MemberDoc {
    MemberDoc {
        id: pair_key(room.as_str(), user.as_str()),
        room_id: room.clone(),
        user_id: user.clone(),
        role,
        delivered_seq: 0,
        read_seq: 0,
        joined_at: now.to_owned(),
    }
}

#[async_trait]
impl UserStore for MongoStore {
    async fn create_user(&self, new: NewUser) -> Result<User, StoreError> {
        let c = &self.inner.c;
        let d = UserDoc {
            id: UserId::generate(),
            username: new.username,
            email: new.email,
            display_name: new.display_name,
            password_hash: new.password_hash,
            created_at: now_rfc3339(),
            last_seen: None,
            notify_push: true,
            notify_email: true,
        };
        match c.users.insert_one(&d).await {
            Ok(_) => Ok(d.into()),
            Err(e) if is_dup_key(&e) => {
                // Which unique index refused it: ask, rather than parse text.
                let taken = c
                    .users
                    .count_documents(doc! { "username": d.username.as_ref() })
                    .await
                    .map_err(store_err)?;
                if taken > 0 {
                    Err(StoreError::Conflict("username_taken"))
                } else {
                    Err(StoreError::Conflict("email_taken"))
                }
            }
            Err(e) => Err(store_err(e)),
        }
    }

    async fn user(&self, id: &UserId) -> Result<Option<User>, StoreError> {
        Ok(self
            .inner
            .c
            .users
            .find_one(doc! { "_id": id.as_str() })
            .await
            .map_err(store_err)?
            .map(User::from))
    }

    async fn credentials(&self, login: &str) -> Result<Option<(User, String)>, StoreError> {
        let login = login.trim().to_lowercase();
        Ok(self
            .inner
            .c
            .users
            .find_one(doc! { "$or": [ { "username": &login }, { "email": &login } ] })
            .await
            .map_err(store_err)?
            .map(|d| {
                let hash = d.password_hash.clone();
                (User::from(d), hash)
            }))
    }

    async fn search_users(&self, prefix: &str, limit: u32) -> Result<Vec<User>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let pattern = format!("^{}", regex_escape(&prefix.to_lowercase()));
        let docs: Vec<UserDoc> = self
            .inner
            .c
            .users
            .find(doc! { "username": { "$regex": pattern } })
            .sort(doc! { "username": 1 })
            .limit(i64::from(limit))
            .await
            .map_err(store_err)?
            .try_collect()
            .await
            .map_err(store_err)?;
        Ok(docs.into_iter().map(User::from).collect())
    }

    async fn set_last_seen(&self, id: &UserId, at: &str) -> Result<(), StoreError> {
        self.inner
            .c
            .users
            .update_one(
                doc! { "_id": id.as_str() },
                doc! { "$set": { "last_seen": at } },
            )
            .await
            .map_err(store_err)?;
        Ok(())
    }

    async fn notification_settings(&self, id: &UserId) -> Result<NotificationSettings, StoreError> {
        let d = self
            .inner
            .c
            .users
            .find_one(doc! { "_id": id.as_str() })
            .await
            .map_err(store_err)?
            .ok_or(StoreError::NotFound)?;
        Ok(NotificationSettings {
            push: d.notify_push,
            email: d.notify_email,
        })
    }

    async fn set_notification_settings(
        &self,
        id: &UserId,
        s: NotificationSettings,
    ) -> Result<(), StoreError> {
        let r = self
            .inner
            .c
            .users
            .update_one(
                doc! { "_id": id.as_str() },
                doc! { "$set": { "notify_push": s.push, "notify_email": s.email } },
            )
            .await
            .map_err(store_err)?;
        if r.matched_count == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    async fn put_device(&self, id: &UserId, platform: &str, token: &str) -> Result<(), StoreError> {
        let devices = &self.inner.c.devices;
        let update = doc! {
            "$set": { "user_id": id.as_str(), "platform": platform },
            "$setOnInsert": { "created_at": now_rfc3339() },
        };
        // Two concurrent upserts of one new _id: one inserts, the other
        // fails on the key and, run again, updates.
        for attempt in 0..3 {
            match devices
                .update_one(doc! { "_id": token }, update.clone())
                .upsert(true)
                .await
            {
                Ok(_) => return Ok(()),
                Err(e) if is_dup_key(&e) && attempt < 2 => continue,
                Err(e) => return Err(store_err(e)),
            }
        }
        Ok(())
    }

    async fn delete_device(&self, id: &UserId, token: &str) -> Result<bool, StoreError> {
        let r = self
            .inner
            .c
            .devices
            .delete_one(doc! { "_id": token, "user_id": id.as_str() })
            .await
            .map_err(store_err)?;
        Ok(r.deleted_count > 0)
    }

    async fn devices(&self, id: &UserId) -> Result<Vec<Device>, StoreError> {
        let docs: Vec<DeviceDoc> = self
            .inner
            .c
            .devices
            .find(doc! { "user_id": id.as_str() })
            .sort(doc! { "created_at": 1, "_id": 1 })
            .await
            .map_err(store_err)?
            .try_collect()
            .await
            .map_err(store_err)?;
        Ok(docs.into_iter().map(Device::from).collect())
    }

    async fn block(&self, blocker: &UserId, blocked: &UserId) -> Result<(), StoreError> {
        let r = self
            .inner
            .c
            .blocks
            .update_one(
                doc! { "_id": pair_key(blocker.as_str(), blocked.as_str()) },
                doc! { "$setOnInsert": {
                    "blocker_id": blocker.as_str(),
                    "blocked_id": blocked.as_str(),
                    "created_at": now_rfc3339(),
                } },
            )
            .upsert(true)
            .await;
        match r {
            Ok(_) => Ok(()),
            // A concurrent identical block inserted it: the block is there.
            Err(e) if is_dup_key(&e) => Ok(()),
            Err(e) => Err(store_err(e)),
        }
    }

    async fn unblock(&self, blocker: &UserId, blocked: &UserId) -> Result<(), StoreError> {
        self.inner
            .c
            .blocks
            .delete_one(doc! { "_id": pair_key(blocker.as_str(), blocked.as_str()) })
            .await
            .map_err(store_err)?;
        Ok(())
    }

    async fn blocked_by(&self, blocker: &UserId) -> Result<Vec<UserId>, StoreError> {
        self.inner
            .block_ids(
                doc! { "blocker_id": blocker.as_str() },
                "blocked_id",
                Some(doc! { "created_at": 1, "_id": 1 }),
            )
            .await
    }

    async fn blockers_of(&self, user: &UserId) -> Result<Vec<UserId>, StoreError> {
        self.inner
            .block_ids(doc! { "blocked_id": user.as_str() }, "blocker_id", None)
            .await
    }

    async fn blocks_among(&self, users: &[UserId]) -> Result<Vec<(UserId, UserId)>, StoreError> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let list: Vec<&str> = users.iter().map(UserId::as_str).collect();
        let docs: Vec<BlockDoc> = self
            .inner
            .c
            .blocks
            .find(doc! { "blocker_id": { "$in": &list }, "blocked_id": { "$in": &list } })
            .await
            .map_err(store_err)?
            .try_collect()
            .await
            .map_err(store_err)?;
        Ok(docs
            .into_iter()
            .map(|d| (d.blocker_id, d.blocked_id))
            .collect())
    }
}

#[async_trait]
impl AuthStore for MongoStore {
    async fn insert_refresh(&self, t: NewRefreshToken) -> Result<(), StoreError> {
        let d = RefreshDoc::new(t.hash, t.user_id, t.family_id, t.expires_at);
        self.inner
            .c
            .refresh
            .insert_one(d)
            .await
            .map_err(store_err)?;
        Ok(())
    }

    async fn rotate_refresh(
        &self,
        old_hash: &str,
        new_hash: &str,
        new_expires_at: i64,
        now: i64,
    ) -> Result<RotateOutcome, StoreError> {
        let c = self.inner.c.clone();
        let (old, new) = (old_hash.to_owned(), new_hash.to_owned());
        self.inner
            .transaction(move |s| {
                let (c, old, new) = (c.clone(), old.clone(), new.clone());
                async move {
                    // Spend the token only if it is current: one atomic step.
                    let spent = c
                        .refresh
                        .find_one_and_update(
                            doc! { "_id": &old, "used": false, "expires_at": { "$gt": now } },
                            doc! { "$set": { "used": true } },
                        )
                        .session(&mut *s)
                        .await?;
                    if let Some(t) = spent {
                        let user = t.user_id.clone();
                        c.refresh
                            .insert_one(RefreshDoc::new(
                                new,
                                t.user_id,
                                t.family_id,
                                new_expires_at,
                            ))
                            .session(&mut *s)
                            .await?;
                        return Ok(RotateOutcome::Rotated(user));
                    }
                    let Some(t) = c
                        .refresh
                        .find_one(doc! { "_id": &old })
                        .session(&mut *s)
                        .await?
                    else {
                        return Ok(RotateOutcome::Invalid);
                    };
                    if t.used {
                        c.refresh
                            .delete_many(doc! { "family_id": &t.family_id })
                            .session(&mut *s)
                            .await?;
                        return Ok(RotateOutcome::Reused);
                    }
                    Ok(RotateOutcome::Invalid)
                }
                .boxed()
            })
            .await
    }

    async fn revoke_refresh(&self, hash: &str) -> Result<bool, StoreError> {
        let c = &self.inner.c;
        let Some(t) = c
            .refresh
            .find_one(doc! { "_id": hash })
            .await
            .map_err(store_err)?
        else {
            return Ok(false);
        };
        c.refresh
            .delete_many(doc! { "family_id": &t.family_id })
            .await
            .map_err(store_err)?;
        Ok(true)
    }
}

#[async_trait]
impl RoomStore for MongoStore {
    async fn create_direct(&self, a: &UserId, b: &UserId) -> Result<(Room, bool), StoreError> {
        if !self.inner.users_exist(&[a, b]).await? {
            return Err(StoreError::NotFound);
        }
        let key = direct_key(a, b);
        let c = self.inner.c.clone();
        let (a, b) = (a.clone(), b.clone());
        let (room_id, created) = self
            .inner
            .transaction(move |s| {
                let (c, key, a, b) = (c.clone(), key.clone(), a.clone(), b.clone());
                async move {
                    if let Some(r) = c
                        .rooms
                        .find_one(doc! { "direct_key": &key })
                        .session(&mut *s)
                        .await?
                    {
                        return Ok((r.id, false));
                    }
                    let now = now_rfc3339();
                    let room = RoomDoc {
                        id: RoomId::generate(),
                        kind: RoomKind::Direct,
                        name: None,
                        direct_key: Some(key),
                        created_at: now.clone(),
                        last_seq: 0,
                    };
                    c.rooms.insert_one(&room).session(&mut *s).await?;
                    let mut members = vec![member_doc(&room.id, &a, Role::Member, &now)];
                    if a != b {
                        members.push(member_doc(&room.id, &b, Role::Member, &now));
                    }
                    c.members.insert_many(members).session(&mut *s).await?;
                    Ok((room.id, true))
                }
                .boxed()
            })
            .await?;
        let room = self
            .inner
            .load_room(room_id.as_str())
            .await?
            .ok_or(StoreError::NotFound)?;
        Ok((room, created))
    }

    async fn create_group(
        &self,
        owner: &UserId,
        name: &str,
        members: &[UserId],
    ) -> Result<Room, StoreError> {
        let everyone: Vec<&UserId> = std::iter::once(owner).chain(members.iter()).collect();
        if !self.inner.users_exist(&everyone).await? {
            return Err(StoreError::NotFound);
        }
        let now = now_rfc3339();
        let room = RoomDoc {
            id: RoomId::generate(),
            kind: RoomKind::Group,
            name: Some(name.to_owned()),
            direct_key: None,
            created_at: now.clone(),
            last_seq: 0,
        };
        let mut seen = HashSet::new();
        let mut docs = Vec::with_capacity(everyone.len());
        for (i, u) in everyone.iter().enumerate() {
            if seen.insert(u.as_str()) {
                let role = if i == 0 { Role::Owner } else { Role::Member };
                docs.push(member_doc(&room.id, u, role, &now));
            }
        }
        let c = self.inner.c.clone();
        let id = room.id.clone();
        self.inner
            .transaction(move |s| {
                let (c, room, docs) = (c.clone(), room.clone(), docs.clone());
                async move {
                    c.rooms.insert_one(&room).session(&mut *s).await?;
                    c.members.insert_many(docs).session(&mut *s).await?;
                    Ok(())
                }
                .boxed()
            })
            .await?;
        self.inner
            .load_room(id.as_str())
            .await?
            .ok_or(StoreError::NotFound)
    }

    async fn room(&self, id: &RoomId) -> Result<Option<Room>, StoreError> {
        self.inner.load_room(id.as_str()).await
    }

    async fn rooms_for_user(&self, user: &UserId) -> Result<Vec<RoomSummary>, StoreError> {
        let c = &self.inner.c;
        let mine: Vec<MemberDoc> = c
            .members
            .find(doc! { "user_id": user.as_str() })
            .await
            .map_err(store_err)?
            .try_collect()
            .await
            .map_err(store_err)?;
        if mine.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<&str> = mine.iter().map(|m| m.room_id.as_str()).collect();
        let rooms: HashMap<RoomId, RoomDoc> = c
            .rooms
            .find(doc! { "_id": { "$in": &ids } })
            .await
            .map_err(store_err)?
            .map_ok(|r| (r.id.clone(), r))
            .try_collect()
            .await
            .map_err(store_err)?;
        let mut members: HashMap<RoomId, Vec<MemberDoc>> = HashMap::new();
        let mut cur = c
            .members
            .find(doc! { "room_id": { "$in": &ids } })
            .sort(doc! { "room_id": 1, "joined_at": 1, "user_id": 1 })
            .await
            .map_err(store_err)?;
        while let Some(m) = cur.try_next().await.map_err(store_err)? {
            members.entry(m.room_id.clone()).or_default().push(m);
        }
        let me = user.as_str();
        // Messages of senders the user blocks count for neither last nor unread.
        let blocked: Vec<String> = self
            .blocked_by(user)
            .await?
            .into_iter()
            .map(|u| u.as_str().to_owned())
            .collect();
        let blocked = &blocked;
        let work: Vec<(RoomDoc, Vec<MemberDoc>, Seq)> = mine
            .into_iter()
            .filter_map(|m| {
                let room = rooms.get(&m.room_id).cloned()?;
                let ms = members.remove(&m.room_id).unwrap_or_default();
                Some((room, ms, m.read_seq))
            })
            .collect();
        let mut out: Vec<RoomSummary> = futures_util::stream::iter(work)
            .map(|(r, ms, read_seq)| async move {
                let rid = r.id.as_str().to_owned();
                let last = c
                    .messages
                    .find_one(doc! { "room_id": &rid, "sender_id": { "$nin": blocked } })
                    .sort(doc! { "seq": -1 })
                    .await
                    .map_err(store_err)?;
                let unread = c
                    .messages
                    .count_documents(doc! {
                        "room_id": &rid,
                        "seq": { "$gt": read_seq },
                        "sender_id": { "$ne": me, "$nin": blocked },
                    })
                    .await
                    .map_err(store_err)?;
                Ok::<_, StoreError>(RoomSummary {
                    room: room_of(r, ms),
                    last_message: last.map(Message::from),
                    unread: unread as i64,
                })
            })
            .buffer_unordered(8)
            .try_collect()
            .await?;
        out.sort_by(|x, y| {
            let at = |s: &RoomSummary| {
                s.last_message
                    .as_ref()
                    .map(|m| m.created_at.clone())
                    .unwrap_or_else(|| s.room.created_at.clone())
            };
            at(y).cmp(&at(x)).then_with(|| y.room.id.cmp(&x.room.id))
        });
        Ok(out)
    }

    async fn cursors_for_user(&self, user: &UserId) -> Result<Vec<RoomCursor>, StoreError> {
        let c = &self.inner.c;
        let mine: Vec<MemberDoc> = c
            .members
            .find(doc! { "user_id": user.as_str() })
            .sort(doc! { "room_id": 1 })
            .await
            .map_err(store_err)?
            .try_collect()
            .await
            .map_err(store_err)?;
        let ids: Vec<&str> = mine.iter().map(|m| m.room_id.as_str()).collect();
        let last: HashMap<RoomId, Seq> = c
            .rooms
            .find(doc! { "_id": { "$in": &ids } })
            .await
            .map_err(store_err)?
            .map_ok(|r| (r.id, r.last_seq))
            .try_collect()
            .await
            .map_err(store_err)?;
        Ok(mine
            .into_iter()
            .filter_map(|m| {
                let last_seq = *last.get(&m.room_id)?;
                Some(RoomCursor {
                    room_id: m.room_id,
                    last_seq,
                    delivered_seq: m.delivered_seq,
                    read_seq: m.read_seq,
                })
            })
            .collect())
    }

    async fn add_member(&self, room: &RoomId, user: &UserId, role: Role) -> Result<(), StoreError> {
        let c = &self.inner.c;
        if !self.inner.users_exist(&[user]).await? {
            return Err(StoreError::NotFound);
        }
        let d = member_doc(room, user, role, &now_rfc3339());
        let set = mongodb::bson::to_document(&d).map_err(bson_err)?;
        let r = c
            .members
            .update_one(doc! { "_id": &d.id }, doc! { "$setOnInsert": set })
            .upsert(true)
            .await;
        match r {
            Ok(_) => Ok(()),
            Err(e) if is_dup_key(&e) => Ok(()),
            Err(e) => Err(store_err(e)),
        }
    }

    async fn remove_member(&self, room: &RoomId, user: &UserId) -> Result<bool, StoreError> {
        let r = self
            .inner
            .c
            .members
            .delete_one(doc! { "_id": pair_key(room.as_str(), user.as_str()) })
            .await
            .map_err(store_err)?;
        Ok(r.deleted_count > 0)
    }

    async fn advance_cursor(
        &self,
        room: &RoomId,
        user: &UserId,
        kind: CursorKind,
        up_to: Seq,
    ) -> Result<(Member, bool), StoreError> {
        let c = &self.inner.c;
        let Some(r) = c
            .raw(ROOMS)
            .find_one(doc! { "_id": room.as_str() })
            .projection(doc! { "last_seq": 1 })
            .await
            .map_err(store_err)?
        else {
            return Err(StoreError::Forbidden);
        };
        let last_seq = match r.get("last_seq") {
            Some(Bson::Int64(v)) => *v,
            Some(Bson::Int32(v)) => i64::from(*v),
            _ => 0,
        };
        let target = up_to.min(last_seq).max(0);
        // $max moves a cursor only forward, atomically, whatever races it.
        let update = match kind {
            CursorKind::Delivered => doc! { "$max": { "delivered_seq": target } },
            CursorKind::Read => {
                doc! { "$max": { "delivered_seq": target, "read_seq": target } }
            }
        };
        let before = c
            .members
            .find_one_and_update(
                doc! { "_id": pair_key(room.as_str(), user.as_str()) },
                update,
            )
            .return_document(ReturnDocument::Before)
            .await
            .map_err(store_err)?
            .ok_or(StoreError::Forbidden)?;
        let delivered = before.delivered_seq.max(target);
        let read = match kind {
            CursorKind::Delivered => before.read_seq,
            CursorKind::Read => before.read_seq.max(target),
        };
        let moved = match kind {
            CursorKind::Delivered => delivered > before.delivered_seq,
            CursorKind::Read => read > before.read_seq,
        };
        Ok((
            Member {
                user_id: before.user_id,
                role: before.role,
                delivered_seq: delivered,
                read_seq: read,
            },
            moved,
        ))
    }

    async fn contacts(&self, user: &UserId) -> Result<Vec<UserId>, StoreError> {
        let c = &self.inner.c;
        let rooms: Vec<Document> = c
            .raw(MEMBERS)
            .find(doc! { "user_id": user.as_str() })
            .projection(doc! { "room_id": 1 })
            .await
            .map_err(store_err)?
            .try_collect()
            .await
            .map_err(store_err)?;
        let ids: Vec<&str> = rooms
            .iter()
            .filter_map(|d| d.get_str("room_id").ok())
            .collect();
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let others = c
            .members
            .distinct(
                "user_id",
                doc! { "room_id": { "$in": ids }, "user_id": { "$ne": user.as_str() } },
            )
            .await
            .map_err(store_err)?;
        Ok(others
            .into_iter()
            .filter_map(|b| match b {
                Bson::String(s) => Some(UserId::from_trusted(s)),
                _ => None,
            })
            .collect())
    }
}

/// What one message of a batch turns into.
enum Plan {
    /// Stored before this batch.
    Stored(Message),
    /// Same key as an earlier message of this batch.
    SameAs(usize),
    Forbidden,
    /// New: the `n`th new message of its room in this batch.
    New(RoomId, i64),
}

/// Appends a batch inside the caller's transaction: two reads, one
/// `$inc` per room, one insert. Returns a result per message.
async fn append_in_txn(
    c: &Colls,
    s: &mut ClientSession,
    batch: &[NewMessage],
) -> mongodb::error::Result<Vec<Result<Appended, StoreError>>> {
    fn key(m: &NewMessage) -> (&str, &str, &str) {
        (
            m.room_id.as_str(),
            m.sender_id.as_str(),
            m.client_msg_id.as_str(),
        )
    }
    // 1. Messages stored before under the same idempotency keys.
    let mut ors = Vec::with_capacity(batch.len());
    let mut asked = HashSet::new();
    for m in batch {
        if asked.insert(key(m)) {
            let (r, u, k) = key(m);
            ors.push(doc! { "room_id": r, "sender_id": u, "client_msg_id": k });
        }
    }
    let mut stored: HashMap<(String, String, String), Message> = HashMap::new();
    if !ors.is_empty() {
        let mut cur = c
            .messages
            .find(doc! { "$or": ors })
            .session(&mut *s)
            .await?;
        let mut stream = cur.stream(&mut *s);
        while let Some(d) = stream.try_next().await? {
            stored.insert(
                (
                    d.room_id.as_str().to_owned(),
                    d.sender_id.as_str().to_owned(),
                    d.client_msg_id.as_str().to_owned(),
                ),
                d.into(),
            );
        }
    }
    // 2. Which senders are members of their rooms.
    let member_ids: Vec<String> = batch
        .iter()
        .map(|m| pair_key(m.room_id.as_str(), m.sender_id.as_str()))
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let mut members = HashSet::new();
    {
        let mut cur = c
            .raw(MEMBERS)
            .find(doc! { "_id": { "$in": &member_ids } })
            .projection(doc! { "_id": 1 })
            .session(&mut *s)
            .await?;
        let mut stream = cur.stream(&mut *s);
        while let Some(d) = stream.try_next().await? {
            if let Ok(id) = d.get_str("_id") {
                members.insert(id.to_owned());
            }
        }
    }
    // 3. Decide, in order, what each message is.
    let mut plans = Vec::with_capacity(batch.len());
    let mut first_of: HashMap<(&str, &str, &str), usize> = HashMap::new();
    let mut per_room: Vec<(RoomId, i64)> = Vec::new();
    for (i, m) in batch.iter().enumerate() {
        let k = key(m);
        let owned = (k.0.to_owned(), k.1.to_owned(), k.2.to_owned());
        if let Some(old) = stored.get(&owned) {
            plans.push(Plan::Stored(old.clone()));
        } else if let Some(&j) = first_of.get(&k) {
            plans.push(Plan::SameAs(j));
        } else if !members.contains(&pair_key(k.0, k.1)) {
            plans.push(Plan::Forbidden);
        } else {
            first_of.insert(k, i);
            let n = match per_room.iter_mut().find(|(r, _)| r == &m.room_id) {
                Some((_, n)) => {
                    *n += 1;
                    *n - 1
                }
                None => {
                    per_room.push((m.room_id.clone(), 1));
                    0
                }
            };
            plans.push(Plan::New(m.room_id.clone(), n));
        }
    }
    // 4. Reserve each room's seqs: one $inc; the transaction makes it and
    //    the insert below one atomic step (no gap, no duplicate).
    let mut base: HashMap<RoomId, Option<Seq>> = HashMap::new();
    for (room, n) in &per_room {
        let after = c
            .raw(ROOMS)
            .find_one_and_update(
                doc! { "_id": room.as_str() },
                doc! { "$inc": { "last_seq": *n } },
            )
            .projection(doc! { "last_seq": 1 })
            .return_document(ReturnDocument::After)
            .session(&mut *s)
            .await?;
        let last = after.and_then(|d| match d.get("last_seq") {
            Some(Bson::Int64(v)) => Some(*v),
            Some(Bson::Int32(v)) => Some(i64::from(*v)),
            _ => None,
        });
        base.insert(room.clone(), last.map(|l| l - n));
    }
    // 5. Build the new messages and the answers.
    let now = now_rfc3339();
    let mut out: Vec<Result<Appended, StoreError>> = Vec::with_capacity(batch.len());
    let mut docs = Vec::new();
    for (m, plan) in batch.iter().zip(plans) {
        let r = match plan {
            Plan::Stored(message) => Ok(Appended {
                message,
                duplicate: true,
            }),
            Plan::SameAs(j) => match &out[j] {
                Ok(a) => Ok(Appended {
                    message: a.message.clone(),
                    duplicate: true,
                }),
                Err(e) => Err(e.clone()),
            },
            Plan::Forbidden => Err(StoreError::Forbidden),
            Plan::New(room, n) => match base.get(&room).copied().flatten() {
                None => Err(StoreError::NotFound),
                Some(b) => {
                    let message = Message {
                        id: MessageId::generate(),
                        room_id: room,
                        seq: b + n + 1,
                        sender_id: m.sender_id.clone(),
                        client_msg_id: m.client_msg_id.clone(),
                        body: m.body.clone(),
                        created_at: now.clone(),
                    };
                    docs.push(MessageDoc::from(message.clone()));
                    Ok(Appended {
                        message,
                        duplicate: false,
                    })
                }
            },
        };
        out.push(r);
    }
    if !docs.is_empty() {
        c.messages
            .insert_many(docs)
            .ordered(true)
            .session(&mut *s)
            .await?;
    }
    Ok(out)
}

impl Inner {
    async fn append_all(&self, batch: Vec<NewMessage>) -> AppendReply {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let c = self.c.clone();
        let batch = Arc::new(batch);
        self.transaction(move |s| {
            let (c, batch) = (c.clone(), batch.clone());
            async move { append_in_txn(&c, s, &batch).await }.boxed()
        })
        .await
    }
}

/// The group-commit loop: takes every append waiting (up to
/// `MAX_APPEND_BATCH` messages), commits them in one transaction, then
/// answers each caller. Ends when the store is dropped.
async fn appender(inner: Arc<Inner>, mut rx: mpsc::Receiver<AppendJob>) {
    while let Some(first) = rx.recv().await {
        let mut jobs = vec![first];
        let mut n = jobs[0].batch.len();
        while n < MAX_APPEND_BATCH {
            match rx.try_recv() {
                Ok(j) => {
                    n += j.batch.len();
                    jobs.push(j);
                }
                Err(_) => break,
            }
        }
        let mut lens = Vec::with_capacity(jobs.len());
        let mut replies = Vec::with_capacity(jobs.len());
        let mut all = Vec::with_capacity(n);
        for j in jobs {
            lens.push(j.batch.len());
            replies.push(j.reply);
            all.extend(j.batch);
        }
        metrics::histogram!("chatd_store_batch_size").record(all.len() as f64);
        match inner.append_all(all).await {
            Ok(results) => {
                let mut it = results.into_iter();
                for (len, reply) in lens.into_iter().zip(replies) {
                    let _ = reply.send(Ok(it.by_ref().take(len).collect()));
                }
            }
            Err(e) => {
                for reply in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }
}

#[async_trait]
impl MessageStore for MongoStore {
    async fn append_batch(
        &self,
        batch: Vec<NewMessage>,
    ) -> Result<Vec<Result<Appended, StoreError>>, StoreError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let (reply, rx) = oneshot::channel();
        self.appender
            .send(AppendJob { batch, reply })
            .await
            .map_err(|_| StoreError::Unavailable("mongodb append task stopped".into()))?;
        rx.await
            .map_err(|_| StoreError::Unavailable("mongodb append task stopped".into()))?
    }

    async fn history(&self, room: &RoomId, q: HistoryQuery) -> Result<Vec<Message>, StoreError> {
        if q.limit == 0 {
            return Ok(Vec::new());
        }
        let before = q.before.unwrap_or(i64::MAX);
        let after = q.after.unwrap_or(0);
        // Only `before` (or nothing): the newest page; otherwise the oldest
        // page after `after`. Either way answered ascending.
        let newest_first = q.after.is_none();
        let docs: Vec<MessageDoc> = self
            .inner
            .c
            .messages
            .find(doc! { "room_id": room.as_str(), "seq": { "$lt": before, "$gt": after } })
            .sort(doc! { "seq": if newest_first { -1 } else { 1 } })
            .limit(i64::from(q.limit))
            .await
            .map_err(store_err)?
            .try_collect()
            .await
            .map_err(store_err)?;
        let mut out: Vec<Message> = docs.into_iter().map(Message::from).collect();
        if newest_first {
            out.reverse();
        }
        Ok(out)
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
    use mongodb::bson;
    use serde::de::DeserializeOwned;

    /// Domain value → the exact document → BSON bytes → the same value.
    fn both_ways<T>(v: &T, expected: Document)
    where
        T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
    {
        let d = bson::to_document(v).unwrap();
        assert_eq!(d, expected);
        let bytes = bson::to_vec(&d).unwrap();
        let back: T = bson::from_slice(&bytes).unwrap();
        assert_eq!(&back, v);
    }

    fn user_doc(display_name: Option<&str>) -> UserDoc {
        UserDoc {
            id: UserId::from_trusted("u1"),
            username: Username::from_trusted("alice".into()),
            email: Email::from_trusted("alice@example.com".into()),
            display_name: display_name.map(str::to_owned),
            password_hash: "$argon2id$x".into(),
            created_at: "2026-01-01T00:00:00.000Z".into(),
            last_seen: None,
            notify_push: true,
            notify_email: false,
        }
    }

    #[test]
    fn user_maps_both_ways() {
        for name in [Some("Alice"), None] {
            let d = user_doc(name);
            both_ways(
                &d,
                doc! {
                    "_id": "u1", "username": "alice", "email": "alice@example.com",
                    "display_name": name, "password_hash": "$argon2id$x",
                    "created_at": "2026-01-01T00:00:00.000Z", "last_seen": Bson::Null,
                    "notify_push": true, "notify_email": false,
                },
            );
            let u = User::from(d);
            assert_eq!(u.id.as_str(), "u1");
            assert_eq!(u.username.as_ref(), "alice");
            assert_eq!(u.email.as_ref(), "alice@example.com");
            assert_eq!(u.display_name.as_deref(), name);
        }
    }

    #[test]
    fn rooms_map_both_ways_and_only_direct_ones_have_a_key() {
        let a = UserId::from_trusted("b2");
        let b = UserId::from_trusted("a1");
        let direct = RoomDoc {
            id: RoomId::from_trusted("r1"),
            kind: RoomKind::Direct,
            name: None,
            direct_key: Some(direct_key(&a, &b)),
            created_at: "t".into(),
            last_seq: 7,
        };
        both_ways(
            &direct,
            doc! {
                "_id": "r1", "kind": "direct", "name": Bson::Null, "direct_key": "a1:b2",
                "created_at": "t", "last_seq": 7_i64,
            },
        );
        assert_eq!(
            direct_key(&b, &a),
            "a1:b2",
            "one key per pair, either order"
        );
        let group = RoomDoc {
            id: RoomId::from_trusted("r2"),
            kind: RoomKind::Group,
            name: Some("team".into()),
            direct_key: None,
            created_at: "t".into(),
            last_seq: 0,
        };
        both_ways(
            &group,
            doc! { "_id": "r2", "kind": "group", "name": "team", "created_at": "t", "last_seq": 0_i64 },
        );
    }

    #[test]
    fn members_map_both_ways_for_every_role() {
        for (role, name) in [
            (Role::Owner, "owner"),
            (Role::Admin, "admin"),
            (Role::Member, "member"),
        ] {
            let mut d = member_doc(
                &RoomId::from_trusted("r1"),
                &UserId::from_trusted("u1"),
                role,
                "t",
            );
            d.delivered_seq = 5;
            d.read_seq = 3;
            both_ways(
                &d,
                doc! {
                    "_id": "r1:u1", "room_id": "r1", "user_id": "u1", "role": name,
                    "delivered_seq": 5_i64, "read_seq": 3_i64, "joined_at": "t",
                },
            );
            let m = Member::from(d);
            assert_eq!((m.role, m.delivered_seq, m.read_seq), (role, 5, 3));
        }
    }

    #[test]
    fn messages_map_both_ways() {
        let m = Message {
            id: MessageId::from_trusted("m1"),
            room_id: RoomId::from_trusted("r1"),
            seq: 42,
            sender_id: UserId::from_trusted("u1"),
            client_msg_id: ClientMsgId::from_trusted("c-1".into()),
            body: MessageBody::from_trusted("hé 👋".into()),
            created_at: "t".into(),
        };
        let d = MessageDoc::from(m.clone());
        both_ways(
            &d,
            doc! {
                "_id": "m1", "room_id": "r1", "seq": 42_i64, "sender_id": "u1",
                "client_msg_id": "c-1", "body": "hé 👋", "created_at": "t",
            },
        );
        assert_eq!(Message::from(d), m);
    }

    #[test]
    fn numbers_written_as_int32_by_other_tools_still_read() {
        let d: MessageDoc = bson::from_document(doc! {
            "_id": "m1", "room_id": "r1", "seq": 3_i32, "sender_id": "u1",
            "client_msg_id": "c", "body": "b", "created_at": "t",
        })
        .unwrap();
        assert_eq!(d.seq, 3);
    }

    #[test]
    fn refresh_tokens_devices_and_blocks_map_both_ways() {
        let mut t = RefreshDoc::new(
            "h".into(),
            UserId::from_trusted("u1"),
            "fam".into(),
            4_000_000_000,
        );
        assert_eq!(t.purge_at.timestamp_millis(), 4_000_000_000_000);
        t.used = true;
        both_ways(
            &t,
            doc! {
                "_id": "h", "user_id": "u1", "family_id": "fam", "expires_at": 4_000_000_000_i64,
                "used": true, "purge_at": DateTime::from_millis(4_000_000_000_000),
            },
        );
        // An expiry already past never schedules the purge before "now".
        let past = RefreshDoc::new("h".into(), UserId::from_trusted("u1"), "f".into(), 10);
        assert!(past.purge_at.timestamp_millis() > 1_700_000_000_000);

        let dev = DeviceDoc {
            token: "tok".into(),
            user_id: UserId::from_trusted("u1"),
            platform: "ios".into(),
            created_at: "t".into(),
        };
        both_ways(
            &dev,
            doc! { "_id": "tok", "user_id": "u1", "platform": "ios", "created_at": "t" },
        );
        assert_eq!(
            Device::from(dev),
            Device {
                platform: "ios".into(),
                token: "tok".into(),
                created_at: "t".into()
            }
        );

        let block = BlockDoc {
            id: pair_key("u1", "u2"),
            blocker_id: UserId::from_trusted("u1"),
            blocked_id: UserId::from_trusted("u2"),
            created_at: "t".into(),
        };
        both_ways(
            &block,
            doc! { "_id": "u1:u2", "blocker_id": "u1", "blocked_id": "u2", "created_at": "t" },
        );
    }

    #[test]
    fn prefix_search_is_literal() {
        assert_eq!(regex_escape("srch_"), "srch_");
        assert_eq!(regex_escape("a.b*c%"), r"a\.b\*c\%");
        assert_eq!(regex_escape(r"(x|y)\[^$]"), r"\(x\|y\)\\\[\^\$\]");
        assert_eq!(regex_escape("é-"), r"é\-");
    }

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

    fn command_error(code: i32) -> MongoError {
        let ce: mongodb::error::CommandError =
            bson::from_document(doc! { "code": code, "codeName": "X", "errmsg": "m" }).unwrap();
        MongoError::from(ErrorKind::Command(ce))
    }

    #[test]
    fn errors_are_classified() {
        let io = MongoError::from(ErrorKind::Io(Arc::new(std::io::Error::from(
            std::io::ErrorKind::ConnectionRefused,
        ))));
        match store_err(io) {
            StoreError::Unavailable(m) => {
                assert_eq!(m, "mongodb connection failed: connection refused")
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            store_err(command_error(10107)),
            StoreError::Unavailable(_)
        ));
        assert!(matches!(
            store_err(command_error(2)),
            StoreError::Internal(_)
        ));
        let dup = command_error(DUPLICATE_KEY);
        assert!(is_dup_key(&dup) && txn_retryable(&dup));
        let we: mongodb::error::WriteError =
            bson::from_document(doc! { "code": DUPLICATE_KEY, "errmsg": "E11000" }).unwrap();
        assert!(is_dup_key(&MongoError::from(ErrorKind::Write(
            WriteFailure::WriteError(we)
        ))));
    }
}
