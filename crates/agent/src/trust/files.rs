//! The files in the trust dir, written only by root: what sshd reads
//! ([`USER_CA_FILE`], [`REVOKED_KEYS_FILE`], [`OPERATORS_FILE`]) and what a
//! root refresh connects with ([`PIVOT_FILE`]). Each is written atomically,
//! mode 0644 (none holds a secret, and `nobody` reads [`OPERATORS_FILE`]),
//! after checking the dir again.

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use burrow_core::agent_file::AgentFile;
use burrow_core::cert::DeviceTrust;
use burrow_core::HostKeyPin;
use serde::{Deserialize, Serialize};

use super::safe::{open_regular, read_capped, write_atomic, DirError, TrustDir};
use super::{TrustError, OPERATORS_FILE, PIVOT_FILE, REVOKED_KEYS_FILE, USER_CA_FILE};

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Dir(#[from] DirError),
    #[error("cannot write {0}")]
    Write(String, #[source] io::Error),
    #[error("a key to write in {0} spans several lines")]
    MultiLine(String),
}

/// What [`OPERATORS_FILE`] holds: enough for `principals` to answer
/// quickly, without the (possibly many) keys.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Operators {
    pub id: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The pivot's clock at the last refresh (Unix seconds; 0: unknown).
    #[serde(default)]
    pub pivot_time: i64,
}

/// Writes the trust files into `dir` (created 0755 if missing; see
/// [`write_in`]). Returns whether the CA keys, revoked keys or labels
/// changed.
pub fn write(dir: &std::path::Path, trust: &DeviceTrust) -> Result<bool, WriteError> {
    let (dir, _) = TrustDir::create(dir)?;
    write_in(&dir, trust)
}

/// Writes the trust files into `dir`. A file whose content is unchanged is
/// left alone. The revoked keys and labels go first, the CA keys last, so
/// a new CA is never trusted before the keys it must refuse are in place.
/// Returns whether the CA keys, revoked keys or labels changed (the
/// pivot's clock alone does not count). `trust` is as `fetch` returns it.
pub fn write_in(dir: &TrustDir, trust: &DeviceTrust) -> Result<bool, WriteError> {
    let operators = Operators { id: trust.id.clone(), labels: trust.labels.clone(), pivot_time: trust.pivot_time };
    let mut json = serde_json::to_string_pretty(&operators).expect("operators serialize");
    json.push('\n');
    let before = read_operators(dir);
    let mut changed = write_if_changed(dir, REVOKED_KEYS_FILE, lines(dir, REVOKED_KEYS_FILE, &trust.revoked_keys)?)?;
    write_if_changed(dir, OPERATORS_FILE, json.as_bytes())?;
    changed |= before.is_none_or(|b| b.id != operators.id || b.labels != operators.labels);
    changed |= write_if_changed(dir, USER_CA_FILE, lines(dir, USER_CA_FILE, &trust.ca_keys)?)?;
    Ok(changed)
}

fn read_operators(dir: &TrustDir) -> Option<Operators> {
    let (file, meta) = open_regular(&dir.file(OPERATORS_FILE)).ok()??;
    serde_json::from_slice(&read_capped(file, &meta, 1 << 20).ok()?).ok()
}

/// Creates an empty [`REVOKED_KEYS_FILE`] in `dir` unless one is there, so
/// that a drop-in naming it never makes sshd refuse every key. `made_dir`
/// says whether this run created `dir` itself. Returns what it created,
/// for a run that fails before it counts to take back.
pub fn ensure_revoked_keys(dir: &TrustDir, made_dir: bool) -> Result<Created, WriteError> {
    let mut created = Created { dir: made_dir.then(|| dir.path().to_path_buf()), file: None };
    let path = dir.file(REVOKED_KEYS_FILE);
    let fail = |created: Created, e: WriteError| {
        created.undo();
        Err(e)
    };
    if let Err(e) = dir.recheck() {
        return fail(created, e.into());
    }
    match open_regular(&path) {
        Ok(Some(_)) => {}
        Ok(None) => {
            if let Err(e) = write_atomic(&path, b"", 0o644) {
                return fail(created, WriteError::Write(path.display().to_string(), e));
            }
            created.file = Some(path);
        }
        Err(e) => return fail(created, WriteError::Write(path.display().to_string(), e)),
    }
    Ok(created)
}

