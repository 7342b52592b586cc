//! Public keys as users hand them to burrow, and the pins that check them.

use std::fmt;
use std::path::Path;

use ssh_key::{Algorithm, HashAlg, LineEnding};
pub use ssh_key::{PrivateKey, PublicKey};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read key file {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} is not an OpenSSH public key (expected a line like 'ssh-ed25519 AAAA... comment')")]
    Malformed { what: String },
    #[error("'{}' is neither a public key file nor a fingerprint like SHA256:... (43 base64 characters)", crate::text::excerpt(.0, 80))]
    BadPin(String),
}

/// Parses one OpenSSH public key line (`ssh-ed25519 AAAA... comment`).
pub fn parse_public_key(text: &str, what: &str) -> Result<PublicKey, KeyError> {
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .ok_or_else(|| KeyError::Malformed { what: what.to_string() })?;
    PublicKey::from_openssh(line).map_err(|_| KeyError::Malformed { what: what.to_string() })
}

/// Reads a `.pub` file.
pub fn read_public_key(path: &Path) -> Result<PublicKey, KeyError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| KeyError::Read { path: path.display().to_string(), source })?;
    parse_public_key(&text, &path.display().to_string())
}

/// `SHA256:...`, the fingerprint OpenSSH prints.
pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

/// The key text without its comment, e.g. for the registry and known_hosts.
pub fn openssh_line(key: &PublicKey) -> String {
    let mut key = key.clone();
    key.set_comment("");
    key.to_openssh().unwrap_or_default().trim().to_string()
}

/// A new ed25519 key.
pub fn generate_ed25519() -> PrivateKey {
    PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519).expect("ed25519 key generation cannot fail")
}

/// Writes an OpenSSH private key, mode 0600 from the first byte on, via a
/// temp file of a fresh random name that no symlink redirects, then a
/// rename, so a reader never sees half a key ([`crate::atomic`]).
pub fn write_private_key(path: &Path, key: &PrivateKey) -> std::io::Result<()> {
    let text = key
        .to_openssh(LineEnding::LF)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    crate::atomic::write_file(path, text.as_bytes(), crate::atomic::Mode::Exact(0o600))
}

/// Unpadded base64 of a SHA-256 digest.
const SHA256_B64_LEN: usize = 43;

/// What a client trusts the pivot's host key to be.
#[derive(Clone, PartialEq, Eq)]
pub enum HostKeyPin {
    Key(PublicKey),
    Fingerprint(String),
}

impl HostKeyPin {
    /// Accepts `SHA256:...` as OpenSSH prints it (43 base64 characters, with
    /// or without the trailing '=') or the path of a public key file.
    pub fn parse(arg: &str) -> Result<Self, KeyError> {
        if let Some(b64) = arg.strip_prefix("SHA256:") {
            let b64 = b64.strip_suffix('=').unwrap_or(b64);
            if b64.len() != SHA256_B64_LEN || !b64.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'+' || c == b'/')
            {
                return Err(KeyError::BadPin(arg.to_string()));
            }
            return Ok(HostKeyPin::Fingerprint(format!("SHA256:{b64}")));
        }
        let path = Path::new(arg);
        if !path.exists() {
            return Err(KeyError::BadPin(arg.to_string()));
        }
        Ok(HostKeyPin::Key(read_public_key(path)?))
    }

    pub fn matches(&self, key: &PublicKey) -> bool {
        match self {
            HostKeyPin::Key(pinned) => pinned.key_data() == key.key_data(),
            HostKeyPin::Fingerprint(fp) => *fp == fingerprint(key),
        }
    }

    pub fn fingerprint(&self) -> String {
        match self {
            HostKeyPin::Key(k) => fingerprint(k),
            HostKeyPin::Fingerprint(fp) => fp.clone(),
        }
    }
}

impl fmt::Debug for HostKeyPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HostKeyPin({})", self.fingerprint())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl test@example";

    #[test]
    fn parses_and_fingerprints() {
        let k = parse_public_key(KEY, "test").unwrap();
        let fp = fingerprint(&k);
        assert!(fp.starts_with("SHA256:"));
        assert!(HostKeyPin::parse(&fp).unwrap().matches(&k));
        assert!(HostKeyPin::parse(&format!("{fp}=")).unwrap().matches(&k));
        assert!(HostKeyPin::Key(k.clone()).matches(&k));
        assert_eq!(openssh_line(&k), KEY.rsplit_once(' ').unwrap().0);
    }

    #[test]
    fn rejects_garbage() {
        assert!(matches!(parse_public_key("not a key", "x"), Err(KeyError::Malformed { .. })));
        assert!(matches!(parse_public_key("", "x"), Err(KeyError::Malformed { .. })));
        assert!(matches!(HostKeyPin::parse("SHA256:"), Err(KeyError::BadPin(_))));
        assert!(matches!(HostKeyPin::parse("SHA256:abc"), Err(KeyError::BadPin(_))));
        assert!(matches!(HostKeyPin::parse(&format!("SHA256:{}", "A".repeat(44))), Err(KeyError::BadPin(_))));
        assert!(matches!(HostKeyPin::parse("/nonexistent/file"), Err(KeyError::BadPin(_))));
    }

    /// Root's `enroll` wrote `device_key.tmp` in the agent's own directory,
    /// through a symlink its user had put there.
    #[test]
    fn a_private_key_is_0600_and_never_written_through_a_symlink() {
        use crate::atomic::tests::{assert_untouched, TempDir};
        use std::os::unix::fs::MetadataExt;
        let tmp = TempDir::new("key-link");
        let victim = tmp.victim();
        let path = tmp.0.join("device_key");
        std::os::unix::fs::symlink(&victim, tmp.0.join("device_key.tmp")).unwrap();
        let key = generate_ed25519();
        write_private_key(&path, &key).unwrap();
        assert_untouched(&victim);
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.is_file());
        assert_eq!(meta.mode() & 0o7777, 0o600);
        let back = PrivateKey::from_openssh(std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(back.public_key(), key.public_key());
        // A symlink at the key's own name is replaced, not followed.
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        write_private_key(&path, &key).unwrap();
        assert_untouched(&victim);
        assert!(std::fs::symlink_metadata(&path).unwrap().is_file());
    }
}
