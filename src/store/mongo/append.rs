//! The append path: one task per store group-commits the appends of every
//! room of this node, one transaction per batch.
//!
//! A batch costs one read of `members` (membership of every sender), one
//! seq reservation per batch (one `$inc` by n for a single room, one
//! pipeline `updateMany` plus one read for several), and one `insertMany`.
//! Idempotency is the unique index on `(room_id, sender_id, client_msg_id)`:
//! the first try reads nothing for it; if the insert hits the index (a
//! client resent a stored message), the transaction aborts, so no seq is
//! taken, and the batch runs again "checked": it first reads the messages
//! already stored under the batch's keys and answers those with their
//! original ack.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use futures_util::{FutureExt, TryStreamExt};
use mongodb::bson::{doc, Bson, Document};
use mongodb::options::ReturnDocument;
use mongodb::ClientSession;
use tokio::sync::{mpsc, oneshot};

use super::docs::{pair_key, MessageDoc};
use super::errors::is_dup_key;
use super::{Colls, Inner, MEMBERS, ROOMS};
use crate::domain::{now_rfc3339, MessageId, RoomId, Seq};
use crate::store::{Appended, Message, NewMessage, StoreError};

/// Most messages committed in one append transaction.
const MAX_APPEND_BATCH: usize = 512;

/// What the append task answers a caller.
pub(super) type AppendReply = Result<Vec<Result<Appended, StoreError>>, StoreError>;

/// One caller's batch and where to answer it.
pub(super) struct AppendJob {
    pub(super) batch: Vec<NewMessage>,
    pub(super) reply: oneshot::Sender<AppendReply>,
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

/// The idempotency key of a message: `(room, sender, client_msg_id)`.
type Key<'a> = (&'a str, &'a str, &'a str);
type OwnedKey = (String, String, String);

fn key(m: &NewMessage) -> Key<'_> {
    (
        m.room_id.as_str(),
        m.sender_id.as_str(),
        m.client_msg_id.as_str(),
    )
}

/// Appends a batch inside the caller's transaction and returns a result
/// per message. `checked` first reads what is stored under the batch's
/// idempotency keys; unchecked, a stored key fails the insert (duplicate
/// key) and with it the transaction.
async fn append_in_txn(
    c: &Colls,
    s: &mut ClientSession,
    batch: &[NewMessage],
    checked: bool,
) -> mongodb::error::Result<Vec<Result<Appended, StoreError>>> {
    let members = members_of(c, s, batch).await?;
    let stored = if checked {
        stored_before(c, s, batch.iter()).await?
    } else {
        // A message resent by a sender who has left since gets its ack,
        // not `Forbidden`; such senders are few, so this read is rare.
        let outsiders = batch
            .iter()
            .filter(|m| !members.contains(&pair_key(m.room_id.as_str(), m.sender_id.as_str())));
        stored_before(c, s, outsiders).await?
    };
    let (plans, per_room) = plan(batch, &stored, &members);
    let base = reserve_seqs(c, s, &per_room).await?;
    let (out, docs) = build(batch, plans, &base);
    if !docs.is_empty() {
        c.messages
            .insert_many(docs)
            .ordered(true)
            .session(&mut *s)
            .await?;
    }
    Ok(out)
}

/// Messages stored before under the idempotency keys of `batch` (nothing
/// is read for an empty `batch`).
async fn stored_before<'a>(
    c: &Colls,
    s: &mut ClientSession,
    batch: impl Iterator<Item = &'a NewMessage>,
) -> mongodb::error::Result<HashMap<OwnedKey, Message>> {
    let mut ors = Vec::new();
    let mut asked = HashSet::new();
    for m in batch {
        if asked.insert(key(m)) {
            let (r, u, k) = key(m);
            ors.push(doc! { "room_id": r, "sender_id": u, "client_msg_id": k });
        }
    }
    let mut stored = HashMap::new();
    if ors.is_empty() {
        return Ok(stored);
    }
    let mut cur = c
        .messages
        .find(doc! { "$or": ors })
        .session(&mut *s)
        .await?;
    let mut stream = cur.stream(&mut *s);
    while let Some(d) = stream.try_next().await? {
        let k = (
            d.room_id.as_str().to_owned(),
            d.sender_id.as_str().to_owned(),
            d.client_msg_id.as_str().to_owned(),
        );
        stored.insert(k, d.into());
    }
    Ok(stored)
}

/// The `members` ids (`"{room}:{user}"`) of the senders of `batch` that are
/// members of their rooms.
async fn members_of(
    c: &Colls,
    s: &mut ClientSession,
    batch: &[NewMessage],
) -> mongodb::error::Result<HashSet<String>> {
    let member_ids: Vec<String> = batch
        .iter()
        .map(|m| pair_key(m.room_id.as_str(), m.sender_id.as_str()))
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let mut members = HashSet::new();
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
    Ok(members)
}

/// Decides, in order, what each message is; also how many new messages
/// each room gets (rooms in order of first appearance).
fn plan(
    batch: &[NewMessage],
    stored: &HashMap<OwnedKey, Message>,
    members: &HashSet<String>,
) -> (Vec<Plan>, Vec<(RoomId, i64)>) {
    let mut plans = Vec::with_capacity(batch.len());
    let mut first_of: HashMap<Key<'_>, usize> = HashMap::new();
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
    (plans, per_room)
}

