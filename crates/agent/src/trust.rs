//! Operator trust on the device: what its sshd needs to let operators in
//! with the pivot's short-lived certificates, fetched over the device's own
//! authenticated connection and kept in files sshd reads.
//!
//! The trust dir (`/etc/burrow/trust`) holds:
//! - [`USER_CA_FILE`]: the CA keys, one a line (sshd's `TrustedUserCAKeys`);
//! - [`REVOKED_KEYS_FILE`]: operator keys to refuse, one a line, possibly
//!   none (sshd's `RevokedKeys`). It always exists once the drop-in is in
//!   place: sshd refuses every public key when that file is missing;
//! - [`OPERATORS_FILE`]: the device's id and labels, read by [`principals`]
//!   (sshd's `AuthorizedPrincipalsCommand`, run as `nobody`).
//!
//! The pivot's answer is hostile input: every key is parsed and written anew,
//! never copied as sent, so no line can carry sshd options.
//! `sshd` (re-exported here) writes the drop-in that points sshd at these
//! files and checks what sshd would trip on; `apply` puts it in place only
//! once sshd has checked it and confirmed that it takes it.

mod apply;
mod sshd;

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use burrow_core::agent_file::AgentFile;
use burrow_core::cert::{
    grants, validate_device_user, DeviceTrust, ANY, MAX_CA_KEYS, MAX_REVOKED_KEYS, PRINCIPAL_PREFIX,
};
use burrow_core::keys::{openssh_line, parse_public_key};
use burrow_core::label::{validate_label, LabelError, MAX_LABELS};
use burrow_core::rpc::{Request, Selector};
use burrow_core::text::excerpt;
use burrow_core::HostKeyPin;
use russh::client;
use russh::keys::ssh_encoding::base64::{Base64, Encoding};
use russh::keys::Certificate;
use serde::{Deserialize, Serialize};

use crate::pivot_client::{self, ClientError, Credentials};