/// What [`ensure_revoked_keys`] created: nothing that was there before.
#[derive(Debug)]
#[must_use = "a run that fails must undo what it created"]
pub struct Created {
    dir: Option<PathBuf>,
    file: Option<PathBuf>,
}

impl Created {
    /// Removes the file, then the directory if still empty: something
    /// else may have been put in it since.
    pub fn undo(self) {
        if let Some(file) = &self.file {
            let _ = std::fs::remove_file(file);
        }
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

fn lines(dir: &TrustDir, name: &str, entries: &[String]) -> Result<Vec<u8>, WriteError> {
    let mut out = String::with_capacity(entries.iter().map(|e| e.len() + 1).sum());
    for e in entries {
        if e.contains(['\n', '\r']) {
            return Err(WriteError::MultiLine(dir.file(name).display().to_string()));
        }
        out.push_str(e);
        out.push('\n');
    }
    Ok(out.into_bytes())
}

/// Writes `bytes` as `dir`/`name` unless it holds them already (then only
/// its mode is set right, through the open file: never a symlink's
/// target). Returns whether the content changed.
fn write_if_changed(dir: &TrustDir, name: &str, bytes: impl AsRef<[u8]>) -> Result<bool, WriteError> {
    let bytes = bytes.as_ref();
    dir.recheck()?;
    let path = dir.file(name);
    let err = |e| WriteError::Write(path.display().to_string(), e);
    if let Some((mut file, meta)) = open_regular(&path).map_err(err)? {
        if meta.len() == bytes.len() as u64 {
            let mut old = Vec::with_capacity(bytes.len());
            file.read_to_end(&mut old).map_err(err)?;
            if old == bytes {
                if meta.mode() & 0o7777 != 0o644 {
                    use std::os::unix::fs::PermissionsExt;
                    file.set_permissions(std::fs::Permissions::from_mode(0o644)).map_err(err)?;
                }
                return Ok(false);
            }
        }
    }
    write_atomic(&path, bytes, 0o644).map_err(err)?;
    Ok(true)
}

/// What root connects to the pivot with, in [`PIVOT_FILE`]: written by
/// root's `enroll` from the token it was given (and by `trust-operators`
/// on a device enrolled before), and read by `trust-operators` and
/// `trust-operators --refresh`, so that root never takes the pivot, its
/// pin or the device from a file the agent's user can change. The device
/// key it names may be the agent's to replace: a key that is not the
/// device's only fails authentication.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PivotFile {
    pub id: String,
    /// `HOST:PORT`, tried in turn.
    pub pivots: Vec<String>,
    /// The pinned pivot host key's fingerprint (`SHA256:...`).
    pub pivot_host_key: String,
    /// The device's private key.
    pub key: PathBuf,
}

impl PivotFile {
    /// The agent config's pivot, pin (a `.pub` file read into its
    /// fingerprint now) and device key.
    pub fn from_agent_file(file: &AgentFile, config: &std::path::Path) -> Result<PivotFile, TrustError> {
        let pin = HostKeyPin::parse(&file.pivot_host_key)
            .map_err(|_| TrustError::Pin { pin: file.pivot_host_key.clone(), from: config.display().to_string() })?;
        Ok(PivotFile {
            id: file.id.clone(),
            pivots: vec![file.server.clone()],
            pivot_host_key: pin.fingerprint(),
            key: file.key.clone(),
        })
    }

    /// Writes it into `dir`; returns whether it changed.
    pub fn save(&self, dir: &TrustDir) -> Result<bool, WriteError> {
        let text = format!(
            "# Written by `burrow agent enroll` (as root), for `trust-operators` and\n\
             # `trust-operators --refresh`, which connect as this device with only what is here.\n{}",
            toml::to_string(self).expect("pivot file serializes")
        );
        write_if_changed(dir, PIVOT_FILE, text)
    }

