//! The documents of each collection, as serde maps them to BSON, and the
//! conversions to and from the store's domain types.

use mongodb::bson::DateTime;
use serde::{Deserialize, Serialize};

use super::super::lifecycle::Extras;
use super::super::{Device, Member, Message, Role, Room, RoomKind, User};
use crate::domain::{ClientMsgId, Email, MessageBody, MessageId, RoomId, Seq, UserId, Username};

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
    /// The admin role (absent in documents written before roles existed).
    #[serde(default)]
    pub admin: bool,
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
            admin: d.admin,
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
    /// Lifecycle state (reply, attachments, edit, tombstone, reactions);
    /// absent on a plain message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x: Option<Extras>,
    /// The room's change number of the last change (absent if never changed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cs: Option<i64>,
}

impl From<MessageDoc> for Message {
    fn from(d: MessageDoc) -> Self {
        let mut m = Message::new_plain(
            d.id,
            d.room_id,
            d.seq,
            d.sender_id,
            d.client_msg_id,
            d.body,
            d.created_at,
        );
        if let Some(x) = &d.x {
            x.present(&mut m);
        }
        m
    }
}

impl From<Message> for MessageDoc {
    /// A new message's document (reactions are not carried: a new message has none).
    fn from(m: Message) -> Self {
        let x = Extras {
            reply_to: m.reply_to,
            attachments: m.attachments,
            edited_at: m.edited_at,
            deleted: m.deleted,
            reactions: Vec::new(),
        };
        MessageDoc {
            id: m.id,
            room_id: m.room_id,
            seq: m.seq,
            sender_id: m.sender_id,
            client_msg_id: m.client_msg_id,
            body: m.body,
            created_at: m.created_at,
            x: (!x.is_empty()).then_some(x),
            cs: None,
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

pub(super) fn pair_key(a: &str, b: &str) -> String {
    // Ids are [A-Za-z0-9_-], so ':' cannot occur inside one.
    format!("{a}:{b}")
}

pub(super) fn direct_key(a: &UserId, b: &UserId) -> String {
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    pair_key(lo.as_str(), hi.as_str())
}

pub(super) fn room_of(r: RoomDoc, members: Vec<MemberDoc>) -> Room {
    Room {
        id: r.id,
        kind: r.kind,
        name: r.name,
        members: members.into_iter().map(Member::from).collect(),
        created_at: r.created_at,
        last_seq: r.last_seq,
    }
}

pub(super) fn member_doc(room: &RoomId, user: &UserId, role: Role, now: &str) -> MemberDoc {
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

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::{self, doc, Bson, Document};
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
            admin: false,
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
                    "notify_push": true, "notify_email": false, "admin": false,
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
        let m = Message::new_plain(
            MessageId::from_trusted("m1"),
            RoomId::from_trusted("r1"),
            42,
            UserId::from_trusted("u1"),
            ClientMsgId::from_trusted("c-1".into()),
            MessageBody::from_trusted("hé 👋".into()),
            "t".into(),
        );
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
}
