//! Who refreshes the trust files: only root writes them.
//!
//! - `enroll` (root) records what to connect with in [`PIVOT_FILE`];
//!   `enroll --trust-operators`, `trust-operators` and
//!   `trust-operators --refresh` (root, `burrow-trust.service`) fetch the
//!   trust as the device with only that file.
//! - A running agent that is root, with a safe trust dir, fetches and
//!   writes itself ([`Keeper::Writes`]). Any other agent never writes them:
//!   where it would fetch, it touches [`REFRESH_MARKER`] next to its status
//!   file instead, which `burrow-trust.path` turns into a root refresh
//!   ([`Keeper::Asks`]). Each such refresh is one more connection to the
//!   pivot, so it asks on a nudge always, and on connecting or periodically
//!   only when the last refresh (the pivot's clock in [`OPERATORS_FILE`])
//!   is older than half the refresh period; and never twice in
//!   [`MIN_ASK_GAP`] (a nudge waits for it instead).

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use burrow_core::cert::DeviceTrust;
use burrow_core::HostKeyPin;
use russh::client;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::files::{write, Operators, PivotFile};
use super::safe::{read_regular, TrustDir};
use super::{fetch, TrustError, FETCH_TIMEOUT, OPERATORS_FILE, PIVOT_FILE};
use crate::pivot_client::{self, Credentials};

/// What an unprivileged agent touches, next to its status file, to ask
/// root for a refresh.
pub const REFRESH_MARKER: &str = "trust-refresh";
/// An unprivileged agent asks root at most this often.
const MIN_ASK_GAP: Duration = Duration::from_secs(10);
/// How long connecting to one pivot may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// A device key is a few hundred bytes.
const MAX_KEY_FILE: u64 = 64 * 1024;

/// Why the agent would fetch the trust now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Occasion {
    /// A new connection, before the tunnel carries any login.
    Connect,
    /// Every `trust_refresh` while connected.
    Periodic,
    /// The pivot said its CA keys or revoked keys changed.
    Nudge,
}

/// How a running agent keeps the operator trust fresh.
#[derive(Debug)]
pub(crate) enum Keeper {
    /// Root, with a safe trust dir: fetch and write the files.
    Writes { dir: PathBuf },
    /// Never write; ask root's unit to refresh, when worth it.
    Asks(Asker),
}

/// An unprivileged agent's way to ask root for a refresh: touching `marker`.
#[derive(Debug)]
pub(crate) struct Asker {
    marker: Option<PathBuf>,
    /// Where root keeps [`OPERATORS_FILE`], to read when it last refreshed.
    dir: PathBuf,
    /// A refresh younger than this needs no asking, but on a nudge.
    fresh_for: Duration,
    /// When it last asked. A std `Mutex`: never held across an `.await`.
    last: Mutex<Option<Instant>>,
    warned: AtomicBool,
}

impl Keeper {
    /// Decides, once, for the trust dir `dir`, with the status file at
    /// `status_path` (the marker goes next to it) and the refresh period
    /// `trust_refresh`.
    pub(crate) fn new(dir: PathBuf, status_path: Option<&Path>, trust_refresh: Duration) -> Keeper {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        let check = |d: &Path| TrustDir::open(d).map(|_| ()).map_err(|e| e.to_string());
        Self::decide(euid, dir, status_path, trust_refresh, check)
    }

    fn decide(
        euid: u32,
        dir: PathBuf,
        status_path: Option<&Path>,
        trust_refresh: Duration,
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
        Keeper::Asks(Asker {
            marker,
            dir,
            fresh_for: trust_refresh / 2,
            last: Mutex::new(None),
            warned: AtomicBool::new(false),
        })
    }

    /// Where the agent would fetch the trust (on `occasion`): fetches and
    /// writes it, or asks root to.
    pub(crate) async fn refresh<H: client::Handler>(&self, handle: &client::Handle<H>, id: &str, occasion: Occasion) {
        match self {
            Keeper::Writes { dir } => refresh(handle, id, dir).await,
            Keeper::Asks(asker) => asker.ask(occasion).await,
        }
    }
}

/// Whether to ask root now, later, or not at all.
#[derive(Debug, PartialEq, Eq)]
enum Ask {
    Now,
    After(Duration),
    /// Why not.
    Skip(&'static str),
}

/// On `occasion` at `now`, having last asked at `last`, with a refresh
/// `fresh` enough that only a nudge needs another.
fn plan_ask(occasion: Occasion, now: Instant, last: Option<Instant>, fresh: bool) -> Ask {
    if fresh && occasion != Occasion::Nudge {
        return Ask::Skip("root refreshed the operator trust recently");
    }
    match last.map(|l| (l + MIN_ASK_GAP).saturating_duration_since(now)) {
        Some(wait) if !wait.is_zero() && occasion == Occasion::Nudge => Ask::After(wait),
        Some(wait) if !wait.is_zero() => Ask::Skip("asked for an operator trust refresh moments ago"),
        _ => Ask::Now,
    }
}

/// Whether a refresh at `pivot_time` (the pivot's clock, Unix seconds; 0
/// unknown) is younger than `fresh_for` at `now` (this device's clock).
/// A time as far ahead counts too: the two clocks may differ by a little.
fn is_fresh(pivot_time: i64, now: i64, fresh_for: Duration) -> bool {
    pivot_time > 0 && now.abs_diff(pivot_time) < fresh_for.as_secs()
}

impl Asker {
    /// Asks root for a refresh on `occasion`, unless the last refresh is
    /// recent (but on a nudge) or it asked moments ago (a nudge then waits).
    async fn ask(&self, occasion: Occasion) {
        let Some(marker) = &self.marker else { return };
        let fresh = self.last_refresh().is_some_and(|t| is_fresh(t, burrow_core::time::now_unix(), self.fresh_for));
        let last = *self.last.lock().unwrap();
        match plan_ask(occasion, Instant::now(), last, fresh) {
            Ask::Skip(why) => {
                debug!(?occasion, "not asking for an operator trust refresh: {why}");
                return;
            }
            Ask::After(wait) => tokio::time::sleep(wait).await,
            Ask::Now => {}
        }
        *self.last.lock().unwrap() = Some(Instant::now());
        match touch(marker) {
            Ok(()) => debug!(marker = %marker.display(), ?occasion, "asked for an operator trust refresh"),
            Err(e) => {
                if !self.warned.swap(true, Ordering::Relaxed) {
                    warn!(marker = %marker.display(), error = %e, "cannot ask for an operator trust refresh; burrow-trust.timer still refreshes hourly");
                }
            }
        }
    }

