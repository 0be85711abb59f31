//! Reading rows of the messages table: the columns, a row as a
//! [`Message`], a room's integer key. Shared by appends, history and the
//! lifecycle changes.

use rusqlite::{Connection, OptionalExtension};

use super::codec::{dec_cmid, dec_id, dec_time};
use super::sql_err;
use crate::store::*;

/// The columns [`row_message`] reads, from `messages m JOIN users u ON
/// u.key = m.sender_key`.
pub(super) const MSG_COLS: &str = "m.id, m.seq, u.id, m.client_msg_id, m.body, m.created_at";

/// A message of the room `room_id` (whose key is `room_key`).
pub(super) fn row_message(
    r: &rusqlite::Row<'_>,
    room_id: &RoomId,
    room_key: i64,
) -> rusqlite::Result<Message> {
    let seq: i64 = r.get(1)?;
    Ok(Message::new_plain(
        MessageId::from_trusted(dec_id(r.get_ref(0)?, r.get_ref(5)?, room_key, seq)?),
        room_id.clone(),
        seq,
        UserId::from_trusted(r.get::<_, String>(2)?),
        ClientMsgId::from_trusted(dec_cmid(r.get_ref(3)?)?),
        MessageBody::from_trusted(r.get(4)?),
        dec_time(r.get_ref(5)?)?,
    ))
}

/// The key of a room, if it exists.
pub(super) fn room_key(c: &Connection, room: &RoomId) -> Result<Option<i64>, StoreError> {
    c.prepare_cached("SELECT key FROM rooms WHERE id = ?1")
        .and_then(|mut st| st.query_row([room.as_str()], |r| r.get(0)).optional())
        .map_err(sql_err)
}
