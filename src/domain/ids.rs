//! Identifier newtypes. Ids are opaque strings to clients; chatd mints UUIDv7
//! (time ordered) in simple hex form.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::Arc;

use super::ParseError;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(Arc<str>);

        impl $name {
            /// Mints a new, time-ordered id.
            pub fn generate() -> Self {
                Self(uuid::Uuid::now_v7().simple().to_string().into())
            }

            /// Accepts an id from outside: 1–64 characters of `[A-Za-z0-9_-]`.
            pub fn parse(s: &str) -> Result<Self, ParseError> {
                if s.is_empty()
                    || s.len() > 64
                    || !s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                {
                    return Err(ParseError::new(
                        "invalid_request",
                        concat!("malformed ", $what, " id"),
                    ));
                }
                Ok(Self(s.into()))
            }

            /// Wraps an id read back from the store (trusted).
            pub fn from_trusted(s: impl Into<Arc<str>>) -> Self {
                Self(s.into())
            }

            /// The id as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), &self.0)
            }
        }

        /// In the OpenAPI document an id is a plain string.
        impl utoipa::PartialSchema for $name {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                utoipa::openapi::ObjectBuilder::new()
                    .schema_type(utoipa::openapi::schema::Type::String)
                    .description(Some(concat!("A ", $what, " id (opaque; 1–64 of [A-Za-z0-9_-])")))
                    .min_length(Some(1))
                    .max_length(Some(64))
                    .pattern(Some("^[A-Za-z0-9_-]+$"))
                    .into()
            }
        }

        impl utoipa::ToSchema for $name {}
    };
}

id_type!(
    /// A user's id.
    UserId, "user"
);
id_type!(
    /// A room's id.
    RoomId, "room"
);
id_type!(
    /// A stored message's id.
    MessageId, "message"
);
id_type!(
    /// One socket connection (one device) of a user.
    SessionId, "session"
);

/// Position of a message in its room: 1, 2, 3, ... with no gaps. 0 means "before
/// the first message" (an empty cursor).
pub type Seq = i64;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_parse_back() {
        let id = UserId::generate();
        assert_eq!(UserId::parse(id.as_str()).unwrap(), id);
    }

    #[test]
    fn rejects_empty_long_and_odd_ids() {
        assert!(RoomId::parse("").is_err());
        assert!(RoomId::parse(&"a".repeat(65)).is_err());
        assert!(RoomId::parse("a/b").is_err());
        assert!(RoomId::parse("a b").is_err());
        assert!(RoomId::parse("abc-DEF_123").is_ok());
    }
}