    /// The pivot's clock at root's last refresh, from [`OPERATORS_FILE`]
    /// (0644, root's): `None` when unknown.
    fn last_refresh(&self) -> Option<i64> {
        let bytes = read_regular(&self.dir.join(OPERATORS_FILE), 1 << 20).ok()??;
        let ops: Operators = serde_json::from_slice(&bytes).ok()?;
        Some(ops.pivot_time)
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

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn only_root_with_a_safe_dir_writes() {
        let status = Path::new("/run/burrow-agent/status.json");
        let ok = |_: &Path| Ok(());
        let unsafe_dir = |_: &Path| Err("unsafe".to_string());
        let dir = PathBuf::from("/etc/ssh/burrow");
        assert!(matches!(Keeper::decide(0, dir.clone(), Some(status), HOUR, ok), Keeper::Writes { .. }));
        for keeper in [
            Keeper::decide(0, dir.clone(), Some(status), HOUR, unsafe_dir),
            Keeper::decide(990, dir.clone(), Some(status), HOUR, ok),
        ] {
            let Keeper::Asks(asker) = keeper else { panic!("{keeper:?} writes") };
            assert_eq!(asker.marker.unwrap(), Path::new("/run/burrow-agent/trust-refresh"));
            assert_eq!(asker.fresh_for, HOUR / 2);
        }
        let Keeper::Asks(asker) = Keeper::decide(990, dir, None, HOUR, ok) else { panic!("writes") };
        assert!(asker.marker.is_none());
    }

    /// Each reconnect of an unprivileged agent made root open a second
    /// connection to the pivot, refreshed or not.
    #[test]
    fn an_agent_asks_on_connecting_only_when_the_last_refresh_is_old() {
        let now = Instant::now();
        let ago = |s: u64| Some(now - Duration::from_secs(s));
        for occasion in [Occasion::Connect, Occasion::Periodic] {
            assert_eq!(plan_ask(occasion, now, None, false), Ask::Now);
            assert!(matches!(plan_ask(occasion, now, None, true), Ask::Skip(_)), "fresh");
            assert!(matches!(plan_ask(occasion, now, ago(3), false), Ask::Skip(_)), "asked 3 s ago");
            assert_eq!(plan_ask(occasion, now, ago(10), false), Ask::Now);
        }
        // A nudge always asks, fresh or not; within 10 s of the last, later.
        assert_eq!(plan_ask(Occasion::Nudge, now, None, true), Ask::Now);
        assert_eq!(plan_ask(Occasion::Nudge, now, ago(3), true), Ask::After(Duration::from_secs(7)));
        assert_eq!(plan_ask(Occasion::Nudge, now, ago(11), false), Ask::Now);

        let half = HOUR / 2;
        let t = 1_700_000_000;
        assert!(is_fresh(t - 60, t, half));
        assert!(!is_fresh(t - 1800, t, half), "half the period old");
        assert!(!is_fresh(0, t, half), "unknown");
        assert!(is_fresh(t + 60, t, half), "a pivot clock a little ahead");
        assert!(!is_fresh(t + 7200, t, half), "or far off");
    }

    /// The agent reads when root last refreshed from operators.json, and
    /// asks (touches the marker) only when that is old, or on a nudge.
    #[tokio::test(start_paused = true)]
    async fn asking_reads_the_last_refresh_and_waits_out_the_gap() {
        let tmp = TempDir::new("ask");
        let marker = tmp.0.join(REFRESH_MARKER);
        let ops = |pivot_time: i64| {
            let json = serde_json::json!({ "id": "cam-42", "labels": {}, "pivot_time": pivot_time });
            std::fs::write(tmp.0.join(OPERATORS_FILE), json.to_string()).unwrap();
        };
        let asker = Asker {
            marker: Some(marker.clone()),
            dir: tmp.0.clone(),
            fresh_for: HOUR / 2,
            last: Mutex::new(None),
            warned: AtomicBool::new(false),
        };
        ops(burrow_core::time::now_unix() - 60);
        asker.ask(Occasion::Connect).await;
        assert!(!marker.exists(), "refreshed a minute ago: no need to ask");
        ops(burrow_core::time::now_unix() - 3600);
        asker.ask(Occasion::Connect).await;
        assert!(marker.exists(), "an hour old: asked");
        std::fs::remove_file(&marker).unwrap();
        asker.ask(Occasion::Periodic).await;
        assert!(!marker.exists(), "not twice within 10 s");
        let before = Instant::now();
        asker.ask(Occasion::Nudge).await;
        assert!(marker.exists(), "a nudge asks, once the 10 s are up");
        let waited = Instant::now() - before;
        assert!(waited >= MIN_ASK_GAP && waited < MIN_ASK_GAP + Duration::from_secs(1), "{waited:?}");
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
