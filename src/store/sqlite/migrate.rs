//! Migrations of older schemas, run by [`super::schema::open_writer`]
//! inside its opening transaction: all or nothing.

use rusqlite::{params, Connection};

use super::codec::{enc_cmid, enc_id, enc_time};

/// Version 1 → 2: users and rooms get an integer `key`; messages move to
/// the compact table keyed `(room_key, seq)`. Every message keeps its id
/// (stored, since it is not derivable), seq, sender, body, time and
/// `client_msg_id` (so resends of old messages stay duplicates). Members,
/// cursors, blocks, devices and tokens are not touched.
pub(super) fn from_v1(c: &Connection, schema: &str) -> rusqlite::Result<()> {
    // Renaming also renames the tables' automatic (UNIQUE) indexes, so the
    // new tables can take the old names.
    c.execute_batch(
        "ALTER TABLE users RENAME TO users_v1;
         ALTER TABLE rooms RENAME TO rooms_v1;
         ALTER TABLE messages RENAME TO messages_v1;",
    )?;
    c.execute_batch(schema)?;
    c.execute_batch(
        "INSERT INTO users(id, username, email, display_name, password_hash, created_at,
                           last_seen, notify_push, notify_email)
         SELECT id, username, email, display_name, password_hash, created_at,
                last_seen, notify_push, notify_email FROM users_v1 ORDER BY rowid;
         INSERT INTO rooms(id, kind, name, direct_key, created_at, last_seq)
         SELECT id, kind, name, direct_key, created_at, last_seq FROM rooms_v1 ORDER BY rowid;",
    )?;
    {
        let mut read = c.prepare(
            "SELECT m.id, r.key, m.seq, u.key, m.client_msg_id, m.body, m.created_at
             FROM messages_v1 m
             LEFT JOIN rooms r ON r.id = m.room_id
             LEFT JOIN users u ON u.id = m.sender_id
             ORDER BY m.rowid",
        )?;
        let mut write = c.prepare(
            "INSERT INTO messages(room_key, seq, sender_key, id, client_msg_id, body, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?;
        let mut rows = read.query([])?;
        while let Some(r) = rows.next()? {
            let id: String = r.get(0)?;
            let (Some(room_key), Some(sender_key)) =
                (r.get::<_, Option<i64>>(1)?, r.get::<_, Option<i64>>(3)?)
            else {
                // Refuse rather than drop a message: the old file stays as it was.
                return Err(rusqlite::Error::ToSqlConversionFailure(
                    format!("message {id} names a room or sender that does not exist").into(),
                ));
            };
            let (cmid, created_at): (String, String) = (r.get(4)?, r.get(6)?);
            write.execute(params![
                room_key,
                r.get::<_, i64>(2)?,
                sender_key,
                enc_id(&id),
                enc_cmid(&cmid),
                r.get::<_, String>(5)?,
                enc_time(&created_at),
            ])?;
        }
    }
    c.execute_batch(
        "DROP TABLE messages_v1;
         DROP TABLE rooms_v1;
         DROP TABLE users_v1;
         UPDATE meta SET value = '2' WHERE key = 'schema_version';",
    )
}
