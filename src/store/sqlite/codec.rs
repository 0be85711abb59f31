//! Compact encodings of the message columns (schema version 2).
//!
//! Each function maps a string to ONE stored value and back, so equal
//! strings always meet in the unique indexes:
//! - message ids that are 32 lowercase hex digits (chatd's UUIDs) are
//!   stored as their 16 bytes, any other id as text; a message appended by
//!   this schema stores no id at all: its id is derived from
//!   `(created_at, room_key, seq)` (see [`derived_id`]);
//! - a `client_msg_id` that is a lowercase hyphenated UUID is stored as its
//!   16 bytes, anything else as the text given;
//! - a `created_at` that chatd itself wrote (RFC 3339, milliseconds, `Z`)
//!   is stored as unix milliseconds, anything else as the text given.

use chrono::{DateTime, SecondsFormat, TimeZone, Utc};
use rusqlite::types::{Value, ValueRef};

/// Largest room key a derived id can carry (32 bits).
const ROOM_KEY_BITS: u32 = 32;
/// Largest seq a derived id can carry (42 bits: 4.4 × 10¹² messages).
const SEQ_BITS: u32 = 42;

/// The id of a message stored without one: a UUID of version 8 (the
/// RFC 9562 "custom" layout) holding the append time in unix milliseconds
/// in its first 48 bits, like a UUIDv7, so ids stay time-ordered and look
/// like every other chatd id, and `(room_key, seq)` in its 74 free bits, so
/// the id finds its row by primary key without an index. `None` when a
/// value does not fit (then the caller stores a UUIDv7 instead).
pub(super) fn derived_id(ms: i64, room_key: i64, seq: i64) -> Option<String> {
    if !(0..1 << 48).contains(&ms)
        || !(0..1 << ROOM_KEY_BITS).contains(&room_key)
        || !(0..1 << SEQ_BITS).contains(&seq)
    {
        return None;
    }
    let packed = ((room_key as u128) << SEQ_BITS) | seq as u128;
    let u = ((ms as u128) << 80)
        | (8u128 << 76)
        | ((packed >> 62) << 64)
        | (0b10u128 << 62)
        | (packed & ((1u128 << 62) - 1));
    Some(format!("{u:032x}"))
}

/// The `(ms, room_key, seq)` a [`derived_id`] carries, if `id` is one.
pub(super) fn parse_derived(id: &str) -> Option<(i64, i64, i64)> {
    if id.len() != 32 || !is_lower_hex(id) {
        return None;
    }
    let u = u128::from_str_radix(id, 16).ok()?;
    if (u >> 76) & 0xf != 8 || (u >> 62) & 0b11 != 0b10 {
        return None;
    }
    let packed = (((u >> 64) & 0xfff) << 62) | (u & ((1u128 << 62) - 1));
    let ms = (u >> 80) as i64;
    let room_key = (packed >> SEQ_BITS) as i64;
    let seq = (packed & ((1u128 << SEQ_BITS) - 1)) as i64;
    Some((ms, room_key, seq))
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A stored message id: 16 bytes for 32 lowercase hex digits, else text.
pub(super) fn enc_id(id: &str) -> Value {
    if id.len() == 32 && is_lower_hex(id) {
        if let Ok(u) = u128::from_str_radix(id, 16) {
            return Value::Blob(u.to_be_bytes().to_vec());
        }
    }
    Value::Text(id.to_owned())
}

/// Reads back a value written by [`enc_id`] or [`enc_cmid`].
fn dec_text_or_uuid(v: ValueRef<'_>, hyphenated: bool) -> rusqlite::Result<String> {
    match v {
        ValueRef::Blob(b) if b.len() == 16 => {
            let u = uuid::Uuid::from_slice(b).map_err(|e| bad(e.to_string()))?;
            Ok(if hyphenated {
                u.hyphenated().to_string()
            } else {
                u.simple().to_string()
            })
        }
        ValueRef::Text(t) => String::from_utf8(t.to_vec()).map_err(|e| bad(e.to_string())),
        other => Err(bad(format!("unexpected {:?}", other.data_type()))),
    }
}

fn bad(msg: String) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Blob, msg.into())
}

