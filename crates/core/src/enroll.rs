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

const PREFIX: &str = "burrow-enroll-v1.";

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollToken {
    /// `HOST:PORT` of the pivot's SSH listener.
    pub pivot: String,
    /// `SHA256:...` of the pivot's host key; the agent pins it.
    pub fingerprint: String,
    pub device: String,
    pub secret: String,
}

impl std::fmt::Debug for EnrollToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrollToken")
            .field("pivot", &self.pivot)
            .field("fingerprint", &self.fingerprint)
            .field("device", &self.device)
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
}

impl EnrollToken {
    pub fn new(pivot: &str, fingerprint: &str, device: &str) -> Self {
        let secret: [u8; 32] = rand::random();
        EnrollToken {
            pivot: pivot.to_string(),
            fingerprint: fingerprint.to_string(),
            device: device.to_string(),
            secret: Base64UrlUnpadded::encode_string(&secret),
        }
    }

    fn payload(&self) -> String {
        serde_json::to_string(self).expect("token serializes")
    }

    pub fn encode(&self) -> String {
        format!("{PREFIX}{}", Base64UrlUnpadded::encode_string(self.payload().as_bytes()))
    }

    pub fn decode(s: &str) -> Result<Self, TokenError> {
        let b64 = s.trim().strip_prefix(PREFIX).ok_or(TokenError::Prefix)?;
        let bytes = Base64UrlUnpadded::decode_vec(b64).map_err(|_| TokenError::Damaged)?;
        serde_json::from_slice(&bytes).map_err(|_| TokenError::Damaged)
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

    #[test]
    fn round_trips_and_detects_changes() {
        let t = EnrollToken::new("pivot.example.com:2222", "SHA256:abc", "cam-42");
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
    }
}
