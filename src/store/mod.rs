//! Persistence: async traits over domain types, one per aggregate, and the
//! backends behind them.
//!
//! - [`sqlite`]: the embedded default (one file, WAL, a single writer thread
//!   that group-commits every write of every room into one transaction).
//! - [`mongo`]: the shared store of a cluster (transactions for every
//!   multi-document change, group-committed appends).
//!
//! Startup picks the backend from config ([`open`]) and hands out [`Stores`],
//! a bundle of `Arc<dyn ...>`. The one contract suite in [`contract`] runs
//! against every backend.

pub mod contract;
pub mod contract_lifecycle;
pub mod lifecycle;
pub mod mongo;
pub mod sqlite;
pub mod transfer;

use std::sync::Arc;

use async_trait::async_trait;
use serde::Serialize;

pub use crate::blobs::Attachment;
pub use lifecycle::{ChangeOutcome, MessageChange, Reaction};

use crate::config::StoreConfig;
use crate::domain::{ClientMsgId, Email, MessageBody, MessageId, RoomId, Seq, UserId, Username};

/// What can go wrong in a store call.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The addressed record does not exist.
    #[error("not found")]
    NotFound,
    /// A unique rule was broken; the code names which (`username_taken`, ...).
    #[error("conflict: {0}")]
    Conflict(&'static str),
    /// The caller may not do this (e.g. append to a room it is not in).
    #[error("forbidden")]
    Forbidden,
    /// The backend cannot be reached now; the caller may retry.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Anything else; details are for the log, not for clients.
    #[error("store error: {0}")]
    Internal(String),
}

/// A user as stored, without the password hash.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct User {
    pub id: UserId,
    #[schema(value_type = String, example = "alice")]
    pub username: Username,
    #[schema(value_type = String, format = Email)]
    pub email: Email,
    pub display_name: Option<String>,
    #[schema(format = DateTime)]
    pub created_at: String,
    #[serde(skip)]
    pub last_seen: Option<String>,
    /// Holds the admin role (`/admin/v1`): granted and revoked by the
    /// operator (`chatd admin grant|revoke`), never by registering.
    #[serde(skip)]
    pub admin: bool,
}

/// Input of [`UserStore::create_user`].
#[derive(Debug, Clone)]
pub struct NewUser {
    pub username: Username,
    pub email: Email,
    pub display_name: Option<String>,
    pub password_hash: String,
}

/// Per-user notification switches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct NotificationSettings {
    pub push: bool,
    pub email: bool,
}

impl Default for NotificationSettings {
    fn default() -> Self {
        Self {
            push: true,
            email: true,
        }
    }
}

/// A registered push device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Device {
    pub platform: String,
    pub token: String,
    pub created_at: String,
}

/// Users: accounts, profiles, search, settings, devices and blocks.
#[async_trait]
pub trait UserStore: Send + Sync {
    /// Creates a user; `Conflict("username_taken" | "email_taken")` on duplicates.
    async fn create_user(&self, new: NewUser) -> Result<User, StoreError>;
    /// One user by id.
    async fn user(&self, id: &UserId) -> Result<Option<User>, StoreError>;
    /// The user and password hash for a login (username or e-mail).
    async fn credentials(&self, login: &str) -> Result<Option<(User, String)>, StoreError>;
    /// Users whose username starts with `prefix`, by username, at most `limit`.
    async fn search_users(&self, prefix: &str, limit: u32) -> Result<Vec<User>, StoreError>;
    /// Records when the user's last socket closed.
    async fn set_last_seen(&self, id: &UserId, at: &str) -> Result<(), StoreError>;
    /// The user's notification switches.
    async fn notification_settings(&self, id: &UserId) -> Result<NotificationSettings, StoreError>;
    /// Replaces the user's notification switches.
    async fn set_notification_settings(
        &self,
        id: &UserId,
        settings: NotificationSettings,
    ) -> Result<(), StoreError>;
    /// Registers (or moves to this user) a push token.
    async fn put_device(&self, id: &UserId, platform: &str, token: &str) -> Result<(), StoreError>;
    /// Removes a push token of the user; `false` if it was not there.
    async fn delete_device(&self, id: &UserId, token: &str) -> Result<bool, StoreError>;
    /// The user's push devices.
    async fn devices(&self, id: &UserId) -> Result<Vec<Device>, StoreError>;
    /// `blocker` blocks `blocked` (idempotent).
    async fn block(&self, blocker: &UserId, blocked: &UserId) -> Result<(), StoreError>;
    /// Lifts a block (idempotent).
    async fn unblock(&self, blocker: &UserId, blocked: &UserId) -> Result<(), StoreError>;
    /// Who `blocker` blocks.
    async fn blocked_by(&self, blocker: &UserId) -> Result<Vec<UserId>, StoreError>;
    /// Who blocks `user`.
    async fn blockers_of(&self, user: &UserId) -> Result<Vec<UserId>, StoreError>;
    /// The (blocker, blocked) pairs where both are in `users`.
    async fn blocks_among(&self, users: &[UserId]) -> Result<Vec<(UserId, UserId)>, StoreError>;
    /// Grants (`true`) or revokes the admin role of the user with this
    /// username; `None` if there is no such user.
    async fn set_admin(&self, username: &str, admin: bool) -> Result<Option<User>, StoreError>;
    /// Every user holding the admin role, by username.
    async fn admins(&self) -> Result<Vec<User>, StoreError>;
}

