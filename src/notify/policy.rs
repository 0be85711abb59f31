//! What to do for one recipient of one message, and what an e-mail digest
//! lists. Everything is read from the store when the worker gets to it, so
//! a read cursor, block or settings change made meanwhile is honoured.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::Context;
use super::{Mail, Push};
use crate::broker::NotifyJob;
use crate::domain::{RoomId, Seq, UserId};
use crate::store::{Device, HistoryQuery, Message, Room, RoomKind, StoreError, Stores, User};

/// Most messages listed per room in one e-mail (the rest are counted).
pub const MAX_LINES_PER_ROOM: usize = 20;

/// The policy's answer for one recipient of one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Nothing to send; the reason is the `dropped_total` label.
    Skip(&'static str),
    /// Push to these devices.
    Push(Vec<Device>),
    /// Add to the user's e-mail digest.
    Email,
}

/// Whether a user counts as online for notifications: connected now, or
/// last seen within `window`. A user never seen is offline.
pub fn counts_as_online(
    connected: bool,
    last_seen: Option<&str>,
    now: DateTime<Utc>,
    window: Duration,
) -> bool {
    if connected {
        return true;
    }
    let Some(seen) = last_seen.and_then(|s| DateTime::parse_from_rfc3339(s).ok()) else {
        return false;
    };
    let age = now - seen.with_timezone(&Utc);
    age.to_std().map(|a| a <= window).unwrap_or(true)
}

/// The text shown for a message: its body cut to `max_chars` characters
/// (with an ellipsis), or `None` when previews are off.
pub fn preview(body: &str, enabled: bool, max_chars: usize) -> Option<String> {
    if !enabled {
        return None;
    }
    let body = body.trim();
    let mut chars = body.chars();
    let cut: String = chars.by_ref().take(max_chars.max(1)).collect();
    if chars.next().is_some() {
        Some(format!("{}…", cut.trim_end()))
    } else {
        Some(cut)
    }
}

/// The name a user is shown by.
pub fn display_name(u: &User) -> String {
    u.display_name
        .clone()
        .filter(|d| !d.trim().is_empty())
        .unwrap_or_else(|| u.username.as_ref().to_owned())
}

/// Decides how to reach `user` about `job`.
pub async fn decide(ctx: &Context, job: &NotifyJob, user: &UserId) -> Result<Decision, StoreError> {
    let stores = &ctx.node.stores;
    if user == &job.sender_id {
        return Ok(Decision::Skip("self"));
    }
    let Some(room) = stores.rooms.room(&job.room_id).await? else {
        return Ok(Decision::Skip("room_gone"));
    };
    let Some(member) = room.member(user) else {
        return Ok(Decision::Skip("not_member"));
    };
    if member.read_seq >= job.seq {
        return Ok(Decision::Skip("read"));
    }
    if stores
        .users
        .blocked_by(user)
        .await?
        .contains(&job.sender_id)
    {
        return Ok(Decision::Skip("blocked"));
    }
    let Some(account) = stores.users.user(user).await? else {
        return Ok(Decision::Skip("no_user"));
    };
    let settings = stores.users.notification_settings(user).await?;
    if settings.push && ctx.push.is_some() {
        let devices = stores.users.devices(user).await?;
        let connected = ctx.node.presence.is_online(user);
        let window = Duration::from_secs(ctx.cfg.online_window_secs);
        if !devices.is_empty()
            && counts_as_online(connected, account.last_seen.as_deref(), Utc::now(), window)
        {
            return Ok(Decision::Push(devices));
        }
    }
    Ok(email_or_skip(ctx, settings.email))
}

/// The e-mail branch: what a push that failed for good falls back to too.
pub fn email_or_skip(ctx: &Context, email_on: bool) -> Decision {
    if !email_on {
        Decision::Skip("settings")
    } else if ctx.mail.is_none() {
        Decision::Skip("no_channel")
    } else {
        Decision::Email
    }
}

/// The message `seq` of `room`, if stored.
pub async fn message_at(
    stores: &Stores,
    room: &RoomId,
    seq: Seq,
) -> Result<Option<Message>, StoreError> {
    let found = stores
        .messages
        .history(
            room,
            HistoryQuery {
                before: Some(seq + 1),
                after: Some(seq - 1),
                limit: 1,
            },
        )
        .await?;
    Ok(found.into_iter().find(|m| m.seq == seq))
}

