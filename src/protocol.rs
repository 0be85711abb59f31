//! The WebSocket frames of the contract (`docs/protocol.md`): what clients
//! send ([`ClientFrame`]) and what the server sends ([`ServerFrame`]).

use serde::{Deserialize, Serialize};

use crate::domain::{RoomId, Seq, SessionId, UserId};
use crate::store::{CursorKind, Message, RoomCursor};

/// A frame from the client. Fields stay strings here; the socket loop parses
/// them into domain types so it can answer each mistake with a precise error.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    Send {
        room_id: String,
        client_msg_id: String,
        /// Required, except that it may be absent or empty when
        /// `attachments` are given.
        #[serde(default)]
        body: Option<String>,
        #[serde(default)]
        reply_to: Option<String>,
        #[serde(default)]
        attachments: Vec<String>,
    },
    Edit {
        room_id: String,
        message_id: String,
        body: String,
        #[serde(default, rename = "ref")]
        reference: Option<String>,
    },
    Delete {
        room_id: String,
        message_id: String,
        #[serde(default, rename = "ref")]
        reference: Option<String>,
    },
    React {
        room_id: String,
        message_id: String,
        emoji: String,
        on: bool,
        #[serde(default, rename = "ref")]
        reference: Option<String>,
    },
    Delivered {
        room_id: String,
        up_to_seq: Seq,
    },
    Read {
        room_id: String,
        up_to_seq: Seq,
    },
    Typing {
        room_id: String,
        state: bool,
    },
    Sync {
        room_id: String,
        after_seq: Seq,
        #[serde(default)]
        limit: Option<u32>,
    },
    Ping {
        #[serde(default)]
        nonce: Option<serde_json::Value>,
    },
}

/// A frame from the server.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame<'a> {
    Ready {
        user_id: &'a UserId,
        session_id: &'a SessionId,
        node_id: &'a str,
        rooms: &'a [RoomCursor],
    },
    Ack {
        client_msg_id: &'a str,
        message_id: &'a str,
        room_id: &'a RoomId,
        seq: Seq,
        created_at: &'a str,
    },
    Message(&'a Message),
    /// The whole current state of a message after an edit, a delete or a
    /// reaction change.
    MessageUpdated {
        message: &'a Message,
    },
    /// A lifecycle request (`edit`, `delete`, `react`) was applied.
    Done {
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a str>,
    },
    Receipt {
        room_id: &'a RoomId,
        user_id: &'a UserId,
        kind: CursorKind,
        up_to_seq: Seq,
    },
    Presence {
        user_id: &'a UserId,
        online: bool,
        last_seen: Option<&'a str>,
    },
    Typing {
        room_id: &'a RoomId,
        user_id: &'a UserId,
        state: bool,
    },
    Pong {
        #[serde(skip_serializing_if = "Option::is_none")]
        nonce: Option<&'a serde_json::Value>,
    },
    Error {
        code: &'a str,
        message: &'a str,
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a str>,
    },
}

impl ServerFrame<'_> {
    /// Serializes the frame once; the result is shared by every socket it goes to.
    pub fn encode(&self) -> Frame {
        // Serializing these types cannot fail: every field is a plain value.
        Frame::from(serde_json::to_string(self).unwrap_or_default())
    }
}

/// A serialized server frame, cheap to clone (reference counted).
pub type Frame = axum::extract::ws::Utf8Bytes;

/// An `ack` for a stored message.
pub fn ack_frame(m: &Message) -> Frame {
    ServerFrame::Ack {
        client_msg_id: m.client_msg_id.as_str(),
        message_id: m.id.as_str(),
        room_id: &m.room_id,
        seq: m.seq,
        created_at: &m.created_at,
    }
    .encode()
}

/// A `message` frame.
pub fn message_frame(m: &Message) -> Frame {
    ServerFrame::Message(m).encode()
}

/// A `message_updated` frame.
pub fn message_updated_frame(m: &Message) -> Frame {
    ServerFrame::MessageUpdated { message: m }.encode()
}

/// A `done` frame answering a lifecycle request.
pub fn done_frame(reference: Option<&str>) -> Frame {
    ServerFrame::Done { reference }.encode()
}

/// An `error` frame.
pub fn error_frame(code: &str, message: &str, reference: Option<&str>) -> Frame {
    ServerFrame::Error {
        code,
        message,
        reference,
    }
    .encode()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_frame_has_type_and_fields() {
        let m = Message::new_plain(
            crate::domain::MessageId::from_trusted("m1"),
            RoomId::from_trusted("r1"),
            3,
            UserId::from_trusted("u1"),
            crate::domain::ClientMsgId::from_trusted("c1".into()),
            crate::domain::MessageBody::from_trusted("hi".into()),
            "2026-01-01T00:00:00.000Z".into(),
        );
        let v: serde_json::Value = serde_json::from_str(message_frame(&m).as_str()).unwrap();
        assert_eq!(v["type"], "message");
        assert_eq!(v["seq"], 3);
        assert_eq!(v["body"], "hi");
        for k in ["reply_to", "edited_at"] {
            assert!(v[k].is_null() && v.get(k).is_some(), "{k} always present");
        }
        assert_eq!(v["attachments"], serde_json::json!([]));
        assert_eq!(v["reactions"], serde_json::json!([]));
        assert_eq!(v["deleted"], false);
        let u: serde_json::Value =
            serde_json::from_str(message_updated_frame(&m).as_str()).unwrap();
        assert_eq!(u["type"], "message_updated");
        assert_eq!(u["message"]["id"], "m1");
        let a: serde_json::Value = serde_json::from_str(ack_frame(&m).as_str()).unwrap();
        assert_eq!(a["type"], "ack");
        assert_eq!(a["message_id"], "m1");
        assert_eq!(a["client_msg_id"], "c1");
    }

    #[test]
    fn client_frames_parse_and_reject() {
        let f: ClientFrame =
            serde_json::from_str(r#"{"type":"send","room_id":"r","client_msg_id":"c","body":"b"}"#)
                .unwrap();
        assert!(matches!(f, ClientFrame::Send { .. }));
        assert!(serde_json::from_str::<ClientFrame>(r#"{"type":"nope"}"#).is_err());
        assert!(serde_json::from_str::<ClientFrame>(
            r#"{"type":"read","room_id":"r","up_to_seq":"x"}"#
        )
        .is_err());
        let p: ClientFrame = serde_json::from_str(r#"{"type":"ping"}"#).unwrap();
        assert!(matches!(p, ClientFrame::Ping { nonce: None }));
    }
}
