//! Keeping the files sshd trusts root's alone. The trust dir and every
//! directory above it must be owned by root and writable by no one else
//! (what OpenSSH's `safe_path` asks of what it trusts; a sticky
//! world-writable directory such as /tmp does not pass), and checked again
//! before every write. Files are written under fresh random names that no
//! symlink can redirect, then renamed into place.

use std::fs::{File, Metadata, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::DEFAULT_TRUST_DIR;

#[derive(Debug, thiserror::Error)]
pub enum DirError {
    #[error(
        "{path} {why}: the files sshd trusts must be root's alone; choose another --trust-dir, e.g. {DEFAULT_TRUST_DIR}"
    )]
    Unsafe { path: String, why: String },
    #[error("{0} is not a directory; choose another --trust-dir, e.g. {DEFAULT_TRUST_DIR}")]
    NotDir(String),
    #[error(
        "{0} does not exist: create it (root's, mode 755) or choose another --trust-dir, e.g. {DEFAULT_TRUST_DIR}"
    )]
    Missing(String),
    #[error("cannot inspect {0}")]
    Stat(String, #[source] io::Error),
    #[error("cannot create {0}")]
    Create(String, #[source] io::Error),
}

/// Why root does not read a file it would take a trust decision from.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// `path` (the file or a directory above it) is not root's alone.
    #[error("{path} {why}")]
    Unsafe { path: String, why: String },
    #[error("cannot read {0}")]
    Read(String, #[source] io::Error),
}

/// Who must own the trust dir and the directories above it, and the last
/// one to check.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rules {
    uid: u32,
    /// `/`; a test's own temp dir in unit tests.
    top: PathBuf,
}

impl Rules {
    fn root() -> Rules {
        Rules { uid: 0, top: PathBuf::from("/") }
    }
}

/// A trust dir found safe: it and every directory above it are owned by
/// root and writable by no one else.
#[derive(Debug, Clone)]
pub struct TrustDir {
    path: PathBuf,
    rules: Rules,
}

impl TrustDir {
    /// `path`, which must exist and be safe.
    pub fn open(path: &Path) -> Result<TrustDir, DirError> {
        let path = absolute(path)?;
        check_existing(&path, &Rules::root())?;
        Ok(TrustDir { path, rules: Rules::root() })
    }

    /// `path`, created 0755 if missing (its parent must be safe), and
    /// whether this call created it.
    pub fn create(path: &Path) -> Result<(TrustDir, bool), DirError> {
        create_with(path, Rules::root())
    }

    /// Whether `path` is safe, or, if missing, could be created safely:
    /// before anything is written or spent.
    pub fn check(path: &Path) -> Result<(), DirError> {
        let path = absolute(path)?;
        match std::fs::symlink_metadata(&path) {
            Ok(_) => check_existing(&path, &Rules::root()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                check_existing(path.parent().unwrap_or(Path::new("/")), &Rules::root())
            }
            Err(e) => Err(DirError::Stat(path.display().to_string(), e)),
        }
    }

