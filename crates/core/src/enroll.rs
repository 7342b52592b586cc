//! One-time enrollment tokens: what `burrow device add ID` (without a key)
//! prints and `burrow agent enroll --token` consumes.
//!
//! A token is `burrow-enroll-v1.` followed by base64url JSON carrying the
//! pivot's address, its host-key fingerprint, the device id and a random
//! secret. The registry stores only the SHA-256 of the whole payload, so a
//! token that was changed in any byte matches nothing, and a leaked registry
//! does not leak usable tokens.

use base64ct::{Base64UrlUnpadded, Encoding};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::host::split_host_port;
use crate::keys::HostKeyPin;
use crate::Id;

const PREFIX: &str = "burrow-enroll-v1.";
/// Real tokens are about 300 characters; anything far longer is not one.
pub const MAX_TOKEN_LEN: usize = 2048;

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollToken {
    /// `HOST:PORT` of the pivot's SSH listener.
    pub pivot: String,
    /// `SHA256:...` of the pivot's host key; the agent pins it.
    pub fingerprint: String,
    pub device: String,
    pub secret: String,
    /// `SHA256:...` of the embedded MQTT broker's TLS certificate, when the
    /// pivot serves devices' MQTT itself; the agent pins it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mqtt_fingerprint: Option<String>,
}

impl std::fmt::Debug for EnrollToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrollToken")
            .field("pivot", &self.pivot)
            .field("fingerprint", &self.fingerprint)
            .field("device", &self.device)
            .field("mqtt_fingerprint", &self.mqtt_fingerprint)
            .field("secret", &"***")
            .finish()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("not a burrow enrollment token (they start with '{PREFIX}')")]
    Prefix,
    #[error("enrollment token is damaged; copy it again in full")]
    Damaged,
    #[error("enrollment token is longer than {MAX_TOKEN_LEN} characters; copy only the token")]
    TooLong,
    #[error("enrollment token carries an invalid {0}; ask the pivot's admin for a new token")]
    Invalid(&'static str),
}

impl EnrollToken {
    pub fn new(pivot: &str, fingerprint: &str, device: &str) -> Self {
        let secret: [u8; 32] = rand::random();
        EnrollToken {
            pivot: pivot.to_string(),
            fingerprint: fingerprint.to_string(),
            device: device.to_string(),
            secret: Base64UrlUnpadded::encode_string(&secret),
            mqtt_fingerprint: None,
        }
    }

    fn payload(&self) -> String {
        serde_json::to_string(self).expect("token serializes")
    }

    pub fn encode(&self) -> String {
        format!("{PREFIX}{}", Base64UrlUnpadded::encode_string(self.payload().as_bytes()))
    }

    /// Parses a token and checks its fields: the pivot is `HOST:PORT`, the
    /// fingerprint a `SHA256:` pin, the device a valid [`Id`], the secret base64url.
    pub fn decode(s: &str) -> Result<Self, TokenError> {
        let s = s.trim();
        if s.len() > MAX_TOKEN_LEN {
            return Err(TokenError::TooLong);
        }
        let b64 = s.strip_prefix(PREFIX).ok_or(TokenError::Prefix)?;
        let bytes = Base64UrlUnpadded::decode_vec(b64).map_err(|_| TokenError::Damaged)?;
        let token: EnrollToken = serde_json::from_slice(&bytes).map_err(|_| TokenError::Damaged)?;
        token.check()?;
        Ok(token)
    }

    fn check(&self) -> Result<(), TokenError> {
        if !matches!(split_host_port(&self.pivot), Some((_, Some(_)))) {
            return Err(TokenError::Invalid("pivot address"));
        }
        if !self.fingerprint.starts_with("SHA256:") || HostKeyPin::parse(&self.fingerprint).is_err() {
            return Err(TokenError::Invalid("pivot fingerprint"));
        }
        if Id::parse(&self.device).is_err() {
            return Err(TokenError::Invalid("device id"));
        }
        if let Some(fp) = &self.mqtt_fingerprint {
            if fp.parse::<crate::mqtt_url::CertPin>().is_err() {
                return Err(TokenError::Invalid("MQTT certificate fingerprint"));
            }
        }
        if self.secret.is_empty()
            || self.secret.len() > 128
            || !self.secret.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(TokenError::Invalid("secret"));
        }
        Ok(())
    }

    /// What the registry stores and looks tokens up by.
    pub fn digest(&self) -> String {
        let d = Sha256::digest(self.payload().as_bytes());
        d.iter().map(|b| format!("{b:02x}")).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP: &str = "SHA256:uNiVztksCsDhcc0u9e8BujQXVUpKZIDTMczCvj3tD2s";

    #[test]
    fn round_trips_and_detects_changes() {
        let t = EnrollToken::new("pivot.example.com:2222", FP, "cam-42");
        let s = t.encode();
        assert!(!s.contains(' ') && !s.contains('\n'));
        let back = EnrollToken::decode(&s).unwrap();
        assert_eq!(back, t);
        assert_eq!(back.digest(), t.digest());
        let mut other = t.clone();
        other.pivot = "evil:22".into();
        assert_ne!(other.digest(), t.digest());
        assert_eq!(EnrollToken::decode("hello"), Err(TokenError::Prefix));
        assert_eq!(EnrollToken::decode(&format!("{}x!", &s[..s.len() - 3])), Err(TokenError::Damaged));
        assert!(!format!("{t:?}").contains(&t.secret));
        assert_eq!(EnrollToken::decode(&"x".repeat(MAX_TOKEN_LEN + 1)), Err(TokenError::TooLong));
    }

    #[test]
    fn refuses_tokens_with_invalid_fields() {
        let good = EnrollToken::new("pivot.example.com:2222", FP, "cam-42");
        let bad = |f: fn(&mut EnrollToken)| {
            let mut t = good.clone();
            f(&mut t);
            EnrollToken::decode(&t.encode())
        };
        assert_eq!(bad(|t| t.pivot = "pivot.example.com".into()), Err(TokenError::Invalid("pivot address")));
        assert_eq!(bad(|t| t.pivot = "evil\n:22".into()), Err(TokenError::Invalid("pivot address")));
        assert_eq!(bad(|t| t.fingerprint = "SHA256:abc".into()), Err(TokenError::Invalid("pivot fingerprint")));
        assert_eq!(bad(|t| t.fingerprint = "/etc/passwd".into()), Err(TokenError::Invalid("pivot fingerprint")));
        assert_eq!(bad(|t| t.device = "x.burrow".into()), Err(TokenError::Invalid("device id")));
        assert_eq!(bad(|t| t.secret = String::new()), Err(TokenError::Invalid("secret")));
        let extra = serde_json::to_string(&good).unwrap().replacen('{', r#"{"admin":true,"#, 1);
        let extra = format!("{PREFIX}{}", Base64UrlUnpadded::encode_string(extra.as_bytes()));
        assert_eq!(EnrollToken::decode(&extra), Err(TokenError::Damaged));
    }
}
