//! The life of a message after it is sent (docs/lifecycle.md): replies,
//! edits, deletes and reactions, as every backend stores them.
//!
//! A message's lifecycle state lives apart from its compact row, in an
//! [`Extras`] record keyed like the row (`(room, seq)`), written only for
//! messages that have any: a plain message costs nothing more on the hot
//! path. [`apply`] is the one implementation of what a change does to that
//! state; the backends only load, apply and write back atomically, and stamp
//! the record with the room's next change number so a reconnecting device can
//! ask for every change after a cursor ([`super::MessageStore::changes_since`]).

use std::sync::atomic::{AtomicUsize, Ordering};

use serde::{Deserialize, Serialize};

use super::{Attachment, Message};
use crate::domain::{Emoji, MessageBody, MessageId, UserId};

/// One reaction as clients see it: `users` is capped (see
/// [`set_reaction_users_shown`]), `count` is exact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Reaction {
    #[schema(value_type = String, example = "👍")]
    pub emoji: Emoji,
    pub count: u64,
    pub users: Vec<UserId>,
}

/// The stored lifecycle state of one message (absent = a plain message).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extras {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<MessageId>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attachments: Vec<Attachment>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edited_at: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleted: bool,
    /// Every reacting user, in the order they reacted (no cap here).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reactions: Vec<StoredReaction>,
}

/// One emoji on a message with every user who put it there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredReaction {
    pub emoji: Emoji,
    pub users: Vec<UserId>,
}

impl Extras {
    /// Whether nothing is set (no record needs to exist).
    pub fn is_empty(&self) -> bool {
        self == &Extras::default()
    }

    /// The extras a new message is appended with.
    pub fn of_new(m: &super::NewMessage) -> Self {
        Self {
            reply_to: m.reply_to.clone(),
            attachments: m.attachments.clone(),
            ..Self::default()
        }
    }

    /// Copies this state into `m`'s lifecycle fields.
    pub fn present(&self, m: &mut Message) {
        let shown = reaction_users_shown();
        m.reply_to = self.reply_to.clone();
        m.attachments = self.attachments.clone();
        m.edited_at = self.edited_at.clone();
        m.deleted = self.deleted;
        m.reactions = self
            .reactions
            .iter()
            .map(|r| Reaction {
                emoji: r.emoji.clone(),
                count: r.users.len() as u64,
                users: r.users.iter().take(shown).cloned().collect(),
            })
            .collect();
    }

    /// Every attachment id (for erasing the files of a deleted message).
    pub fn attachment_ids(&self) -> Vec<String> {
        self.attachments.iter().map(|a| a.id.clone()).collect()
    }
}

/// What to change on a message. Permission (who may edit or delete) is the
/// caller's decision; the store applies.
#[derive(Debug, Clone)]
pub enum MessageChange {
    /// A new body (validated like a send); `at` becomes `edited_at`.
    Edit { body: MessageBody, at: String },
    /// Erase body, attachments and reactions; keep a tombstone.
    Delete,
    /// `user` puts (`on`) or takes back an emoji; at most `max_distinct`
    /// different emoji per message.
    React {
        user: UserId,
        emoji: Emoji,
        on: bool,
        max_distinct: usize,
    },
}

/// The result of [`super::MessageStore::change_message`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeOutcome {
    /// Stored; the message in its new state, with the change number.
    Changed(Message, i64),
    /// Nothing to do (same reaction again, already deleted): the message as it is.
    Unchanged(Message),
    /// The message is a tombstone: it cannot be edited or reacted to.
    Gone,
    /// Putting this emoji would pass the limit of distinct reactions.
    TooManyReactions,
}

/// What [`apply`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// Write back body (when `Some`) and extras; the attachments to erase.
    Write {
        body: Option<MessageBody>,
        erase: Vec<String>,
    },
    /// Nothing changes.
    Noop,
    /// Refused (see [`ChangeOutcome`]).
    Refused(ChangeOutcome),
}

