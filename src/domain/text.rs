//! Text newtypes with the contract's limits.

use serde::{Deserialize, Serialize};
use unicode_normalization::UnicodeNormalization;
use unicode_properties::{GeneralCategory, GeneralCategoryGroup, UnicodeGeneralCategory};

use super::ParseError;

/// Configurable input limits (the contract's defaults in `Default`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Limits {
    /// Shortest username.
    pub username_min: usize,
    /// Longest username.
    pub username_max: usize,
    /// Shortest password, in characters.
    pub password_min: usize,
    /// Longest password, in characters.
    pub password_max: usize,
    /// Longest message body after trimming, in characters.
    pub body_max: usize,
    /// Longest `client_msg_id`, in characters.
    pub client_msg_id_max: usize,
    /// Most members of a group room.
    pub group_max_members: usize,
    /// Longest display name or room name, in characters.
    pub name_max: usize,
    /// Largest attachment upload, in bytes (more is 413).
    pub attachment_max_bytes: u64,
    /// Seconds an upload may stay unattached to a message before it is removed.
    pub attachment_unattached_ttl_secs: u64,
    /// Most distinct reactions (emoji) on one message.
    pub reactions_per_message: usize,
    /// Most user ids listed per reaction in a `message` (the count is exact).
    pub reaction_users_shown: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            username_min: 3,
            username_max: 32,
            password_min: 8,
            password_max: 128,
            body_max: 4000,
            client_msg_id_max: 64,
            group_max_members: 1000,
            name_max: 64,
            attachment_max_bytes: 25 * 1024 * 1024,
            attachment_unattached_ttl_secs: 86_400,
            reactions_per_message: 20,
            reaction_users_shown: 10,
        }
    }
}

/// A username: lowercase `[a-z0-9_.-]`, length within the limits.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Username(String);

impl Username {
    /// Parses a username, refusing anything outside `[a-z0-9_.-]{min,max}`.
    pub fn parse(s: &str, limits: &Limits) -> Result<Self, ParseError> {
        let n = s.chars().count();
        if n < limits.username_min || n > limits.username_max {
            return Err(ParseError::new(
                "invalid_username",
                format!(
                    "username must be {}–{} characters",
                    limits.username_min, limits.username_max
                ),
            ));
        }
        if !s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-')
        }) {
            return Err(ParseError::new(
                "invalid_username",
                "username may only contain a-z, 0-9, '_', '.' and '-'",
            ));
        }
        Ok(Self(s.to_owned()))
    }

    /// Wraps a username read back from the store.
    pub fn from_trusted(s: String) -> Self {
        Self(s)
    }
}

impl AsRef<str> for Username {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// An e-mail address, lowercased; a light syntactic check only (the mail
/// server is the real judge).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Email(String);

impl Email {
    /// Parses `local@domain.tld`, at most 254 characters, no spaces.
    pub fn parse(s: &str) -> Result<Self, ParseError> {
        let s = s.trim().to_lowercase();
        let bad = || ParseError::new("invalid_email", "e-mail address is not valid");
        if s.len() > 254 || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad());
        }
        let (local, domain) = s.split_once('@').ok_or_else(bad)?;
        if local.is_empty()
            || domain.is_empty()
            || domain.contains('@')
            || !domain.contains('.')
            || domain.starts_with('.')
            || domain.ends_with('.')
        {
            return Err(bad());
        }
        Ok(Self(s))
    }

    /// Wraps an address read back from the store.
    pub fn from_trusted(s: String) -> Self {
        Self(s)
    }
}

impl AsRef<str> for Email {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// A password in clear, only between the request and the hasher. Its `Debug`
/// hides the content.
#[derive(Clone)]
pub struct Password(String);

impl Password {
    /// Checks the length in characters.
    pub fn parse(s: &str, limits: &Limits) -> Result<Self, ParseError> {
        let n = s.chars().count();
        if n < limits.password_min || n > limits.password_max {
            return Err(ParseError::new(
                "invalid_password",
                format!(
                    "password must be {}–{} characters",
                    limits.password_min, limits.password_max
                ),
            ));
        }
        Ok(Self(s.to_owned()))
    }

    /// The clear text, for the hasher.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Password(***)")
    }
}

