//! Who refreshes the trust files: only root writes them.
//!
//! - `enroll --trust-operators` and `trust-operators` (root) fetch the
//!   trust as the device and record what to connect with in [`PIVOT_FILE`];
//!   `trust-operators --refresh` (root, `burrow-trust.service`) fetches
//!   again with only that file.
//! - A running agent that is root, with a safe trust dir, fetches and
//!   writes itself ([`Keeper::Writes`]). Any other agent never writes them:
//!   where it would fetch, it touches [`REFRESH_MARKER`] next to its status
//!   file instead, which `burrow-trust.path` turns into a root refresh.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use burrow_core::cert::DeviceTrust;
use burrow_core::HostKeyPin;
use russh::client;
use tracing::{debug, info, warn};

use super::files::{write, PivotFile};
use super::safe::{read_regular, TrustDir};
use super::{fetch, TrustError, FETCH_TIMEOUT, PIVOT_FILE};
use crate::pivot_client::{self, Credentials};

/// What an unprivileged agent touches, next to its status file, to ask
/// root for a refresh.
pub const REFRESH_MARKER: &str = "trust-refresh";
/// How long connecting to one pivot may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// A device key is a few hundred bytes.
const MAX_KEY_FILE: u64 = 64 * 1024;

/// How a running agent keeps the operator trust fresh.
#[derive(Debug)]
pub(crate) enum Keeper {
    /// Root, with a safe trust dir: fetch and write the files.
    Writes { dir: PathBuf },
    /// Never write; touch `marker` (if any) for root's unit to refresh.
    Asks { marker: Option<PathBuf>, warned: AtomicBool },
}

impl Keeper {
    /// Decides, once, for the trust dir `dir`, with the status file at
    /// `status_path` (the marker goes next to it).
    pub(crate) fn new(dir: PathBuf, status_path: Option<&Path>) -> Keeper {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        Self::decide(euid, dir, status_path, |d| TrustDir::open(d).map(|_| ()).map_err(|e| e.to_string()))
    }

    fn decide(
        euid: u32,
        dir: PathBuf,
        status_path: Option<&Path>,
        check: impl FnOnce(&Path) -> Result<(), String>,
    ) -> Keeper {
        if euid == 0 {
            match check(&dir) {
                Ok(()) => return Keeper::Writes { dir },
                Err(why) => warn!("this agent does not write the operator trust files: {why}"),
            }
        }
        let marker = status_path.and_then(Path::parent).map(|d| d.join(REFRESH_MARKER));
        match &marker {
            Some(m) => info!(
                dir = %dir.display(),
                "a root unit refreshes the operator trust files (burrow-trust.service: trust-operators --refresh); this agent asks it by touching {}",
                m.display()
            ),
            None => {
                info!(dir = %dir.display(), "a root unit refreshes the operator trust files (burrow-trust.service: trust-operators --refresh)")
            }
        }
        Keeper::Asks { marker, warned: AtomicBool::new(false) }
    }

    /// Where the agent would fetch the trust: fetches and writes it, or
    /// asks root to.
    pub(crate) async fn refresh<H: client::Handler>(&self, handle: &client::Handle<H>, id: &str) {
        match self {
            Keeper::Writes { dir } => refresh(handle, id, dir).await,
            Keeper::Asks { marker: Some(marker), warned } => match touch(marker) {
                Ok(()) => debug!(marker = %marker.display(), "asked for an operator trust refresh"),
                Err(e) => {
                    if !warned.swap(true, Ordering::Relaxed) {
                        warn!(marker = %marker.display(), error = %e, "cannot ask for an operator trust refresh; burrow-trust.timer still refreshes hourly");
                    }
                }
            },
            Keeper::Asks { marker: None, .. } => {}
        }
    }
}

/// Creates `marker` or updates its time (never through a symlink):
/// `burrow-trust.path` watches it.
pub(crate) fn touch(marker: &Path) -> io::Result<()> {
    let file = OpenOptions::new().write(true).create(true).mode(0o644).custom_flags(libc::O_NOFOLLOW).open(marker)?;
    file.set_modified(SystemTime::now())
}

/// Fetches and writes the trust on a live connection. A failure is logged
/// and sshd keeps the files it has.
async fn refresh<H: client::Handler>(handle: &client::Handle<H>, id: &str, dir: &Path) {
    let trust = match tokio::time::timeout(FETCH_TIMEOUT, fetch(handle, id)).await {
        Ok(Ok(trust)) => trust,
        Ok(Err(e)) => {
            warn!("cannot refresh the operator trust; sshd keeps the files it has: {}", crate::error_chain(&e));
            return;
        }
        Err(_) => {
            warn!("cannot refresh the operator trust; sshd keeps the files it has: no answer from the pivot in time");
            return;
        }
    };
    let (cas, revoked) = (trust.ca_keys.len(), trust.revoked_keys.len());
    let owned = dir.to_path_buf();
    match tokio::task::spawn_blocking(move || write(&owned, &trust)).await {
        Ok(Ok(true)) => info!(dir = %dir.display(), "operator trust updated: {cas} CA keys, {revoked} revoked keys"),
        Ok(Ok(false)) => debug!(dir = %dir.display(), "operator trust unchanged"),
        Ok(Err(e)) => {
            warn!(dir = %dir.display(), "cannot write the operator trust files; sshd keeps the ones it has: {}", crate::error_chain(&e))
        }
        Err(e) => warn!(error = %e, "writing the operator trust files failed"),
    }
}