/// Input of a refresh token row: only the hash of the token is stored.
#[derive(Debug, Clone)]
pub struct NewRefreshToken {
    pub hash: String,
    pub user_id: UserId,
    /// One login's chain of rotated tokens shares a family.
    pub family_id: String,
    /// Unix seconds.
    pub expires_at: i64,
}

/// What presenting a refresh token did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RotateOutcome {
    /// The token was current; it is spent and the new one replaces it.
    Rotated(UserId),
    /// The token was already spent: the whole login (family) is revoked.
    Reused,
    /// Unknown or expired token.
    Invalid,
}

/// Refresh tokens (opaque, stored hashed, rotated on use).
#[async_trait]
pub trait AuthStore: Send + Sync {
    /// Stores a new token (a new login, or the result of a rotation).
    async fn insert_refresh(&self, token: NewRefreshToken) -> Result<(), StoreError>;
    /// Spends `old_hash` and stores `new` in the same family, atomically.
    async fn rotate_refresh(
        &self,
        old_hash: &str,
        new_hash: &str,
        new_expires_at: i64,
        now: i64,
    ) -> Result<RotateOutcome, StoreError>;
    /// Revokes the login (family) the token belongs to; `false` if unknown.
    async fn revoke_refresh(&self, hash: &str) -> Result<bool, StoreError>;
}

/// Direct (two users) or group room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum RoomKind {
    Direct,
    Group,
}

impl RoomKind {
    /// The stored and wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            RoomKind::Direct => "direct",
            RoomKind::Group => "group",
        }
    }
}

/// A member's role in a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Owner,
    Admin,
    Member,
}

impl Role {
    /// The stored and wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Owner => "owner",
            Role::Admin => "admin",
            Role::Member => "member",
        }
    }

    /// Parses a stored name; unknown names read as `Member`.
    pub fn from_str_lossy(s: &str) -> Self {
        match s {
            "owner" => Role::Owner,
            "admin" => Role::Admin,
            _ => Role::Member,
        }
    }
}

/// A member of a room with its cursors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Member {
    pub user_id: UserId,
    pub role: Role,
    #[schema(value_type = i64, minimum = 0)]
    pub delivered_seq: Seq,
    #[schema(value_type = i64, minimum = 0)]
    pub read_seq: Seq,
}

/// A room with its members.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Room {
    pub id: RoomId,
    pub kind: RoomKind,
    pub name: Option<String>,
    pub members: Vec<Member>,
    #[schema(format = DateTime)]
    pub created_at: String,
    #[schema(value_type = i64, minimum = 0)]
    pub last_seq: Seq,
}

impl Room {
    /// The member entry of `user`, if a member.
    pub fn member(&self, user: &UserId) -> Option<&Member> {
        self.members.iter().find(|m| &m.user_id == user)
    }
}

/// A room as listed for one user.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct RoomSummary {
    #[serde(flatten)]
    pub room: Room,
    pub last_message: Option<Message>,
    pub unread: i64,
}

