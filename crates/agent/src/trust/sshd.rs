//! The sshd drop-in that makes the device trust the pivot's CA, and the
//! checks that catch what sshd would otherwise only log at login time.
//! Putting it in place is `apply`'s.

use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use burrow_core::text::printable;

use super::{REVOKED_KEYS_FILE, USER_CA_FILE};

/// The drop-in's name in the sshd config dir.
pub const DROP_IN_FILE: &str = "burrow.conf";
/// Where Debian, Ubuntu, Fedora and others `Include` drop-ins from.
pub const DEFAULT_SSHD_CONFIG_DIR: &str = "/etc/ssh/sshd_config.d";
/// The config the running sshd reads, unless started with `-f`.
pub const DEFAULT_SSHD_CONFIG: &str = "/etc/ssh/sshd_config";
pub const DEFAULT_SSHD_RELOAD: &str = "systemctl reload ssh";

#[derive(Debug, thiserror::Error)]
pub enum SshdError {
    #[error("cannot find the running executable")]
    Exe(#[source] io::Error),
    #[error("sshd cannot take the path {path}: {why}")]
    BadPath { path: String, why: &'static str },
    #[error(
        "sshd runs AuthorizedPrincipalsCommand only from a root-owned path that no one else can write; {path} {why}: install burrow under /usr/local/bin"
    )]
    UnsafeExe { path: String, why: String },
    #[error(
        "sshd runs AuthorizedPrincipalsCommand as 'nobody', who cannot run {exe} (mode {mode:o}, nothing for others): chmod o+x it, or install burrow in /usr/local/bin"
    )]
    ExeNotExecutable { exe: String, mode: u32 },
    #[error(
        "sshd runs AuthorizedPrincipalsCommand {exe} as 'nobody', who cannot get through {path} (mode {mode:o}, nothing for others): every directory up to the executable must be world-traversable; install burrow in such a place, e.g. /usr/local/bin"
    )]
    ExeUnreachable { exe: String, path: String, mode: u32 },
    #[error(
        "sshd's AuthorizedPrincipalsCommand runs as 'nobody', who cannot get through {path} (mode {mode:o}, nothing for others) to the trust files: chmod o+x it or choose another --trust-dir"
    )]
    TrustDirUnreachable { path: String, mode: u32 },
    #[error("cannot inspect {0}")]
    Stat(String, #[source] io::Error),
}

/// `path` as it can stand in sshd_config: absolute, UTF-8, and nothing sshd
/// splits on, unquotes, escapes or expands (`%u`).
pub fn sshd_path(path: &Path) -> Result<&str, SshdError> {
    let bad = |why| SshdError::BadPath { path: printable(&path.to_string_lossy()).into_owned(), why };
    let text = path.to_str().ok_or_else(|| bad("it is not UTF-8"))?;
    if !path.is_absolute() {
        return Err(bad("it is not absolute"));
    }
    if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad("it contains whitespace; choose a path without"));
    }
    if text.contains(['"', '\'', '\\', '%', '#']) {
        return Err(bad("it contains a quote, '\\', '%' or '#'; choose a path without"));
    }
    Ok(text)
}

/// How sshd should start the principals command of the executable `exe`:
/// `EXE agent` for the full `burrow`, `EXE` for `burrow-agent`.
pub fn invocation(exe: &Path) -> Result<String, SshdError> {
    let text = sshd_path(exe)?;
    let name = exe.file_name().and_then(|n| n.to_str()).unwrap_or("");
    Ok(if name.starts_with("burrow-agent") { text.to_string() } else { format!("{text} agent") })
}

/// The running executable (symlinks resolved, as sshd resolves them) and
/// its [`invocation`].
pub fn current_invocation() -> Result<(PathBuf, String), SshdError> {
    let exe = std::env::current_exe().and_then(std::fs::canonicalize).map_err(SshdError::Exe)?;
    let invocation = invocation(&exe)?;
    Ok((exe, invocation))
}

/// What burrow puts in sshd's config dir: its text, and the settings that
/// sshd must end up using for it to work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DropIn {
    pub text: String,
    /// (keyword as `sshd -T` prints it, value) for each setting that an
    /// earlier one in sshd's config would override: sshd keeps the first
    /// value it reads.
    pub settings: Vec<(&'static str, String)>,
}

/// The drop-in for device `id`, whose trust files are in `dir`, with the
/// principals command started as `exe_invocation` ([`invocation`]).
pub fn drop_in(exe_invocation: &str, dir: &Path, id: &str) -> DropIn {
    let dir = dir.display();
    let ca = format!("{dir}/{USER_CA_FILE}");
    let revoked = format!("{dir}/{REVOKED_KEYS_FILE}");
    let command = format!("{exe_invocation} principals %u %k --trust-dir {dir}");
    let text = format!(
        "# Written by `burrow agent enroll --trust-operators` for device '{id}'.\n\
         # Operators log in with short-lived certificates from the pivot's CA. Root\n\
         # refreshes the files named here (`trust-operators --refresh`).\n\
         TrustedUserCAKeys {ca}\n\
         RevokedKeys {revoked}\n\
         AuthorizedPrincipalsCommand {command}\n\
         AuthorizedPrincipalsCommandUser nobody\n"
    );
    let settings = vec![("trustedusercakeys", ca), ("revokedkeys", revoked), ("authorizedprincipalscommand", command)];
    DropIn { text, settings }
}

