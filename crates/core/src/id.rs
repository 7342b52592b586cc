//! Names of devices and operators.
//!
//! A device id is a virtual name routed inside the pivot, never a port, and
//! operators also reach a device as `ID.burrow`. So an id is exactly one DNS
//! label that no resolver mistakes for an address: 1 to 63 characters of
//! `[a-z0-9_-]`, starting with a letter or digit, with no '.', with at least
//! one letter (`1234` and `017` are IPv4 addresses to `inet_aton`) and not
//! `0x` hex (`0x7f` is one too). That also keeps it safe in shells, logs and
//! ssh_config host patterns.

use std::fmt;
use std::str::FromStr;

use crate::text::excerpt;

/// The longest id: one DNS label.
pub const MAX_LEN: usize = 63;

/// A validated device or operator name: 1 to 63 characters of `[a-z0-9_-]`,
/// starting with a lowercase letter or digit, with at least one letter, and
/// not a `0x` hex number.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Id(String);

/// Why a string is not an id. The fields hold the raw input; the messages
/// quote it escaped and clipped, since it may come from anyone.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdError {
    #[error("id is empty; use 1-{MAX_LEN} characters of [a-z0-9_-], e.g. cam-42")]
    Empty,
    #[error("id '{}' is longer than {MAX_LEN} characters", excerpt(.0, 24))]
    TooLong(String),
    #[error("id '{}' must start with a lowercase letter or a digit", excerpt(.0, MAX_LEN))]
    BadStart(String),
    #[error(
        "id '{}' contains '.'; an id is one DNS label because the pivot is addressed as ID.burrow, so use '-' instead",
        excerpt(.0, MAX_LEN)
    )]
    Dot(String),
    #[error(
        "id '{}' contains '{}'; only lowercase letters, digits, '_' and '-' are allowed",
        excerpt(id, MAX_LEN),
        excerpt(&ch.to_string(), 1)
    )]
    BadChar { id: String, ch: char },
    #[error(
        "id '{}' has no letter; an id needs one so that no resolver reads it as an IPv4 address, e.g. 'dev-{}'",
        excerpt(.0, MAX_LEN),
        excerpt(.0, MAX_LEN)
    )]
    NoLetter(String),
    #[error(
        "id '{}' reads as a hex number, which resolvers take for an IPv4 address; prefix it, e.g. 'dev-{}'",
        excerpt(.0, MAX_LEN),
        excerpt(.0, MAX_LEN)
    )]
    Numeric(String),
}

/// Ids in messages are validated as they are read: a request that parses
/// carries only valid ids.
impl serde::Serialize for Id {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for Id {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Id::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl Id {
    pub fn parse(s: &str) -> Result<Self, IdError> {
        let first = s.chars().next().ok_or(IdError::Empty)?;
        if s.len() > MAX_LEN {
            return Err(IdError::TooLong(s.to_string()));
        }
        if !(first.is_ascii_lowercase() || first.is_ascii_digit()) {
            return Err(IdError::BadStart(s.to_string()));
        }
        if s.contains('.') {
            return Err(IdError::Dot(s.to_string()));
        }
        if let Some(ch) = s.chars().find(|c| !is_id_char(*c)) {
            return Err(IdError::BadChar { id: s.to_string(), ch });
        }
        if !s.bytes().any(|b| b.is_ascii_lowercase()) {
            return Err(IdError::NoLetter(s.to_string()));
        }
        if is_hex_number(s) {
            return Err(IdError::Numeric(s.to_string()));
        }
        Ok(Id(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// `[a-z0-9_-]`.
pub fn is_id_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-')
}

/// `0x` and hex digits, which `inet_aton` takes for a whole IPv4 address.
/// (Decimal and octal numbers have no letter, so the letter rule refuses them.)
fn is_hex_number(s: &str) -> bool {
    s.strip_prefix("0x").is_some_and(|hex| hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

impl FromStr for Id {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Id::parse(s)
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for Id {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_valid_ids() {
        for ok in ["cam-42", "a", "42a", "dev_site-1", "0xg1", "cafe", &"x".repeat(63)] {
            assert_eq!(Id::parse(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn rejects_invalid_ids() {
        assert_eq!(Id::parse(""), Err(IdError::Empty));
        assert!(matches!(Id::parse(&"x".repeat(64)), Err(IdError::TooLong(_))));
        assert!(matches!(Id::parse("-cam"), Err(IdError::BadStart(_))));
        assert!(matches!(Id::parse(".cam"), Err(IdError::BadStart(_))));
        assert!(matches!(Id::parse("Cam"), Err(IdError::BadStart(_))));
        assert!(matches!(Id::parse("cam 42"), Err(IdError::BadChar { ch: ' ', .. })));
        assert!(matches!(Id::parse("cam:42"), Err(IdError::BadChar { ch: ':', .. })));
        assert!(matches!(Id::parse("caM"), Err(IdError::BadChar { ch: 'M', .. })));
        assert!(matches!(Id::parse("cam\u{1b}[2J"), Err(IdError::BadChar { ch: '\u{1b}', .. })));
    }

    #[test]
    fn rejects_what_resolves_as_an_address() {
        for dotted in ["127.0.0.1", "x.burrow", "dev.site_1", "cam."] {
            assert_eq!(Id::parse(dotted), Err(IdError::Dot(dotted.into())));
        }
        for number in ["0", "42", "2130706433", "017700000001", "0-", "1_2", "12-34"] {
            assert_eq!(Id::parse(number), Err(IdError::NoLetter(number.into())));
        }
        for hex in ["0x7f000001", "0xdeadbeef", "0x"] {
            assert_eq!(Id::parse(hex), Err(IdError::Numeric(hex.into())));
        }
        let msg = Id::parse("x.burrow").unwrap_err().to_string();
        assert!(msg.contains("ID.burrow") && msg.contains("'-'"), "{msg}");
        assert_eq!(
            Id::parse("42").unwrap_err().to_string(),
            "id '42' has no letter; an id needs one so that no resolver reads it as an IPv4 address, e.g. 'dev-42'"
        );
    }

    #[test]
    fn messages_escape_the_input() {
        let msg = Id::parse("a\nforged log line").unwrap_err().to_string();
        assert!(!msg.contains('\n'), "{msg}");
        let msg = Id::parse(&"é".repeat(1000)).unwrap_err().to_string();
        assert!(msg.len() < 200, "{msg}");
    }
}
