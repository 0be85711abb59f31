//! Reactions: the emoji a member puts on a message.

use serde::{Deserialize, Serialize};

use super::ParseError;

/// Longest reaction, in characters (a flag or a family emoji with skin
/// tones is a handful of code points; short words like `+1` also fit).
pub const EMOJI_MAX_CHARS: usize = 32;

/// A reaction key: 1–[`EMOJI_MAX_CHARS`] characters, no whitespace, no
/// control characters (so it is safe in a URL path segment and one line).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Emoji(String);

impl Emoji {
    /// Checks the shape; the text is kept exactly as given (not trimmed).
    pub fn parse(s: &str) -> Result<Self, ParseError> {
        if s.is_empty() {
            return Err(ParseError::new("invalid_emoji", "emoji is empty"));
        }
        if s.chars().count() > EMOJI_MAX_CHARS {
            return Err(ParseError::new(
                "invalid_emoji",
                format!("emoji is longer than {EMOJI_MAX_CHARS} characters"),
            ));
        }
        if s.chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '/')
        {
            return Err(ParseError::new(
                "invalid_emoji",
                "emoji must not contain whitespace, control characters or '/'",
            ));
        }
        Ok(Self(s.to_owned()))
    }

    /// Wraps a value read back from the store.
    pub fn from_trusted(s: String) -> Self {
        Self(s)
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Emoji {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_emoji_and_short_words() {
        for ok in ["👍", "❤️", "👨‍👩‍👧", "🇫🇷", "+1", ":tada:"] {
            assert_eq!(Emoji::parse(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn refuses_empty_long_space_and_control() {
        let long = "x".repeat(EMOJI_MAX_CHARS + 1);
        for bad in [
            "",
            " ",
            "a b",
            "\u{7}",
            "x\n",
            "\u{200b}\u{2028}",
            "a/b",
            long.as_str(),
        ] {
            let e = Emoji::parse(bad).unwrap_err();
            assert_eq!(e.code, "invalid_emoji", "{bad:?}");
        }
    }
}
