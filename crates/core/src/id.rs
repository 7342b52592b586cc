//! Names of devices and operators.
//!
//! A device id is a virtual name routed inside the pivot, never a port, so the
//! only rules are the ones that keep it safe in shells, logs, DNS labels and
//! ssh_config host patterns.

use std::fmt;
use std::str::FromStr;

/// The longest id: one DNS label.
pub const MAX_LEN: usize = 63;

/// A validated device or operator name: 1 to 63 characters of `[a-z0-9._-]`,
/// starting with a letter or digit.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Id(String);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdError {
    #[error("id is empty; use 1-{MAX_LEN} characters of [a-z0-9._-]")]
    Empty,
    #[error("id '{0}' is longer than {MAX_LEN} characters")]
    TooLong(String),
    #[error("id '{0}' must start with a lowercase letter or a digit")]
    BadStart(String),
    #[error("id '{id}' contains '{ch}'; only lowercase letters, digits, '.', '_' and '-' are allowed")]
    BadChar { id: String, ch: char },
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
        if let Some(ch) =
            s.chars().find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-')))
        {
            return Err(IdError::BadChar { id: s.to_string(), ch });
        }
        Ok(Id(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
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
        for ok in ["cam-42", "a", "0", "dev.site_1", &"x".repeat(63)] {
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
    }
}