/// One room's position for one user, as sent in `ready`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RoomCursor {
    pub room_id: RoomId,
    pub last_seq: Seq,
    pub delivered_seq: Seq,
    pub read_seq: Seq,
}

/// Which cursor to move.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum CursorKind {
    Delivered,
    Read,
}

/// Rooms: creation, membership, cursors.
#[async_trait]
pub trait RoomStore: Send + Sync {
    /// The direct room of two users, created if missing (`true` when created).
    /// Never creates two rooms for one pair, also under concurrent calls.
    async fn create_direct(&self, a: &UserId, b: &UserId) -> Result<(Room, bool), StoreError>;
    /// A group room; `owner` becomes its owner, `members` plain members.
    async fn create_group(
        &self,
        owner: &UserId,
        name: &str,
        members: &[UserId],
    ) -> Result<Room, StoreError>;
    /// One room with members.
    async fn room(&self, id: &RoomId) -> Result<Option<Room>, StoreError>;
    /// The rooms of a user with last message and unread count, newest
    /// activity first. Messages of senders the user blocks count for neither.
    async fn rooms_for_user(&self, user: &UserId) -> Result<Vec<RoomSummary>, StoreError>;
    /// The user's cursors in every room it is in.
    async fn cursors_for_user(&self, user: &UserId) -> Result<Vec<RoomCursor>, StoreError>;
    /// Adds a member (idempotent).
    async fn add_member(&self, room: &RoomId, user: &UserId, role: Role) -> Result<(), StoreError>;
    /// Removes a member; `false` if it was not one.
    async fn remove_member(&self, room: &RoomId, user: &UserId) -> Result<bool, StoreError>;
    /// Moves a cursor forward to `min(up_to, last_seq)` (read also moves
    /// delivered). Returns the member's cursors after the call and whether
    /// the named cursor moved. `Forbidden` if not a member.
    async fn advance_cursor(
        &self,
        room: &RoomId,
        user: &UserId,
        kind: CursorKind,
        up_to: Seq,
    ) -> Result<(Member, bool), StoreError>;
    /// Everyone who shares at least one room with `user` (without `user`).
    async fn contacts(&self, user: &UserId) -> Result<Vec<UserId>, StoreError>;
}

/// A stored message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Message {
    pub id: MessageId,
    pub room_id: RoomId,
    #[schema(value_type = i64, minimum = 0)]
    pub seq: Seq,
    pub sender_id: UserId,
    #[schema(value_type = String)]
    pub client_msg_id: ClientMsgId,
    #[schema(value_type = String)]
    pub body: MessageBody,
    #[schema(format = DateTime)]
    pub created_at: String,
    /// The message this one answers (same room), or null.
    #[schema(value_type = Option<String>)]
    pub reply_to: Option<MessageId>,
    /// Files sent with the message (none once deleted).
    pub attachments: Vec<Attachment>,
    /// When the body was last edited, or null.
    #[schema(format = DateTime)]
    pub edited_at: Option<String>,
    /// A tombstone: body and attachments were erased.
    pub deleted: bool,
    /// Reactions in the order they were first put on.
    pub reactions: Vec<Reaction>,
}

impl Message {
    /// A freshly appended message: no edits, no reactions.
    pub fn new_plain(
        id: MessageId,
        room_id: RoomId,
        seq: Seq,
        sender_id: UserId,
        client_msg_id: ClientMsgId,
        body: MessageBody,
        created_at: String,
    ) -> Self {
        Self {
            id,
            room_id,
            seq,
            sender_id,
            client_msg_id,
            body,
            created_at,
            reply_to: None,
            attachments: Vec::new(),
            edited_at: None,
            deleted: false,
            reactions: Vec::new(),
        }
    }
}

/// Input of an append.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub room_id: RoomId,
    pub sender_id: UserId,
    pub client_msg_id: ClientMsgId,
    pub body: MessageBody,
    /// Checked by the caller to name a message of the same room.
    pub reply_to: Option<MessageId>,
    /// Checked and bound by the caller ([`crate::blobs::check_attachable`]).
    pub attachments: Vec<Attachment>,
}

