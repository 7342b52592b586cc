//! The admin protocol spoken over the pivot's SSH port.
//!
//! A client opens a `direct-tcpip` channel to the reserved name [`RPC_HOST`]
//! (not a valid device id, so it can never collide with one), writes one
//! JSON [`Request`] line, reads one JSON [`Response`] line, and closes. The
//! caller's SSH key decides what it may do; no shell or exec is involved.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub const RPC_HOST: &str = "@burrow";
pub const RPC_PORT: u32 = 1;
/// SSH user name a device uses to present an enrollment token with its new key.
pub const ENROLL_USER: &str = "enroll";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    DeviceList,
    DeviceShow {
        id: String,
    },
    DeviceAdd {
        id: String,
        /// OpenSSH public key line; without it the pivot issues an enrollment token.
        key: Option<String>,
        labels: BTreeMap<String, String>,
        ttl_secs: Option<u64>,
        /// Pivot address to put in the token, if the pivot does not know its own.
        address: Option<String>,
    },
    DeviceRemove {
        id: String,
    },
    DeviceRevoke {
        id: String,
    },
    OperatorAdd {
        name: String,
        key: String,
        admin: bool,
        allow: Vec<String>,
    },
    OperatorList,
    OperatorRemove {
        name: String,
    },
    /// May the caller reach `id:port` now? Answers with the refusal text if not.
    Check {
        id: String,
        port: u32,
    },
    /// Sent by a device under [`ENROLL_USER`], authenticated with its new key.
    Enroll {
        token: String,
        host_keys: Vec<String>,
    },
    /// Sent by a device: replace its key. `proof` is an sshsig by the new key.
    RotateKey {
        new_key: String,
        proof: String,
    },
    Whoami,
}

impl Request {
    /// Whether the request changes the registry (admin role only).
    pub fn is_admin(&self) -> bool {
        matches!(
            self,
            Request::DeviceAdd { .. }
                | Request::DeviceRemove { .. }
                | Request::DeviceRevoke { .. }
                | Request::OperatorAdd { .. }
                | Request::OperatorList
                | Request::OperatorRemove { .. }
        )
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub data: serde_json::Value,
}

impl Response {
    pub fn ok(data: serde_json::Value) -> Self {
        Response { ok: true, error: None, data }
    }

    pub fn err(e: impl std::fmt::Display) -> Self {
        Response { ok: false, error: Some(e.to_string()), data: serde_json::Value::Null }
    }
}

/// `sshsig` namespace of key-rotation proofs.
pub const ROTATE_NAMESPACE: &str = "rotate@burrow";

/// What the new key signs when a device rotates: its id and the old key's fingerprint.
pub fn rotate_message(id: &str, old_fingerprint: &str) -> String {
    format!("{id}\n{old_fingerprint}")
}

/// An operator's label selector, `k=v[,k=v...]`: a device matches if it has every pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selector(pub BTreeMap<String, String>);

impl std::str::FromStr for Selector {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut pairs = BTreeMap::new();
        for part in s.split(',') {
            let (k, v) = part.split_once('=').ok_or_else(|| format!("selector '{s}' is not k=v[,k=v...]"))?;
            if k.is_empty() {
                return Err(format!("selector '{s}' has an empty label name"));
            }
            pairs.insert(k.to_string(), v.to_string());
        }
        Ok(Selector(pairs))
    }
}

impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|(k, v)| format!("{k}={v}")).collect();
        f.write_str(&parts.join(","))
    }
}

impl Selector {
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

/// No selectors: every device. Otherwise any one selector must match.
pub fn allowed(selectors: &[Selector], labels: &BTreeMap<String, String>) -> bool {
    selectors.is_empty() || selectors.iter().any(|s| s.matches(labels))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_match_all_pairs_of_any_selector() {
        let labels: BTreeMap<_, _> = [("site".to_string(), "berlin".to_string()), ("rack".into(), "3".into())].into();
        let s: Selector = "site=berlin".parse().unwrap();
        assert!(s.matches(&labels));
        assert!(!"site=paris".parse::<Selector>().unwrap().matches(&labels));
        assert!("site=berlin,rack=3".parse::<Selector>().unwrap().matches(&labels));
        assert!(!"site=berlin,rack=4".parse::<Selector>().unwrap().matches(&labels));
        assert!(allowed(&[], &labels));
        assert!(allowed(&["site=paris".parse().unwrap(), "rack=3".parse().unwrap()], &labels));
        assert!("nope".parse::<Selector>().is_err());
    }

    #[test]
    fn requests_are_tagged_json() {
        let r: Request = serde_json::from_str(r#"{"op":"device_show","id":"cam-42"}"#).unwrap();
        assert!(matches!(r, Request::DeviceShow { id } if id == "cam-42"));
        assert!(Request::OperatorList.is_admin());
        assert!(!Request::DeviceList.is_admin());
    }
}