/// Applies `change` to a message's state in place; the one definition every
/// backend uses.
pub fn apply(extras: &mut Extras, change: &MessageChange) -> Applied {
    match change {
        MessageChange::Delete => {
            if extras.deleted {
                return Applied::Noop;
            }
            let erase = extras.attachment_ids();
            extras.deleted = true;
            extras.attachments.clear();
            extras.reactions.clear();
            Applied::Write {
                body: Some(MessageBody::from_trusted(String::new())),
                erase,
            }
        }
        _ if extras.deleted => Applied::Refused(ChangeOutcome::Gone),
        MessageChange::Edit { body, at } => {
            extras.edited_at = Some(at.clone());
            Applied::Write {
                body: Some(body.clone()),
                erase: Vec::new(),
            }
        }
        MessageChange::React {
            user,
            emoji,
            on,
            max_distinct,
        } => {
            let pos = extras.reactions.iter().position(|r| &r.emoji == emoji);
            match (pos, on) {
                (Some(i), true) => {
                    let users = &mut extras.reactions[i].users;
                    if users.contains(user) {
                        return Applied::Noop;
                    }
                    users.push(user.clone());
                }
                (None, true) => {
                    if extras.reactions.len() >= *max_distinct {
                        return Applied::Refused(ChangeOutcome::TooManyReactions);
                    }
                    extras.reactions.push(StoredReaction {
                        emoji: emoji.clone(),
                        users: vec![user.clone()],
                    });
                }
                (Some(i), false) => {
                    let users = &mut extras.reactions[i].users;
                    let Some(j) = users.iter().position(|u| u == user) else {
                        return Applied::Noop;
                    };
                    users.remove(j);
                    if users.is_empty() {
                        extras.reactions.remove(i);
                    }
                }
                (None, false) => return Applied::Noop,
            }
            Applied::Write {
                body: None,
                erase: Vec::new(),
            }
        }
    }
}

static REACTION_USERS_SHOWN: AtomicUsize = AtomicUsize::new(10);

/// Sets how many user ids a reaction lists (`limits.reaction_users_shown`,
/// at least 10); the count stays exact. Called once at startup.
pub fn set_reaction_users_shown(n: usize) {
    REACTION_USERS_SHOWN.store(n.max(10), Ordering::Relaxed);
}

fn reaction_users_shown() -> usize {
    REACTION_USERS_SHOWN.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn react(u: &str, e: &str, on: bool) -> MessageChange {
        MessageChange::React {
            user: UserId::from_trusted(u),
            emoji: Emoji::parse(e).unwrap(),
            on,
            max_distinct: 2,
        }
    }

    #[test]
    fn reactions_toggle_idempotently_and_respect_the_limit() {
        let mut x = Extras::default();
        assert!(matches!(
            apply(&mut x, &react("a", "👍", true)),
            Applied::Write { .. }
        ));
        assert_eq!(apply(&mut x, &react("a", "👍", true)), Applied::Noop);
        assert!(matches!(
            apply(&mut x, &react("b", "👍", true)),
            Applied::Write { .. }
        ));
        assert!(matches!(
            apply(&mut x, &react("a", "🎉", true)),
            Applied::Write { .. }
        ));
        assert_eq!(
            apply(&mut x, &react("a", "🔥", true)),
            Applied::Refused(ChangeOutcome::TooManyReactions)
        );
        assert!(matches!(
            apply(&mut x, &react("a", "🎉", false)),
            Applied::Write { .. }
        ));
        assert_eq!(apply(&mut x, &react("a", "🎉", false)), Applied::Noop);
        assert_eq!(x.reactions.len(), 1);
        assert_eq!(x.reactions[0].users.len(), 2);
    }

    #[test]
    fn delete_erases_and_blocks_later_changes() {
        let mut x = Extras {
            reactions: vec![StoredReaction {
                emoji: Emoji::parse("👍").unwrap(),
                users: vec![UserId::from_trusted("a")],
            }],
            ..Extras::default()
        };
        assert!(matches!(
            apply(&mut x, &MessageChange::Delete),
            Applied::Write { body: Some(_), .. }
        ));
        assert!(x.deleted && x.reactions.is_empty());
        assert_eq!(apply(&mut x, &MessageChange::Delete), Applied::Noop);
        assert_eq!(
            apply(&mut x, &react("a", "👍", true)),
            Applied::Refused(ChangeOutcome::Gone)
        );
    }
}