/// The push for `job`, or `None` when the message is gone.
pub async fn push_for(ctx: &Context, job: &NotifyJob) -> Result<Option<Push>, StoreError> {
    let stores = &ctx.node.stores;
    let Some(msg) = message_at(stores, &job.room_id, job.seq).await? else {
        return Ok(None);
    };
    let sender = match stores.users.user(&job.sender_id).await? {
        Some(u) => display_name(&u),
        None => "Someone".to_owned(),
    };
    let room = stores.rooms.room(&job.room_id).await?;
    let title = match room.as_ref().filter(|r| r.kind == RoomKind::Group) {
        Some(r) => format!("{sender} in {}", r.name.as_deref().unwrap_or("a group")),
        None => sender.clone(),
    };
    let text = preview(msg.body.as_str(), ctx.cfg.preview, ctx.cfg.preview_chars);
    let mut data = BTreeMap::new();
    data.insert("room_id".to_owned(), job.room_id.to_string());
    data.insert("message_id".to_owned(), job.message_id.to_string());
    data.insert("seq".to_owned(), job.seq.to_string());
    data.insert("sender_id".to_owned(), job.sender_id.to_string());
    data.insert("sender_name".to_owned(), sender);
    if let Some(p) = &text {
        data.insert("preview".to_owned(), p.clone());
    }
    Ok(Some(Push {
        title,
        body: text.unwrap_or_else(|| "New message".to_owned()),
        data,
    }))
}

/// One message waiting in a user's e-mail digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub room_id: RoomId,
    pub seq: Seq,
    pub sender_id: UserId,
}

/// What a digest e-mail lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digest {
    pub to: String,
    pub to_name: String,
    pub rooms: Vec<RoomLines>,
    /// Messages listed plus those counted in `more`.
    pub total: usize,
}

/// The unread messages of one room in a digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomLines {
    /// The group's name, or the other person's name in a direct room.
    pub title: String,
    pub kind: RoomKind,
    pub lines: Vec<Line>,
    /// Unread messages of the room not listed.
    pub more: usize,
}

/// One listed message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub sender: String,
    /// `HH:MM` UTC.
    pub at: String,
    pub preview: Option<String>,
}

/// A digest to send, or why there is none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DigestPlan {
    Nothing(&'static str),
    Send(Digest),
}

/// Builds the digest of `user` from what is still pending and unread now.
pub async fn digest(
    ctx: &Context,
    user: &UserId,
    pending: &[Pending],
) -> Result<DigestPlan, StoreError> {
    let stores = &ctx.node.stores;
    let Some(account) = stores.users.user(user).await? else {
        return Ok(DigestPlan::Nothing("no_user"));
    };
    if !stores.users.notification_settings(user).await?.email {
        return Ok(DigestPlan::Nothing("settings"));
    }
    let blocked: HashSet<UserId> = stores.users.blocked_by(user).await?.into_iter().collect();
    // Rooms in the order their first pending message arrived.
    let mut order: Vec<RoomId> = Vec::new();
    let mut by_room: HashMap<RoomId, Vec<Seq>> = HashMap::new();
    for p in pending {
        if blocked.contains(&p.sender_id) {
            continue;
        }
        let seqs = by_room.entry(p.room_id.clone()).or_insert_with(|| {
            order.push(p.room_id.clone());
            Vec::new()
        });
        seqs.push(p.seq);
    }
    if order.is_empty() {
        return Ok(DigestPlan::Nothing("blocked"));
    }
    let mut names: HashMap<UserId, String> = HashMap::new();
    let mut rooms = Vec::new();
    let mut total = 0;
    for room_id in order {
        let Some(room) = stores.rooms.room(&room_id).await? else {
            continue;
        };
        let Some(member) = room.member(user) else {
            continue;
        };
        let mut seqs = by_room.remove(&room_id).unwrap_or_default();
        seqs.retain(|s| *s > member.read_seq);
        seqs.sort_unstable();
        seqs.dedup();
        if seqs.is_empty() {
            continue;
        }
        let wanted: HashSet<Seq> = seqs.iter().copied().collect();
        let messages = fetch(stores, &room_id, &seqs, MAX_LINES_PER_ROOM).await?;
        let mut lines = Vec::new();
        for m in messages.iter().filter(|m| wanted.contains(&m.seq)) {
            if blocked.contains(&m.sender_id) {
                continue;
            }
            let sender = name_of(stores, &mut names, &m.sender_id).await?;
            lines.push(Line {
                sender,
                at: hh_mm(&m.created_at),
                preview: preview(m.body.as_str(), ctx.cfg.preview, ctx.cfg.preview_chars),
            });
        }
        let more = seqs.len().saturating_sub(MAX_LINES_PER_ROOM);
        if lines.is_empty() {
            continue;
        }
        total += lines.len() + more;
        let title = room_title(stores, &mut names, &room, user).await?;
        rooms.push(RoomLines {
            title,
            kind: room.kind,
            lines,
            more,
        });
    }
    if rooms.is_empty() {
        return Ok(DigestPlan::Nothing("read"));
    }
    Ok(DigestPlan::Send(Digest {
        to: account.email.as_ref().to_owned(),
        to_name: display_name(&account),
        rooms,
        total,
    }))
}