    /// A trust dir in a test's temp dir `top`, owned by whoever runs the test.
    #[cfg(test)]
    pub(crate) fn under(top: &Path, path: &Path) -> (TrustDir, bool) {
        // SAFETY: geteuid has no preconditions.
        let uid = unsafe { libc::geteuid() };
        create_with(path, Rules { uid, top: top.to_path_buf() }).unwrap()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Checks again, before each write: a directory above may have changed.
    pub fn recheck(&self) -> Result<(), DirError> {
        check_existing(&self.path, &self.rules)
    }

    /// Why a file in this dir (its metadata `meta`) is not root's alone, if it is not.
    pub(crate) fn why_unsafe(&self, meta: &Metadata) -> Option<String> {
        why_unsafe(meta, &self.rules)
    }
}

fn absolute(path: &Path) -> Result<PathBuf, DirError> {
    std::path::absolute(path).map_err(|e| DirError::Stat(path.display().to_string(), e))
}

fn create_with(path: &Path, rules: Rules) -> Result<(TrustDir, bool), DirError> {
    let path = absolute(path)?;
    let shown = || path.display().to_string();
    let missing = match std::fs::symlink_metadata(&path) {
        Ok(_) => false,
        Err(e) if e.kind() == io::ErrorKind::NotFound => true,
        Err(e) => return Err(DirError::Stat(shown(), e)),
    };
    let mut created = false;
    if missing {
        check_existing(path.parent().unwrap_or(Path::new("/")), &rules)?;
        match std::fs::DirBuilder::new().mode(0o755).create(&path) {
            Ok(()) => created = true,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(DirError::Create(shown(), e)),
        }
        if created {
            // The umask may have taken bits away; `nobody` must get through.
            let mode = std::fs::Permissions::from_mode(0o755);
            if let Err(e) = std::fs::set_permissions(&path, mode) {
                let _ = std::fs::remove_dir(&path);
                return Err(DirError::Create(shown(), e));
            }
        }
    }
    if let Err(e) = check_existing(&path, &rules) {
        if created {
            let _ = std::fs::remove_dir(&path);
        }
        return Err(e);
    }
    Ok((TrustDir { path, rules }, created))
}

/// `path` is a directory, and it and every directory above it, both as
/// written and with symlinks resolved, are safe.
fn check_existing(path: &Path, rules: &Rules) -> Result<(), DirError> {
    let shown = || path.display().to_string();
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => return Err(DirError::NotDir(shown())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(DirError::Missing(shown())),
        Err(e) => return Err(DirError::Stat(shown(), e)),
    }
    // Whoever can write a directory on the way can swap what is below it:
    // a symlink's own directory is checked here, its target below.
    walk_up(path, rules)?;
    let real = std::fs::canonicalize(path).map_err(|e| DirError::Stat(shown(), e))?;
    if real != path {
        walk_up(&real, rules)?;
    }
    Ok(())
}

fn walk_up(path: &Path, rules: &Rules) -> Result<(), DirError> {
    for at in path.ancestors().filter(|a| !a.as_os_str().is_empty()) {
        let meta = std::fs::symlink_metadata(at).map_err(|e| DirError::Stat(at.display().to_string(), e))?;
        if !meta.file_type().is_symlink() {
            check_meta(at, &meta, rules)?;
        }
        if at == rules.top {
            break;
        }
    }
    Ok(())
}

fn check_meta(path: &Path, meta: &Metadata, rules: &Rules) -> Result<(), DirError> {
    match why_unsafe(meta, rules) {
        None => Ok(()),
        Some(why) => Err(DirError::Unsafe { path: path.display().to_string(), why }),
    }
}

fn why_unsafe(meta: &Metadata, rules: &Rules) -> Option<String> {
    let mode = meta.mode() & 0o7777;
    if meta.uid() != rules.uid {
        Some(format!("is owned by {}, not {}", owner_name(meta.uid()), owner_name(rules.uid)))
    } else if mode & 0o002 != 0 {
        Some(format!("is writable by others (mode {mode:o})"))
    } else if mode & 0o020 != 0 {
        Some(format!("is writable by its group (mode {mode:o})"))
    } else {
        None
    }
}

fn owner_name(uid: u32) -> String {
    if uid == 0 {
        "root".into()
    } else {
        format!("uid {uid}")
    }
}

/// The content of the regular file at `path` (at most `max` bytes), read
/// only when the file, its directory and every directory above are root's
/// alone, as the trust dir must be, and `path` itself is no symlink: what
/// no other user can have changed.
pub fn read_roots_alone(path: &Path, max: u64) -> Result<Vec<u8>, FileError> {
    read_checked(path, max, &Rules::root())
}

fn read_checked(path: &Path, max: u64, rules: &Rules) -> Result<Vec<u8>, FileError> {
    let read_err = |p: &Path, e| FileError::Read(p.display().to_string(), e);
    let path = std::path::absolute(path).map_err(|e| read_err(path, e))?;
    let dir = path.parent().unwrap_or(Path::new("/"));
    check_existing(dir, rules).map_err(|e| match e {
        DirError::Unsafe { path, why } => FileError::Unsafe { path, why },
        DirError::Stat(p, e) => FileError::Read(p, e),
        DirError::Missing(_) => read_err(&path, io::ErrorKind::NotFound.into()),
        other => read_err(dir, io::Error::other(other.to_string())),
    })?;
    let unsafe_file = |why: &str| FileError::Unsafe { path: path.display().to_string(), why: why.into() };
    let file = match OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(&path) {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return Err(unsafe_file("is a symbolic link")),
        Err(e) => return Err(read_err(&path, e)),
    };
    let meta = file.metadata().map_err(|e| read_err(&path, e))?;
    if !meta.is_file() {
        return Err(unsafe_file("is not a regular file"));
    }
    if let Some(why) = why_unsafe(&meta, rules) {
        return Err(unsafe_file(&why));
    }
    read_capped(file, &meta, max).map_err(|e| read_err(&path, e))
}

/// Writes a file so that readers see the old content or the new, never a
/// part, and no symlink can send the bytes elsewhere: mode `mode` exactly
/// ([`burrow_core::atomic`]).
pub(crate) fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    burrow_core::atomic::write_file(path, bytes, burrow_core::atomic::Mode::Exact(mode))
}

