//! The admin protocol spoken over the pivot's SSH port.
//!
//! A client opens a `direct-tcpip` channel to the reserved name [`RPC_HOST`]
//! (not a valid device id, so it can never collide with one), writes one
//! JSON [`Request`] line, reads one JSON [`Response`] line, and closes. The
//! caller's SSH key decides what it may do; no shell or exec is involved.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};

use crate::label::{deserialize_labels, validate_label, MAX_LABELS};
use crate::text::excerpt;
use crate::time::MAX_DURATION;
use crate::Id;

pub const RPC_HOST: &str = "@burrow";
pub const RPC_PORT: u32 = 1;
/// The connected address of a `forwarded-tcpip` channel a pivot opens to a
/// connected agent to say that the CA keys or revoked keys changed: the
/// agent refuses it and fetches them again (`Trust`).
pub const TRUST_NUDGE_HOST: &str = "@burrow-trust";
/// SSH user name a device uses to present an enrollment token with its new key.
pub const ENROLL_USER: &str = "enroll";

/// One admin request. Labels and the token lifetime are checked while
/// parsing, so a request that parses carries only valid ones.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    DeviceList,
    DeviceShow {
        id: Id,
    },
    DeviceAdd {
        id: Id,
        /// OpenSSH public key line; without it the pivot issues an enrollment token.
        key: Option<String>,
        #[serde(deserialize_with = "deserialize_labels")]
        labels: BTreeMap<String, String>,
        /// Lifetime of the enrollment token: 1 s to [`MAX_DURATION`].
        #[serde(default, deserialize_with = "deserialize_ttl")]
        ttl_secs: Option<u64>,
        /// Pivot address to put in the token, if the pivot does not know its own.
        address: Option<String>,
        /// The device sshd's public host keys (OpenSSH lines), registered
        /// with `key` so operators can pin them at once.
        #[serde(default)]
        host_keys: Vec<String>,
    },
    DeviceRemove {
        id: Id,
    },
    DeviceRevoke {
        id: Id,
    },
    OperatorAdd {
        name: Id,
        key: String,
        admin: bool,
        allow: Vec<String>,
        /// Users the operator may log in as on devices with a certificate
        /// (empty: see [`crate::cert::device_users_or_default`]).
        #[serde(default)]
        device_users: Vec<String>,
        /// Lifetime of the operator's certificates (default 8 h).
        #[serde(default, deserialize_with = "deserialize_cert_ttl")]
        cert_ttl_secs: Option<u64>,
    },
    OperatorList,
    OperatorRemove {
        name: Id,
    },
    /// May the caller reach `id:port` now? Answers with the refusal text if not.
    Check {
        id: Id,
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
    /// Sent by a device when its tunnel comes up: the host keys its exposed
    /// sshd shows. Registered if the device has none; a different set is
    /// only flagged, for an admin to accept with `DeviceHostKeysReset`.
    HostKeys {
        keys: Vec<String>,
    },
    /// Accept the host keys a device reported since (or forget them, so its
    /// next report registers them) (admin).
    DeviceHostKeysReset {
        id: Id,
        /// With no changed keys pending, drop the registered ones.
        #[serde(default)]
        forget: bool,
    },
    /// Make the pivot listen on `bind` (default: a free port of its lease
    /// range on 127.0.0.1) and relay each connection to the device's `port`,
    /// waking it if needed (admin).
    DeviceListen {
        id: Id,
        port: u16,
        #[serde(default)]
        bind: Option<String>,
    },
    /// End such a lease (admin).
    DeviceUnlisten {
        id: Id,
        port: u16,
    },
    /// Every lease (admin).
    DeviceListens,
    /// Bans in force (admin).
    BanList,
    /// Ban `net` (an address or CIDR) for `secs` seconds (admin).
    BanAdd {
        net: String,
        secs: u64,
    },
    BanRemove {
        net: String,
    },
    /// Sign the caller's operator key: a short-lived certificate that
    /// devices trusting the pivot's CA accept.
    Certificate,
    /// Sent by a device that trusts the CA: the CA keys, the revoked
    /// operator keys, its id and labels, for its sshd to decide alone.
    Trust,
    /// The user CA's public keys.
    CaShow,
    /// Add a new CA key (admin). Devices trust it at once; it signs after
    /// `overlap_secs`, and the old key is trusted until the certificates it
    /// signed expire. `now`: sign with it at once and drop the old key.
    CaRotate {
        overlap_secs: u64,
        #[serde(default)]
        now: bool,
    },
    /// Audit records matching every filter given (admin).
    Audit {
        #[serde(default)]
        since: Option<i64>,
        #[serde(default)]
        until: Option<i64>,
        #[serde(default)]
        device: Option<String>,
        #[serde(default)]
        operator: Option<String>,
        #[serde(default)]
        source: Option<String>,
        #[serde(default)]
        event: Option<String>,
        #[serde(default)]
        limit: Option<u32>,
    },
}

