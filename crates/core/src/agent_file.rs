//! The agent's config file (`/etc/burrow/agent.toml`), written by
//! `burrow agent enroll` and read by `burrow agent --config`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::atomic::{write_file, Mode};

pub const DEFAULT_PATH: &str = "/etc/burrow/agent.toml";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentFile {
    pub id: String,
    /// The pivot's SSH address, `HOST:PORT`.
    pub server: String,
    /// The device's private key.
    pub key: PathBuf,
    /// The pivot's host key fingerprint (`SHA256:...`) or a `.pub` path.
    pub pivot_host_key: String,
    #[serde(default)]
    pub expose: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mqtt_url: Option<String>,
    /// The pivot's MQTT certificate fingerprint (`SHA256:...`), pinned
    /// instead of trusting a CA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mqtt_fingerprint: Option<String>,
    #[serde(default)]
    pub always_on: bool,
    /// Where the device keeps what its sshd reads to let operators in with
    /// certificates (the CA keys, revoked keys and labels); root's alone.
    /// When set, the agent refreshes them whenever it connects to the pivot
    /// (as root), or asks the root unit `burrow-trust` to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_dir: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentFileError {
    #[error("cannot read {0}")]
    Read(String, #[source] std::io::Error),
    #[error("{0} is not a valid agent config")]
    Parse(String, #[source] toml::de::Error),
    #[error("cannot write {0}")]
    Write(String, #[source] std::io::Error),
}

impl AgentFile {
    /// Reads a regular file (never blocking on a FIFO: root reads this
    /// file, which the agent's user may replace) of at most 1 MiB.
    pub fn load(path: &Path) -> Result<Self, AgentFileError> {
        let text = read_regular(path).map_err(|e| AgentFileError::Read(path.display().to_string(), e))?;
        toml::from_str(&text).map_err(|e| AgentFileError::Parse(path.display().to_string(), e))
    }

    /// Writes atomically, through a temp file of a fresh random name that
    /// no symlink redirects ([`crate::atomic`]): root rewrites this file in
    /// a directory the agent's user may own. A new file is 0666 less the
    /// umask, as before.
    pub fn save(&self, path: &Path) -> Result<(), AgentFileError> {
        let err = |e| AgentFileError::Write(path.display().to_string(), e);
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let text = format!(
            "# burrow agent config, written by `burrow agent enroll`.\n# Start with: burrow agent --config {}\n{}",
            path.display(),
            toml::to_string(self).expect("agent config serializes")
        );
        write_file(path, text.as_bytes(), Mode::Umasked(0o666)).map_err(err)
    }
}

fn read_regular(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    const MAX: u64 = 1 << 20;
    let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mut text = String::new();
    file.take(MAX + 1).read_to_string(&mut text)?;
    if text.len() as u64 > MAX {
        return Err(std::io::Error::other(format!("larger than {MAX} bytes")));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::atomic::tests::{assert_untouched, TempDir};

    #[test]
    fn saves_and_loads() {
        let dir = std::env::temp_dir().join(format!("burrow-agent-file-{}", std::process::id()));
        let path = dir.join("agent.toml");
        let f = AgentFile {
            id: "cam-42".into(),
            server: "pivot:2222".into(),
            key: "/etc/burrow/device_key".into(),
            pivot_host_key: "SHA256:abc".into(),
            expose: vec!["22=127.0.0.1:22".into()],
            mqtt_url: Some("mqtts://pivot:8883".into()),
            mqtt_fingerprint: Some("SHA256:uNiVztksCsDhcc0u9e8BujQXVUpKZIDTMczCvj3tD2s".into()),
            always_on: false,
            trust_dir: Some("/etc/ssh/burrow".into()),
        };
        f.save(&path).unwrap();
        assert_eq!(AgentFile::load(&path).unwrap(), f);
        // Without a trust dir the key is left out, and an old file loads.
        let plain = AgentFile { trust_dir: None, ..f.clone() };
        plain.save(&path).unwrap();
        assert!(!std::fs::read_to_string(&path).unwrap().contains("trust_dir"));
        assert_eq!(AgentFile::load(&path).unwrap(), plain);
        std::fs::write(&path, "id = 'x'\nbogus = 1\n").unwrap();
        assert!(matches!(AgentFile::load(&path), Err(AgentFileError::Parse(..))));
        // A FIFO there is refused, not waited on.
        std::fs::remove_file(&path).unwrap();
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        assert!(matches!(AgentFile::load(&path), Err(AgentFileError::Read(..))));
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Root's `enroll` and `trust-operators` wrote `agent.toml.tmp` in the
    /// agent's own directory, through a symlink its user had put there.
    #[test]
    fn save_never_writes_through_a_planted_symlink() {
        let tmp = TempDir::new("agent-file-link");
        let victim = tmp.victim();
        let path = tmp.0.join("agent.toml");
        std::os::unix::fs::symlink(&victim, tmp.0.join("agent.toml.tmp")).unwrap();
        let f = AgentFile {
            id: "cam-42".into(),
            server: "pivot:2222".into(),
            key: "/etc/burrow/device_key".into(),
            pivot_host_key: "SHA256:abc".into(),
            expose: vec![],
            mqtt_url: None,
            mqtt_fingerprint: None,
            always_on: true,
            trust_dir: None,
        };
        f.save(&path).unwrap();
        assert_untouched(&victim);
        assert_eq!(AgentFile::load(&path).unwrap(), f);
        // A symlink at the config's own name is replaced, not followed.
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        f.save(&path).unwrap();
        assert_untouched(&victim);
        assert!(std::fs::symlink_metadata(&path).unwrap().is_file());
    }
}
