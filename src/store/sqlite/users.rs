//! [`UserStore`] on SQLite: accounts, settings, devices, blocks.

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension};

use super::{internal, is_unique_violation, sql_err, SqliteStore};
use crate::domain::now_rfc3339;
use crate::store::*;

const USER_COLS: &str = "id, username, email, display_name, created_at, last_seen, admin";

fn row_user(r: &rusqlite::Row<'_>) -> rusqlite::Result<User> {
    Ok(User {
        id: UserId::from_trusted(r.get::<_, String>(0)?),
        username: Username::from_trusted(r.get(1)?),
        email: Email::from_trusted(r.get(2)?),
        display_name: r.get(3)?,
        created_at: r.get(4)?,
        last_seen: r.get(5)?,
        admin: r.get(6)?,
    })
}

#[async_trait]
impl UserStore for SqliteStore {
    async fn create_user(&self, new: NewUser) -> Result<User, StoreError> {
        self.write(move |c| {
            let user = User {
                id: UserId::generate(),
                username: new.username,
                email: new.email,
                display_name: new.display_name,
                created_at: now_rfc3339(),
                last_seen: None,
                admin: false,
            };
            let r = c.execute(
                "INSERT INTO users(id, username, email, display_name, password_hash, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    user.id.as_str(),
                    user.username.as_ref(),
                    user.email.as_ref(),
                    user.display_name,
                    new.password_hash,
                    user.created_at
                ],
            );
            match r {
                Ok(_) => Ok(user),
                Err(e) => match is_unique_violation(&e) {
                    Some(m) if m.contains("username") => {
                        Err(StoreError::Conflict("username_taken"))
                    }
                    Some(m) if m.contains("email") => Err(StoreError::Conflict("email_taken")),
                    _ => Err(sql_err(e)),
                },
            }
        })
        .await
    }

    async fn user(&self, id: &UserId) -> Result<Option<User>, StoreError> {
        let id = id.clone();
        self.read(move |c| {
            c.query_row(
                &format!("SELECT {USER_COLS} FROM users WHERE id = ?1"),
                [id.as_str()],
                row_user,
            )
            .optional()
            .map_err(sql_err)
        })
        .await
    }

    async fn credentials(&self, login: &str) -> Result<Option<(User, String)>, StoreError> {
        let login = login.trim().to_lowercase();
        self.read(move |c| {
            c.query_row(
                &format!(
                    "SELECT {USER_COLS}, password_hash FROM users WHERE username = ?1 OR email = ?1"
                ),
                [login],
                |r| Ok((row_user(r)?, r.get::<_, String>("password_hash")?)),
            )
            .optional()
            .map_err(sql_err)
        })
        .await
    }

    async fn search_users(&self, prefix: &str, limit: u32) -> Result<Vec<User>, StoreError> {
        // Escape LIKE wildcards so a prefix matches literally.
        let mut pat = String::with_capacity(prefix.len() + 1);
        for ch in prefix.to_lowercase().chars() {
            if matches!(ch, '%' | '_' | '\\') {
                pat.push('\\');
            }
            pat.push(ch);
        }
        pat.push('%');
        self.read(move |c| {
            let mut st = c
                .prepare_cached(&format!(
                    "SELECT {USER_COLS} FROM users WHERE username LIKE ?1 ESCAPE '\\'
                     ORDER BY username LIMIT ?2"
                ))
                .map_err(sql_err)?;
            let rows = st
                .query_map(params![pat, limit], row_user)
                .map_err(sql_err)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(sql_err)?;
            Ok(rows)
        })
        .await
    }

    async fn set_last_seen(&self, id: &UserId, at: &str) -> Result<(), StoreError> {
        let (id, at) = (id.clone(), at.to_owned());
        self.write(move |c| {
            c.execute(
                "UPDATE users SET last_seen = ?2 WHERE id = ?1",
                params![id.as_str(), at],
            )
            .map_err(sql_err)?;
            Ok(())
        })
        .await
    }

    async fn notification_settings(&self, id: &UserId) -> Result<NotificationSettings, StoreError> {
        let id = id.clone();
        self.read(move |c| {
            c.query_row(
                "SELECT notify_push, notify_email FROM users WHERE id = ?1",
                [id.as_str()],
                |r| {
                    Ok(NotificationSettings {
                        push: r.get(0)?,
                        email: r.get(1)?,
                    })
                },
            )
            .optional()
            .map_err(sql_err)?
            .ok_or(StoreError::NotFound)
        })
        .await
    }

    async fn set_notification_settings(
        &self,
        id: &UserId,
        s: NotificationSettings,
    ) -> Result<(), StoreError> {
        let id = id.clone();
        self.write(move |c| {
            let n = c
                .execute(
                    "UPDATE users SET notify_push = ?2, notify_email = ?3 WHERE id = ?1",
                    params![id.as_str(), s.push, s.email],
                )
                .map_err(sql_err)?;
            if n == 0 {
                return Err(StoreError::NotFound);
            }
            Ok(())
        })
        .await
    }

    async fn put_device(&self, id: &UserId, platform: &str, token: &str) -> Result<(), StoreError> {
        let (id, platform, token) = (id.clone(), platform.to_owned(), token.to_owned());
        self.write(move |c| {
            c.execute(
                "INSERT INTO devices(token, user_id, platform, created_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(token) DO UPDATE SET user_id = excluded.user_id, platform = excluded.platform",
                params![token, id.as_str(), platform, now_rfc3339()],
            )
            .map_err(sql_err)?;
            Ok(())
        })
        .await
    }

    async fn delete_device(&self, id: &UserId, token: &str) -> Result<bool, StoreError> {
        let (id, token) = (id.clone(), token.to_owned());
        self.write(move |c| {
            let n = c
                .execute(
                    "DELETE FROM devices WHERE token = ?1 AND user_id = ?2",
                    params![token, id.as_str()],
                )
                .map_err(sql_err)?;
            Ok(n > 0)
        })
        .await
    }

    async fn devices(&self, id: &UserId) -> Result<Vec<Device>, StoreError> {
        let id = id.clone();
        self.read(move |c| {
            let mut st = c
                .prepare_cached(
                    "SELECT platform, token, created_at FROM devices WHERE user_id = ?1 ORDER BY created_at",
                )
                .map_err(sql_err)?;
            let rows = st
                .query_map([id.as_str()], |r| {
                    Ok(Device {
                        platform: r.get(0)?,
                        token: r.get(1)?,
                        created_at: r.get(2)?,
                    })
                })
                .map_err(sql_err)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(sql_err)?;
            Ok(rows)
        })
        .await
    }

    async fn block(&self, blocker: &UserId, blocked: &UserId) -> Result<(), StoreError> {
        let (a, b) = (blocker.clone(), blocked.clone());
        self.write(move |c| {
            c.execute(
                "INSERT OR IGNORE INTO blocks(blocker_id, blocked_id, created_at) VALUES (?1, ?2, ?3)",
                params![a.as_str(), b.as_str(), now_rfc3339()],
            )
            .map_err(sql_err)?;
            Ok(())
        })
        .await
    }

    async fn unblock(&self, blocker: &UserId, blocked: &UserId) -> Result<(), StoreError> {
        let (a, b) = (blocker.clone(), blocked.clone());
        self.write(move |c| {
            c.execute(
                "DELETE FROM blocks WHERE blocker_id = ?1 AND blocked_id = ?2",
                params![a.as_str(), b.as_str()],
            )
            .map_err(sql_err)?;
            Ok(())
        })
        .await
    }

    async fn blocked_by(&self, blocker: &UserId) -> Result<Vec<UserId>, StoreError> {
        let a = blocker.clone();
        self.read(move |c| {
            ids(
                c,
                "SELECT blocked_id FROM blocks WHERE blocker_id = ?1 ORDER BY created_at",
                a.as_str(),
            )
        })
        .await
    }

    async fn blockers_of(&self, user: &UserId) -> Result<Vec<UserId>, StoreError> {
        let a = user.clone();
        self.read(move |c| {
            ids(
                c,
                "SELECT blocker_id FROM blocks WHERE blocked_id = ?1",
                a.as_str(),
            )
        })
        .await
    }

    async fn blocks_among(&self, users: &[UserId]) -> Result<Vec<(UserId, UserId)>, StoreError> {
        let list = serde_json::to_string(users).map_err(internal)?;
        self.read(move |c| {
            let mut st = c
                .prepare_cached(
                    "SELECT blocker_id, blocked_id FROM blocks
                     WHERE blocker_id IN (SELECT value FROM json_each(?1))
                       AND blocked_id IN (SELECT value FROM json_each(?1))",
                )
                .map_err(sql_err)?;
            let rows = st
                .query_map([list], |r| {
                    Ok((
                        UserId::from_trusted(r.get::<_, String>(0)?),
                        UserId::from_trusted(r.get::<_, String>(1)?),
                    ))
                })
                .map_err(sql_err)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(sql_err)?;
            Ok(rows)
        })
        .await
    }

    async fn set_admin(&self, username: &str, admin: bool) -> Result<Option<User>, StoreError> {
        let username = username.to_owned();
        self.write(move |c| {
            c.execute(
                "UPDATE users SET admin = ?2 WHERE username = ?1",
                params![username, admin],
            )
            .map_err(sql_err)?;
            c.query_row(
                &format!("SELECT {USER_COLS} FROM users WHERE username = ?1"),
                [username.as_str()],
                row_user,
            )
            .optional()
            .map_err(sql_err)
        })
        .await
    }

    async fn admins(&self) -> Result<Vec<User>, StoreError> {
        self.read(|c| {
            let mut st = c
                .prepare_cached(&format!(
                    "SELECT {USER_COLS} FROM users WHERE admin = 1 ORDER BY username"
                ))
                .map_err(sql_err)?;
            let rows = st
                .query_map([], row_user)
                .map_err(sql_err)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(sql_err)?;
            Ok(rows)
        })
        .await
    }
}

pub(super) fn ids(c: &Connection, sql: &str, arg: &str) -> Result<Vec<UserId>, StoreError> {
    let mut st = c.prepare_cached(sql).map_err(sql_err)?;
    let rows = st
        .query_map([arg], |r| Ok(UserId::from_trusted(r.get::<_, String>(0)?)))
        .map_err(sql_err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(sql_err)?;
    Ok(rows)
}
