//! [`AuthStore`] on SQLite: refresh tokens.

use async_trait::async_trait;
use rusqlite::{params, OptionalExtension};

use super::{sql_err, SqliteStore};
use crate::store::*;

#[async_trait]
impl AuthStore for SqliteStore {
    async fn insert_refresh(&self, t: NewRefreshToken) -> Result<(), StoreError> {
        self.write(move |c| {
            c.execute(
                "INSERT INTO refresh_tokens(hash, user_id, family_id, expires_at) VALUES (?1, ?2, ?3, ?4)",
                params![t.hash, t.user_id.as_str(), t.family_id, t.expires_at],
            )
            .map_err(sql_err)?;
            Ok(())
        })
        .await
    }

    async fn rotate_refresh(
        &self,
        old_hash: &str,
        new_hash: &str,
        new_expires_at: i64,
        now: i64,
    ) -> Result<RotateOutcome, StoreError> {
        let (old, new) = (old_hash.to_owned(), new_hash.to_owned());
        self.write(move |c| {
            let row = c
                .query_row(
                    "SELECT user_id, family_id, expires_at, used FROM refresh_tokens WHERE hash = ?1",
                    [&old],
                    |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, i64>(2)?,
                            r.get::<_, bool>(3)?,
                        ))
                    },
                )
                .optional()
                .map_err(sql_err)?;
            let Some((user, family, expires_at, used)) = row else {
                return Ok(RotateOutcome::Invalid);
            };
            if used {
                c.execute("DELETE FROM refresh_tokens WHERE family_id = ?1", [&family])
                    .map_err(sql_err)?;
                return Ok(RotateOutcome::Reused);
            }
            if expires_at <= now {
                return Ok(RotateOutcome::Invalid);
            }
            c.execute("UPDATE refresh_tokens SET used = 1 WHERE hash = ?1", [&old])
                .map_err(sql_err)?;
            c.execute(
                "INSERT INTO refresh_tokens(hash, user_id, family_id, expires_at) VALUES (?1, ?2, ?3, ?4)",
                params![new, user, family, new_expires_at],
            )
            .map_err(sql_err)?;
            // Spent tokens are kept only to detect reuse; drop the expired ones.
            c.execute("DELETE FROM refresh_tokens WHERE expires_at <= ?1", [now])
                .map_err(sql_err)?;
            Ok(RotateOutcome::Rotated(UserId::from_trusted(user)))
        })
        .await
    }

    async fn revoke_refresh(&self, hash: &str) -> Result<bool, StoreError> {
        let hash = hash.to_owned();
        self.write(move |c| {
            let family: Option<String> = c
                .query_row(
                    "SELECT family_id FROM refresh_tokens WHERE hash = ?1",
                    [&hash],
                    |r| r.get(0),
                )
                .optional()
                .map_err(sql_err)?;
            let Some(family) = family else {
                return Ok(false);
            };
            c.execute("DELETE FROM refresh_tokens WHERE family_id = ?1", [&family])
                .map_err(sql_err)?;
            Ok(true)
        })
        .await
    }
}
