//! Talking to a pivot from an operator's machine: `--pivot HOST:PORT`,
//! the operator's key (`--identity FILE` or ssh-agent), and the pivot's
//! pinned host key (`--pivot-fingerprint`, or the one `burrow login` saved).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use burrow_agent::pivot_client::{self, Credentials};
use burrow_core::rpc::Request;
use burrow_core::HostKeyPin;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// What `burrow login` remembers, in `~/.config/burrow/login.toml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginState {
    pub pivot: String,
    pub fingerprint: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<PathBuf>,
    pub suffix: String,
    pub ssh_config: PathBuf,
}

pub fn home() -> PathBuf {
    std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/root"))
}

pub fn login_state_path() -> PathBuf {
    home().join(".config/burrow/login.toml")
}

impl LoginState {
    pub fn load() -> Option<LoginState> {
        let text = std::fs::read_to_string(login_state_path()).ok()?;
        toml::from_str(&text).ok()
    }

    pub fn save(&self) -> Result<()> {
        let path = login_state_path();
        std::fs::create_dir_all(path.parent().expect("has a parent"))?;
        std::fs::write(&path, toml::to_string(self)?).with_context(|| format!("cannot write {}", path.display()))
    }
}

/// A pivot reached over SSH.
pub struct Remote {
    pub addr: String,
    pub pin: HostKeyPin,
    pub creds: Credentials,
    pub user: String,
}

impl Remote {
    /// From the global flags, falling back on what `burrow login` saved.
    pub fn new(addr: &str, pin: Option<&str>, identity: Option<&Path>) -> Result<Remote> {
        let saved = LoginState::load().filter(|s| s.pivot == addr);
        let pin = match (pin, &saved) {
            (Some(p), _) => HostKeyPin::parse(p).context("--pivot-fingerprint")?,
            (None, Some(s)) => HostKeyPin::parse(&s.fingerprint)?,
            (None, None) => bail!("the pivot's host key is not pinned: pass --pivot-fingerprint SHA256:... or run `burrow login {addr}` first"),
        };
        let identity = identity.map(Path::to_path_buf).or_else(|| saved.and_then(|s| s.identity));
        Ok(Remote { addr: addr.to_string(), pin, creds: credentials(identity.as_deref())?, user: user_name() })
    }

    pub async fn call(&self, req: &Request) -> Result<Value> {
        let handle = pivot_client::connect(&self.addr, self.pin.clone(), &self.user, &self.creds).await?;
        let out = pivot_client::call(&handle, req).await;
        let _ = handle.disconnect(russh::Disconnect::ByApplication, "", "en").await;
        Ok(out?)
    }
}

/// `--identity FILE`, else ssh-agent if one runs, else `~/.ssh/id_ed25519`.
pub fn credentials(identity: Option<&Path>) -> Result<Credentials> {
    if let Some(path) = identity {
        let key = russh::keys::load_secret_key(path, None)
            .with_context(|| format!("cannot load the identity {}", path.display()))?;
        return Ok(Credentials::Key(Arc::new(key)));
    }
    if std::env::var_os("SSH_AUTH_SOCK").is_some() {
        return Ok(Credentials::Agent);
    }
    let default = home().join(".ssh/id_ed25519");
    if default.exists() {
        return credentials(Some(&default));
    }
    bail!("no operator key: pass --identity FILE or start an ssh-agent")
}

fn user_name() -> String {
    std::env::var("USER").unwrap_or_else(|_| "operator".into())
}
