//! [`AuthStore`] on MongoDB: `refresh_tokens`, rotated in a transaction.

use async_trait::async_trait;
use futures_util::FutureExt;
use mongodb::bson::doc;

use super::docs::RefreshDoc;
use super::errors::store_err;
use super::MongoStore;
use crate::store::{AuthStore, NewRefreshToken, RotateOutcome, StoreError};

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