/// sshd runs an `AuthorizedPrincipalsCommand` only if the executable and
/// every directory above it are owned by root and writable by no one else,
/// and it runs it as `nobody`, who must be able to execute it. Checks both,
/// symlinks resolved, from the file up as sshd does.
pub fn check_exe(exe: &Path) -> Result<(), SshdError> {
    check_exe_owned_by(exe, 0)?;
    check_exe_reachable(exe)
}

/// `nobody` must get through every directory down to `exe`, and run it.
pub(crate) fn check_exe_reachable(exe: &Path) -> Result<(), SshdError> {
    let real = std::fs::canonicalize(exe).map_err(|e| SshdError::Stat(exe.display().to_string(), e))?;
    match closed_to_others(&real)? {
        None => Ok(()),
        Some((p, mode)) if p == real => Err(SshdError::ExeNotExecutable { exe: p.display().to_string(), mode }),
        Some((p, mode)) => {
            Err(SshdError::ExeUnreachable { exe: real.display().to_string(), path: p.display().to_string(), mode })
        }
    }
}

pub(crate) fn check_exe_owned_by(exe: &Path, owner: u32) -> Result<(), SshdError> {
    let real = std::fs::canonicalize(exe).map_err(|e| SshdError::Stat(exe.display().to_string(), e))?;
    let unsafe_exe = |p: &Path, why: String| SshdError::UnsafeExe { path: p.display().to_string(), why };
    let mut at = Some(real.as_path());
    while let Some(p) = at {
        let meta = std::fs::metadata(p).map_err(|e| SshdError::Stat(p.display().to_string(), e))?;
        if p == real && !meta.is_file() {
            return Err(unsafe_exe(p, "is not a regular file".into()));
        }
        if meta.uid() != owner {
            let want = if owner == 0 { "root".to_string() } else { format!("uid {owner}") };
            return Err(unsafe_exe(p, format!("is owned by uid {}, not {want}", meta.uid())));
        }
        if meta.mode() & 0o002 != 0 {
            return Err(unsafe_exe(p, "is writable by others".into()));
        }
        if meta.mode() & 0o020 != 0 {
            return Err(unsafe_exe(p, "is writable by its group".into()));
        }
        at = p.parent();
    }
    Ok(())
}

/// `nobody` must get through every directory down to the trust dir `dir`:
/// each that exists must have o+x (a directory not yet created will be
/// made 0755).
pub fn check_trust_dir_reachable(dir: &Path) -> Result<(), SshdError> {
    match closed_to_others(dir)? {
        None => Ok(()),
        Some((p, mode)) => Err(SshdError::TrustDirUnreachable { path: p.display().to_string(), mode }),
    }
}