/// Connects as the device `pivot` names (its key, its pinned pivot; each
/// pivot in turn until one answers), fetches the trust and disconnects:
/// for `enroll`, `trust-operators` and `trust-operators --refresh`.
pub async fn fetch_as_device(pivot: &PivotFile) -> Result<DeviceTrust, TrustError> {
    let key = load_device_key(&pivot.key)?;
    let pin = HostKeyPin::parse(&pivot.pivot_host_key)
        .map_err(|_| TrustError::Pin { pin: pivot.pivot_host_key.clone(), from: PIVOT_FILE.into() })?;
    let creds = Credentials::Key(Arc::new(key));
    let mut last = TrustError::NoPivot;
    for addr in &pivot.pivots {
        let connected =
            tokio::time::timeout(CONNECT_TIMEOUT, pivot_client::connect(addr, pin.clone(), &pivot.id, &creds));
        let handle = match connected.await {
            Ok(Ok(handle)) => handle,
            Ok(Err(e)) => {
                last = e.into();
                continue;
            }
            Err(_) => {
                last = TrustError::ConnectTimeout(addr.clone());
                continue;
            }
        };
        let result = tokio::time::timeout(FETCH_TIMEOUT, fetch(&handle, &pivot.id)).await;
        let _ = handle.disconnect(russh::Disconnect::ByApplication, "", "en").await;
        match result {
            Ok(Ok(trust)) => return Ok(trust),
            Ok(Err(e)) => last = e,
            Err(_) => last = TrustError::Timeout,
        }
    }
    Err(last)
}

/// The device key at `path`: a regular file (no symlink followed, as root
/// may be reading a path the agent's user can change).
fn load_device_key(path: &Path) -> Result<russh::keys::PrivateKey, TrustError> {
    let shown = || path.display().to_string();
    let bytes = read_regular(path, MAX_KEY_FILE)
        .map_err(|e| TrustError::ReadKey(shown(), e))?
        .ok_or_else(|| TrustError::ReadKey(shown(), io::Error::other("missing, or not a regular file")))?;
    let text = String::from_utf8(bytes).map_err(|_| TrustError::ReadKey(shown(), io::Error::other("not text")))?;
    russh::keys::decode_secret_key(&text, None).map_err(|e| TrustError::LoadKey(shown(), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trust::tests::TempDir;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn only_root_with_a_safe_dir_writes() {
        let status = Path::new("/run/burrow-agent/status.json");
        let ok = |_: &Path| Ok(());
        let unsafe_dir = |_: &Path| Err("unsafe".to_string());
        let dir = PathBuf::from("/etc/ssh/burrow");
        assert!(matches!(Keeper::decide(0, dir.clone(), Some(status), ok), Keeper::Writes { .. }));
        for keeper in [
            Keeper::decide(0, dir.clone(), Some(status), unsafe_dir),
            Keeper::decide(990, dir.clone(), Some(status), ok),
        ] {
            let Keeper::Asks { marker, .. } = keeper else { panic!("{keeper:?} writes") };
            assert_eq!(marker.unwrap(), Path::new("/run/burrow-agent/trust-refresh"));
        }
        assert!(matches!(Keeper::decide(990, dir, None, ok), Keeper::Asks { marker: None, .. }));
    }

    #[test]
    fn touching_the_marker_creates_it_or_moves_its_time_on() {
        let tmp = TempDir::new("marker");
        let marker = tmp.0.join(REFRESH_MARKER);
        touch(&marker).unwrap();
        assert!(marker.is_file());
        let long_ago = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        std::fs::File::options().write(true).open(&marker).unwrap().set_modified(long_ago).unwrap();
        touch(&marker).unwrap();
        assert!(std::fs::metadata(&marker).unwrap().mtime() > 1_000_000_000);

        let victim = tmp.0.join("victim");
        std::fs::write(&victim, "x").unwrap();
        std::fs::File::options().write(true).open(&victim).unwrap().set_modified(long_ago).unwrap();
        let link = tmp.0.join("link");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        assert!(touch(&link).is_err(), "a symlink is not followed");
        assert_eq!(std::fs::metadata(&victim).unwrap().mtime(), 1_000_000_000);
    }

    #[test]
    fn a_device_key_must_be_a_regular_file() {
        let tmp = TempDir::new("device-key");
        let key = tmp.0.join("device_key");
        let err = load_device_key(&key).unwrap_err().to_string();
        assert!(err.starts_with(&format!("cannot read the device key {}", key.display())), "{err}");
        let real = tmp.0.join("real_key");
        let pair = burrow_core::keys::generate_ed25519();
        burrow_core::keys::write_private_key(&real, &pair).unwrap();
        load_device_key(&real).unwrap();
        std::os::unix::fs::symlink(&real, &key).unwrap();
        assert!(matches!(load_device_key(&key), Err(TrustError::ReadKey(..))), "a symlink is not followed");
    }
}