/// The first `limit` of `seqs` (ascending) of a room, in one or a few reads.
async fn fetch(
    stores: &Stores,
    room: &RoomId,
    seqs: &[Seq],
    limit: usize,
) -> Result<Vec<Message>, StoreError> {
    let listed = &seqs[..limit.min(seqs.len())];
    let (Some(&first), Some(&last)) = (listed.first(), listed.last()) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    let mut after = first - 1;
    while after < last {
        let page = stores
            .messages
            .history(
                room,
                HistoryQuery {
                    before: Some(last + 1),
                    after: Some(after),
                    limit: 100,
                },
            )
            .await?;
        let Some(end) = page.last().map(|m| m.seq) else {
            break;
        };
        after = end;
        out.extend(page);
    }
    Ok(out)
}

async fn name_of(
    stores: &Stores,
    cache: &mut HashMap<UserId, String>,
    id: &UserId,
) -> Result<String, StoreError> {
    if let Some(n) = cache.get(id) {
        return Ok(n.clone());
    }
    let n = match stores.users.user(id).await? {
        Some(u) => display_name(&u),
        None => "Someone".to_owned(),
    };
    cache.insert(id.clone(), n.clone());
    Ok(n)
}

async fn room_title(
    stores: &Stores,
    cache: &mut HashMap<UserId, String>,
    room: &Room,
    user: &UserId,
) -> Result<String, StoreError> {
    match room.kind {
        RoomKind::Group => Ok(room.name.clone().unwrap_or_else(|| "a group".to_owned())),
        RoomKind::Direct => match room.members.iter().find(|m| &m.user_id != user) {
            Some(peer) => name_of(stores, cache, &peer.user_id).await,
            None => Ok("a conversation".to_owned()),
        },
    }
}

fn hh_mm(rfc3339: &str) -> String {
    DateTime::parse_from_rfc3339(rfc3339)
        .map(|t| t.with_timezone(&Utc).format("%H:%M").to_string())
        .unwrap_or_default()
}

/// The digest as an e-mail (text and HTML with the same content).
pub fn render(d: &Digest, window: Duration) -> Mail {
    let senders: HashSet<&str> = d
        .rooms
        .iter()
        .flat_map(|r| r.lines.iter().map(|l| l.sender.as_str()))
        .collect();
    let subject = match (d.total, d.rooms.len(), senders.iter().next()) {
        (1, _, Some(s)) => format!("New message from {s}"),
        (n, 1, Some(s)) if senders.len() == 1 => format!("{n} new messages from {s}"),
        (n, k, _) => format!("{n} new messages in {k} conversations"),
    };
    let every = match window.as_secs() {
        s if s >= 120 => format!("{} minutes", s / 60),
        s => format!("{s} seconds"),
    };
    let mut text = format!(
        "Hi {},\n\nyou have {} unread message{} on chatd.\n",
        d.to_name,
        d.total,
        if d.total == 1 { "" } else { "s" }
    );
    let mut html = format!(
        "<!doctype html><html><body style=\"font-family:sans-serif\">\
         <p>Hi {},</p><p>you have {} unread message{} on chatd.</p>",
        esc(&d.to_name),
        d.total,
        if d.total == 1 { "" } else { "s" }
    );
    for r in &d.rooms {
        let heading = match r.kind {
            RoomKind::Group => format!("#{}", r.title),
            RoomKind::Direct => r.title.clone(),
        };
        text.push_str(&format!("\n{heading}\n"));
        html.push_str(&format!("<h3>{}</h3><ul>", esc(&heading)));
        for l in &r.lines {
            let body = l.preview.as_deref().unwrap_or("New message");
            text.push_str(&format!("  [{}] {}: {}\n", l.at, l.sender, body));
            html.push_str(&format!(
                "<li><small>{}</small> <b>{}</b>: {}</li>",
                esc(&l.at),
                esc(&l.sender),
                esc(body)
            ));
        }
        if r.more > 0 {
            text.push_str(&format!("  … and {} more\n", r.more));
            html.push_str(&format!("<li>… and {} more</li>", r.more));
        }
        html.push_str("</ul>");
    }
    let footer = format!(
        "Open chatd to reply. You get at most one such e-mail every {every}; \
         you can turn them off in your notification settings."
    );
    text.push_str(&format!("\n{footer}\n"));
    html.push_str(&format!(
        "<p><small>{}</small></p></body></html>",
        esc(&footer)
    ));
    Mail {
        to: d.to.clone(),
        to_name: d.to_name.clone(),
        subject,
        text,
        html,
    }
}

