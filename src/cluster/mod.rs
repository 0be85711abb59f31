//! The cluster as one node sees it: the node table (who is alive, from
//! heartbeats), the user → node directory (from presence events and
//! heartbeats), node loss by heartbeat timeout, the narrow [`Presence`]
//! view other subsystems (the notification policy, handlers) read, and the
//! [`wire`] types the bus carries.
//!
//! This module knows no actor: the broker bridge (`actors::bridge`) feeds it
//! from the bus and acts on what it reports (sessions to settle, contacts
//! to tell).

pub mod wire;

use std::collections::{BTreeSet, HashSet};

use dashmap::DashMap;

pub use wire::{DeviceInfo, SessionInfo};

use crate::domain::UserId;

/// Who is online, cluster-wide: what the notification policy and handlers
/// may ask of the cluster.
pub trait Presence: Send + Sync {
    /// Whether any node (this one included) holds a socket of the user.
    fn is_online(&self, user: &UserId) -> bool;
    /// The nodes holding a socket of the user.
    fn nodes_of(&self, user: &UserId) -> Vec<String>;
}

/// Which nodes hold sockets of which users, cluster-wide (this node's own
/// entries included). Kept fresh by presence events and heartbeats.
#[derive(Default)]
pub struct Directory {
    users: DashMap<UserId, BTreeSet<String>>,
}

impl Directory {
    /// Records that `node` does (or no longer does) hold `user`. Returns
    /// whether the user's cluster-wide online state changed.
    pub fn set(&self, user: &UserId, node: &str, online: bool) -> bool {
        if online {
            let mut e = self.users.entry(user.clone()).or_default();
            let was = !e.is_empty();
            e.insert(node.to_owned());
            !was
        } else {
            let mut changed = false;
            self.users.remove_if_mut(user, |_, nodes| {
                let was = !nodes.is_empty();
                nodes.remove(node);
                changed = was && nodes.is_empty();
                nodes.is_empty()
            });
            changed
        }
    }

    /// Whether any node holds a socket of the user.
    pub fn is_online(&self, user: &UserId) -> bool {
        self.users.get(user).is_some_and(|n| !n.is_empty())
    }

    /// Calls `f` for every node other than `own` that holds the user.
    pub fn for_each_remote(&self, user: &UserId, own: &str, mut f: impl FnMut(&str)) {
        if let Some(nodes) = self.users.get(user) {
            for n in nodes.iter().filter(|n| n.as_str() != own) {
                f(n);
            }
        }
    }

    /// Nodes holding the user.
    pub fn nodes_of(&self, user: &UserId) -> Vec<String> {
        self.users
            .get(user)
            .map(|n| n.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Replaces what `node` holds by `users` (a heartbeat; empty: the node is
    /// gone); returns users whose online state changed, with their new state.
    pub fn replace_node(&self, node: &str, users: &[UserId]) -> Vec<(UserId, bool)> {
        let mut changed = Vec::new();
        let now: HashSet<&UserId> = users.iter().collect();
        let stale: Vec<UserId> = self
            .users
            .iter()
            .filter(|e| e.value().contains(node) && !now.contains(e.key()))
            .map(|e| e.key().clone())
            .collect();
        for u in stale {
            if self.set(&u, node, false) {
                changed.push((u, false));
            }
        }
        for u in users {
            if self.set(u, node, true) {
                changed.push((u.clone(), true));
            }
        }
        changed
    }
}

/// One node as seen in the cluster view.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct NodeInfo {
    pub id: String,
    pub address: String,
    pub started_at: String,
    pub last_heartbeat: String,
    pub sessions: usize,
    pub rooms: usize,
}

/// The known nodes (this one included), by id.
#[derive(Default)]
pub struct NodeTable {
    nodes: DashMap<String, NodeInfo>,
}

impl NodeTable {
    /// Records a node's heartbeat (or its first sign of life).
    pub fn insert(&self, id: String, info: NodeInfo) {
        self.nodes.insert(id, info);
    }

    /// Whether the node is known.
    pub fn contains_key(&self, id: &str) -> bool {
        self.nodes.contains_key(id)
    }

    /// Forgets a node (gone).
    pub fn remove(&self, id: &str) -> Option<(String, NodeInfo)> {
        self.nodes.remove(id)
    }

    /// Every known node.
    pub fn all(&self) -> Vec<NodeInfo> {
        self.nodes.iter().map(|n| n.value().clone()).collect()
    }

    /// A node that was first heard of from an event other than its
    /// heartbeat: tracked from now, so that it times out if it dies before
    /// that heartbeat. Returns false if it was known already.
    pub fn track(&self, id: &str) -> bool {
        if self.nodes.contains_key(id) {
            return false;
        }
        self.nodes.insert(
            id.to_owned(),
            NodeInfo {
                id: id.to_owned(),
                address: String::new(),
                started_at: String::new(),
                last_heartbeat: crate::domain::now_rfc3339(),
                sessions: 0,
                rooms: 0,
            },
        );
        true
    }

    /// Nodes other than `own` without a heartbeat for `timeout_secs`: gone.
    pub fn silent(&self, own: &str, timeout_secs: u64) -> Vec<String> {
        let timeout = i64::try_from(timeout_secs).unwrap_or(i64::MAX);
        let now = chrono::Utc::now();
        self.nodes
            .iter()
            .filter(|n| n.id != own)
            .filter(|n| {
                chrono::DateTime::parse_from_rfc3339(&n.last_heartbeat)
                    .map(|t| (now - t.with_timezone(&chrono::Utc)).num_seconds() >= timeout)
                    .unwrap_or(true)
            })
            .map(|n| n.id.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_tracks_cluster_wide_online_state() {
        let d = Directory::default();
        let u = UserId::parse("u1").unwrap();
        assert!(d.set(&u, "a", true));
        assert!(!d.set(&u, "b", true));
        assert_eq!(d.nodes_of(&u), vec!["a".to_owned(), "b".to_owned()]);
        assert!(!d.set(&u, "a", false));
        assert!(d.is_online(&u));
        assert_eq!(d.replace_node("b", &[]), vec![(u.clone(), false)]);
        assert!(!d.is_online(&u));
    }

    #[test]
    fn node_table_reports_silent_nodes_but_not_itself() {
        let t = NodeTable::default();
        assert!(t.track("me"));
        assert!(t.track("other"));
        assert!(!t.track("other"));
        assert!(t.silent("me", 3600).is_empty());
        assert_eq!(t.silent("me", 0), vec!["other".to_owned()]);
    }
}