    /// Reads it from `dir`; the file must be root's alone, as the dir is.
    pub fn load(dir: &TrustDir) -> Result<PivotFile, TrustError> {
        let path = dir.file(PIVOT_FILE);
        let shown = || path.display().to_string();
        dir.recheck()?;
        let (file, meta) = match open_regular(&path) {
            Ok(Some(f)) => f,
            Ok(None) => return Err(TrustError::NoPivotFile(shown())),
            Err(e) => return Err(TrustError::ReadPivotFile(shown(), e)),
        };
        if let Some(why) = dir.why_unsafe(&meta) {
            return Err(TrustError::UnsafePivotFile { path: shown(), why });
        }
        let bytes = read_capped(file, &meta, 64 * 1024).map_err(|e| TrustError::ReadPivotFile(shown(), e))?;
        let text = String::from_utf8(bytes).map_err(|_| TrustError::BadPivotFile(shown(), "not UTF-8".into()))?;
        let pivot: PivotFile = toml::from_str(&text).map_err(|e| TrustError::BadPivotFile(shown(), e.to_string()))?;
        if pivot.pivots.is_empty() {
            return Err(TrustError::BadPivotFile(shown(), "it names no pivot".into()));
        }
        Ok(pivot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trust::tests::{key, line, trust, TempDir};
    use std::os::unix::fs::PermissionsExt;

    fn mode(path: &std::path::Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn write_is_atomic_0644_and_says_what_changed() {
        let tmp = TempDir::new("write");
        let (dir, _) = TrustDir::under(&tmp.0, &tmp.0.join("trust"));
        let t = trust("cam-42", &[("site", "berlin")], 2, 0);
        assert!(write_in(&dir, &t).unwrap());
        assert_eq!(mode(dir.path()), 0o755);
        for name in [USER_CA_FILE, REVOKED_KEYS_FILE, OPERATORS_FILE] {
            assert_eq!(mode(&dir.file(name)), 0o644, "{name}");
        }
        assert_eq!(std::fs::read_to_string(dir.file(REVOKED_KEYS_FILE)).unwrap(), "", "exists, even empty");
        assert_eq!(std::fs::read_to_string(dir.file(USER_CA_FILE)).unwrap(), format!("{}\n", t.ca_keys.join("\n")));
        let ops = read_operators(&dir).unwrap();
        assert_eq!((ops.id.as_str(), ops.labels), ("cam-42", t.labels.clone()));

        assert!(!write_in(&dir, &t).unwrap(), "the same trust changes nothing");
        let later = DeviceTrust { pivot_time: t.pivot_time + 3600, ..t.clone() };
        assert!(!write_in(&dir, &later).unwrap(), "the pivot's clock alone is no change");
        assert_eq!(read_operators(&dir).unwrap().pivot_time, later.pivot_time, "but it is kept");
        std::fs::set_permissions(dir.file(USER_CA_FILE), std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(!write_in(&dir, &later).unwrap());
        assert_eq!(mode(&dir.file(USER_CA_FILE)), 0o644, "a wrong mode is put right");

        let before = std::fs::metadata(dir.file(USER_CA_FILE)).unwrap().ino();
        let revoked = DeviceTrust { revoked_keys: vec![line(&key())], ..later.clone() };
        assert!(write_in(&dir, &revoked).unwrap());
        assert_eq!(std::fs::metadata(dir.file(USER_CA_FILE)).unwrap().ino(), before, "unchanged file left alone");
        assert_eq!(
            std::fs::read_to_string(dir.file(REVOKED_KEYS_FILE)).unwrap(),
            format!("{}\n", revoked.revoked_keys[0])
        );
        let relabeled = DeviceTrust { labels: [("site".into(), "paris".into())].into(), ..revoked.clone() };
        assert!(write_in(&dir, &relabeled).unwrap(), "new labels are a change");
        // No temp file is left behind.
        let mut names: Vec<String> =
            std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        assert_eq!(names, [OPERATORS_FILE, REVOKED_KEYS_FILE, USER_CA_FILE]);

        let smuggled = DeviceTrust { ca_keys: vec![format!("{}\ncert-authority x", t.ca_keys[0])], ..t.clone() };
        assert!(matches!(write_in(&dir, &smuggled), Err(WriteError::MultiLine(_))));
    }

    /// A symlink at a trust file's name made root chmod (or overwrite) its target.
    #[test]
    fn a_symlink_at_a_trust_files_name_is_replaced_not_followed() {
        let tmp = TempDir::new("write-link");
        let (dir, _) = TrustDir::under(&tmp.0, &tmp.0.join("trust"));
        let t = trust("cam-42", &[], 1, 0);
        let victim = tmp.0.join("victim");
        // The same bytes: an unchanged file would only have its mode set.
        std::fs::write(&victim, format!("{}\n", t.ca_keys[0])).unwrap();
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::symlink(&victim, dir.file(USER_CA_FILE)).unwrap();
        write_in(&dir, &t).unwrap();
        assert_eq!(mode(&victim), 0o600, "the target's mode is untouched");
        assert!(std::fs::symlink_metadata(dir.file(USER_CA_FILE)).unwrap().is_file());
    }

    #[test]
    fn ensure_revoked_keys_keeps_what_is_there() {
        let tmp = TempDir::new("revoked");
        let path = tmp.0.join("trust");
        let (dir, made) = TrustDir::under(&tmp.0, &path);
        ensure_revoked_keys(&dir, made).unwrap().undo();
        assert!(!path.exists(), "undo takes back the dir it made");
        let (dir, made) = TrustDir::under(&tmp.0, &path);
        let _kept = ensure_revoked_keys(&dir, made).unwrap();
        assert_eq!(std::fs::read_to_string(dir.file(REVOKED_KEYS_FILE)).unwrap(), "");
        std::fs::write(dir.file(REVOKED_KEYS_FILE), "ssh-ed25519 AAAA\n").unwrap();
        ensure_revoked_keys(&dir, false).unwrap().undo();
        assert_eq!(std::fs::read_to_string(dir.file(REVOKED_KEYS_FILE)).unwrap(), "ssh-ed25519 AAAA\n");
    }

    /// A failed enroll left an empty trust/revoked_keys behind.
    #[test]
    fn undo_removes_only_what_this_run_created() {
        let tmp = TempDir::new("undo");
        let path = tmp.0.join("trust");
        let (dir, made) = TrustDir::under(&tmp.0, &path);
        let created = ensure_revoked_keys(&dir, made).unwrap();
        assert!(dir.file(REVOKED_KEYS_FILE).exists());
        created.undo();
        assert!(!path.exists(), "the dir it made is gone");
        assert!(tmp.0.exists(), "the dir that was there stays");

        // An existing dir with a file of its own: only the new file goes.
        let (dir, made) = TrustDir::under(&tmp.0, &path);
        std::fs::write(dir.file(USER_CA_FILE), "kept\n").unwrap();
        ensure_revoked_keys(&dir, false).unwrap().undo();
        assert!(!dir.file(REVOKED_KEYS_FILE).exists());
        assert_eq!(std::fs::read_to_string(dir.file(USER_CA_FILE)).unwrap(), "kept\n");

        // A dir it made that something else filled meanwhile stays.
        let created = ensure_revoked_keys(&dir, made).unwrap();
        created.undo();
        assert!(path.exists() && dir.file(USER_CA_FILE).exists());
    }

    #[test]
    fn the_pivot_file_round_trips_and_must_be_roots_alone() {
        let tmp = TempDir::new("pivot-file");
        let (dir, _) = TrustDir::under(&tmp.0, &tmp.0.join("trust"));
        assert!(matches!(PivotFile::load(&dir), Err(TrustError::NoPivotFile(_))));
        let agent = AgentFile {
            id: "cam-42".into(),
            server: "pivot:2222".into(),
            key: "/etc/burrow/device_key".into(),
            pivot_host_key: "SHA256:uNiVztksCsDhcc0u9e8BujQXVUpKZIDTMczCvj3tD2s".into(),
            expose: vec![],
            mqtt_url: None,
            mqtt_fingerprint: None,
            always_on: true,
            trust_dir: None,
        };
        let pivot = PivotFile::from_agent_file(&agent, "agent.toml".as_ref()).unwrap();
        assert_eq!(pivot.pivots, ["pivot:2222"]);
        assert!(pivot.save(&dir).unwrap());
        assert!(!pivot.save(&dir).unwrap());
        assert_eq!(mode(&dir.file(PIVOT_FILE)), 0o644);
        assert_eq!(PivotFile::load(&dir).unwrap(), pivot);

        std::fs::set_permissions(dir.file(PIVOT_FILE), std::fs::Permissions::from_mode(0o666)).unwrap();
        let err = PivotFile::load(&dir).unwrap_err().to_string();
        assert!(err.contains("pivot.toml is writable by others (mode 666)"), "{err}");
        std::fs::write(dir.file(PIVOT_FILE), "id = 'x'\nbogus = 1\n").unwrap();
        std::fs::set_permissions(dir.file(PIVOT_FILE), std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(PivotFile::load(&dir), Err(TrustError::BadPivotFile(..))));

        let bad_pin = AgentFile { pivot_host_key: "/no/such/pivot.pub".into(), ..agent };
        let err = PivotFile::from_agent_file(&bad_pin, "/etc/burrow/agent.toml".as_ref()).unwrap_err().to_string();
        assert!(err.contains("'/no/such/pivot.pub' in /etc/burrow/agent.toml"), "{err}");
    }
}