/// Escapes text for HTML element content and attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-03-01T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    #[test]
    fn online_means_connected_or_recently_seen() {
        let w = Duration::from_secs(300);
        assert!(counts_as_online(true, None, now(), w));
        assert!(counts_as_online(
            false,
            Some("2026-03-01T11:56:00.000Z"),
            now(),
            w
        ));
        assert!(!counts_as_online(
            false,
            Some("2026-03-01T11:54:00.000Z"),
            now(),
            w
        ));
        assert!(!counts_as_online(false, None, now(), w));
        assert!(!counts_as_online(false, Some("yesterday"), now(), w));
        // A clock a little ahead elsewhere still counts as recent.
        assert!(counts_as_online(
            false,
            Some("2026-03-01T12:00:05Z"),
            now(),
            w
        ));
    }

    #[test]
    fn previews_cut_on_characters_and_can_be_off() {
        assert_eq!(preview("  hi  ", true, 10).as_deref(), Some("hi"));
        assert_eq!(preview("ääääää", true, 3).as_deref(), Some("äää…"));
        assert_eq!(preview("abc", true, 3).as_deref(), Some("abc"));
        assert_eq!(preview("abc", false, 3), None);
    }

    fn digest() -> Digest {
        Digest {
            to: "bob@example.com".into(),
            to_name: "Bob".into(),
            rooms: vec![RoomLines {
                title: "Alice".into(),
                kind: RoomKind::Direct,
                lines: vec![
                    Line {
                        sender: "Alice".into(),
                        at: "12:01".into(),
                        preview: Some("<b>hi</b> & bye".into()),
                    },
                    Line {
                        sender: "Alice".into(),
                        at: "12:02".into(),
                        preview: None,
                    },
                ],
                more: 0,
            }],
            total: 2,
        }
    }

    #[test]
    fn mails_list_messages_and_escape_html() {
        let m = render(&digest(), Duration::from_secs(180));
        assert_eq!(m.subject, "2 new messages from Alice");
        assert!(
            m.text.contains("[12:01] Alice: <b>hi</b> & bye"),
            "{}",
            m.text
        );
        assert!(m.text.contains("[12:02] Alice: New message"));
        assert!(m.text.contains("every 3 minutes"));
        assert!(
            m.html.contains("&lt;b&gt;hi&lt;/b&gt; &amp; bye"),
            "{}",
            m.html
        );
        assert!(!m.html.contains("<b>hi</b>"));
    }

    #[test]
    fn subjects_follow_the_content() {
        let mut d = digest();
        d.rooms[0].lines.truncate(1);
        d.total = 1;
        assert_eq!(
            render(&d, Duration::from_secs(60)).subject,
            "New message from Alice"
        );
        let mut d = digest();
        d.rooms.push(RoomLines {
            title: "team".into(),
            kind: RoomKind::Group,
            lines: vec![Line {
                sender: "Carol".into(),
                at: "12:03".into(),
                preview: Some("yo".into()),
            }],
            more: 0,
        });
        d.total = 3;
        let m = render(&d, Duration::from_secs(60));
        assert_eq!(m.subject, "3 new messages in 2 conversations");
        assert!(
            m.text.contains("\n#team\n  [12:03] Carol: yo\n"),
            "{}",
            m.text
        );
    }
}