/// Joiners that emoji sequences (👩‍💻) and some scripts (Persian, Indic)
/// need: the only format characters a name may hold.
const JOINERS: [char; 2] = ['\u{200C}', '\u{200D}'];

/// Letters and symbols that render as nothing (the Hangul fillers, which
/// Unicode marks default-ignorable, and the blank Braille pattern): they do
/// not make a name visible.
const BLANK_GRAPHICS: [char; 5] = ['\u{115F}', '\u{1160}', '\u{3164}', '\u{FFA0}', '\u{2800}'];

/// Refused in names: controls (Cc), format characters (Cf: bidi overrides
/// and isolates, zero-width spaces, BOM...) but the joiners, and the line
/// and paragraph separators.
fn forbidden_in_name(c: char) -> bool {
    match c.general_category() {
        GeneralCategory::Control
        | GeneralCategory::LineSeparator
        | GeneralCategory::ParagraphSeparator
        | GeneralCategory::Surrogate => true,
        GeneralCategory::Format => !JOINERS.contains(&c),
        _ => false,
    }
}

/// Whether `c` shows something: a letter, number, punctuation or symbol
/// that is not blank. Spaces, marks on their own and joiners do not.
fn visible(c: char) -> bool {
    matches!(
        c.general_category_group(),
        GeneralCategoryGroup::Letter
            | GeneralCategoryGroup::Number
            | GeneralCategoryGroup::Punctuation
            | GeneralCategoryGroup::Symbol
    ) && !BLANK_GRAPHICS.contains(&c)
}

/// A name shown to other users: NFC, trimmed, 1..=`max` characters, no
/// control, format (bidi) or separator characters, and something visible.
fn bounded_name(s: &str, max: usize, code: &'static str, what: &str) -> Result<String, ParseError> {
    let nfc: String = s.nfc().collect();
    let t = nfc.trim();
    let n = t.chars().count();
    if n == 0 || n > max {
        return Err(ParseError::new(
            code,
            format!("{what} must be 1–{max} characters"),
        ));
    }
    if t.chars().any(forbidden_in_name) {
        return Err(ParseError::new(
            code,
            format!("{what} may not contain control, format or bidirectional-override characters"),
        ));
    }
    if !t.chars().any(visible) {
        return Err(ParseError::new(
            code,
            format!("{what} must contain a visible character"),
        ));
    }
    Ok(t.to_owned())
}

/// A display name: NFC, trimmed, 1..=`name_max` characters, no control,
/// format or bidi-override characters, not invisible.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DisplayName(String);

impl DisplayName {
    /// Parses a display name.
    pub fn parse(s: &str, limits: &Limits) -> Result<Self, ParseError> {
        bounded_name(s, limits.name_max, "invalid_display_name", "display name").map(Self)
    }

    /// Wraps a name read back from the store.
    pub fn from_trusted(s: String) -> Self {
        Self(s)
    }
}

impl AsRef<str> for DisplayName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// A group room's name: the same rules as a display name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RoomName(String);

impl RoomName {
    /// Parses a room name.
    pub fn parse(s: &str, limits: &Limits) -> Result<Self, ParseError> {
        bounded_name(s, limits.name_max, "invalid_room_name", "room name").map(Self)
    }
}

impl AsRef<str> for RoomName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// A message body: trimmed, 1..=`body_max` characters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MessageBody(String);

impl MessageBody {
    /// Trims and checks the length in characters (not bytes).
    pub fn parse(s: &str, limits: &Limits) -> Result<Self, ParseError> {
        let t = s.trim();
        if t.is_empty() {
            return Err(ParseError::new("invalid_body", "message body is empty"));
        }
        if t.chars().count() > limits.body_max {
            return Err(ParseError::new(
                "body_too_long",
                format!("message body is longer than {} characters", limits.body_max),
            ));
        }
        Ok(Self(t.to_owned()))
    }

