//! [`MessageStore`] on MongoDB: appends go to the group-commit task
//! (`append.rs`), history reads `messages` by `(room_id, seq)`.

use async_trait::async_trait;
use futures_util::TryStreamExt;
use mongodb::bson::doc;
use tokio::sync::oneshot;

use super::append::AppendJob;
use super::docs::MessageDoc;
use super::errors::store_err;
use super::MongoStore;
use crate::domain::{MessageId, RoomId, UserId};
use crate::store::{
    Appended, ChangeOutcome, HistoryQuery, Message, MessageChange, MessageStore, NewMessage,
    StoreError,
};

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

    async fn message(&self, room: &RoomId, id: &MessageId) -> Result<Option<Message>, StoreError> {
        self.lc_message(room, id).await
    }

    async fn change_message(
        &self,
        room: &RoomId,
        id: &MessageId,
        change: MessageChange,
    ) -> Result<ChangeOutcome, StoreError> {
        self.lc_change(room, id, change).await
    }

    async fn changes_since(
        &self,
        room: &RoomId,
        after: i64,
        limit: u32,
    ) -> Result<Vec<(i64, Message)>, StoreError> {
        self.lc_changes_since(room, after, limit).await
    }

    async fn change_cursor(&self, room: &RoomId, user: &UserId) -> Result<i64, StoreError> {
        self.lc_change_cursor(room, user).await
    }

    async fn advance_change_cursor(
        &self,
        room: &RoomId,
        user: &UserId,
        to: i64,
    ) -> Result<(), StoreError> {
        self.lc_advance_change_cursor(room, user, to).await
    }
}
