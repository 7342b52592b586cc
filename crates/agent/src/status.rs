//! The agent's state, written to a small JSON file whenever it changes, for
//! `burrow agent status` (and for whatever watches the device).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use burrow_core::time::now_unix;
use serde::{Deserialize, Serialize};
use tracing::warn;

/// Where a running agent keeps its status when none is given: under /run
/// for root (systemd's `RuntimeDirectory=burrow-agent`), else in the user's
/// runtime dir, else in their home.
pub fn default_status_path() -> PathBuf {
    if let Some(dir) = std::env::var_os("RUNTIME_DIRECTORY") {
        return PathBuf::from(dir).join("status.json");
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/run/burrow-agent/status.json");
    }
    match (std::env::var_os("XDG_RUNTIME_DIR"), std::env::var_os("HOME")) {
        (Some(run), _) => PathBuf::from(run).join("burrow-agent/status.json"),
        (None, Some(home)) => PathBuf::from(home).join(".local/state/burrow-agent/status.json"),
        (None, None) => PathBuf::from("burrow-agent-status.json"),
    }
}

/// What the agent is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    /// Dialing the pivot (or the broker).
    Connecting,
    /// The tunnel is up.
    Connected,
    /// On demand: connected to the broker, waiting for a wake-up.
    Waiting,
    /// A failure that retrying may fix (the pivot unreachable, say).
    Retrying,
    /// A refusal that retrying will not fix by itself: a revoked device, an
    /// unknown key, a host-key mismatch. Retried slowly.
    Refused,
    Stopped,
}

impl State {
    /// Working as configured.
    pub fn healthy(self) -> bool {
        matches!(self, State::Connected | State::Waiting)
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            State::Connecting => "connecting",
            State::Connected => "connected",
            State::Waiting => "waiting for wake-ups",
            State::Retrying => "retrying",
            State::Refused => "refused",
            State::Stopped => "stopped",
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub pid: u32,
    pub id: String,
    /// "always-on" or "on-demand".
    pub mode: String,
    pub state: State,
    /// Why, for `retrying` and `refused`: the pivot's own words where it gave any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The pivot dialed last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pivot: Option<String>,
    /// When the agent entered this state (Unix seconds).
    pub since: i64,
}

/// A status file is a few hundred bytes.
const MAX_STATUS_FILE: u64 = 64 * 1024;

impl Status {
    /// Reads the status file at `path`: a regular file, opened without
    /// following a symlink or blocking on a FIFO, since root may read what
    /// the agent's user wrote. Its strings are the agent's: escape them
    /// before showing them ([`burrow_core::text::printable`]).
    pub fn read(path: &Path) -> std::io::Result<Status> {
        use std::io::{Error, ErrorKind, Read};
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ELOOP) => Error::other("a symbolic link, not a status file"),
                _ => e,
            })?;
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(Error::other("not a regular file"));
        }
        let mut bytes = Vec::new();
        file.take(MAX_STATUS_FILE + 1).read_to_end(&mut bytes)?;
        if bytes.len() as u64 > MAX_STATUS_FILE {
            return Err(Error::new(ErrorKind::InvalidData, format!("larger than {MAX_STATUS_FILE} bytes")));
        }
        serde_json::from_slice(&bytes).map_err(|e| Error::new(ErrorKind::InvalidData, e))
    }
}

/// The running agent's status and where it goes.
pub(crate) struct StatusFile {
    path: Option<PathBuf>,
    now: Mutex<Status>,
    warned: std::sync::atomic::AtomicBool,
}

impl StatusFile {
    pub(crate) fn new(path: Option<PathBuf>, id: &str, mode: &str) -> Self {
        let now = Status {
            pid: std::process::id(),
            id: id.to_string(),
            mode: mode.to_string(),
            state: State::Connecting,
            reason: None,
            pivot: None,
            since: now_unix(),
        };
        StatusFile { path, now: Mutex::new(now), warned: Default::default() }
    }

    /// The status now.
    pub(crate) fn snapshot(&self) -> Status {
        self.now.lock().unwrap().clone()
    }