impl Request {
    /// Whether only an operator with the admin role may make it.
    pub fn needs_admin(&self) -> bool {
        matches!(
            self,
            Request::DeviceAdd { .. }
                | Request::DeviceRemove { .. }
                | Request::DeviceRevoke { .. }
                | Request::DeviceHostKeysReset { .. }
                | Request::DeviceListen { .. }
                | Request::DeviceUnlisten { .. }
                | Request::DeviceListens
                | Request::OperatorAdd { .. }
                | Request::OperatorList
                | Request::OperatorRemove { .. }
                | Request::BanList
                | Request::BanAdd { .. }
                | Request::BanRemove { .. }
                | Request::Audit { .. }
                | Request::CaRotate { .. }
        )
    }

    /// Whether it may change the registry.
    pub fn mutates(&self) -> bool {
        matches!(
            self,
            Request::DeviceAdd { .. }
                | Request::DeviceRemove { .. }
                | Request::DeviceRevoke { .. }
                | Request::DeviceHostKeysReset { .. }
                | Request::DeviceListen { .. }
                | Request::DeviceUnlisten { .. }
                | Request::OperatorAdd { .. }
                | Request::OperatorRemove { .. }
                | Request::BanAdd { .. }
                | Request::BanRemove { .. }
                | Request::Enroll { .. }
                | Request::RotateKey { .. }
                | Request::HostKeys { .. }
                | Request::Certificate
                | Request::Trust
                | Request::CaRotate { .. }
        )
    }

    /// Whether it may change who reaches what now, so the pivot rechecks
    /// open sessions after it. Host keys, certificates, trust reports and
    /// CA keys change only what later logins present.
    pub fn changes_access(&self) -> bool {
        self.mutates()
            && !matches!(
                self,
                Request::HostKeys { .. } | Request::Certificate | Request::Trust | Request::CaRotate { .. }
            )
    }
}

/// A device as `device list` and `device show` return it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    pub id: String,
    /// connected, waiting, offline, not-enrolled or revoked.
    pub status: String,
    /// Reachable now: its tunnel is open, or it waits to be woken.
    pub online: bool,
    /// "online" or "offline" as last heard over MQTT.
    pub presence: Option<String>,
    pub tunnel: bool,
    /// RFC 3339; `None` if never seen.
    pub last_seen: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub ports: Vec<u32>,
    pub fingerprint: Option<String>,
    pub enrolled: bool,
    pub revoked: bool,
    /// The device sshd's host keys (OpenSSH lines) that operators pin.
    pub host_keys: Vec<String>,
    /// Different keys the device reported since, waiting for an admin.
    #[serde(default)]
    pub host_keys_changed: Option<Vec<String>>,
    /// The pivot holding its tunnel.
    pub pivot: Option<String>,
    /// The last probe of its tunnel: the round trip to the agent, when, and
    /// for each exposed port whether its target answered.
    #[serde(default)]
    pub rtt_ms: Option<i64>,
    #[serde(default)]
    pub health_at: Option<String>,
    #[serde(default)]
    pub targets: BTreeMap<String, String>,
    /// How operators log in to its sshd: "certificates" once its agent
    /// trusts the pivot's CA, else "authorized_keys".
    #[serde(default)]
    pub access: String,
    /// When its agent last fetched the CA keys and labels (RFC 3339).
    #[serde(default)]
    pub trust_at: Option<String>,
    pub added: String,
}

/// An operator as `operator list` returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorInfo {
    pub name: String,
    /// "admin" or "operator".
    pub role: String,
    pub fingerprint: String,
    /// Label selectors; empty means every device.
    pub allow: Vec<String>,
    /// Users the operator's certificates log in as on devices.
    #[serde(default)]
    pub device_users: Vec<String>,
    /// Lifetime of the operator's certificates, in seconds.
    #[serde(default)]
    pub cert_ttl_secs: u64,
    pub added: String,
}

/// A certificate the pivot issued (`Certificate`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateIssued {
    /// The certificate, an OpenSSH `...-cert-v01@openssh.com` line.
    pub certificate: String,
    pub serial: u64,
    pub key_id: String,
    pub principals: Vec<String>,
    /// RFC 3339.
    pub valid_after: String,
    pub valid_before: String,
    /// The CA key that signed it.
    pub ca_fingerprint: String,
}

/// One key of the user CA (`CaShow`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaKeyInfo {
    /// OpenSSH public key line.
    pub public_key: String,
    pub fingerprint: String,
    /// signing, next (trusted, signs from `signs_from`) or retiring
    /// (trusted until `retires_at`, signs no more).
    pub state: String,
    pub added: String,
    pub signs_from: String,
    #[serde(default)]
    pub retires_at: Option<String>,
}

/// A pivot-side port lease as `device listens` returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenInfo {
    pub id: String,
    /// The device's exposed port.
    pub port: u16,
    /// Where the pivot listens for it.
    pub bind: String,
    pub added: String,
}

/// A ban as `ban list` returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BanInfo {
    pub net: String,
    pub until: String,
    pub reason: String,
    pub by: String,
    pub added: String,
}