/// The first of `path` and the directories above it that exists and has
/// no o+x, with its mode.
fn closed_to_others(path: &Path) -> Result<Option<(PathBuf, u32)>, SshdError> {
    let mut at = Some(path);
    while let Some(p) = at {
        at = p.parent();
        let meta = match std::fs::metadata(p) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(SshdError::Stat(p.display().to_string(), e)),
        };
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o001 == 0 {
            return Ok(Some((p.to_path_buf(), mode)));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trust::tests::{chmod, TempDir};

    #[test]
    fn drop_in_names_the_files_and_the_command() {
        let exe = invocation(Path::new("/usr/bin/burrow")).unwrap();
        let d = drop_in(&exe, Path::new("/etc/ssh/burrow"), "cam-42");
        assert_eq!(
            d.text,
            "# Written by `burrow agent enroll --trust-operators` for device 'cam-42'.\n\
             # Operators log in with short-lived certificates from the pivot's CA. Root\n\
             # refreshes the files named here (`trust-operators --refresh`).\n\
             TrustedUserCAKeys /etc/ssh/burrow/user_ca.pub\n\
             RevokedKeys /etc/ssh/burrow/revoked_keys\n\
             AuthorizedPrincipalsCommand /usr/bin/burrow agent principals %u %k --trust-dir /etc/ssh/burrow\n\
             AuthorizedPrincipalsCommandUser nobody\n"
        );
        // Each setting to confirm is in the text, as sshd -T names it.
        for (keyword, value) in &d.settings {
            let line = d.text.lines().find(|l| l.to_ascii_lowercase().starts_with(&format!("{keyword} "))).unwrap();
            assert_eq!(&line[keyword.len() + 1..], value);
        }
        assert_eq!(d.settings.len(), 3);
        assert_eq!(invocation(Path::new("/usr/local/bin/burrow-agent")).unwrap(), "/usr/local/bin/burrow-agent");
        assert_eq!(invocation(Path::new("/opt/burrow-agent-1.2")).unwrap(), "/opt/burrow-agent-1.2");
        assert_eq!(invocation(Path::new("/opt/b/burrow")).unwrap(), "/opt/b/burrow agent");
    }

    #[test]
    fn paths_sshd_would_misread_are_refused() {
        sshd_path(Path::new("/etc/ssh/burrow")).unwrap();
        for bad in [
            "relative/dir",
            "/opt/my dir",
            "/opt/a\tb",
            "/opt/\"x\"",
            "/opt/it's",
            "/opt/%u",
            "/opt/a\\b",
            "/opt/#x",
            "/opt/a\nb",
        ] {
            assert!(matches!(sshd_path(Path::new(bad)), Err(SshdError::BadPath { .. })), "{bad:?}");
            assert!(invocation(&Path::new(bad).join("burrow")).is_err(), "{bad:?}");
        }
        use std::os::unix::ffi::OsStrExt;
        let latin1 = Path::new(std::ffi::OsStr::from_bytes(b"/opt/\xe9"));
        assert!(matches!(sshd_path(latin1), Err(SshdError::BadPath { why: "it is not UTF-8", .. })));
    }

    #[test]
    fn an_exe_others_can_replace_is_refused() {
        let tmp = TempDir::new("exe");
        let open = tmp.0.join("open");
        std::fs::create_dir(&open).unwrap();
        chmod(&open, 0o777);
        let exe = open.join("burrow");
        std::fs::write(&exe, "#!/bin/sh\n").unwrap();
        chmod(&exe, 0o755);
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        let err = check_exe_owned_by(&exe, me).unwrap_err();
        let text = err.to_string();
        assert!(text.contains(&format!("{} is writable by others", open.display())), "{text}");
        assert!(text.contains("install burrow under /usr/local/bin"), "{text}");

        chmod(&open, 0o775);
        assert!(check_exe_owned_by(&exe, me).unwrap_err().to_string().contains("writable by its group"));
        chmod(&open, 0o755);
        chmod(&exe, 0o757);
        assert!(check_exe_owned_by(&exe, me)
            .unwrap_err()
            .to_string()
            .contains(&format!("{} is writable", exe.display())));
        chmod(&exe, 0o755);
        let wrong_owner = check_exe_owned_by(&exe, me.wrapping_add(1)).unwrap_err().to_string();
        assert!(wrong_owner.contains("is owned by uid"), "{wrong_owner}");
        assert!(check_exe_owned_by(&open, me).unwrap_err().to_string().contains("not a regular file"));
        // A system binary passes, as sshd would take it.
        check_exe(Path::new("/bin/sh")).unwrap();
    }

    #[test]
    fn nobody_must_get_through_to_the_trust_files() {
        let tmp = TempDir::new("reach");
        let closed = tmp.0.join("closed");
        std::fs::create_dir(&closed).unwrap();
        chmod(&closed, 0o700);
        let err = check_trust_dir_reachable(&closed.join("trust/not-yet")).unwrap_err().to_string();
        assert!(err.contains(&closed.display().to_string()) && err.contains("mode 700"), "{err}");
        assert!(err.contains("--trust-dir"), "{err}");
        chmod(&closed, 0o711);
        check_trust_dir_reachable(&closed.join("trust/not-yet")).unwrap();
    }

    /// A burrow copied into a 0700 directory was told to choose another --trust-dir.
    #[test]
    fn a_closed_dir_above_the_executable_is_blamed_on_where_it_is_installed() {
        let tmp = TempDir::new("reach-exe");
        let closed = tmp.0.join("bin");
        std::fs::create_dir(&closed).unwrap();
        let exe = closed.join("burrow");
        std::fs::write(&exe, "#!/bin/sh\n").unwrap();
        chmod(&exe, 0o755);
        chmod(&closed, 0o700);
        let err = check_exe_reachable(&exe).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, SshdError::ExeUnreachable { .. }), "{text}");
        assert!(text.contains(&format!("who cannot get through {} (mode 700", closed.display())), "{text}");
        assert!(text.contains("every directory up to the executable") && text.contains("/usr/local/bin"), "{text}");
        assert!(!text.contains("--trust-dir"), "{text}");

        chmod(&closed, 0o755);
        chmod(&exe, 0o750);
        let text = check_exe_reachable(&exe).unwrap_err().to_string();
        assert!(text.contains(&format!("cannot run {} (mode 750", exe.display())), "{text}");
        assert!(!text.contains("--trust-dir"), "{text}");
        chmod(&exe, 0o755);
        check_exe_reachable(&exe).unwrap();
    }
}
