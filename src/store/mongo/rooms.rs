//! [`RoomStore`] on MongoDB: `rooms` and `members`.

use std::collections::{HashMap, HashSet};

use async_trait::async_trait;
use futures_util::{FutureExt, StreamExt, TryStreamExt};
use mongodb::bson::{doc, Bson, Document};
use mongodb::options::ReturnDocument;

use super::docs::{direct_key, member_doc, pair_key, room_of, MemberDoc, RoomDoc};
use super::errors::{bson_err, is_dup_key, store_err};
use super::{Colls, MongoStore, MEMBERS, ROOMS};
use crate::domain::{now_rfc3339, RoomId, Seq, UserId};
use crate::store::{
    CursorKind, Member, Message, Role, Room, RoomCursor, RoomKind, RoomStore, RoomSummary,
    StoreError, UserStore,
};

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
            .map(|(r, ms, read_seq)| summary(c, r, ms, read_seq, me, blocked))
            .buffer_unordered(8)
            .try_collect()
            .await?;
        sort_by_activity(&mut out);
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

/// One room as listed for `me`: its last message and unread count, both
/// without the messages of senders `me` blocks.
async fn summary(
    c: &Colls,
    r: RoomDoc,
    ms: Vec<MemberDoc>,
    read_seq: Seq,
    me: &str,
    blocked: &[String],
) -> Result<RoomSummary, StoreError> {
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
    Ok(RoomSummary {
        room: room_of(r, ms),
        last_message: last.map(Message::from),
        unread: unread as i64,
    })
}

/// Newest activity (last message, else creation) first; ties by room id.
fn sort_by_activity(out: &mut [RoomSummary]) {
    out.sort_by(|x, y| {
        let at = |s: &RoomSummary| {
            s.last_message
                .as_ref()
                .map(|m| m.created_at.clone())
                .unwrap_or_else(|| s.room.created_at.clone())
        };
        at(y).cmp(&at(x)).then_with(|| y.room.id.cmp(&x.room.id))
    });
}