/// A message's id from its stored `id` column, or derived when that is NULL.
pub(super) fn dec_id(
    v: ValueRef<'_>,
    created_at: ValueRef<'_>,
    room_key: i64,
    seq: i64,
) -> rusqlite::Result<String> {
    match (v, created_at) {
        (ValueRef::Null, ValueRef::Integer(ms)) => {
            derived_id(ms, room_key, seq).ok_or_else(|| bad("underivable message id".into()))
        }
        (ValueRef::Null, _) => Err(bad("a message without id has no time".into())),
        (v, _) => dec_text_or_uuid(v, false),
    }
}

/// A stored `client_msg_id`: 16 bytes for a lowercase hyphenated UUID.
pub(super) fn enc_cmid(s: &str) -> Value {
    if s.len() == 36 {
        if let Ok(u) = uuid::Uuid::try_parse(s) {
            if u.hyphenated().to_string() == s {
                return Value::Blob(u.as_bytes().to_vec());
            }
        }
    }
    Value::Text(s.to_owned())
}

/// Reads back a value written by [`enc_cmid`].
pub(super) fn dec_cmid(v: ValueRef<'_>) -> rusqlite::Result<String> {
    dec_text_or_uuid(v, true)
}

/// A stored time: unix milliseconds when `s` is exactly what chatd writes.
pub(super) fn enc_time(s: &str) -> Value {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        let ms = t.timestamp_millis();
        if render_ms(ms).as_deref() == Some(s) {
            return Value::Integer(ms);
        }
    }
    Value::Text(s.to_owned())
}

/// Reads back a value written by [`enc_time`].
pub(super) fn dec_time(v: ValueRef<'_>) -> rusqlite::Result<String> {
    match v {
        ValueRef::Integer(ms) => render_ms(ms).ok_or_else(|| bad(format!("bad time {ms}"))),
        ValueRef::Text(t) => String::from_utf8(t.to_vec()).map_err(|e| bad(e.to_string())),
        other => Err(bad(format!("unexpected {:?}", other.data_type()))),
    }
}

/// Unix milliseconds as chatd writes times (`now_rfc3339`).
pub(super) fn render_ms(ms: i64) -> Option<String> {
    Utc.timestamp_millis_opt(ms)
        .single()
        .map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_ids_round_trip_and_stay_apart_from_uuid_v7() {
        let ms = 1_790_000_000_123;
        for (rk, seq) in [(1, 1), (7, 123_456), ((1 << 32) - 1, (1 << 42) - 1), (0, 0)] {
            let id = derived_id(ms, rk, seq).unwrap();
            assert_eq!(id.len(), 32);
            assert_eq!(parse_derived(&id), Some((ms, rk, seq)));
            let u = uuid::Uuid::parse_str(&id).unwrap();
            assert_eq!(u.get_version_num(), 8);
        }
        assert_eq!(derived_id(ms, 1 << 32, 1), None);
        assert_eq!(derived_id(ms, 1, 1 << 42), None);
        let v7 = uuid::Uuid::now_v7().simple().to_string();
        assert_eq!(parse_derived(&v7), None);
        // Later appends get larger ids, as UUIDv7 ids do.
        assert!(derived_id(ms + 1, 1, 1).unwrap() > derived_id(ms, 9, 9).unwrap());
    }

    #[test]
    fn encodings_read_back_exactly() {
        let id = uuid::Uuid::now_v7().simple().to_string();
        assert!(matches!(enc_id(&id), Value::Blob(ref b) if b.len() == 16));
        for s in [id.as_str(), "m1", "ABCDEF0123456789ABCDEF0123456789"] {
            let v = enc_id(s);
            let back = dec_id(ValueRef::from(&v), ValueRef::Null, 0, 0).unwrap();
            assert_eq!(back, s);
        }
        let u = uuid::Uuid::new_v4().hyphenated().to_string();
        assert!(matches!(enc_cmid(&u), Value::Blob(_)));
        for s in [u.as_str(), &u.to_uppercase(), "1-2-3", "c1"] {
            assert_eq!(dec_cmid(ValueRef::from(&enc_cmid(s))).unwrap(), s);
        }
        let now = crate::domain::now_rfc3339();
        assert!(matches!(enc_time(&now), Value::Integer(_)));
        for s in [
            now.as_str(),
            "2026-02-03T04:05:06Z",
            "x",
            "2026-02-03T04:05:06.789+01:00",
        ] {
            assert_eq!(dec_time(ValueRef::from(&enc_time(s))).unwrap(), s);
        }
    }
}
