//! The pivot's own host key: created once, then loaded on every start.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use burrow_core::keys::{generate_ed25519, write_private_key};
use russh::keys::ssh_key::PrivateKey;

pub const HOST_KEY_FILE: &str = "host_key";

#[derive(Debug, thiserror::Error)]
pub enum HostKeyError {
    #[error("cannot read or write {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not an OpenSSH private key")]
    Parse {
        path: String,
        #[source]
        source: russh::keys::ssh_key::Error,
    },
    #[error("{path} is readable by other users (mode {mode:o}); run chmod 600 {path}")]
    Permissions { path: String, mode: u32 },
}

/// Loads `host_key` from `data_dir`, generating an ed25519 key (and `host_key.pub`) on first start.
pub fn load_or_create(data_dir: &Path) -> Result<PrivateKey, HostKeyError> {
    let path = data_dir.join(HOST_KEY_FILE);
    let io = |source| HostKeyError::Io { path: path.display().to_string(), source };
    if path.exists() {
        let mode = fs::metadata(&path).map_err(io)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(HostKeyError::Permissions { path: path.display().to_string(), mode });
        }
        let text = fs::read_to_string(&path).map_err(io)?;
        return PrivateKey::from_openssh(text)
            .map_err(|source| HostKeyError::Parse { path: path.display().to_string(), source });
    }
    let key = generate_ed25519();
    write_private_key(&path, &key).map_err(io)?;
    let public = key.public_key().to_openssh().unwrap_or_default();
    fs::write(data_dir.join(format!("{HOST_KEY_FILE}.pub")), format!("{public}\n")).map_err(io)?;
    Ok(key)
}