/// Who the pivot takes the caller for (`Whoami`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WhoamiInfo {
    /// local, operator, device or enrollee.
    pub kind: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub role: Option<String>,
    /// The pivot's public host key, an OpenSSH line.
    pub pivot_host_key: String,
}

/// What `DeviceAdd` did: registered a key, or issued an enrollment token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceAdded {
    pub id: String,
    /// With a key: its fingerprint.
    #[serde(default)]
    pub fingerprint: Option<String>,
    /// Without a key: the one-time token, its expiry and the pivot it names.
    #[serde(default)]
    pub token: Option<String>,
    #[serde(default)]
    pub expires_at: Option<String>,
    #[serde(default)]
    pub pivot: Option<String>,
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

fn deserialize_ttl<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let ttl = Option::<u64>::deserialize(d)?;
    match ttl {
        Some(secs) if secs == 0 || secs > MAX_DURATION.as_secs() => Err(serde::de::Error::custom(format!(
            "ttl_secs {secs} is outside 1..={} (100 years)",
            MAX_DURATION.as_secs()
        ))),
        _ => Ok(ttl),
    }
}

fn deserialize_cert_ttl<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let ttl = Option::<u64>::deserialize(d)?;
    let max = crate::cert::MAX_CERT_TTL.as_secs();
    match ttl {
        Some(secs) if secs == 0 || secs > max => {
            Err(serde::de::Error::custom(format!("cert_ttl_secs {secs} is outside 1..={max} (7 days)")))
        }
        _ => Ok(ttl),
    }
}

/// `sshsig` namespace of key-rotation proofs.
pub const ROTATE_NAMESPACE: &str = "rotate@burrow";

/// What the new key signs when a device rotates: its id and the old key's fingerprint.
pub fn rotate_message(id: &str, old_fingerprint: &str) -> String {
    format!("{id}\n{old_fingerprint}")
}

/// An operator's label selector, `k=v[,k=v...]`: a device matches if it has
/// every pair. Each pair passes [`validate_label`], no name appears twice, and
/// there are at most [`MAX_LABELS`] pairs (a device has no more labels).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selector(pub BTreeMap<String, String>);

impl std::str::FromStr for Selector {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let shown = || excerpt(s, 80);
        let mut pairs = BTreeMap::new();
        for part in s.split(',') {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("selector '{}' is not k=v[,k=v...], e.g. site=berlin,rack=3", shown()))?;
            validate_label(k, v).map_err(|e| format!("selector '{}': {e}", shown()))?;
            if pairs.insert(k.to_string(), v.to_string()).is_some() {
                return Err(format!(
                    "selector '{}' names label '{k}' twice; a device has one value per label",
                    shown()
                ));
            }
            if pairs.len() > MAX_LABELS {
                return Err(format!("selector '{}' has more than {MAX_LABELS} pairs", shown()));
            }
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
    fn selectors_refuse_what_labels_refuse() {
        assert!("site=".parse::<Selector>().is_ok(), "an empty value is a value");
        for bad in ["", "=x", "site=a,", "site=a,,rack=3", "site=a=b", "Site=a", "site=\x1b[31m", "site=a,site=b"] {
            let err = bad.parse::<Selector>().unwrap_err();
            assert!(!err.contains('\x1b'), "{err}");
        }
        let too_many: Vec<String> = (0..=MAX_LABELS).map(|i| format!("k{i}=v")).collect();
        assert!(too_many.join(",").parse::<Selector>().is_err());
        let s: Selector = "rack=3,site=berlin".parse().unwrap();
        assert_eq!(s.to_string().parse::<Selector>().unwrap(), s);
    }

    #[test]
    fn device_add_checks_labels_and_ttl() {
        let add = |labels: &str, ttl: &str| {
            serde_json::from_str::<Request>(&format!(r#"{{"op":"device_add","id":"cam-42","labels":{labels}{ttl}}}"#))
        };
        assert!(add(r#"{"site":"berlin"}"#, "").is_ok());
        assert!(add(r#"{"site":"berlin"}"#, r#","ttl_secs":null"#).is_ok());
        assert!(add(r#"{"site":"berlin"}"#, r#","ttl_secs":86400"#).is_ok());
        assert!(add(r#"{"site":"\u001b[2J"}"#, "").is_err());
        assert!(add(r#"{"":"x"}"#, "").is_err());
        assert!(add("{}", r#","ttl_secs":0"#).is_err());
        assert!(add("{}", r#","ttl_secs":18446744073709551615"#).is_err());
    }

    #[test]
    fn requests_are_tagged_json() {
        let r: Request = serde_json::from_str(r#"{"op":"device_show","id":"cam-42"}"#).unwrap();
        assert!(matches!(r, Request::DeviceShow { id } if id.as_str() == "cam-42"));
        assert!(Request::OperatorList.needs_admin() && !Request::OperatorList.mutates());
        assert!(!Request::DeviceList.needs_admin() && !Request::DeviceList.mutates());
        assert!(Request::HostKeys { keys: vec![] }.mutates() && !Request::HostKeys { keys: vec![] }.needs_admin());
    }
}