pub use apply::{find_sshd, ApplyError, DeviceSshd, Problem};
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
/// Where `principals` looks without `--trust-dir`.
pub const DEFAULT_TRUST_DIR: &str = "/etc/burrow/trust";
/// How long the agent waits for the pivot's answer.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Selectors of up to this many labels are answered without a certificate.
const MAX_SELECTOR_PAIRS: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("cannot fetch the operator trust from the pivot")]
    Pivot(#[from] ClientError),
    #[error("no answer from the pivot in time")]
    Timeout,
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
    #[error("the pivot host key '{}' in the agent config is neither a .pub file nor a fingerprint", excerpt(.0, 80))]
    Pin(String),
    #[error("cannot load the device key {0}")]
    LoadKey(String, #[source] russh::keys::Error),
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

/// Connects as the device of `file` (its key, its pinned pivot), fetches the
/// trust and disconnects: for `enroll` and `trust-operators`.
pub async fn fetch_as_device(file: &AgentFile) -> Result<DeviceTrust, TrustError> {
    let key = russh::keys::load_secret_key(&file.key, None)
        .map_err(|e| TrustError::LoadKey(file.key.display().to_string(), e))?;
    let pin = HostKeyPin::parse(&file.pivot_host_key).map_err(|_| TrustError::Pin(file.pivot_host_key.clone()))?;
    let creds = Credentials::Key(Arc::new(key));
    let handle = pivot_client::connect(&file.server, pin, &file.id, &creds).await?;
    let result = tokio::time::timeout(FETCH_TIMEOUT, fetch(&handle, &file.id)).await;
    let _ = handle.disconnect(russh::Disconnect::ByApplication, "", "en").await;
    result.map_err(|_| TrustError::Timeout)?
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

/// What [`OPERATORS_FILE`] holds: enough for [`principals`] to answer
/// quickly, without the (possibly many) keys.
#[derive(Debug, Serialize, Deserialize)]
struct Operators {
    id: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

/// Writes the trust files into `dir` (created 0755 if missing), each
/// atomically and mode 0644: none holds a secret, and `nobody` reads
/// [`OPERATORS_FILE`]. A file whose content is unchanged is left alone.
/// The revoked keys and labels go first, the CA keys last, so a new CA is
/// never trusted before the keys it must refuse are in place. Returns
/// whether any file changed. `trust` is as [`fetch`] returns it.
pub fn write(dir: &Path, trust: &DeviceTrust) -> io::Result<bool> {
    create_dir(dir)?;
    let operators = Operators { id: trust.id.clone(), labels: trust.labels.clone() };
    let mut json = serde_json::to_string_pretty(&operators).map_err(io::Error::other)?;
    json.push('\n');
    let mut changed = write_if_changed(&dir.join(REVOKED_KEYS_FILE), lines(&trust.revoked_keys)?.as_bytes())?;
    changed |= write_if_changed(&dir.join(OPERATORS_FILE), json.as_bytes())?;
    changed |= write_if_changed(&dir.join(USER_CA_FILE), lines(&trust.ca_keys)?.as_bytes())?;
    Ok(changed)
}

/// Creates `dir` and an empty [`REVOKED_KEYS_FILE`] unless one exists, so
/// that a drop-in naming it never makes sshd refuse every key. Returns what
/// it created, for a run that fails before it counts to take back.
pub fn ensure_revoked_keys(dir: &Path) -> io::Result<Created> {
    let mut created = Created { dirs: create_dir(dir)?, file: None };
    let path = dir.join(REVOKED_KEYS_FILE);
    if !path.exists() {
        if let Err(e) = write_atomic(&path, b"", 0o644) {
            created.undo();
            return Err(e);
        }
        created.file = Some(path);
    }
    Ok(created)
}

/// What [`ensure_revoked_keys`] created: nothing that was there before.
#[derive(Debug)]
#[must_use = "a run that fails must undo what it created"]
pub struct Created {
    /// Directories created, outermost first.
    dirs: Vec<PathBuf>,
    file: Option<PathBuf>,
}

impl Created {
    /// Removes the file, then the directories, innermost first and only
    /// while empty: something else may have been put in them since.
    pub fn undo(self) {
        if let Some(file) = &self.file {
            let _ = std::fs::remove_file(file);
        }
        for dir in self.dirs.iter().rev() {
            if std::fs::remove_dir(dir).is_err() {
                break;
            }
        }
    }
}

fn lines(entries: &[String]) -> io::Result<String> {
    let mut out = String::with_capacity(entries.iter().map(|e| e.len() + 1).sum());
    for e in entries {
        if e.contains(['\n', '\r']) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "a key spans several lines"));
        }
        out.push_str(e);
        out.push('\n');
    }
    Ok(out)
}

/// Creates `dir` 0755 with the directories above it it needs; returns
/// those it created, outermost first.
fn create_dir(dir: &Path) -> io::Result<Vec<PathBuf>> {
    if dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut missing: Vec<PathBuf> =
        dir.ancestors().take_while(|a| !a.as_os_str().is_empty() && !a.exists()).map(Path::to_path_buf).collect();
    missing.reverse();
    std::fs::DirBuilder::new().recursive(true).mode(0o755).create(dir)?;
    // The umask may have taken bits away; `nobody` must get through.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    Ok(missing)
}

/// Writes `bytes` unless `path` holds them already (then only its mode is
/// set right). Returns whether the content changed.
fn write_if_changed(path: &Path, bytes: &[u8]) -> io::Result<bool> {
    if let Ok(old) = std::fs::read(path) {
        if old == bytes {
            let mode = std::fs::metadata(path)?.permissions().mode() & 0o7777;
            if mode != 0o644 {
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))?;
            }
            return Ok(false);
        }
    }
    write_atomic(path, bytes, 0o644)?;
    Ok(true)
}

/// Writes a file so that readers see the old content or the new, never a
/// part: a temp file in the same directory, synced, then renamed over.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = dir.join(tmp_name);
    let written = (|| {
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp)?;
        // `mode` at open is filtered by the umask; this is not.
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    // The rename itself survives a crash once the directory is synced.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Fetches and writes the trust on a live connection. A failure is logged
/// and sshd keeps the files it has.
pub(crate) async fn refresh<H: client::Handler>(handle: &client::Handle<H>, id: &str, dir: &Path) {
    let trust = match tokio::time::timeout(FETCH_TIMEOUT, fetch(handle, id)).await {
        Ok(Ok(trust)) => trust,
        Ok(Err(e)) => {
            tracing::warn!(
                "cannot refresh the operator trust; sshd keeps the files it has: {}",
                crate::error_chain(&e)
            );
            return;
        }
        Err(_) => {
            tracing::warn!(
                "cannot refresh the operator trust; sshd keeps the files it has: no answer from the pivot in time"
            );
            return;
        }
    };
    let (cas, revoked) = (trust.ca_keys.len(), trust.revoked_keys.len());
    let owned = dir.to_path_buf();
    match tokio::task::spawn_blocking(move || write(&owned, &trust)).await {
        Ok(Ok(true)) => {
            tracing::info!(dir = %dir.display(), "operator trust updated: {cas} CA keys, {revoked} revoked keys")
        }
        Ok(Ok(false)) => tracing::debug!(dir = %dir.display(), "operator trust unchanged"),
        Ok(Err(e)) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot write the operator trust files; sshd keeps the ones it has")
        }
        Err(e) => tracing::warn!(error = %e, "writing the operator trust files failed"),
    }
}

