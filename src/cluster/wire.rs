//! The cluster's wire types that the bus carries between nodes (the broker
//! imports these, never an actor's types).

use serde::{Deserialize, Serialize};

use crate::domain::{SessionId, UserId};

/// The admin view of a user's session actor on one node.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SessionInfo {
    pub node: String,
    pub user_id: UserId,
    pub connected_at: String,
    pub presence: String,
    pub devices: Vec<DeviceInfo>,
}

/// One socket in the admin view.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeviceInfo {
    pub session_id: SessionId,
    pub connected_at: String,
    pub queued_frames: usize,
}
