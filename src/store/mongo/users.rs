//! [`UserStore`] on MongoDB: `users`, `devices` and `blocks`.

use async_trait::async_trait;
use futures_util::TryStreamExt;
use mongodb::bson::doc;

use super::docs::{pair_key, BlockDoc, DeviceDoc, UserDoc};
use super::errors::{is_dup_key, store_err};
use super::MongoStore;
use crate::domain::{now_rfc3339, UserId};
use crate::store::{Device, NewUser, NotificationSettings, StoreError, User, UserStore};

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
            admin: false,
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

    async fn set_admin(&self, username: &str, admin: bool) -> Result<Option<User>, StoreError> {
        Ok(self
            .inner
            .c
            .users
            .find_one_and_update(
                doc! { "username": username },
                doc! { "$set": { "admin": admin } },
            )
            .return_document(mongodb::options::ReturnDocument::After)
            .await
            .map_err(store_err)?
            .map(User::from))
    }

    async fn admins(&self) -> Result<Vec<User>, StoreError> {
        let docs: Vec<UserDoc> = self
            .inner
            .c
            .users
            .find(doc! { "admin": true })
            .sort(doc! { "username": 1 })
            .await
            .map_err(store_err)?
            .try_collect()
            .await
            .map_err(store_err)?;
        Ok(docs.into_iter().map(User::from).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_search_is_literal() {
        assert_eq!(regex_escape("srch_"), "srch_");
        assert_eq!(regex_escape("a.b*c%"), r"a\.b\*c\%");
        assert_eq!(regex_escape(r"(x|y)\[^$]"), r"\(x\|y\)\\\[\^\$\]");
        assert_eq!(regex_escape("é-"), r"é\-");
    }
}