/// For sshd's `AuthorizedPrincipalsCommand`: the principals that let a
/// certificate log in as `user` on this device, whose labels are in
/// `dir`/[`OPERATORS_FILE`].
///
/// With the certificate (`%k`: the base64 of its blob), exactly its valid
/// principals that [`grants`] the login: sshd has checked its signature, CA
/// and validity before running the command. Without one, every principal
/// that would be accepted for selectors of up to 3 of the device's labels,
/// for `user` and for any user. On any problem: nothing, and one line on
/// stderr saying why.
pub fn principals(user: &str, cert_b64: Option<&str>, dir: &Path) -> Vec<String> {
    match try_principals(user, cert_b64, dir) {
        Ok(p) => p,
        Err(why) => {
            let _ = writeln!(io::stderr(), "burrow principals: {why}");
            Vec::new()
        }
    }
}

fn try_principals(user: &str, cert_b64: Option<&str>, dir: &Path) -> Result<Vec<String>, String> {
    if user == ANY || validate_device_user(user).is_err() {
        return Err(format!("'{}' is not a user a certificate can name", excerpt(user, 40)));
    }
    let path = dir.join(OPERATORS_FILE);
    let text = std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let ops: Operators =
        serde_json::from_slice(&text).map_err(|e| format!("{} is not burrow's operators file: {e}", path.display()))?;
    match cert_b64 {
        Some(cert) => {
            let cert = decode_certificate(cert)?;
            Ok(cert.valid_principals().iter().filter(|p| grants(p, user, &ops.labels)).cloned().collect())
        }
        None => Ok(every_accepted(user, &ops.labels)),
    }
}

/// `%k` is the base64 of the blob; a whole OpenSSH line is taken too.
fn decode_certificate(text: &str) -> Result<Certificate, String> {
    let text = text.trim();
    let cert = if text.contains(char::is_whitespace) {
        Certificate::from_openssh(text).map_err(|e| e.to_string())
    } else {
        Base64::decode_vec(text)
            .map_err(|e| e.to_string())
            .and_then(|b| Certificate::from_bytes(&b).map_err(|e| e.to_string()))
    };
    cert.map_err(|e| format!("the key given is not an OpenSSH certificate: {e}"))
}

/// `burrow:U:*` and `burrow:U:SEL` for every selector SEL of 1 to 3 of
/// `labels` in canonical form, for U = `user` and `*`.
fn every_accepted(user: &str, labels: &BTreeMap<String, String>) -> Vec<String> {
    // A label the pivot would not accept could not appear in a selector.
    let pairs: Vec<(&String, &String)> = labels.iter().filter(|(k, v)| validate_label(k, v).is_ok()).collect();
    let mut scopes = vec![ANY.to_string()];
    each_subset(pairs.len(), 0, &mut Vec::with_capacity(MAX_SELECTOR_PAIRS), &mut |idx| {
        let sel = Selector(idx.iter().map(|&i| (pairs[i].0.clone(), pairs[i].1.clone())).collect());
        scopes.push(sel.to_string());
    });
    let mut out = Vec::with_capacity(scopes.len() * 2);
    for u in [user, ANY] {
        out.extend(scopes.iter().map(|s| format!("{PRINCIPAL_PREFIX}{u}:{s}")));
    }
    out
}

/// Calls `f` with each set of 1 to [`MAX_SELECTOR_PAIRS`] indices below
/// `n`, in increasing order, from `start` on.
fn each_subset(n: usize, start: usize, idx: &mut Vec<usize>, f: &mut impl FnMut(&[usize])) {
    for i in start..n {
        idx.push(i);
        f(idx);
        if idx.len() < MAX_SELECTOR_PAIRS {
            each_subset(n, i + 1, idx, f);
        }
        idx.pop();
    }
}

