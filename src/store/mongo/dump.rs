//! `chatd export` / `chatd import` on MongoDB: [`Dump`] reads every
//! collection in load order, [`Load`] inserts into an empty database in
//! batches of `insertMany` (not one transaction: an import that fails
//! leaves what it inserted, so the database is dropped before a new try).

use async_trait::async_trait;
use futures_util::TryStreamExt;
use mongodb::bson::{doc, Document};
use mongodb::{Collection, Database};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::docs::{
    pair_key, BlockDoc, DeviceDoc, MemberDoc, MessageDoc, RefreshDoc, RoomDoc, UserDoc,
};
use super::errors::store_err;
use super::{Colls, MongoStore, BLOCKS, DEVICES, MEMBERS, MESSAGES, REFRESH_TOKENS, ROOMS, USERS};
use crate::store::transfer::{
    BlockRec, Counts, DeviceRec, Dump, LineRx, Load, MemberRec, MessageRec, Record, RecordTx,
    RefreshRec, RoomRec, TransferError, UserRec,
};

/// Documents per `insertMany` of an import.
const BATCH: usize = 1000;

/// The collections in load order (a member needs its room, a message its
/// member, and so on).
const LOAD_ORDER: [&str; 7] = [
    USERS,
    ROOMS,
    MEMBERS,
    MESSAGES,
    BLOCKS,
    DEVICES,
    REFRESH_TOKENS,
];

fn err(e: mongodb::error::Error) -> TransferError {
    TransferError::Store(store_err(e))
}

#[async_trait]
impl Dump for MongoStore {
    async fn totals(&self) -> Result<Counts, TransferError> {
        let db = &self.inner.c.db;
        Ok(Counts {
            users: count(db, USERS).await?,
            rooms: count(db, ROOMS).await?,
            members: count(db, MEMBERS).await?,
            messages: count(db, MESSAGES).await?,
            blocks: count(db, BLOCKS).await?,
            devices: count(db, DEVICES).await?,
            refresh_tokens: count(db, REFRESH_TOKENS).await?,
            attachments: 0,
            attachment_chunks: 0,
        })
    }

    async fn dump(&self, tx: RecordTx) -> Result<(), TransferError> {
        let c = &self.inner.c;
        // Each kind in a stable order, the same as the SQLite dump's, so
        // exports of equal stores are equal line by line.
        each(&c.users, doc! { "_id": 1 }, &tx, user_rec).await?;
        each(&c.rooms, doc! { "_id": 1 }, &tx, room_rec).await?;
        let by_room_user = doc! { "room_id": 1, "user_id": 1 };
        each(&c.members, by_room_user, &tx, member_rec).await?;
        let by_room_seq = doc! { "room_id": 1, "seq": 1 };
        each(&c.messages, by_room_seq, &tx, message_rec).await?;
        let by_pair = doc! { "blocker_id": 1, "blocked_id": 1 };
        each(&c.blocks, by_pair, &tx, block_rec).await?;
        each(&c.devices, doc! { "_id": 1 }, &tx, device_rec).await?;
        each(&c.refresh, doc! { "_id": 1 }, &tx, refresh_rec).await?;
        Ok(())
    }
}

async fn count(db: &Database, name: &str) -> Result<u64, TransferError> {
    db.collection::<Document>(name)
        .count_documents(doc! {})
        .await
        .map_err(err)
}

/// Sends every document of `coll`, in `sort` order, as a record.
async fn each<T>(
    coll: &Collection<T>,
    sort: Document,
    tx: &RecordTx,
    rec: fn(T) -> Record,
) -> Result<(), TransferError>
where
    T: DeserializeOwned + Send + Sync,
{
    let mut cur = coll.find(doc! {}).sort(sort).await.map_err(err)?;
    while let Some(d) = cur.try_next().await.map_err(err)? {
        if tx.send(Ok(rec(d))).await.is_err() {
            // The export stopped reading; it reports why.
            return Err(TransferError::Incomplete(
                "the export stopped reading".into(),
            ));
        }
    }
    Ok(())
}

fn user_rec(d: UserDoc) -> Record {
    Record::User(UserRec {
        id: d.id,
        username: d.username,
        email: d.email,
        display_name: d.display_name,
        password_hash: d.password_hash,
        created_at: d.created_at,
        last_seen: d.last_seen,
        notify_push: d.notify_push,
        notify_email: d.notify_email,
        admin: d.admin,
    })
}

fn room_rec(d: RoomDoc) -> Record {
    Record::Room(RoomRec {
        id: d.id,
        kind: d.kind,
        name: d.name,
        direct_key: d.direct_key,
        created_at: d.created_at,
        last_seq: d.last_seq,
    })
}

fn member_rec(d: MemberDoc) -> Record {
    Record::Member(MemberRec {
        room_id: d.room_id,
        user_id: d.user_id,
        role: d.role,
        delivered_seq: d.delivered_seq,
        read_seq: d.read_seq,
        joined_at: d.joined_at,
    })
}

fn message_rec(d: MessageDoc) -> Record {
    Record::Message(MessageRec {
        id: d.id,
        room_id: d.room_id,
        seq: d.seq,
        sender_id: d.sender_id,
        client_msg_id: d.client_msg_id,
        body: d.body,
        created_at: d.created_at,
        x: d.x,
    })
}

