//! `ping {nonce?}`: answered with `pong` carrying the same nonce.

use super::Ctx;
use crate::protocol::{Frame, ServerFrame};

/// The `pong` answering `nonce`.
pub(crate) fn pong(nonce: Option<&serde_json::Value>) -> Frame {
    ServerFrame::Pong { nonce }.encode()
}

/// Queues the `pong`.
pub(crate) fn apply(ctx: Ctx<'_>, nonce: Option<&serde_json::Value>) {
    ctx.handle.push(pong(nonce));
}
