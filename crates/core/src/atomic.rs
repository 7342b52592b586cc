//! Writing a file whole, in a directory someone else may be able to write.
//!
//! Root runs `burrow agent enroll` and `trust-operators` in /etc/burrow,
//! which the agent's user owns. A temp file of a fixed name there
//! (`agent.toml.tmp`) is a name that user can plant a symlink at, to make
//! root write /etc/ld.so.preload. So the temp file gets a fresh random name
//! and is created exclusively without following a symlink: a name already
//! taken by anything, a symlink included, is never opened. The rename over
//! the target replaces a symlink there rather than following it.

use std::ffi::{OsStr, OsString};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The mode a new file gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Exactly this, from creation on: the umask takes nothing away.
    Exact(u32),
    /// This less the umask, as `std::fs::write` creates a file.
    Umasked(u32),
}

/// How many taken temp names to step over before giving up.
const TRIES: usize = 4;

/// Writes `bytes` as `path` so that a reader sees the old content or the
/// new, never a part, and no symlink sends the bytes elsewhere: a temp file
/// of a fresh random name in the same directory, created exclusively
/// (`O_CREAT|O_EXCL|O_NOFOLLOW`) with `mode`, synced, then renamed over
/// `path`. The directory is synced too, so the rename survives a crash.
pub fn write_file(path: &Path, bytes: &[u8], mode: Mode) -> io::Result<()> {
    write_with(path, bytes, mode, random_name)
}

fn random_name(name: &OsStr) -> OsString {
    let mut tmp = OsString::from(".");
    tmp.push(name);
    tmp.push(format!(".{:016x}.tmp", rand::random::<u64>()));
    tmp
}

fn write_with(path: &Path, bytes: &[u8], mode: Mode, mut names: impl FnMut(&OsStr) -> OsString) -> io::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let (mut file, tmp) = create_temp(dir, || names(name), mode)?;
    let written = (|| {
        if let Mode::Exact(bits) = mode {
            // Through the open file: the umask filtered `mode` at open.
            file.set_permissions(std::fs::Permissions::from_mode(bits))?;
        }
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

fn create_temp(dir: &Path, mut name: impl FnMut() -> OsString, mode: Mode) -> io::Result<(File, PathBuf)> {
    let bits = match mode {
        // Nothing more than asked even for the moment before the chmod.
        Mode::Exact(bits) => bits & 0o777,
        Mode::Umasked(bits) => bits,
    };
    let mut tries = 0;
    loop {
        let tmp = dir.join(name());
        let opened =
            OpenOptions::new().write(true).create_new(true).mode(bits).custom_flags(libc::O_NOFOLLOW).open(&tmp);
        match opened {
            Ok(f) => return Ok((f, tmp)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && tries + 1 < TRIES => tries += 1,
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// A directory removed on drop.
    pub(crate) struct TempDir(pub PathBuf);

    impl TempDir {
        pub(crate) fn new(tag: &str) -> Self {
            let path = std::env::temp_dir().join(format!(
                "burrow-core-{tag}-{}-{:x}",
                std::process::id(),
                rand::random::<u64>()
            ));
            std::fs::create_dir_all(&path).unwrap();
            TempDir(path)
        }

        /// A file `victim` holding "untouched", mode 0600, and its mtime.
        pub(crate) fn victim(&self) -> PathBuf {
            let victim = self.0.join("victim");
            std::fs::write(&victim, "untouched").unwrap();
            std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).unwrap();
            victim
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    pub(crate) fn assert_untouched(victim: &Path) {
        assert_eq!(std::fs::read_to_string(victim).unwrap(), "untouched");
        assert_eq!(std::fs::metadata(victim).unwrap().mode() & 0o7777, 0o600);
    }

    fn names_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        names
    }

    #[test]
    fn writes_whole_with_the_mode_asked_and_leaves_no_temp_file() {
        let tmp = TempDir::new("atomic");
        let path = tmp.0.join("key");
        write_file(&path, b"one", Mode::Exact(0o600)).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"one");
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o7777, 0o600);
        write_file(&path, b"two", Mode::Exact(0o644)).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o7777, 0o644);
        assert_eq!(names_in(&tmp.0), ["key"]);
    }

    /// A symlink at whatever name the temp file would take is stepped
    /// over, never opened; with every name taken, nothing is written.
    #[test]
    fn a_symlink_at_a_temp_name_is_never_followed() {
        let tmp = TempDir::new("atomic-link");
        let victim = tmp.victim();
        let path = tmp.0.join("agent.toml");
        let planted = |n: usize| tmp.0.join(format!("planted-{n}"));
        for n in 0..TRIES {
            std::os::unix::fs::symlink(&victim, planted(n)).unwrap();
        }
        // The first names are taken by symlinks; the next is free.
        let mut n = 0;
        let names = |_: &OsStr| {
            n += 1;
            if n <= 2 {
                OsString::from(format!("planted-{}", n - 1))
            } else {
                OsString::from("free")
            }
        };
        write_with(&path, b"id = 'cam-42'\n", Mode::Umasked(0o666), names).unwrap();
        assert_untouched(&victim);
        assert_eq!(std::fs::read(&path).unwrap(), b"id = 'cam-42'\n");

        // Every name taken: an error, and still nothing written through a link.
        let mut n = 0;
        let names = |_: &OsStr| {
            n += 1;
            OsString::from(format!("planted-{}", n - 1))
        };
        let err = write_with(&path, b"x", Mode::Exact(0o600), names).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_untouched(&victim);
        assert_eq!(std::fs::read(&path).unwrap(), b"id = 'cam-42'\n");
    }

    /// A symlink at the file's own name is replaced, not written through.
    #[test]
    fn a_symlink_at_the_target_is_replaced() {
        let tmp = TempDir::new("atomic-target");
        let victim = tmp.victim();
        let path = tmp.0.join("device_key");
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        write_file(&path, b"key", Mode::Exact(0o600)).unwrap();
        assert_untouched(&victim);
        assert!(std::fs::symlink_metadata(&path).unwrap().is_file());
        assert_eq!(std::fs::read(&path).unwrap(), b"key");
    }
}