/// The trust dir next to an agent config: `/etc/burrow/trust` for `/etc/burrow/agent.toml`.
pub fn default_dir(config_path: &Path) -> PathBuf {
    config_path.with_file_name("trust")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    use russh::keys::ssh_key::certificate::{Builder, CertType};
    use russh::keys::ssh_key::Algorithm;
    use russh::keys::PrivateKey;

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

    fn key() -> PrivateKey {
        PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519).unwrap()
    }

    fn line(k: &PrivateKey) -> String {
        openssh_line(k.public_key())
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn trust(id: &str, pairs: &[(&str, &str)], cas: usize, revoked: usize) -> DeviceTrust {
        DeviceTrust {
            id: id.into(),
            labels: labels(pairs),
            ca_keys: (0..cas).map(|_| line(&key())).collect(),
            revoked_keys: (0..revoked).map(|_| line(&key())).collect(),
            pivot_time: 0,
        }
    }

    fn certificate(ca: &PrivateKey, principals: &[&str]) -> String {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        let user = key();
        let mut b = Builder::new(vec![7u8; 32], user.public_key().key_data().clone(), now - 60, now + 3600).unwrap();
        b.cert_type(CertType::User).unwrap().key_id("alice").unwrap();
        for p in principals {
            b.valid_principal(*p).unwrap();
        }
        let cert = b.sign(ca).unwrap();
        Base64::encode_string(&cert.to_bytes().unwrap())
    }

    #[test]
    fn principals_from_a_certificate_are_those_that_grant() {
        let dir = TempDir::new("principals");
        write(&dir.0, &trust("cam-42", &[("site", "berlin"), ("rack", "3")], 1, 0)).unwrap();
        let cert = certificate(
            &key(),
            &[
                "burrow:root:site=berlin",
                "burrow:root:site=paris",
                "burrow:*:rack=3,site=berlin",
                "burrow:pi:*",
                "burrow:root:site=berlin,rack=3",
                "root",
            ],
        );
        assert_eq!(principals("root", Some(&cert), &dir.0), ["burrow:root:site=berlin", "burrow:*:rack=3,site=berlin"]);
        assert_eq!(principals("pi", Some(&cert), &dir.0), ["burrow:*:rack=3,site=berlin", "burrow:pi:*"]);
        assert_eq!(principals("admin", Some(&cert), &dir.0), ["burrow:*:rack=3,site=berlin"]);
        let paris = certificate(&key(), &["burrow:root:site=paris", "burrow:*:site=paris"]);
        assert!(principals("root", Some(&paris), &dir.0).is_empty(), "another site's certificate");
        // sshd's %k is base64 alone; a whole line is taken too.
        let whole = format!("ssh-ed25519-cert-v01@openssh.com {cert} alice");
        assert_eq!(principals("root", Some(&whole), &dir.0).len(), 2);
        // Garbage in, nothing out, and no panic.
        for bad in ["", "AAAA", "!!!", "AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"] {
            assert!(principals("root", Some(bad), &dir.0).is_empty(), "{bad}");
        }
        for user in ["*", "bad user", "a:b", ""] {
            assert!(principals(user, Some(&cert), &dir.0).is_empty(), "{user}");
        }
        let other = TempDir::new("principals-none");
        assert!(principals("root", Some(&cert), &other.0).is_empty(), "no operators.json, no principal");
        std::fs::write(other.0.join(OPERATORS_FILE), "{not json").unwrap();
        assert!(principals("root", Some(&cert), &other.0).is_empty());
    }

    #[test]
    fn principals_without_a_certificate_cover_small_selectors() {
        let dir = TempDir::new("principals-all");
        let device = [("site", "berlin"), ("rack", "3"), ("room", "b2"), ("os", "deb")];
        write(&dir.0, &trust("cam-42", &device, 1, 0)).unwrap();
        let p = principals("root", None, &dir.0);
        // Per user: *, 4 singles, 6 pairs and 4 triples.
        assert_eq!(p.len(), 2 * (1 + 4 + 6 + 4));
        let l = labels(&device);
        for user in ["root", "*"] {
            assert!(p.contains(&format!("burrow:{user}:*")));
            assert!(p.contains(&format!("burrow:{user}:rack=3,site=berlin")));
            assert!(p.contains(&format!("burrow:{user}:os=deb,rack=3,room=b2")));
        }
        assert!(p.iter().all(|p| grants(p, "root", &l)), "{p:?}");
        assert!(!p.iter().any(|p| p.matches('=').count() > 3));
        let mut unique = p.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), p.len());
        // 32 labels: every selector of up to 3, quickly and without panicking.
        let many: BTreeMap<String, String> = (0..MAX_LABELS).map(|i| (format!("k{i:02}"), format!("v{i}"))).collect();
        let t = DeviceTrust { labels: many, ..trust("cam-42", &[], 1, 0) };
        write(&dir.0, &t).unwrap();
        assert_eq!(principals("root", None, &dir.0).len(), 2 * (1 + 32 + 496 + 4960));
    }

    #[test]
    fn write_is_atomic_0644_and_says_what_changed() {
        let dir = TempDir::new("write");
        let trust_dir = dir.0.join("etc/trust");
        let t = trust("cam-42", &[("site", "berlin")], 2, 0);
        assert!(write(&trust_dir, &t).unwrap());
        let mode = |name: &str| std::fs::metadata(trust_dir.join(name)).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode("."), 0o755);
        for name in [USER_CA_FILE, REVOKED_KEYS_FILE, OPERATORS_FILE] {
            assert_eq!(mode(name), 0o644, "{name}");
        }
        assert_eq!(std::fs::read_to_string(trust_dir.join(REVOKED_KEYS_FILE)).unwrap(), "", "exists, even empty");
        assert_eq!(
            std::fs::read_to_string(trust_dir.join(USER_CA_FILE)).unwrap(),
            format!("{}\n", t.ca_keys.join("\n"))
        );
        let ops: Operators =
            serde_json::from_str(&std::fs::read_to_string(trust_dir.join(OPERATORS_FILE)).unwrap()).unwrap();
        assert_eq!((ops.id.as_str(), ops.labels), ("cam-42", t.labels.clone()));

        assert!(!write(&trust_dir, &t).unwrap(), "the same trust changes nothing");
        std::fs::set_permissions(trust_dir.join(USER_CA_FILE), std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(!write(&trust_dir, &t).unwrap());
        assert_eq!(mode(USER_CA_FILE), 0o644, "a wrong mode is put right");

        let before = std::fs::metadata(trust_dir.join(USER_CA_FILE)).unwrap().ino();
        let revoked = DeviceTrust { revoked_keys: vec![line(&key())], ..t.clone() };
        assert!(write(&trust_dir, &revoked).unwrap());
        assert_eq!(std::fs::metadata(trust_dir.join(USER_CA_FILE)).unwrap().ino(), before, "unchanged file left alone");
        assert_eq!(
            std::fs::read_to_string(trust_dir.join(REVOKED_KEYS_FILE)).unwrap(),
            format!("{}\n", revoked.revoked_keys[0])
        );
        // No temp file is left behind.
        let mut names: Vec<String> =
            std::fs::read_dir(&trust_dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        assert_eq!(names, [OPERATORS_FILE, REVOKED_KEYS_FILE, USER_CA_FILE]);

        let smuggled = DeviceTrust { ca_keys: vec![format!("{}\ncert-authority x", t.ca_keys[0])], ..t.clone() };
        assert!(write(&trust_dir, &smuggled).is_err());
    }

    #[test]
    fn ensure_revoked_keys_keeps_what_is_there() {
        let dir = TempDir::new("revoked");
        let trust_dir = dir.0.join("trust");
        ensure_revoked_keys(&trust_dir).unwrap().undo();
        assert!(!trust_dir.exists(), "undo takes back the dir it made");
        let _kept = ensure_revoked_keys(&trust_dir).unwrap();
        assert_eq!(std::fs::read_to_string(trust_dir.join(REVOKED_KEYS_FILE)).unwrap(), "");
        std::fs::write(trust_dir.join(REVOKED_KEYS_FILE), "ssh-ed25519 AAAA\n").unwrap();
        ensure_revoked_keys(&trust_dir).unwrap().undo();
        assert_eq!(std::fs::read_to_string(trust_dir.join(REVOKED_KEYS_FILE)).unwrap(), "ssh-ed25519 AAAA\n");
    }

    /// A failed enroll left an empty trust/revoked_keys behind.
    #[test]
    fn undo_removes_only_what_this_run_created() {
        let dir = TempDir::new("undo");
        let etc = dir.0.join("etc");
        let trust_dir = etc.join("burrow/trust");
        let created = ensure_revoked_keys(&trust_dir).unwrap();
        assert!(trust_dir.join(REVOKED_KEYS_FILE).exists());
        created.undo();
        assert!(!etc.exists(), "every dir it made is gone");
        assert!(dir.0.exists(), "the dir that was there stays");

        // An existing dir with a file of its own: only the new file goes.
        std::fs::create_dir_all(&trust_dir).unwrap();
        std::fs::write(trust_dir.join(USER_CA_FILE), "kept\n").unwrap();
        ensure_revoked_keys(&trust_dir).unwrap().undo();
        assert!(!trust_dir.join(REVOKED_KEYS_FILE).exists());
        assert_eq!(std::fs::read_to_string(trust_dir.join(USER_CA_FILE)).unwrap(), "kept\n");

        // A dir it made that something else filled meanwhile stays.
        let fresh = dir.0.join("fresh/trust");
        let created = ensure_revoked_keys(&fresh).unwrap();
        std::fs::write(dir.0.join("fresh/agent.toml"), "").unwrap();
        created.undo();
        assert!(!fresh.exists() && dir.0.join("fresh/agent.toml").exists());
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