impl NewMessage {
    /// A plain message: no reply, no attachments.
    pub fn plain(
        room_id: RoomId,
        sender_id: UserId,
        client_msg_id: ClientMsgId,
        body: MessageBody,
    ) -> Self {
        Self {
            room_id,
            sender_id,
            client_msg_id,
            body,
            reply_to: None,
            attachments: Vec::new(),
        }
    }
}

/// Result of an append: the stored message, and whether it was stored
/// before under the same `(room, sender, client_msg_id)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    pub message: Message,
    pub duplicate: bool,
}

/// Which slice of a room's history.
#[derive(Debug, Clone, Copy, Default)]
pub struct HistoryQuery {
    /// Only seq < before.
    pub before: Option<Seq>,
    /// Only seq > after.
    pub after: Option<Seq>,
    /// At most this many (the newest when only `before` is given, the
    /// oldest after `after`).
    pub limit: u32,
}

/// Messages: the append log of every room.
#[async_trait]
pub trait MessageStore: Send + Sync {
    /// Appends messages, each in its room's next `seq`, durably (committed
    /// before this returns), in order. The seq is assigned inside the
    /// store's transaction, so processes sharing the store never collide.
    /// One result per input; a non-member sender gets `Forbidden`.
    async fn append_batch(
        &self,
        batch: Vec<NewMessage>,
    ) -> Result<Vec<Result<Appended, StoreError>>, StoreError>;
    /// History in ascending seq, each message in its current state.
    async fn history(&self, room: &RoomId, q: HistoryQuery) -> Result<Vec<Message>, StoreError>;
    /// One message of `room` by id, in its current state.
    async fn message(&self, room: &RoomId, id: &MessageId) -> Result<Option<Message>, StoreError>;
    /// Applies an edit, delete or reaction change atomically and stamps the
    /// message with the room's next change number (nothing is written when
    /// the change changes nothing). `NotFound` for an unknown message.
    async fn change_message(
        &self,
        room: &RoomId,
        id: &MessageId,
        change: MessageChange,
    ) -> Result<ChangeOutcome, StoreError>;
    /// Messages of `room` changed after change number `after`, in change
    /// order, at most `limit`, with the change number of each.
    async fn changes_since(
        &self,
        room: &RoomId,
        after: i64,
        limit: u32,
    ) -> Result<Vec<(i64, Message)>, StoreError>;
    /// The member's change cursor in `room` (0 when never set).
    async fn change_cursor(&self, room: &RoomId, user: &UserId) -> Result<i64, StoreError>;
    /// Moves the member's change cursor forward to `to` (never back).
    async fn advance_change_cursor(
        &self,
        room: &RoomId,
        user: &UserId,
        to: i64,
    ) -> Result<(), StoreError>;
}

/// Health of the store connection.
#[async_trait]
pub trait StoreHealth: Send + Sync {
    /// `Ok` when the store answers a trivial query.
    async fn ping(&self) -> Result<(), StoreError>;
    /// The backend's name.
    fn backend(&self) -> &'static str;
}

/// The store handed to the rest of chatd.
#[derive(Clone)]
pub struct Stores {
    pub users: Arc<dyn UserStore>,
    pub auth: Arc<dyn AuthStore>,
    pub rooms: Arc<dyn RoomStore>,
    pub messages: Arc<dyn MessageStore>,
    pub health: Arc<dyn StoreHealth>,
}

impl Stores {
    /// Bundles one backend object that implements every trait.
    pub fn from_backend<B>(b: Arc<B>) -> Self
    where
        B: UserStore + AuthStore + RoomStore + MessageStore + StoreHealth + 'static,
    {
        Self {
            users: b.clone(),
            auth: b.clone(),
            rooms: b.clone(),
            messages: b.clone(),
            health: b,
        }
    }
}

/// Opens the configured backend.
pub async fn open(cfg: &StoreConfig) -> Result<Stores, StoreError> {
    match cfg.kind {
        crate::config::StoreKind::Sqlite => {
            let s = sqlite::SqliteStore::open(&cfg.sqlite).await?;
            Ok(Stores::from_backend(Arc::new(s)))
        }
        crate::config::StoreKind::Mongodb => {
            let s = mongo::MongoStore::open(&cfg.mongodb).await?;
            Ok(Stores::from_backend(Arc::new(s)))
        }
    }
}