/// The regular file at `path`, opened for reading without following a
/// symlink there or blocking on a FIFO; `None` when there is none (or
/// something else is there).
pub(crate) fn open_regular(path: &Path) -> io::Result<Option<(File, Metadata)>> {
    match OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(path) {
        Ok(f) => {
            let meta = f.metadata()?;
            Ok(meta.is_file().then_some((f, meta)))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ELOOP) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The content of the regular file at `path`, if it has at most `max`
/// bytes; `None` when there is no such file.
pub(crate) fn read_regular(path: &Path, max: u64) -> io::Result<Option<Vec<u8>>> {
    let Some((file, meta)) = open_regular(path)? else { return Ok(None) };
    read_capped(file, &meta, max).map(Some)
}

pub(crate) fn read_capped(file: File, meta: &Metadata, max: u64) -> io::Result<Vec<u8>> {
    if meta.len() > max {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("larger than {max} bytes")));
    }
    let mut out = Vec::with_capacity(meta.len() as usize);
    file.take(max + 1).read_to_end(&mut out)?;
    if out.len() as u64 > max {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("larger than {max} bytes")));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trust::tests::{chmod, TempDir};

    fn test_rules(top: &Path) -> Rules {
        // SAFETY: geteuid has no preconditions.
        Rules { uid: unsafe { libc::geteuid() }, top: top.to_path_buf() }
    }

    #[test]
    fn a_dir_others_or_its_group_can_write_is_refused_even_sticky() {
        let tmp = TempDir::new("safe-modes");
        let rules = test_rules(&tmp.0);
        let shared = tmp.0.join("shared");
        let trust = shared.join("trust");
        std::fs::create_dir_all(&trust).unwrap();
        chmod(&trust, 0o755);
        for (mode, why) in [
            (0o1777, "is writable by others (mode 1777)"),
            (0o777, "is writable by others (mode 777)"),
            (0o775, "is writable by its group (mode 775)"),
        ] {
            chmod(&shared, mode);
            let text = check_existing(&trust, &rules).unwrap_err().to_string();
            assert_eq!(
                text,
                format!(
                    "{} {why}: the files sshd trusts must be root's alone; choose another --trust-dir, e.g. /etc/ssh/burrow",
                    shared.display()
                )
            );
        }
        chmod(&shared, 0o755);
        check_existing(&trust, &rules).unwrap();
        chmod(&trust, 0o757);
        assert!(check_existing(&trust, &rules)
            .unwrap_err()
            .to_string()
            .starts_with(&format!("{} is writable by others (mode 757)", trust.display())));
        chmod(&trust, 0o755);
        let other = Rules { uid: rules.uid.wrapping_add(1), ..rules.clone() };
        let text = check_existing(&trust, &other).unwrap_err().to_string();
        assert!(text.starts_with(&format!("{} is owned by", trust.display())), "{text}");
        let file = trust.join("f");
        std::fs::write(&file, "").unwrap();
        assert!(matches!(check_existing(&file, &rules), Err(DirError::NotDir(_))));
    }

    /// A trust dir under /tmp would let anyone who can create a directory
    /// there stand in for root's files.
    #[test]
    fn root_rules_check_up_to_the_root() {
        let tmp = TempDir::new("safe-root");
        let err = TrustDir::check(&tmp.0.join("trust")).unwrap_err();
        assert!(matches!(err, DirError::Unsafe { .. }), "{err}");
        // The system's own /etc passes; a missing dir below it is checked by its parent.
        TrustDir::check(Path::new("/etc")).unwrap();
        TrustDir::check(Path::new("/etc/no-such-burrow-dir")).unwrap();
        let err = TrustDir::check(Path::new("/etc/no-such-burrow-dir/trust")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "/etc/no-such-burrow-dir does not exist: create it (root's, mode 755) or choose another --trust-dir, e.g. /etc/ssh/burrow"
        );
    }

    #[test]
    fn a_symlink_to_an_unsafe_dir_is_refused() {
        let tmp = TempDir::new("safe-link");
        let rules = test_rules(&tmp.0);
        let open = tmp.0.join("open");
        std::fs::create_dir(&open).unwrap();
        chmod(&open, 0o777);
        let target = open.join("trust");
        std::fs::create_dir(&target).unwrap();
        chmod(&target, 0o755);
        let link = tmp.0.join("trust");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let text = check_existing(&link, &rules).unwrap_err().to_string();
        assert!(text.starts_with(&format!("{} is writable by others", open.display())), "{text}");
    }

    #[test]
    fn a_missing_dir_is_created_0755_only_in_a_safe_parent() {
        let tmp = TempDir::new("safe-create");
        let (dir, created) = TrustDir::under(&tmp.0, &tmp.0.join("trust"));
        assert!(created);
        assert_eq!(std::fs::metadata(dir.path()).unwrap().mode() & 0o7777, 0o755);
        let (_, again) = TrustDir::under(&tmp.0, &tmp.0.join("trust"));
        assert!(!again);
        let rules = test_rules(&tmp.0);
        let err = create_with(&tmp.0.join("a/b"), rules.clone()).unwrap_err();
        assert!(matches!(err, DirError::Missing(_)), "{err}");
        let open = tmp.0.join("open");
        std::fs::create_dir(&open).unwrap();
        chmod(&open, 0o1777);
        assert!(matches!(create_with(&open.join("trust"), rules), Err(DirError::Unsafe { .. })));
        assert!(!open.join("trust").exists(), "nothing created under an unsafe parent");
    }

    /// Root took the pivot, pin and device from an agent config the
    /// agent's user could write.
    #[test]
    fn a_file_root_trusts_must_be_roots_alone_up_to_the_root() {
        let tmp = TempDir::new("safe-file");
        let rules = test_rules(&tmp.0);
        let dir = tmp.0.join("etc");
        std::fs::create_dir(&dir).unwrap();
        chmod(&dir, 0o755);
        let file = dir.join("agent.toml");
        std::fs::write(&file, "id = 'cam-42'\n").unwrap();
        chmod(&file, 0o644);
        assert_eq!(read_checked(&file, 1024, &rules).unwrap(), b"id = 'cam-42'\n");

        let refused = |rules: &Rules| match read_checked(&file, 1024, rules) {
            Err(FileError::Unsafe { path, why }) => format!("{path} {why}"),
            other => panic!("{other:?}"),
        };
        chmod(&file, 0o664);
        assert_eq!(refused(&rules), format!("{} is writable by its group (mode 664)", file.display()));
        chmod(&file, 0o644);
        chmod(&dir, 0o1777);
        assert_eq!(refused(&rules), format!("{} is writable by others (mode 1777)", dir.display()));
        chmod(&dir, 0o755);
        let other = Rules { uid: rules.uid.wrapping_add(1), ..rules.clone() };
        assert!(refused(&other).starts_with(&format!("{} is owned by", dir.display())));

        // A symlink, even to a file that would pass, or a FIFO (which
        // would block the reader), is refused.
        let link = dir.join("link.toml");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert!(
            matches!(read_checked(&link, 1024, &rules), Err(FileError::Unsafe { why, .. }) if why == "is a symbolic link")
        );
        let fifo = dir.join("fifo.toml");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        assert!(
            matches!(read_checked(&fifo, 1024, &rules), Err(FileError::Unsafe { why, .. }) if why == "is not a regular file")
        );
        assert!(matches!(read_checked(&dir.join("none"), 1024, &rules), Err(FileError::Read(..))));
        assert!(matches!(read_checked(&file, 4, &rules), Err(FileError::Read(..))), "over the cap");
        // With root's rules, a temp dir (under the sticky, world-writable /tmp) never passes.
        assert!(matches!(read_roots_alone(&file, 1024), Err(FileError::Unsafe { .. })));
    }

    /// `write_atomic` used a predictable temp name and followed symlinks.
    #[test]
    fn writes_follow_no_symlink() {
        let tmp = TempDir::new("safe-write");
        let victim = tmp.0.join("victim");
        std::fs::write(&victim, "precious\n").unwrap();
        let path = tmp.0.join("user_ca.pub");
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        // The old temp name, planted in advance.
        let old_tmp = tmp.0.join(format!(".user_ca.pub.{}.tmp", std::process::id()));
        std::os::unix::fs::symlink(&victim, &old_tmp).unwrap();
        write_atomic(&path, b"ssh-ed25519 AAAA\n", 0o644).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.is_file(), "the symlink is replaced, not followed");
        assert_eq!(meta.mode() & 0o7777, 0o644);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "ssh-ed25519 AAAA\n");
        assert!(open_regular(&old_tmp).unwrap().is_none(), "a symlink is not a regular file to read");
        assert!(read_regular(&tmp.0.join("none"), 10).unwrap().is_none());
        assert!(read_regular(&path, 4).is_err(), "over the cap");
    }
}