    /// Wraps a body read back from the store.
    pub fn from_trusted(s: String) -> Self {
        Self(s)
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The client's id for a send, the key of idempotent resends.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ClientMsgId(String);

impl ClientMsgId {
    /// 1..=`client_msg_id_max` characters, no control characters.
    pub fn parse(s: &str, limits: &Limits) -> Result<Self, ParseError> {
        let n = s.chars().count();
        if n == 0 || n > limits.client_msg_id_max || s.chars().any(|c| c.is_control()) {
            return Err(ParseError::new(
                "invalid_client_msg_id",
                format!(
                    "client_msg_id must be 1–{} printable characters",
                    limits.client_msg_id_max
                ),
            ));
        }
        Ok(Self(s.to_owned()))
    }

    /// Wraps an id read back from the store.
    pub fn from_trusted(s: String) -> Self {
        Self(s)
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l() -> Limits {
        Limits::default()
    }

    #[test]
    fn username_rules() {
        assert!(Username::parse("ab", &l()).is_err());
        assert!(Username::parse("abc", &l()).is_ok());
        assert!(Username::parse(&"a".repeat(32), &l()).is_ok());
        assert!(Username::parse(&"a".repeat(33), &l()).is_err());
        assert!(Username::parse("Alice", &l()).is_err());
        assert!(Username::parse("al ice", &l()).is_err());
        assert!(Username::parse("a.l_i-ce9", &l()).is_ok());
        assert_eq!(
            Username::parse("é√x", &l()).unwrap_err().code,
            "invalid_username"
        );
    }

    #[test]
    fn email_rules() {
        assert_eq!(Email::parse(" A@B.io ").unwrap().as_ref(), "a@b.io");
        for bad in [
            "", "a", "a@", "@b.io", "a@b", "a@@b.io", "a b@c.io", "a@.io",
        ] {
            assert!(Email::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn password_counts_characters() {
        assert!(Password::parse("1234567", &l()).is_err());
        assert!(Password::parse("12345678", &l()).is_ok());
        assert!(Password::parse(&"é".repeat(128), &l()).is_ok());
        assert!(Password::parse(&"é".repeat(129), &l()).is_err());
        assert_eq!(
            format!("{:?}", Password::parse("secret123", &l()).unwrap()),
            "Password(***)"
        );
    }

    #[test]
    fn body_trims_and_counts_characters() {
        assert_eq!(MessageBody::parse("  hi  ", &l()).unwrap().as_str(), "hi");
        assert_eq!(
            MessageBody::parse("   ", &l()).unwrap_err().code,
            "invalid_body"
        );
        assert!(MessageBody::parse(&"ü".repeat(4000), &l()).is_ok());
        assert_eq!(
            MessageBody::parse(&"x".repeat(4001), &l())
                .unwrap_err()
                .code,
            "body_too_long"
        );
    }

    #[test]
    fn client_msg_id_rules() {
        assert!(ClientMsgId::parse("", &l()).is_err());
        assert!(ClientMsgId::parse(&"x".repeat(64), &l()).is_ok());
        assert!(ClientMsgId::parse(&"x".repeat(65), &l()).is_err());
        assert!(ClientMsgId::parse("a\nb", &l()).is_err());
    }

    #[test]
    fn names_refuse_controls_bidi_and_invisible_text() {
        for bad in [
            "admin\u{202E}gnp.exe",
            "a\u{2066}b\u{2069}",
            "\u{200E}x",
            "\u{200B}",
            "\u{FEFF}",
            " \u{200B}\u{200D} ",
            "\u{3164}",
            "\u{0301}",
            "x\u{0007}",
            "a\u{2028}b",
            "x\u{00AD}y",
        ] {
            let e = DisplayName::parse(bad, &l()).unwrap_err();
            assert_eq!(e.code, "invalid_display_name", "{bad:?}");
            assert_eq!(
                RoomName::parse(bad, &l()).unwrap_err().code,
                "invalid_room_name"
            );
        }
        for good in [
            "Zoë",
            "👩\u{200D}💻 dev",
            "می\u{200C}خواهم",
            "李小龍",
            "O'Brien",
            "-_-",
        ] {
            assert!(DisplayName::parse(good, &l()).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn names_are_nfc() {
        let n = DisplayName::parse("Jose\u{0301}", &l()).unwrap();
        assert_eq!(n.as_ref(), "Jos\u{00E9}");
        // The limit counts characters after normalisation.
        let decomposed = "e\u{0301}".repeat(64);
        assert!(DisplayName::parse(&decomposed, &l()).is_ok());
    }

    #[test]
    fn names_trim() {
        assert_eq!(DisplayName::parse(" Bob ", &l()).unwrap().as_ref(), "Bob");
        assert!(DisplayName::parse("  ", &l()).is_err());
        assert!(RoomName::parse(&"n".repeat(65), &l()).is_err());
    }
}
