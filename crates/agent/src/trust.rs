//! Operator trust on the device: what its sshd needs to let operators in
//! with the pivot's short-lived certificates, fetched over the device's own
//! authenticated connection and kept in files sshd reads.
//!
//! The trust dir ([`DEFAULT_TRUST_DIR`]) is root's alone (`safe`): whoever
//! can write it can put a CA of their own there and log in as root. It holds:
//! - [`USER_CA_FILE`]: the CA keys, one a line (sshd's `TrustedUserCAKeys`);
//! - [`REVOKED_KEYS_FILE`]: operator keys to refuse, one a line, possibly
//!   none (sshd's `RevokedKeys`). It always exists once the drop-in is in
//!   place: sshd refuses every public key when that file is missing;
//! - [`OPERATORS_FILE`]: the device's id and labels, and the pivot's clock,
//!   read by [`principals`] (sshd's `AuthorizedPrincipalsCommand`, run as `nobody`);
//! - [`PIVOT_FILE`]: what root connects to the pivot with, written by root's
//!   `enroll` from its token (`files::PivotFile`); never the agent config.
//!
//! The pivot's answer is hostile input: every key is parsed and written anew,
//! never copied as sent, so no line can carry sshd options.
//!
//! - `safe`: the root-only check of the trust dir, and writes no symlink redirects;
//! - `files`: writing the trust files and the pivot file;
//! - `keeper`: who refreshes them (root only), and fetching as the device;
//! - `principals`: the principals command;
//! - `sshd`: the drop-in that points sshd at these files, and checks of
//!   what sshd would trip on; `apply` puts it in place only once sshd has
//!   checked it and confirmed that it takes it.

mod apply;
mod files;
mod keeper;
mod principals;
mod safe;
mod sshd;

use std::time::Duration;

use burrow_core::cert::{DeviceTrust, MAX_CA_KEYS, MAX_REVOKED_KEYS};
use burrow_core::keys::{openssh_line, parse_public_key};
use burrow_core::label::{validate_label, LabelError, MAX_LABELS};
use burrow_core::rpc::Request;
use burrow_core::text::excerpt;
use russh::client;

use crate::pivot_client::{self, ClientError};

pub use apply::{find_sshd, ApplyError, DeviceSshd, Problem};
pub use files::{ensure_revoked_keys, write, write_in, Created, PivotFile, WriteError};
pub use keeper::{fetch_as_device, REFRESH_MARKER};
pub(crate) use keeper::{Keeper, Occasion};
pub use principals::principals;
pub(crate) use safe::write_atomic;
pub use safe::{read_roots_alone, DirError, FileError, TrustDir};
pub use sshd::{
    check_exe, check_trust_dir_reachable, current_invocation, drop_in, invocation, sshd_path, DropIn, SshdError,
    DEFAULT_SSHD_CONFIG, DEFAULT_SSHD_CONFIG_DIR, DEFAULT_SSHD_RELOAD, DROP_IN_FILE,
};