fn block_rec(d: BlockDoc) -> Record {
    Record::Block(BlockRec {
        blocker_id: d.blocker_id,
        blocked_id: d.blocked_id,
        created_at: d.created_at,
    })
}

fn device_rec(d: DeviceDoc) -> Record {
    Record::Device(DeviceRec {
        token: d.token,
        user_id: d.user_id,
        platform: d.platform,
        created_at: d.created_at,
    })
}

fn refresh_rec(d: RefreshDoc) -> Record {
    Record::RefreshToken(RefreshRec {
        hash: d.hash,
        user_id: d.user_id,
        family_id: d.family_id,
        expires_at: d.expires_at,
        used: d.used,
    })
}

#[async_trait]
impl Load for MongoStore {
    async fn load(&self, mut rx: LineRx) -> Result<Counts, TransferError> {
        let c = &self.inner.c;
        ensure_empty(&c.db).await?;
        let mut batches = Batches::default();
        let mut counts = Counts::default();
        while let Some(item) = rx.recv().await {
            let (_, r) = item.map_err(|e| match e {
                TransferError::Incomplete(m) => TransferError::Incomplete(format!(
                    "{m} (what was read is in the database: drop it before importing again)"
                )),
                e => e,
            })?;
            counts.count(&r);
            batches.push(r);
            batches.flush(c, BATCH).await?;
        }
        batches.flush(c, 1).await?;
        Ok(counts)
    }
}

/// `NotEmpty` naming the first collection that holds a document.
async fn ensure_empty(db: &Database) -> Result<(), TransferError> {
    for name in LOAD_ORDER {
        let any = db
            .collection::<Document>(name)
            .find_one(doc! {})
            .await
            .map_err(err)?;
        if any.is_some() {
            return Err(TransferError::NotEmpty(name.into()));
        }
    }
    Ok(())
}

/// Per-collection buffers of documents waiting for an `insertMany`.
#[derive(Default)]
struct Batches {
    users: Vec<UserDoc>,
    rooms: Vec<RoomDoc>,
    members: Vec<MemberDoc>,
    messages: Vec<MessageDoc>,
    blocks: Vec<BlockDoc>,
    devices: Vec<DeviceDoc>,
    refresh: Vec<RefreshDoc>,
}

impl Batches {
    fn push(&mut self, r: Record) {
        match r {
            Record::User(u) => self.users.push(user_doc(u)),
            Record::Room(r) => self.rooms.push(RoomDoc {
                id: r.id,
                kind: r.kind,
                name: r.name,
                direct_key: r.direct_key,
                created_at: r.created_at,
                last_seq: r.last_seq,
            }),
            Record::Member(m) => self.members.push(MemberDoc {
                id: pair_key(m.room_id.as_str(), m.user_id.as_str()),
                room_id: m.room_id,
                user_id: m.user_id,
                role: m.role,
                delivered_seq: m.delivered_seq,
                read_seq: m.read_seq,
                joined_at: m.joined_at,
            }),
            Record::Message(m) => self.messages.push(message_doc(m)),
            Record::Block(b) => self.blocks.push(BlockDoc {
                id: pair_key(b.blocker_id.as_str(), b.blocked_id.as_str()),
                blocker_id: b.blocker_id,
                blocked_id: b.blocked_id,
                created_at: b.created_at,
            }),
            Record::Device(d) => self.devices.push(DeviceDoc {
                token: d.token,
                user_id: d.user_id,
                platform: d.platform,
                created_at: d.created_at,
            }),
            Record::RefreshToken(t) => {
                let mut d = RefreshDoc::new(t.hash, t.user_id, t.family_id, t.expires_at);
                d.used = t.used;
                self.refresh.push(d);
            }
            Record::Header(_)
            | Record::End(_)
            | Record::Attachment(_)
            | Record::AttachmentChunk(_) => {}
        }
    }

    /// Inserts every buffer that holds `min` or more documents, in load order.
    async fn flush(&mut self, c: &Colls, min: usize) -> Result<(), TransferError> {
        put(&c.users, &mut self.users, min).await?;
        put(&c.rooms, &mut self.rooms, min).await?;
        put(&c.members, &mut self.members, min).await?;
        put(&c.messages, &mut self.messages, min).await?;
        put(&c.blocks, &mut self.blocks, min).await?;
        put(&c.devices, &mut self.devices, min).await?;
        put(&c.refresh, &mut self.refresh, min).await?;
        Ok(())
    }
}

async fn put<T: Serialize + Send + Sync>(
    coll: &Collection<T>,
    buf: &mut Vec<T>,
    min: usize,
) -> Result<(), TransferError> {
    if !buf.is_empty() && buf.len() >= min {
        coll.insert_many(buf.drain(..)).await.map_err(err)?;
    }
    Ok(())
}

fn user_doc(u: UserRec) -> UserDoc {
    UserDoc {
        id: u.id,
        username: u.username,
        email: u.email,
        display_name: u.display_name,
        password_hash: u.password_hash,
        created_at: u.created_at,
        last_seen: u.last_seen,
        notify_push: u.notify_push,
        notify_email: u.notify_email,
        admin: u.admin,
    }
}

fn message_doc(m: MessageRec) -> MessageDoc {
    MessageDoc {
        id: m.id,
        room_id: m.room_id,
        seq: m.seq,
        sender_id: m.sender_id,
        client_msg_id: m.client_msg_id,
        body: m.body,
        created_at: m.created_at,
        x: m.x,
        cs: None,
    }
}