/// Reserves each room's seqs: `last_seq` grows by the room's count of new
/// messages, once per room per batch; the transaction makes it and the
/// insert one atomic step (no gap, no duplicate). Returns each room's last
/// seq before the batch (`None`: no such room).
async fn reserve_seqs(
    c: &Colls,
    s: &mut ClientSession,
    per_room: &[(RoomId, i64)],
) -> mongodb::error::Result<HashMap<RoomId, Option<Seq>>> {
    let mut base = HashMap::with_capacity(per_room.len());
    match per_room {
        [] => {}
        [(room, n)] => {
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
            base.insert(
                room.clone(),
                after.and_then(|d| last_seq(&d)).map(|l| l - n),
            );
        }
        many => {
            let after = bump_rooms(c, s, many).await?;
            for (room, n) in many {
                base.insert(room.clone(), after.get(room).map(|l| l - n));
            }
        }
    }
    Ok(base)
}

/// Several rooms in two round trips: one pipeline `updateMany` adds each
/// room's count (a `$switch` on `_id`), one read returns the new values
/// (the transaction reads its own writes).
async fn bump_rooms(
    c: &Colls,
    s: &mut ClientSession,
    per_room: &[(RoomId, i64)],
) -> mongodb::error::Result<HashMap<RoomId, Seq>> {
    let ids: Vec<&str> = per_room.iter().map(|(r, _)| r.as_str()).collect();
    let branches: Vec<Document> = per_room
        .iter()
        .map(|(r, n)| doc! { "case": { "$eq": ["$_id", r.as_str()] }, "then": *n })
        .collect();
    let add = doc! { "$switch": { "branches": branches, "default": 0_i64 } };
    let pipeline = vec![doc! { "$set": { "last_seq": { "$add": ["$last_seq", add] } } }];
    c.raw(ROOMS)
        .update_many(doc! { "_id": { "$in": &ids } }, pipeline)
        .session(&mut *s)
        .await?;
    let mut after = HashMap::with_capacity(per_room.len());
    let mut cur = c
        .raw(ROOMS)
        .find(doc! { "_id": { "$in": &ids } })
        .projection(doc! { "last_seq": 1 })
        .session(&mut *s)
        .await?;
    let mut stream = cur.stream(&mut *s);
    while let Some(d) = stream.try_next().await? {
        if let (Ok(id), Some(last)) = (d.get_str("_id"), last_seq(&d)) {
            after.insert(RoomId::from_trusted(id), last);
        }
    }
    Ok(after)
}

/// A room document's `last_seq`, written as Int64 (or Int32 by other tools).
fn last_seq(d: &Document) -> Option<Seq> {
    match d.get("last_seq") {
        Some(Bson::Int64(v)) => Some(*v),
        Some(Bson::Int32(v)) => Some(i64::from(*v)),
        _ => None,
    }
}

/// Builds the answers and the documents of the new messages.
fn build(
    batch: &[NewMessage],
    plans: Vec<Plan>,
    base: &HashMap<RoomId, Option<Seq>>,
) -> (Vec<Result<Appended, StoreError>>, Vec<MessageDoc>) {
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
                    let mut message = Message::new_plain(
                        MessageId::generate(),
                        room,
                        b + n + 1,
                        m.sender_id.clone(),
                        m.client_msg_id.clone(),
                        m.body.clone(),
                        now.clone(),
                    );
                    crate::store::lifecycle::Extras::of_new(m).present(&mut message);
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
    (out, docs)
}

impl Inner {
    /// One batch, one transaction (retried as [`Inner::transaction`] says).
    /// The first try is unchecked; a duplicate key makes the retries checked.
    async fn append_all(&self, batch: Vec<NewMessage>) -> AppendReply {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let c = self.c.clone();
        let batch = Arc::new(batch);
        let checked = Arc::new(AtomicBool::new(false));
        self.transaction(move |s| {
            let (c, batch, checked) = (c.clone(), batch.clone(), checked.clone());
            async move {
                let check = checked.load(Ordering::Relaxed);
                let r = append_in_txn(&c, s, &batch, check).await;
                if matches!(&r, Err(e) if !check && is_dup_key(e)) {
                    tracing::debug!("append hit a stored idempotency key: rerun checked");
                    checked.store(true, Ordering::Relaxed);
                }
                r
            }
            .boxed()
        })
        .await
    }
}

/// The group-commit loop: takes every append waiting (up to
/// `MAX_APPEND_BATCH` messages), commits them in one transaction, then
/// answers each caller. Ends when the store is dropped.
pub(super) async fn appender(inner: Arc<Inner>, mut rx: mpsc::Receiver<AppendJob>) {
    while let Some(first) = rx.recv().await {
        let jobs = more_jobs(first, &mut rx);
        let mut lens = Vec::with_capacity(jobs.len());
        let mut replies = Vec::with_capacity(jobs.len());
        let mut all = Vec::new();
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

/// `first` and every job already waiting, up to `MAX_APPEND_BATCH` messages.
fn more_jobs(first: AppendJob, rx: &mut mpsc::Receiver<AppendJob>) -> Vec<AppendJob> {
    let mut n = first.batch.len();
    let mut jobs = vec![first];
    while n < MAX_APPEND_BATCH {
        match rx.try_recv() {
            Ok(j) => {
                n += j.batch.len();
                jobs.push(j);
            }
            Err(_) => break,
        }
    }
    jobs
}
