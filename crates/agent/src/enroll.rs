//! Joining a pivot with a one-time token, and rotating the device key.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use burrow_core::agent_file::{AgentFile, AgentFileError};
use burrow_core::enroll::{EnrollToken, TokenError};
use burrow_core::keys::{fingerprint, generate_ed25519, read_public_key, write_private_key, KeyError};
use burrow_core::rpc::{rotate_message, Request, ENROLL_USER, ROTATE_NAMESPACE};
use burrow_core::{Expose, HostKeyPin};
use russh::keys::HashAlg;

use crate::pivot_client::{self, ClientError, Credentials};

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("the token's pivot fingerprint '{0}' is malformed")]
    Pin(String),
    #[error("no sshd host keys found ({0}); pass --host-keys FILE...")]
    NoHostKeys(String),
    #[error(transparent)]
    HostKey(#[from] KeyError),
    // The cause follows in the error chain; repeating it here printed it twice.
    #[error("enrollment refused")]
    Pivot(#[from] ClientError),
    #[error("cannot write the device key {0}")]
    WriteKey(String, #[source] std::io::Error),
    #[error(transparent)]
    Config(#[from] AgentFileError),
    #[error("cannot load the device key {0}")]
    LoadKey(String, #[source] russh::keys::Error),
    #[error("cannot sign the rotation proof: {0}")]
    Sign(String),
    #[error("the pivot serves devices' MQTT over TLS, but {0} is plain MQTT; give --mqtt-url mqtts://HOST:8883")]
    PlainMqtt(String),
}

pub struct Enrollment {
    pub token: String,
    pub config_path: PathBuf,
    pub key_path: PathBuf,
    /// The device sshd's public host keys to register.
    pub host_keys: Vec<PathBuf>,
    pub expose: Vec<Expose>,
    pub mqtt_url: Option<String>,
    pub always_on: bool,
}

/// The sshd host keys registered by default.
pub fn default_host_keys() -> Vec<PathBuf> {
    let Ok(dir) = std::fs::read_dir("/etc/ssh") else { return Vec::new() };
    let mut keys: Vec<PathBuf> = dir
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name.starts_with("ssh_host_") && name.ends_with("_key.pub")
        })
        .collect();
    keys.sort();
    keys
}

/// Generates the device key, presents the token to the pivot it names
/// (checking the pivot's host key against the token), registers the key and
/// the sshd host keys, then writes the key and the agent config.
pub async fn enroll(e: Enrollment) -> Result<AgentFile, EnrollError> {
    let token = EnrollToken::decode(&e.token)?;
    if let (Some(_), Some(url)) = (&token.mqtt_fingerprint, &e.mqtt_url) {
        if url.starts_with("mqtt://") {
            return Err(EnrollError::PlainMqtt(url.clone()));
        }
    }
    let pin = HostKeyPin::parse(&token.fingerprint).map_err(|_| EnrollError::Pin(token.fingerprint.clone()))?;
    if e.host_keys.is_empty() {
        return Err(EnrollError::NoHostKeys("/etc/ssh/ssh_host_*_key.pub".into()));
    }
    let mut host_keys = Vec::new();
    for path in &e.host_keys {
        host_keys.push(burrow_core::keys::openssh_line(&read_public_key(path)?));
    }
    let key = generate_ed25519();
    let creds = Credentials::Key(Arc::new(key.clone()));
    let handle = pivot_client::connect(&token.pivot, pin, ENROLL_USER, &creds).await?;
    let result = pivot_client::call(&handle, &Request::Enroll { token: e.token.trim().to_string(), host_keys }).await;
    let _ = handle.disconnect(russh::Disconnect::ByApplication, "", "en").await;
    result?;
    write_private_key(&e.key_path, &key).map_err(|err| EnrollError::WriteKey(e.key_path.display().to_string(), err))?;
    let file = AgentFile {
        id: token.device,
        server: token.pivot,
        key: e.key_path.clone(),
        pivot_host_key: token.fingerprint,
        expose: e.expose.iter().map(Expose::to_string).collect(),
        // Without a broker the agent can only hold its tunnel: say so.
        always_on: e.always_on || e.mqtt_url.is_none(),
        mqtt_url: e.mqtt_url,
        mqtt_fingerprint: token.mqtt_fingerprint,
        trust_dir: None,
    };
    file.save(&e.config_path)?;
    Ok(file)
}

/// Replaces the device key: the pivot accepts the new key (proven by a
/// signature) in one registry update, then the new key file replaces the
/// old one by rename. Returns the new fingerprint.
pub async fn rotate_key(config_path: &Path) -> Result<String, EnrollError> {
    let file = AgentFile::load(config_path)?;
    let key_path = &file.key;
    let old = russh::keys::load_secret_key(key_path, None)
        .map_err(|err| EnrollError::LoadKey(key_path.display().to_string(), err))?;
    let pin = HostKeyPin::parse(&file.pivot_host_key).map_err(|_| EnrollError::Pin(file.pivot_host_key.clone()))?;
    let new = generate_ed25519();
    let proof = new
        .sign(ROTATE_NAMESPACE, HashAlg::Sha512, rotate_message(&file.id, &fingerprint(old.public_key())).as_bytes())
        .and_then(|s| s.to_pem(russh::keys::ssh_key::LineEnding::LF))
        .map_err(|err| EnrollError::Sign(err.to_string()))?;
    // Keep the new key on disk before the pivot switches, so a crash in
    // between leaves it recoverable next to the old one.
    let staged = key_path.with_extension("new");
    write_private_key(&staged, &new).map_err(|err| EnrollError::WriteKey(staged.display().to_string(), err))?;
    let creds = Credentials::Key(Arc::new(old));
    let handle = pivot_client::connect(&file.server, pin, &file.id, &creds).await?;
    let new_key = burrow_core::keys::openssh_line(new.public_key());
    let result = pivot_client::call(&handle, &Request::RotateKey { new_key, proof }).await;
    let _ = handle.disconnect(russh::Disconnect::ByApplication, "", "en").await;
    if let Err(err) = result {
        let _ = std::fs::remove_file(&staged);
        return Err(err.into());
    }
    std::fs::rename(&staged, key_path).map_err(|err| EnrollError::WriteKey(key_path.display().to_string(), err))?;
    Ok(fingerprint(new.public_key()))
}