/// The CA keys sshd trusts (`TrustedUserCAKeys`).
pub const USER_CA_FILE: &str = "user_ca.pub";
/// The keys sshd refuses (`RevokedKeys`).
pub const REVOKED_KEYS_FILE: &str = "revoked_keys";
/// The device's id and labels, for [`principals`].
pub const OPERATORS_FILE: &str = "operators.json";
/// The pivot, pin and device key a root refresh connects with.
pub const PIVOT_FILE: &str = "pivot.toml";
/// The trust dir unless `--trust-dir` (or the agent config) says otherwise.
pub const DEFAULT_TRUST_DIR: &str = "/etc/ssh/burrow";
/// How long the agent waits for the pivot's answer.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("cannot fetch the operator trust from the pivot")]
    Pivot(#[from] ClientError),
    #[error("no answer from the pivot in time")]
    Timeout,
    #[error("no answer from the pivot at {0} in time")]
    ConnectTimeout(String),
    #[error("the pivot's trust answer is malformed")]
    Malformed(#[source] serde_json::Error),
    #[error("the pivot sent the trust of device '{got}', not of this device '{expected}'")]
    WrongDevice { expected: String, got: String },
    #[error("the pivot sent {0} CA keys; a device takes 1 to {MAX_CA_KEYS}")]
    CaKeyCount(usize),
    #[error("CA key {0} from the pivot is not an OpenSSH public key")]
    BadCaKey(usize),
    #[error("the pivot sent {0} revoked keys; a device takes at most {MAX_REVOKED_KEYS}")]
    RevokedKeyCount(usize),
    #[error("revoked key {0} from the pivot is not an OpenSSH public key")]
    BadRevokedKey(usize),
    #[error("the pivot sent {0} labels; a device carries at most {MAX_LABELS}")]
    LabelCount(usize),
    #[error("the pivot sent a label this device refuses")]
    BadLabel(#[source] LabelError),
    #[error("the pivot host key '{}' in {from} is neither a .pub file nor a fingerprint", excerpt(.pin, 80))]
    Pin { pin: String, from: String },
    #[error("cannot read the device key {0}")]
    ReadKey(String, #[source] std::io::Error),
    #[error("cannot load the device key {0}")]
    LoadKey(String, #[source] russh::keys::Error),
    #[error("the pivot file names no pivot")]
    NoPivot,
    #[error(transparent)]
    Dir(#[from] DirError),
    #[error("there is no {0}: enroll the device as root, or run `trust-operators` once as root, to write it")]
    NoPivotFile(String),
    #[error("cannot read {0}")]
    ReadPivotFile(String, #[source] std::io::Error),
    #[error("{path} {why}: it must be root's alone (chown root:root and chmod 644 it)")]
    UnsafePivotFile { path: String, why: String },
    #[error("{0} is not burrow's pivot file: {1}")]
    BadPivotFile(String, String),
}

/// Asks the pivot, over the device's authenticated connection, for the CA
/// keys, revoked keys and labels, and checks the answer ([`checked`]).
pub async fn fetch<H: client::Handler>(
    handle: &client::Handle<H>,
    expected_id: &str,
) -> Result<DeviceTrust, TrustError> {
    let answer = pivot_client::call(handle, &Request::Trust).await?;
    let sent: DeviceTrust = serde_json::from_value(answer).map_err(TrustError::Malformed)?;
    checked(sent, expected_id)
}

/// The pivot's answer made safe to hand sshd: the right device, 1 to
/// [`MAX_CA_KEYS`] CA keys and at most [`MAX_REVOKED_KEYS`] revoked keys,
/// each parsed and written anew (comment dropped), and valid labels.
pub fn checked(sent: DeviceTrust, expected_id: &str) -> Result<DeviceTrust, TrustError> {
    if sent.id != expected_id {
        return Err(TrustError::WrongDevice { expected: expected_id.to_string(), got: excerpt(&sent.id, 80) });
    }
    if sent.ca_keys.is_empty() || sent.ca_keys.len() > MAX_CA_KEYS {
        return Err(TrustError::CaKeyCount(sent.ca_keys.len()));
    }
    if sent.revoked_keys.len() > MAX_REVOKED_KEYS {
        return Err(TrustError::RevokedKeyCount(sent.revoked_keys.len()));
    }
    if sent.labels.len() > MAX_LABELS {
        return Err(TrustError::LabelCount(sent.labels.len()));
    }
    for (k, v) in &sent.labels {
        validate_label(k, v).map_err(TrustError::BadLabel)?;
    }
    let ca_keys = rewrite(&sent.ca_keys, TrustError::BadCaKey)?;
    let revoked_keys = rewrite(&sent.revoked_keys, TrustError::BadRevokedKey)?;
    Ok(DeviceTrust { id: sent.id, labels: sent.labels, ca_keys, revoked_keys, pivot_time: sent.pivot_time })
}

/// Each key parsed and printed again; `bad` gets the key's 1-based number.
fn rewrite(keys: &[String], bad: fn(usize) -> TrustError) -> Result<Vec<String>, TrustError> {
    let mut out = Vec::with_capacity(keys.len());
    for (i, text) in keys.iter().enumerate() {
        // One key per entry: a second line is not a key, it is a smuggling attempt.
        if text.contains(['\n', '\r']) {
            return Err(bad(i + 1));
        }
        let key = parse_public_key(text, "key").map_err(|_| bad(i + 1))?;
        let line = openssh_line(&key);
        if line.is_empty() {
            return Err(bad(i + 1));
        }
        out.push(line);
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;

    use russh::keys::ssh_key::Algorithm;
    use russh::keys::PrivateKey;

    pub(crate) fn chmod(p: &std::path::Path, mode: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    /// A directory removed on drop.
    pub(crate) struct TempDir(pub PathBuf);

    impl TempDir {
        pub(crate) fn new(tag: &str) -> Self {
            use std::sync::atomic::{AtomicU32, Ordering};
            static N: AtomicU32 = AtomicU32::new(0);
            let n = N.fetch_add(1, Ordering::Relaxed);
            let path = std::env::temp_dir().join(format!("burrow-{tag}-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir_all(&path).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
            TempDir(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    pub(crate) fn key() -> PrivateKey {
        PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519).unwrap()
    }

    pub(crate) fn line(k: &PrivateKey) -> String {
        openssh_line(k.public_key())
    }

    pub(crate) fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    pub(crate) fn trust(id: &str, pairs: &[(&str, &str)], cas: usize, revoked: usize) -> DeviceTrust {
        DeviceTrust {
            id: id.into(),
            labels: labels(pairs),
            ca_keys: (0..cas).map(|_| line(&key())).collect(),
            revoked_keys: (0..revoked).map(|_| line(&key())).collect(),
            pivot_time: 0,
        }
    }

    #[test]
    fn the_pivots_answer_is_checked_and_rewritten() {
        let t = trust("cam-42", &[("site", "berlin")], 2, 3);
        assert_eq!(checked(t.clone(), "cam-42").unwrap(), t);
        let commented = DeviceTrust { ca_keys: vec![format!("{} the CA", t.ca_keys[0])], ..t.clone() };
        assert_eq!(checked(commented, "cam-42").unwrap().ca_keys, [t.ca_keys[0].clone()], "comment dropped");

        assert!(matches!(checked(t.clone(), "cam-43"), Err(TrustError::WrongDevice { .. })));
        let none = DeviceTrust { ca_keys: vec![], ..t.clone() };
        assert!(matches!(checked(none, "cam-42"), Err(TrustError::CaKeyCount(0))));
        let many = trust("cam-42", &[], MAX_CA_KEYS + 1, 0);
        assert!(matches!(checked(many, "cam-42"), Err(TrustError::CaKeyCount(_))));
        let k = &t.ca_keys[0];
        for bad in [
            format!("restrict,command=\"/bin/sh\" {k}"),
            format!("cert-authority {k}"),
            format!("{k}\nssh-ed25519 AAAA"),
            format!("# hi\n{k}"),
            "ssh-ed25519 AAAA".to_string(),
            String::new(),
        ] {
            let sent = DeviceTrust { ca_keys: vec![bad.clone()], ..t.clone() };
            assert!(matches!(checked(sent, "cam-42"), Err(TrustError::BadCaKey(1))), "{bad:?}");
            let sent = DeviceTrust { revoked_keys: vec![k.clone(), bad.clone()], ..t.clone() };
            assert!(matches!(checked(sent, "cam-42"), Err(TrustError::BadRevokedKey(2))), "{bad:?}");
        }
        let bad_label = DeviceTrust { labels: labels(&[("site", "a\nb")]), ..t.clone() };
        assert!(matches!(checked(bad_label, "cam-42"), Err(TrustError::BadLabel(_))));
        let many: BTreeMap<String, String> = (0..=MAX_LABELS).map(|i| (format!("k{i}"), "v".into())).collect();
        assert!(matches!(checked(DeviceTrust { labels: many, ..t.clone() }, "cam-42"), Err(TrustError::LabelCount(_))));
        let revoked = DeviceTrust { revoked_keys: vec![k.clone(); MAX_REVOKED_KEYS + 1], ..t };
        assert!(matches!(checked(revoked, "cam-42"), Err(TrustError::RevokedKeyCount(_))));
    }
}
