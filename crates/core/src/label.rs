//! Device labels (`site=berlin`): the one check every label passes, wherever
//! it enters: `device add --label`, the admin protocol, operator selectors.
//!
//! Keys are 1-63 characters of `[a-z0-9._/-]` starting with a letter or
//! digit. Values are 0-128 characters of printable ASCII other than space,
//! '=', ',' and '|': the selector syntax is `k=v[,k=v]` and listings separate
//! columns with '|'. So a label never carries a control character or an ANSI
//! escape into a terminal, a log or a selector.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer};

use crate::text::excerpt;

/// The longest label key.
pub const MAX_KEY_LEN: usize = 63;
/// The longest label value.
pub const MAX_VALUE_LEN: usize = 128;
/// The most labels one device may carry.
pub const MAX_LABELS: usize = 32;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LabelError {
    #[error("label '{}' is not k=v, e.g. site=berlin", excerpt(.0, 80))]
    Shape(String),
    #[error("label name is empty; use 1-{MAX_KEY_LEN} characters of [a-z0-9._/-], e.g. site")]
    EmptyKey,
    #[error("label name '{}' is longer than {MAX_KEY_LEN} characters", excerpt(.0, 24))]
    KeyTooLong(String),
    #[error("label name '{}' must start with a lowercase letter or a digit", excerpt(.0, MAX_KEY_LEN))]
    KeyStart(String),
    #[error(
        "label name '{}' contains '{}'; only lowercase letters, digits, '.', '_', '/' and '-' are allowed",
        excerpt(key, MAX_KEY_LEN),
        excerpt(&ch.to_string(), 1)
    )]
    KeyChar { key: String, ch: char },
    #[error("value of label '{}' is longer than {MAX_VALUE_LEN} characters", excerpt(.0, MAX_KEY_LEN))]
    ValueTooLong(String),
    #[error(
        "value of label '{}' contains '{}'; use printable ASCII without spaces, '=', ',' or '|'",
        excerpt(key, MAX_KEY_LEN),
        excerpt(&ch.to_string(), 1)
    )]
    ValueChar { key: String, ch: char },
    #[error("{0} labels; a device may carry at most {MAX_LABELS}")]
    TooMany(usize),
}

/// Checks one label.
pub fn validate_label(key: &str, value: &str) -> Result<(), LabelError> {
    let first = key.chars().next().ok_or(LabelError::EmptyKey)?;
    if key.len() > MAX_KEY_LEN {
        return Err(LabelError::KeyTooLong(key.to_string()));
    }
    if !(first.is_ascii_lowercase() || first.is_ascii_digit()) {
        return Err(LabelError::KeyStart(key.to_string()));
    }
    if let Some(ch) = key.chars().find(|c| !is_key_char(*c)) {
        return Err(LabelError::KeyChar { key: key.to_string(), ch });
    }
    // Checked before the length so a multi-byte character is named, not counted.
    if let Some(ch) = value.chars().find(|c| !is_value_char(*c)) {
        return Err(LabelError::ValueChar { key: key.to_string(), ch });
    }
    if value.len() > MAX_VALUE_LEN {
        return Err(LabelError::ValueTooLong(key.to_string()));
    }
    Ok(())
}

/// `[a-z0-9._/-]`.
pub fn is_key_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '/' | '-')
}

/// Printable ASCII other than space, '=', ',' and '|'.
pub fn is_value_char(c: char) -> bool {
    c.is_ascii_graphic() && !matches!(c, '=' | ',' | '|')
}

/// Parses and checks `k=v`. The value may be empty (`k=`), the key not.
pub fn parse_label(s: &str) -> Result<(String, String), LabelError> {
    let (key, value) = s.split_once('=').ok_or_else(|| LabelError::Shape(s.to_string()))?;
    validate_label(key, value)?;
    Ok((key.to_string(), value.to_string()))
}

/// Checks every label of a device and their number.
pub fn validate_labels(labels: &BTreeMap<String, String>) -> Result<(), LabelError> {
    if labels.len() > MAX_LABELS {
        return Err(LabelError::TooMany(labels.len()));
    }
    labels.iter().try_for_each(|(k, v)| validate_label(k, v))
}

/// `#[serde(deserialize_with)]` for a label map: refuses what
/// [`validate_labels`] refuses, so an invalid label never gets past parsing.
pub fn deserialize_labels<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    let labels = BTreeMap::<String, String>::deserialize(d)?;
    validate_labels(&labels).map_err(serde::de::Error::custom)?;
    Ok(labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_valid_labels() {
        for (k, v) in [("site", "berlin"), ("k8s.io/zone", "eu-1"), ("0", ""), ("rack", "3"), ("a", "x:y/z@w")] {
            validate_label(k, v).unwrap();
            assert_eq!(parse_label(&format!("{k}={v}")).unwrap(), (k.to_string(), v.to_string()));
        }
        validate_label(&"k".repeat(MAX_KEY_LEN), &"v".repeat(MAX_VALUE_LEN)).unwrap();
    }

    #[test]
    fn rejects_invalid_labels() {
        assert_eq!(parse_label("site"), Err(LabelError::Shape("site".into())));
        assert_eq!(parse_label("=x"), Err(LabelError::EmptyKey));
        assert!(matches!(parse_label(&format!("{}=x", "k".repeat(64))), Err(LabelError::KeyTooLong(_))));
        assert!(matches!(parse_label("-a=x"), Err(LabelError::KeyStart(_))));
        assert!(matches!(parse_label("Site=x"), Err(LabelError::KeyStart(_))));
        assert!(matches!(parse_label("si te=x"), Err(LabelError::KeyChar { ch: ' ', .. })));
        assert!(matches!(parse_label("site=a=b"), Err(LabelError::ValueChar { ch: '=', .. })));
        assert!(matches!(parse_label("site=a,b"), Err(LabelError::ValueChar { ch: ',', .. })));
        assert!(matches!(parse_label("site=a|b"), Err(LabelError::ValueChar { ch: '|', .. })));
        assert!(matches!(parse_label("site=a b"), Err(LabelError::ValueChar { ch: ' ', .. })));
        assert!(matches!(parse_label("site=\x1b[31m"), Err(LabelError::ValueChar { ch: '\x1b', .. })));
        assert!(matches!(parse_label("site=café"), Err(LabelError::ValueChar { ch: 'é', .. })));
        assert!(matches!(parse_label(&format!("a={}", "v".repeat(129))), Err(LabelError::ValueTooLong(_))));
        let msg = parse_label("site=\x1b[2J").unwrap_err().to_string();
        assert!(!msg.contains('\x1b'), "{msg}");
    }

    #[test]
    fn caps_the_number_of_labels() {
        let labels: BTreeMap<_, _> = (0..=MAX_LABELS).map(|i| (format!("k{i}"), String::new())).collect();
        assert_eq!(validate_labels(&labels), Err(LabelError::TooMany(MAX_LABELS + 1)));
        let json = serde_json::to_string(&labels).unwrap();
        let mut d = serde_json::Deserializer::from_str(&json);
        assert!(deserialize_labels(&mut d).is_err());
    }
}
