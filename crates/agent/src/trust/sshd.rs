//! The sshd drop-in that makes the device trust the pivot's CA, the checks
//! that catch what sshd would otherwise only log at login time, and
//! applying the drop-in so that a config sshd rejects is never left behind.

use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use burrow_core::text::{clip, printable};

use super::{write_atomic, REVOKED_KEYS_FILE, USER_CA_FILE};

/// The drop-in's name in the sshd config dir.
pub const DROP_IN_FILE: &str = "burrow.conf";
/// Where Debian, Ubuntu, Fedora and others `Include` drop-ins from.
pub const DEFAULT_SSHD_CONFIG_DIR: &str = "/etc/ssh/sshd_config.d";
pub const DEFAULT_SSHD_CHECK: &str = "sshd -t";
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
        "sshd runs AuthorizedPrincipalsCommand as 'nobody', who cannot get through {path} (mode {mode:o}, nothing for others): chmod o+x it{hint}"
    )]
    Unreachable { path: String, mode: u32, hint: &'static str },
    #[error("cannot inspect {0}")]
    Stat(String, #[source] io::Error),
    #[error(
        "{0} is not a directory: is OpenSSH's sshd installed, and does its sshd_config Include it? Give --sshd-config-dir DIR otherwise"
    )]
    NoConfigDir(String),
    #[error("cannot write {0}")]
    Write(String, #[source] io::Error),
    #[error("cannot run `{0}`")]
    Spawn(String, #[source] io::Error),
    #[error(
        "`{cmd}` rejects the sshd config with the burrow drop-in, so the existing config was left untouched and sshd was not reloaded: {output}"
    )]
    CheckFailed { cmd: String, output: String },
    #[error(
        "`{cmd}` rejects the sshd config with the burrow drop-in ({output}), and {path} could not be put back as it was: restore or remove it by hand before sshd restarts"
    )]
    RestoreFailed {
        cmd: String,
        output: String,
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("the drop-in {path} is in place but sshd was not reloaded: `{cmd}` failed: {output}")]
    ReloadFailed { path: String, cmd: String, output: String },
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

/// The drop-in for device `id`, whose trust files are in `dir`, with the
/// principals command started as `exe_invocation` ([`invocation`]).
pub fn drop_in(exe_invocation: &str, dir: &Path, id: &str) -> String {
    let dir = dir.display();
    format!(
        "# Written by `burrow agent enroll --trust-operators` for device '{id}'.\n\
         # Operators log in with short-lived certificates from the pivot's CA. The\n\
         # agent refreshes the files named here whenever it connects to the pivot.\n\
         TrustedUserCAKeys {dir}/{USER_CA_FILE}\n\
         RevokedKeys {dir}/{REVOKED_KEYS_FILE}\n\
         AuthorizedPrincipalsCommand {exe_invocation} principals %u %k --trust-dir {dir}\n\
         AuthorizedPrincipalsCommandUser nobody\n"
    )
}

/// sshd runs an `AuthorizedPrincipalsCommand` only if the executable and
/// every directory above it are owned by root and writable by no one else,
/// and it runs it as `nobody`, who must be able to execute it. Checks both,
/// symlinks resolved, from the file up as sshd does.
pub fn check_exe(exe: &Path) -> Result<(), SshdError> {
    check_exe_owned_by(exe, 0)?;
    check_reachable_by_others(exe)
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

/// `nobody` must get through every directory down to `path`, and run
/// `path` if it is a file: each that exists must have o+x (a directory not
/// yet created will be made 0755).
pub fn check_reachable_by_others(path: &Path) -> Result<(), SshdError> {
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
            let hint = if meta.is_dir() { " or choose another --trust-dir" } else { "" };
            return Err(SshdError::Unreachable { path: p.display().to_string(), mode, hint });
        }
    }
    Ok(())
}

/// A note when `config_dir` sits next to an `sshd_config` that does not
/// seem to `Include` it: sshd would then ignore the drop-in without a word.
pub fn include_warning(config_dir: &Path) -> Option<String> {
    let main = config_dir.parent()?.join("sshd_config");
    let text = std::fs::read_to_string(&main).ok()?;
    let name = config_dir.file_name()?.to_str()?;
    let included = text.lines().any(|l| {
        let l = l.trim_start();
        l.get(..7).is_some_and(|w| w.eq_ignore_ascii_case("include")) && l.contains(name)
    });
    (!included).then(|| {
        format!(
            "{} has no Include line naming {name}; unless another file includes it, sshd ignores {}: add `Include {}/*.conf` at its top",
            main.display(),
            config_dir.join(DROP_IN_FILE).display(),
            config_dir.display()
        )
    })
}

/// What the drop-in's path held before it was replaced.
struct Previous {
    path: PathBuf,
    old: Option<(Vec<u8>, u32)>,
}

