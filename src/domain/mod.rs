//! Domain newtypes that parse at the edge.
//!
//! Every value that comes from outside (HTTP bodies, socket frames, config)
//! becomes one of these types through its `parse` constructor; past the edge a
//! `Username` or `MessageBody` is valid by construction.

mod emoji;
mod ids;
mod text;

pub use emoji::{Emoji, EMOJI_MAX_CHARS};
pub use ids::{MessageId, RoomId, Seq, SessionId, UserId};
pub use text::{
    ClientMsgId, DisplayName, Email, Limits, MessageBody, Password, RoomName, Username,
};

/// Why a value was refused at the edge. `code` is the contract's snake_case code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ParseError {
    /// Contract error code, e.g. `invalid_username`.
    pub code: &'static str,
    /// Human readable explanation.
    pub message: String,
}

impl ParseError {
    pub(crate) fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// Current time as the contract's RFC 3339 UTC string with millisecond precision.
pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}