    /// Records a state; the file is rewritten only when something changed.
    pub(crate) fn set(&self, state: State, reason: Option<String>, pivot: Option<&str>) {
        let snapshot = {
            let mut now = self.now.lock().unwrap();
            let pivot = pivot.map(str::to_string).or_else(|| now.pivot.clone());
            if now.state == state && now.reason == reason && now.pivot == pivot {
                return;
            }
            if now.state != state {
                now.since = now_unix();
            }
            now.state = state;
            now.reason = reason;
            now.pivot = pivot;
            now.clone()
        };
        self.write(&snapshot);
    }

    fn write(&self, status: &Status) {
        let Some(path) = &self.path else { return };
        let written = (|| {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)?;
            }
            // A fresh name, created (never followed through a symlink) and
            // then renamed over the status: a shared directory cannot make
            // the agent write elsewhere.
            let tmp = path.with_extension(format!("{:016x}.tmp", rand::random::<u64>()));
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o644)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&tmp)?;
            let done = f
                .write_all(&serde_json::to_vec_pretty(status).expect("status serializes"))
                .and_then(|()| std::fs::rename(&tmp, path));
            if done.is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
            done
        })();
        if let Err(e) = written {
            if !self.warned.swap(true, std::sync::atomic::Ordering::Relaxed) {
                warn!(path = %path.display(), error = %e, "cannot write the agent status; give --status-file");
            }
        }
    }
}

/// Serves `GET /healthz` on `listener`: 200 with the status as JSON while
/// the agent is connected or waiting for wake-ups, 503 otherwise. Anything
/// else gets 404. One small request per connection, read within 5 s.
pub(crate) async fn serve_health(
    listener: tokio::net::TcpListener,
    status: std::sync::Arc<StatusFile>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A few requests at a time: a flood cannot take the agent's descriptors.
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(16));
    loop {
        let slot = tokio::select! {
            _ = shutdown.cancelled() => return,
            s = slots.clone().acquire_owned() => s.expect("never closed"),
        };
        let (mut stream, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(a) => a,
                Err(_) => {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let now = status.snapshot();
        tokio::spawn(async move {
            let _slot = slot;
            let mut buf = vec![0u8; 2048];
            let mut got = 0;
            let read = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                while got < buf.len() {
                    let n = stream.read(&mut buf[got..]).await.ok()?;
                    if n == 0 {
                        break;
                    }
                    got += n;
                    if buf[..got].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                Some(())
            })
            .await;
            if read.is_err() {
                return;
            }
            let line = String::from_utf8_lossy(&buf[..got]);
            let path = line.split_whitespace().nth(1).unwrap_or("");
            let (code, body) = if path == "/healthz" {
                let body = serde_json::to_string(&now).expect("status serializes") + "\n";
                (if now.state.healthy() { "200 OK" } else { "503 Service Unavailable" }, body)
            } else {
                ("404 Not Found", "not found; try /healthz\n".to_string())
            };
            let reply = format!(
                "HTTP/1.1 {code}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(reply.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trust::tests::TempDir;

    /// `agent status` as root followed a symlink the agent's user put at
    /// the status file, and blocked forever on a FIFO there.
    #[test]
    fn reading_the_status_follows_no_symlink_and_never_blocks() {
        let tmp = TempDir::new("status-read");
        let path = tmp.0.join("status.json");
        let file = StatusFile::new(Some(path.clone()), "cam-42", "always-on");
        file.set(State::Connected, Some("fine\x1b[2J".into()), Some("pivot:2222"));
        let read = Status::read(&path).unwrap();
        assert_eq!((read.id.as_str(), read.state), ("cam-42", State::Connected));
        assert_eq!(read.reason.as_deref(), Some("fine\x1b[2J"), "kept as written; escaped when shown");

        let link = tmp.0.join("link.json");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        let err = Status::read(&link).unwrap_err();
        assert!(err.to_string().contains("symbolic link"), "{err}");
        let fifo = tmp.0.join("fifo.json");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        assert!(Status::read(&fifo).unwrap_err().to_string().contains("not a regular file"));
    }
}