impl Previous {
    fn restore(&self) -> io::Result<()> {
        match &self.old {
            Some((bytes, mode)) => write_atomic(&self.path, bytes, *mode),
            None => std::fs::remove_file(&self.path),
        }
    }
}

fn put(config_dir: &Path, text: &str) -> Result<Previous, SshdError> {
    if !config_dir.is_dir() {
        return Err(SshdError::NoConfigDir(config_dir.display().to_string()));
    }
    let path = config_dir.join(DROP_IN_FILE);
    let shown = || path.display().to_string();
    let old = match std::fs::read(&path) {
        Ok(bytes) => {
            let mode = std::fs::metadata(&path).map_err(|e| SshdError::Stat(shown(), e))?.permissions().mode() & 0o7777;
            Some((bytes, mode))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(SshdError::Stat(shown(), e)),
    };
    write_atomic(&path, text.as_bytes(), 0o644).map_err(|e| SshdError::Write(shown(), e))?;
    Ok(Previous { path, old })
}

/// Puts `text` in place, runs `check_cmd`, and puts back what was there
/// (or nothing) whatever the check said: a dry run before enrolling.
pub fn check_drop_in(config_dir: &Path, text: &str, check_cmd: &str) -> Result<(), SshdError> {
    let prev = put(config_dir, text)?;
    let checked = run(check_cmd)?;
    let restored = prev.restore();
    match (checked, restored) {
        (Ok(()), Ok(())) => Ok(()),
        (Err(output), Ok(())) => Err(SshdError::CheckFailed { cmd: check_cmd.into(), output }),
        (Ok(()), Err(e)) => Err(SshdError::Write(prev.path.display().to_string(), e)),
        (Err(output), Err(source)) => Err(SshdError::RestoreFailed {
            cmd: check_cmd.into(),
            output,
            path: prev.path.display().to_string(),
            source,
        }),
    }
}

/// Writes `config_dir`/[`DROP_IN_FILE`] atomically and runs `check_cmd`
/// (with `/bin/sh -c`). If the check fails, the file is put back exactly as
/// it was (or removed) and sshd is not reloaded; otherwise `reload_cmd`
/// runs. Returns the drop-in's path.
pub fn install_drop_in(config_dir: &Path, text: &str, check_cmd: &str, reload_cmd: &str) -> Result<PathBuf, SshdError> {
    let prev = put(config_dir, text)?;
    if let Err(output) = run(check_cmd)? {
        return Err(match prev.restore() {
            Ok(()) => SshdError::CheckFailed { cmd: check_cmd.into(), output },
            Err(source) => SshdError::RestoreFailed {
                cmd: check_cmd.into(),
                output,
                path: prev.path.display().to_string(),
                source,
            },
        });
    }
    if let Err(output) = run(reload_cmd)? {
        return Err(SshdError::ReloadFailed { path: prev.path.display().to_string(), cmd: reload_cmd.into(), output });
    }
    Ok(prev.path)
}

/// Runs `cmd` with `/bin/sh -c`: Ok(Ok) if it succeeds, Ok(Err(what it
/// said)) if it fails.
fn run(cmd: &str) -> Result<Result<(), String>, SshdError> {
    let out = Command::new("/bin/sh")
        .arg("-c")
        .arg(cmd)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| SshdError::Spawn(cmd.to_string(), e))?;
    if out.status.success() {
        return Ok(Ok(()));
    }
    let said = |bytes: &[u8]| {
        String::from_utf8_lossy(bytes).lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("; ")
    };
    let mut text = said(&out.stderr);
    if text.is_empty() {
        text = said(&out.stdout);
    }
    let text = printable(&clip(&text, 2000)).into_owned();
    Ok(Err(if text.is_empty() { out.status.to_string() } else { format!("{text} ({})", out.status) }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trust::tests::TempDir;

    #[test]
    fn drop_in_names_the_files_and_the_command() {
        let exe = invocation(Path::new("/usr/bin/burrow")).unwrap();
        assert_eq!(
            drop_in(&exe, Path::new("/etc/burrow/trust"), "cam-42"),
            "# Written by `burrow agent enroll --trust-operators` for device 'cam-42'.\n\
             # Operators log in with short-lived certificates from the pivot's CA. The\n\
             # agent refreshes the files named here whenever it connects to the pivot.\n\
             TrustedUserCAKeys /etc/burrow/trust/user_ca.pub\n\
             RevokedKeys /etc/burrow/trust/revoked_keys\n\
             AuthorizedPrincipalsCommand /usr/bin/burrow agent principals %u %k --trust-dir /etc/burrow/trust\n\
             AuthorizedPrincipalsCommandUser nobody\n"
        );
        assert_eq!(invocation(Path::new("/usr/local/bin/burrow-agent")).unwrap(), "/usr/local/bin/burrow-agent");
        assert_eq!(invocation(Path::new("/opt/burrow-agent-1.2")).unwrap(), "/opt/burrow-agent-1.2");
        assert_eq!(invocation(Path::new("/opt/b/burrow")).unwrap(), "/opt/b/burrow agent");
    }

    #[test]
    fn paths_sshd_would_misread_are_refused() {
        sshd_path(Path::new("/etc/burrow/trust")).unwrap();
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

    fn chmod(p: &Path, mode: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
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
        let err = check_reachable_by_others(&closed.join("trust/not-yet")).unwrap_err().to_string();
        assert!(err.contains(&closed.display().to_string()) && err.contains("mode 700"), "{err}");
        chmod(&closed, 0o711);
        check_reachable_by_others(&closed.join("trust/not-yet")).unwrap();
    }

    fn drop_in_at(dir: &Path) -> PathBuf {
        dir.join(DROP_IN_FILE)
    }

    #[test]
    fn a_failed_check_leaves_the_old_config_and_does_not_reload() {
        let tmp = TempDir::new("install-fail");
        let marker = tmp.0.join("reloaded");
        let reload = format!("touch {}", marker.display());
        std::fs::write(drop_in_at(&tmp.0), "# old\n").unwrap();
        chmod(&drop_in_at(&tmp.0), 0o600);
        let err = install_drop_in(&tmp.0, "# new\n", "echo 'line 3: Bad configuration option' >&2; false", &reload)
            .unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, SshdError::CheckFailed { .. }), "{text}");
        assert!(text.contains("Bad configuration option") && text.contains("left untouched"), "{text}");
        assert_eq!(std::fs::read_to_string(drop_in_at(&tmp.0)).unwrap(), "# old\n");
        assert_eq!(std::fs::metadata(drop_in_at(&tmp.0)).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(!marker.exists(), "not reloaded");

        std::fs::remove_file(drop_in_at(&tmp.0)).unwrap();
        assert!(install_drop_in(&tmp.0, "# new\n", "false", &reload).is_err());
        assert!(!drop_in_at(&tmp.0).exists(), "no drop-in before, none after");
        assert!(!marker.exists());
        let names: Vec<_> = std::fs::read_dir(&tmp.0).unwrap().collect();
        assert!(names.is_empty(), "no temp file left: {names:?}");
    }

    #[test]
    fn a_passed_check_keeps_the_drop_in_and_reloads() {
        let tmp = TempDir::new("install-ok");
        let marker = tmp.0.join("reloaded");
        std::fs::write(drop_in_at(&tmp.0), "# old\n").unwrap();
        let path = install_drop_in(&tmp.0, "# new\n", "true", &format!("touch {}", marker.display())).unwrap();
        assert_eq!(path, drop_in_at(&tmp.0));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "# new\n");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o644);
        assert!(marker.exists(), "reloaded");

        let err = install_drop_in(&tmp.0, "# newer\n", "true", "echo 'Unit ssh.service not found.' >&2; exit 5")
            .unwrap_err()
            .to_string();
        assert!(err.contains("in place but sshd was not reloaded") && err.contains("ssh.service not found"), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "# newer\n");

        let missing = tmp.0.join("no-such-dir");
        assert!(matches!(install_drop_in(&missing, "x", "true", "true"), Err(SshdError::NoConfigDir(_))));
    }

    #[test]
    fn the_dry_run_always_puts_back_what_was_there() {
        let tmp = TempDir::new("dry-run");
        let seen = tmp.0.join("seen");
        let check = format!("cp {} {}", drop_in_at(&tmp.0).display(), seen.display());
        check_drop_in(&tmp.0, "# new\n", &check).unwrap();
        assert_eq!(std::fs::read_to_string(&seen).unwrap(), "# new\n", "the check saw the drop-in");
        assert!(!drop_in_at(&tmp.0).exists());
        std::fs::write(drop_in_at(&tmp.0), "# old\n").unwrap();
        check_drop_in(&tmp.0, "# new\n", "true").unwrap();
        assert_eq!(std::fs::read_to_string(drop_in_at(&tmp.0)).unwrap(), "# old\n");
        assert!(matches!(check_drop_in(&tmp.0, "# new\n", "false"), Err(SshdError::CheckFailed { .. })));
        assert_eq!(std::fs::read_to_string(drop_in_at(&tmp.0)).unwrap(), "# old\n");
    }

    #[test]
    fn a_missing_include_is_noticed() {
        let tmp = TempDir::new("include");
        let d = tmp.0.join("sshd_config.d");
        std::fs::create_dir(&d).unwrap();
        assert!(include_warning(&d).is_none(), "no sshd_config here: nothing to say");
        std::fs::write(tmp.0.join("sshd_config"), "Port 22\n").unwrap();
        assert!(include_warning(&d).unwrap().contains("Include"));
        std::fs::write(tmp.0.join("sshd_config"), "include /etc/ssh/sshd_config.d/*.conf\nPort 22\n").unwrap();
        assert!(include_warning(&d).is_none());
    }
}
