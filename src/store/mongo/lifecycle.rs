//! Message lifecycle on MongoDB (docs/lifecycle.md): the state lives in the
//! message document itself (`x`, absent on a plain message) with the room's
//! change number of its last change (`cs`, indexed with `room_id`); the
//! per-room change counters are in `room_changes`, the members' change
//! cursors in `change_cursors`.
//!
//! A change reads the document, applies [`crate::store::lifecycle::apply`]
//! and writes it back only if nobody changed it meanwhile (compare and set
//! on `cs`), retrying a few times: changes to one message from two nodes
//! never lose each other.

use futures_util::TryStreamExt;
use mongodb::bson::{self, doc, Document};
use mongodb::options::{IndexOptions, ReturnDocument};
use mongodb::IndexModel;

use super::docs::MessageDoc;
use super::errors::{is_unavailable, store_err};
use super::{Colls, MongoStore};
use crate::store::lifecycle::{apply, Applied};
use crate::store::*;

/// Collection of per-room change counters: `{_id: room_id, n}`.
pub const ROOM_CHANGES: &str = "room_changes";
/// Collection of change cursors: `{_id: {r: room_id, u: user_id}, n}`.
pub const CHANGE_CURSORS: &str = "change_cursors";
/// Attempts of a change that keeps losing its compare-and-set.
const CAS_ATTEMPTS: u32 = 16;

/// The index that lets a reconnecting device read a room's changes in order.
pub(super) async fn create_indexes(c: &Colls) -> Result<(), StoreError> {
    let mut o = IndexOptions::default();
    o.name = Some("messages_room_changes".into());
    o.partial_filter_expression = Some(doc! { "cs": { "$exists": true } });
    let model = IndexModel::builder()
        .keys(doc! { "room_id": 1, "cs": 1 })
        .options(o)
        .build();
    c.raw(super::MESSAGES)
        .create_index(model)
        .await
        .map_err(|e| {
            if is_unavailable(&e) {
                store_err(e)
            } else {
                StoreError::Internal(format!("cannot create the lifecycle index: {e}"))
            }
        })?;
    Ok(())
}

fn bson_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Internal(format!("bson: {e}"))
}

impl MongoStore {
    fn lc_c(&self) -> &Colls {
        &self.inner.c
    }

    /// [`MessageStore::message`].
    pub(super) async fn lc_message(
        &self,
        room: &RoomId,
        id: &MessageId,
    ) -> Result<Option<Message>, StoreError> {
        let d = self
            .lc_c()
            .messages
            .find_one(doc! { "_id": id.as_str(), "room_id": room.as_str() })
            .await
            .map_err(store_err)?;
        Ok(d.map(Message::from))
    }

    /// [`MessageStore::change_message`].
    pub(super) async fn lc_change(
        &self,
        room: &RoomId,
        id: &MessageId,
        change: MessageChange,
    ) -> Result<ChangeOutcome, StoreError> {
        let c = self.lc_c();
        let filter = doc! { "_id": id.as_str(), "room_id": room.as_str() };
        for _ in 0..CAS_ATTEMPTS {
            let Some(d) = c
                .messages
                .find_one(filter.clone())
                .await
                .map_err(store_err)?
            else {
                return Err(StoreError::NotFound);
            };
            let mut extras = d.x.clone().unwrap_or_default();
            let body = match apply(&mut extras, &change) {
                Applied::Noop => return Ok(ChangeOutcome::Unchanged(Message::from(d))),
                Applied::Refused(o) => return Ok(o),
                Applied::Write { body, .. } => body,
            };
            let counter = c
                .raw(ROOM_CHANGES)
                .find_one_and_update(
                    doc! { "_id": room.as_str() },
                    doc! { "$inc": { "n": 1_i64 } },
                )
                .upsert(true)
                .return_document(ReturnDocument::After)
                .await
                .map_err(store_err)?;
            let n = counter
                .as_ref()
                .and_then(|d| match d.get("n") {
                    Some(bson::Bson::Int64(v)) => Some(*v),
                    Some(bson::Bson::Int32(v)) => Some(i64::from(*v)),
                    _ => None,
                })
                .ok_or_else(|| StoreError::Internal("room change counter missing".into()))?;
            let mut set = Document::new();
            set.insert("x", bson::to_bson(&extras).map_err(bson_err)?);
            set.insert("cs", n);
            if let Some(b) = &body {
                set.insert("body", b.as_str());
            }
            let mut cas = filter.clone();
            match d.cs {
                Some(old) => cas.insert("cs", old),
                None => cas.insert("cs", doc! { "$exists": false }),
            };
            let r = c
                .messages
                .update_one(cas, doc! { "$set": set })
                .await
                .map_err(store_err)?;
            if r.matched_count == 1 {
                let mut new = d;
                if let Some(b) = body {
                    new.body = b;
                }
                new.x = Some(extras);
                new.cs = Some(n);
                return Ok(ChangeOutcome::Changed(Message::from(new), n));
            }
        }
        Err(StoreError::Unavailable(
            "the message keeps changing concurrently; retry".into(),
        ))
    }

    /// [`MessageStore::changes_since`].
    pub(super) async fn lc_changes_since(
        &self,
        room: &RoomId,
        after: i64,
        limit: u32,
    ) -> Result<Vec<(i64, Message)>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let docs: Vec<MessageDoc> = self
            .lc_c()
            .messages
            .find(doc! { "room_id": room.as_str(), "cs": { "$gt": after } })
            .sort(doc! { "cs": 1 })
            .limit(i64::from(limit))
            .await
            .map_err(store_err)?
            .try_collect()
            .await
            .map_err(store_err)?;
        Ok(docs
            .into_iter()
            .map(|d| (d.cs.unwrap_or(0), Message::from(d)))
            .collect())
    }

    /// [`MessageStore::change_cursor`].
    pub(super) async fn lc_change_cursor(
        &self,
        room: &RoomId,
        user: &UserId,
    ) -> Result<i64, StoreError> {
        let d = self
            .lc_c()
            .raw(CHANGE_CURSORS)
            .find_one(doc! { "_id": { "r": room.as_str(), "u": user.as_str() } })
            .await
            .map_err(store_err)?;
        Ok(d.and_then(|d| match d.get("n") {
            Some(bson::Bson::Int64(v)) => Some(*v),
            Some(bson::Bson::Int32(v)) => Some(i64::from(*v)),
            _ => None,
        })
        .unwrap_or(0))
    }

    /// [`MessageStore::advance_change_cursor`].
    pub(super) async fn lc_advance_change_cursor(
        &self,
        room: &RoomId,
        user: &UserId,
        to: i64,
    ) -> Result<(), StoreError> {
        self.lc_c()
            .raw(CHANGE_CURSORS)
            .update_one(
                doc! { "_id": { "r": room.as_str(), "u": user.as_str() } },
                doc! { "$max": { "n": to } },
            )
            .upsert(true)
            .await
            .map_err(store_err)?;
        Ok(())
    }
}
