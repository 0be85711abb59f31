//! Who hears what in a room: its members with their roles and the blocks
//! among them. Shared by the room pipeline and message changes.

use std::collections::{HashMap, HashSet};

use crate::domain::UserId;
use crate::store::Role;

/// Who hears what in a room: members and the blocks among them.
pub struct Audience {
    pub members: HashMap<UserId, Role>,
    /// (blocker, blocked) pairs among members.
    pub blocks: HashSet<(UserId, UserId)>,
    /// Every member, for the common case of a room without blocks.
    all: Vec<UserId>,
}

impl Audience {
    /// An audience from members and the blocks among them.
    pub fn new(members: HashMap<UserId, Role>, blocks: HashSet<(UserId, UserId)>) -> Self {
        let all = members.keys().cloned().collect();
        Self {
            members,
            blocks,
            all,
        }
    }

    /// Members that should hear from `from` (not blocking it), `from` included.
    pub fn hearing(&self, from: &UserId) -> std::borrow::Cow<'_, [UserId]> {
        if self.blocks.is_empty() || !self.blocks.iter().any(|(_, blocked)| blocked == from) {
            return std::borrow::Cow::Borrowed(&self.all);
        }
        std::borrow::Cow::Owned(
            self.all
                .iter()
                .filter(|m| !self.blocks.contains(&((*m).clone(), from.clone())))
                .cloned()
                .collect(),
        )
    }
}
