//! Talking to a pivot from an operator's machine: `--pivot HOST:PORT`,
//! the operator's key (`--identity FILE` or ssh-agent), and the pivot's
//! pinned host key (`--pivot-host-key`, or the one `burrow login` saved).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use burrow_agent::pivot_client::{self, Credentials};
use burrow_core::rpc::Request;
use burrow_core::HostKeyPin;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// What `burrow login` remembers about one pivot, in
/// `~/.config/burrow/logins/NAME.toml`. Devices behind it are `ID.NAME`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginState {
    pub name: String,
    pub pivot: String,
    pub fingerprint: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<PathBuf>,
    pub ssh_config: PathBuf,
    /// The operator's certificate from the pivot's CA, renewed by `burrow
    /// ssh/scp/sftp` when it runs out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<PathBuf>,
}

/// The login name used when none is given: devices are `ID.burrow`.
pub const DEFAULT_LOGIN: &str = "burrow";

pub fn home() -> PathBuf {
    std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/root"))
}

fn logins_dir() -> PathBuf {
    home().join(".config/burrow/logins")
}

impl LoginState {
    /// Every saved login, sorted by name.
    pub fn all() -> Vec<LoginState> {
        let mut out: Vec<LoginState> = std::fs::read_dir(logins_dir())
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "toml"))
            .filter_map(|e| toml::from_str(&std::fs::read_to_string(e.path()).ok()?).ok())
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// The login a device name points at: `cam-42.eu` picks the login named
    /// `eu`; a bare `cam-42` needs exactly one login, or the default one.
    /// Returns the login and the device id without the name.
    pub fn for_device(target: &str) -> Result<(LoginState, String)> {
        let all = LoginState::all();
        if all.is_empty() {
            bail!("not logged in: run `burrow login HOST:PORT` first");
        }
        if let Some((id, name)) = target.rsplit_once('.') {
            if let Some(s) = all.iter().find(|s| s.name == name) {
                return Ok((s.clone(), id.to_string()));
            }
        }
        let chosen = match all.iter().find(|s| s.name == DEFAULT_LOGIN) {
            _ if all.len() == 1 => &all[0],
            Some(s) => s,
            None => {
                let names: Vec<String> = all.iter().map(|s| format!("{target}.{}", s.name)).collect();
                bail!("logged in to several pivots; say which: {}", names.join(" or "))
            }
        };
        Ok((chosen.clone(), target.to_string()))
    }

    pub fn save(&self) -> Result<()> {
        let dir = logins_dir();
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let path = dir.join(format!("{}.toml", self.name));
        std::fs::write(&path, toml::to_string(self)?).with_context(|| format!("cannot write {}", path.display()))
    }

    /// The ssh_config alias of this login's pivot.
    pub fn pivot_alias(&self) -> String {
        format!("{}-pivot", self.name)
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
    /// From an admin command's flags, falling back on what `burrow login` saved.
    pub fn new(addr: &str, pin: Option<&str>, identity: Option<&Path>) -> Result<Remote> {
        let saved = LoginState::all().into_iter().find(|s| s.pivot == addr);
        let pin = match (pin, &saved) {
            (Some(p), _) => HostKeyPin::parse(p).context("--pivot-host-key")?,
            (None, Some(s)) => HostKeyPin::parse(&s.fingerprint)?,
            (None, None) => bail!("the pivot's host key is not pinned: pass --pivot-host-key SHA256:... or run `burrow login {addr}` first"),
        };
        let identity = identity.map(Path::to_path_buf).or_else(|| saved.and_then(|s| s.identity));
        Ok(Remote { addr: addr.to_string(), pin, creds: credentials(identity.as_deref())?, user: user_name() })
    }

    /// One connection, for several requests.
    pub async fn connect(&self) -> Result<russh::client::Handle<impl russh::client::Handler>> {
        Ok(pivot_client::connect(&self.addr, self.pin.clone(), &self.user, &self.creds).await?)
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
