//! The admin role: stored with the user, granted and revoked by the operator
//! (`chatd admin grant|revoke USERNAME`, on either backend), never by
//! registering a name.
//!
//! `admin.usernames` is a bootstrap for accounts that already exist when a
//! node starts: each such account gets the role (once, persisted). A name
//! with no account yet is only reported: registering it later grants
//! nothing, so nobody can squat an admin name an operator configured early.

use crate::store::{StoreError, User, UserStore};

/// Grants the admin role to the configured usernames that exist; returns
/// the names that have no account (logged as a warning).
pub async fn bootstrap(users: &dyn UserStore, names: &[String]) -> Result<Vec<String>, StoreError> {
    let mut missing = Vec::new();
    for name in names {
        let name = name.trim();
        if name.is_empty() {
            continue;
        }
        match users.set_admin(name, true).await? {
            Some(u) => tracing::info!(
                username = u.username.as_ref(),
                "admin role granted from admin.usernames"
            ),
            None => {
                tracing::warn!(
                    username = name,
                    "admin.usernames names no existing account: not granted (create the account, \
                     then `chatd admin grant {name}`)"
                );
                missing.push(name.to_owned());
            }
        }
    }
    Ok(missing)
}

/// Grants or revokes the role; `None` if there is no such user.
pub async fn set(
    users: &dyn UserStore,
    username: &str,
    admin: bool,
) -> Result<Option<User>, StoreError> {
    users.set_admin(username, admin).await
}
