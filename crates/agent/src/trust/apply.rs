//! Putting the sshd drop-in in place so that a config sshd rejects, or one
//! it would not read, is never left behind: write it, have sshd check the
//! whole config, confirm with `sshd -T` that sshd takes its settings, and
//! only then reload; otherwise put back exactly what was there.
//!
//! `sshd -t` passing proves little on its own: a drop-in dir that the
//! running sshd's config does not `Include`, or includes after settings of
//! its own, is checked and then silently ignored, and logins fail later.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use burrow_core::text::{clip, printable};

use super::sshd::{DropIn, DROP_IN_FILE};
use super::write_atomic;

/// Where sshd is looked for after the directories on `PATH`.
const SSHD_DIRS: [&str; 3] = ["/usr/sbin", "/usr/local/sbin", "/sbin"];

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("cannot find sshd on PATH or in /usr/sbin, /usr/local/sbin or /sbin: is OpenSSH's server installed?")]
    NoSshd,
    #[error("{0} is not a file: give --sshd-config FILE, the sshd_config the running sshd reads")]
    NoSshdConfig(String),
    #[error(
        "{0} is not a directory: is OpenSSH's sshd installed, and does its sshd_config Include it? Give --sshd-config-dir DIR otherwise"
    )]
    NoConfigDir(String),
    #[error("cannot inspect {0}")]
    Stat(String, #[source] io::Error),
    #[error("cannot write {0}")]
    Write(String, #[source] io::Error),
    #[error("{problem}; sshd's config was left as it was and sshd was not reloaded")]
    Untouched { problem: Box<Problem> },
    #[error(
        "{problem}; and {path} could not be put back as it was: restore or remove it by hand before sshd restarts"
    )]
    RestoreFailed {
        problem: Box<Problem>,
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("the drop-in {path} is in place but sshd was not reloaded: {problem}")]
    NotReloaded { path: String, problem: Box<Problem> },
}

/// Why a drop-in cannot be kept, or sshd not reloaded.
#[derive(Debug, thiserror::Error)]
pub enum Problem {
    #[error("`{cmd}` rejects the sshd config with the burrow drop-in: {output}")]
    Rejected { cmd: String, output: String },
    /// The shell could not find or execute the command (exit status 127 or 126).
    #[error("could not run the {role} command `{cmd}` ({why}); give {flag} CMD")]
    CannotRun { role: &'static str, flag: &'static str, cmd: String, why: String },
    #[error("`{cmd}` failed: {output}")]
    Failed { cmd: String, output: String },
    #[error("cannot tell whether sshd takes the drop-in: `{cmd}` fails: {output}")]
    NoEffectiveConfig { cmd: String, output: String },
    #[error(
        "sshd's config {config} does not take {drop_in} (`sshd -T` gives {keyword} {got}): add `Include {dir}/*.conf` near its top, before any Match block and any TrustedUserCAKeys, RevokedKeys or AuthorizedPrincipalsCommand of its own (sshd keeps the first value it reads)"
    )]
    NotTaken { config: String, drop_in: String, dir: String, keyword: &'static str, got: String },
}

/// The device's sshd, as burrow changes its config.
#[derive(Debug, Clone)]
pub struct DeviceSshd {
    /// The sshd executable, for `sshd -T`.
    pub binary: PathBuf,
    /// The sshd_config the running sshd reads.
    pub config: PathBuf,
    /// Where the drop-in goes; `config` must `Include` it.
    pub config_dir: PathBuf,
    /// Validates sshd's whole config (run with `/bin/sh -c`).
    pub check: String,
    /// Makes the running sshd reload its config (run with `/bin/sh -c`).
    pub reload: String,
}

impl DeviceSshd {
    /// The sshd found by [`find_sshd`], reading `config` and including
    /// drop-ins from `config_dir`; both must exist. `check` defaults to
    /// `SSHD -t -f CONFIG`.
    pub fn new(
        config: PathBuf,
        config_dir: PathBuf,
        check: Option<String>,
        reload: String,
    ) -> Result<DeviceSshd, ApplyError> {
        if !config_dir.is_dir() {
            return Err(ApplyError::NoConfigDir(config_dir.display().to_string()));
        }
        if !config.is_file() {
            return Err(ApplyError::NoSshdConfig(config.display().to_string()));
        }
        let binary = find_sshd()?;
        let check = check.unwrap_or_else(|| {
            format!("{} -t -f {}", shell_word(&binary.to_string_lossy()), shell_word(&config.to_string_lossy()))
        });
        Ok(DeviceSshd { binary, config, config_dir, check, reload })
    }

    pub fn drop_in_path(&self) -> PathBuf {
        self.config_dir.join(DROP_IN_FILE)
    }

    /// Puts `drop_in` in place, checks it as [`install`](Self::install)
    /// does, and puts back what was there (or nothing) whatever came out:
    /// a dry run before enrolling.
    pub fn dry_run(&self, drop_in: &DropIn) -> Result<(), ApplyError> {
        let prev = self.put(drop_in)?;
        let verdict = self.verify(drop_in);
        let restored = prev.restore();
        match (verdict, restored) {
            (Ok(()), Ok(())) => Ok(()),
            (Err(problem), Ok(())) => Err(ApplyError::Untouched { problem: Box::new(problem) }),
            (Ok(()), Err(e)) => Err(ApplyError::Write(prev.path.display().to_string(), e)),
            (Err(problem), Err(source)) => Err(ApplyError::RestoreFailed {
                problem: Box::new(problem),
                path: prev.path.display().to_string(),
                source,
            }),
        }
    }

    /// Writes the drop-in atomically, runs the check and confirms with
    /// `sshd -T` that sshd takes its settings. If not, the file is put back
    /// exactly as it was (or removed) and sshd is not reloaded; otherwise
    /// the reload command runs. Returns the drop-in's path.
    pub fn install(&self, drop_in: &DropIn) -> Result<PathBuf, ApplyError> {
        let prev = self.put(drop_in)?;
        if let Err(problem) = self.verify(drop_in) {
            let problem = Box::new(problem);
            return Err(match prev.restore() {
                Ok(()) => ApplyError::Untouched { problem },
                Err(source) => ApplyError::RestoreFailed { problem, path: prev.path.display().to_string(), source },
            });
        }
        let problem = match run(&self.reload) {
            Ran::Ok => return Ok(prev.path),
            Ran::Failed(output) => Problem::Failed { cmd: self.reload.clone(), output },
            Ran::CannotRun(why) => {
                Problem::CannotRun { role: "reload", flag: "--sshd-reload", cmd: self.reload.clone(), why }
            }
        };
        Err(ApplyError::NotReloaded { path: prev.path.display().to_string(), problem: Box::new(problem) })
    }

    /// With the drop-in in place: the check passes, and sshd takes it.
    fn verify(&self, drop_in: &DropIn) -> Result<(), Problem> {
        match run(&self.check) {
            Ran::Ok => {}
            Ran::Failed(output) => return Err(Problem::Rejected { cmd: self.check.clone(), output }),
            Ran::CannotRun(why) => {
                return Err(Problem::CannotRun { role: "check", flag: "--sshd-check", cmd: self.check.clone(), why })
            }
        }
        self.confirm_taken(drop_in)
    }

    /// Asks sshd what it will use (`sshd -T -f CONFIG`) and compares that
    /// with the drop-in's settings.
    fn confirm_taken(&self, drop_in: &DropIn) -> Result<(), Problem> {
        let cmd = format!("{} -T -f {}", self.binary.display(), self.config.display());
        let out = Command::new(&self.binary).arg("-T").arg("-f").arg(&self.config).stdin(Stdio::null()).output();
        let out = match out {
            Ok(out) if out.status.success() => out,
            Ok(out) => return Err(Problem::NoEffectiveConfig { cmd, output: said_with_status(&out) }),
            Err(e) => return Err(Problem::NoEffectiveConfig { cmd, output: e.to_string() }),
        };
        let effective = String::from_utf8_lossy(&out.stdout);
        for (keyword, want) in &drop_in.settings {
            let got = value_of(&effective, keyword);
            if !got.is_some_and(|got| got.split_whitespace().eq(want.split_whitespace())) {
                return Err(Problem::NotTaken {
                    config: self.config.display().to_string(),
                    drop_in: self.drop_in_path().display().to_string(),
                    dir: self.config_dir.display().to_string(),
                    keyword,
                    got: got.map_or("nothing".into(), |g| printable(&clip(g, 200)).into_owned()),
                });
            }
        }
        Ok(())
    }

    fn put(&self, drop_in: &DropIn) -> Result<Previous, ApplyError> {
        if !self.config_dir.is_dir() {
            return Err(ApplyError::NoConfigDir(self.config_dir.display().to_string()));
        }
        let path = self.drop_in_path();
        let shown = || path.display().to_string();
        let old = match std::fs::read(&path) {
            Ok(bytes) => {
                let meta = std::fs::metadata(&path).map_err(|e| ApplyError::Stat(shown(), e))?;
                Some((bytes, meta.permissions().mode() & 0o7777))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(ApplyError::Stat(shown(), e)),
        };
        write_atomic(&path, drop_in.text.as_bytes(), 0o644).map_err(|e| ApplyError::Write(shown(), e))?;
        Ok(Previous { path, old })
    }
}

/// The value `sshd -T` prints for `keyword` (lowercase, as it prints them).
fn value_of<'a>(effective: &'a str, keyword: &str) -> Option<&'a str> {
    effective.lines().find_map(|l| {
        let (k, v) = l.trim().split_once(char::is_whitespace)?;
        k.eq_ignore_ascii_case(keyword).then(|| v.trim())
    })
}

/// sshd as root runs it: the first `sshd` on `PATH` (absolute entries
/// only), else in [`SSHD_DIRS`].
pub fn find_sshd() -> Result<PathBuf, ApplyError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .filter(|d| d.is_absolute())
        .chain(SSHD_DIRS.iter().map(PathBuf::from))
        .map(|d| d.join("sshd"))
        .find(|p| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
        .ok_or(ApplyError::NoSshd)
}

/// `word` as one word for `/bin/sh`: as it is when nothing in it is
/// special, else single-quoted.
fn shell_word(word: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "/._-+=:,@%".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
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

/// How a command run with `/bin/sh -c` went.
enum Ran {
    Ok,
    /// It ran and failed: what it said, and its exit status.
    Failed(String),
    /// The shell could not find or execute it, or could not start: why.
    CannotRun(String),
}

fn run(cmd: &str) -> Ran {
    let out = match Command::new("/bin/sh").arg("-c").arg(cmd).stdin(Stdio::null()).output() {
        Ok(out) => out,
        Err(e) => return Ran::CannotRun(format!("cannot start /bin/sh: {e}")),
    };
    if out.status.success() {
        return Ran::Ok;
    }
    // The shell's own codes: nothing ran, so nothing was checked or rejected.
    let why = match out.status.code() {
        Some(127) => "not found",
        Some(126) => "not executable",
        _ => return Ran::Failed(said_with_status(&out)),
    };
    let text = said(&out);
    Ran::CannotRun(if text.is_empty() { why.to_string() } else { format!("{why}: {text}") })
}

/// What a command wrote on stderr (else stdout), on one line, clipped.
fn said(out: &Output) -> String {
    let lines = |bytes: &[u8]| {
        String::from_utf8_lossy(bytes).lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("; ")
    };
    let mut text = lines(&out.stderr);
    if text.is_empty() {
        text = lines(&out.stdout);
    }
    printable(&clip(&text, 2000)).into_owned()
}

fn said_with_status(out: &Output) -> String {
    let text = said(out);
    if text.is_empty() {
        out.status.to_string()
    } else {
        format!("{text} ({})", out.status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trust::tests::{chmod, TempDir};

    fn drop_in(text: &str) -> DropIn {
        DropIn {
            text: format!("TrustedUserCAKeys /t/user_ca.pub\n# {text}\n"),
            settings: vec![("trustedusercakeys", "/t/user_ca.pub".into())],
        }
    }

    /// A device sshd in `tmp`: a drop-in dir, a config, and in place of
    /// sshd a script whose `-T` prints the drop-in's settings (lowercase
    /// keywords, as sshd does) when `includes`, or sshd's defaults.
    fn device(tmp: &TempDir, includes: bool, check: &str, reload: &str) -> DeviceSshd {
        let config_dir = tmp.0.join("sshd_config.d");
        std::fs::create_dir_all(&config_dir).unwrap();
        let config = tmp.0.join("sshd_config");
        std::fs::write(&config, "Port 22\n").unwrap();
        let binary = tmp.0.join("sshd");
        let script = if includes {
            format!(
                "#!/bin/sh\ncat {}/*.conf 2>/dev/null | grep -v '^#' | awk '{{ $1 = tolower($1); print }}'\necho 'port 22'\n",
                config_dir.display()
            )
        } else {
            "#!/bin/sh\necho 'port 22'\necho 'trustedusercakeys none'\n".to_string()
        };
        std::fs::write(&binary, script).unwrap();
        chmod(&binary, 0o755);
        DeviceSshd { binary, config, config_dir, check: check.into(), reload: reload.into() }
    }

    /// Why the drop-in was not kept, when it was put back.
    fn kept(err: &ApplyError) -> Option<&Problem> {
        match err {
            ApplyError::Untouched { problem } => Some(problem),
            _ => None,
        }
    }

    fn text_at(sshd: &DeviceSshd) -> Option<String> {
        std::fs::read_to_string(sshd.drop_in_path()).ok()
    }

    #[test]
    fn a_failed_check_leaves_the_old_config_and_does_not_reload() {
        let tmp = TempDir::new("install-fail");
        let marker = tmp.0.join("reloaded");
        let reload = format!("touch {}", marker.display());
        let sshd = device(&tmp, true, "echo 'line 3: Bad configuration option' >&2; false", &reload);
        std::fs::write(sshd.drop_in_path(), "# old\n").unwrap();
        chmod(&sshd.drop_in_path(), 0o600);
        let err = sshd.install(&drop_in("new")).unwrap_err();
        let text = err.to_string();
        assert!(matches!(kept(&err), Some(Problem::Rejected { .. })), "{text}");
        assert!(text.contains("Bad configuration option") && text.contains("left as it was"), "{text}");
        assert_eq!(text_at(&sshd).unwrap(), "# old\n");
        assert_eq!(std::fs::metadata(sshd.drop_in_path()).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(!marker.exists(), "not reloaded");

        std::fs::remove_file(sshd.drop_in_path()).unwrap();
        let sshd = DeviceSshd { check: "false".into(), ..sshd };
        assert!(sshd.install(&drop_in("new")).is_err());
        assert!(text_at(&sshd).is_none(), "no drop-in before, none after");
        assert!(!marker.exists());
        let names: Vec<_> = std::fs::read_dir(&sshd.config_dir).unwrap().collect();
        assert!(names.is_empty(), "no temp file left: {names:?}");
    }

    #[test]
    fn a_passed_check_keeps_the_drop_in_and_reloads() {
        let tmp = TempDir::new("install-ok");
        let marker = tmp.0.join("reloaded");
        let sshd = device(&tmp, true, "true", &format!("touch {}", marker.display()));
        std::fs::write(sshd.drop_in_path(), "# old\n").unwrap();
        let path = sshd.install(&drop_in("new")).unwrap();
        assert_eq!(path, sshd.drop_in_path());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), drop_in("new").text);
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o644);
        assert!(marker.exists(), "reloaded");

        let failing = DeviceSshd { reload: "echo 'Unit ssh.service not found.' >&2; exit 5".into(), ..sshd.clone() };
        let err = failing.install(&drop_in("newer")).unwrap_err().to_string();
        assert!(err.contains("in place but sshd was not reloaded") && err.contains("ssh.service not found"), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), drop_in("newer").text);

        let missing = DeviceSshd { config_dir: tmp.0.join("no-such-dir"), ..sshd };
        assert!(matches!(missing.install(&drop_in("x")), Err(ApplyError::NoConfigDir(_))));
    }

    /// A mistyped --sshd-check was reported as sshd rejecting the config.
    #[test]
    fn a_check_or_reload_command_that_cannot_run_is_not_a_rejection() {
        let tmp = TempDir::new("unrunnable");
        let marker = tmp.0.join("reloaded");
        let sshd = device(&tmp, true, "sshdd-no-such-command -t", &format!("touch {}", marker.display()));
        std::fs::write(sshd.drop_in_path(), "# old\n").unwrap();
        for err in [sshd.install(&drop_in("new")).unwrap_err(), sshd.dry_run(&drop_in("new")).unwrap_err()] {
            let text = err.to_string();
            assert!(matches!(kept(&err), Some(Problem::CannotRun { role: "check", .. })), "{text}");
            assert!(
                text.starts_with("could not run the check command `sshdd-no-such-command -t` (not found"),
                "{text}"
            );
            assert!(text.contains("give --sshd-check CMD") && !text.contains("rejects"), "{text}");
            assert_eq!(text_at(&sshd).unwrap(), "# old\n");
        }
        let not_executable = tmp.0.join("check.sh");
        std::fs::write(&not_executable, "#!/bin/sh\n").unwrap();
        chmod(&not_executable, 0o644);
        let sshd = DeviceSshd { check: not_executable.display().to_string(), ..sshd };
        let text = sshd.install(&drop_in("new")).unwrap_err().to_string();
        assert!(text.contains("(not executable"), "{text}");
        assert!(!marker.exists());

        let sshd = DeviceSshd { check: "true".into(), reload: "systemctll reload ssh".into(), ..sshd };
        let err = sshd.install(&drop_in("new")).unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(&err, ApplyError::NotReloaded { problem, .. } if matches!(**problem, Problem::CannotRun { .. })),
            "{text}"
        );
        assert!(text.contains("could not run the reload command `systemctll reload ssh` (not found"), "{text}");
        assert!(text.contains("give --sshd-reload CMD"), "{text}");
    }

    /// `sshd -t` passed with the drop-in that sshd's config never included,
    /// and enroll said sshd trusted the CA.
    #[test]
    fn a_drop_in_sshd_does_not_take_is_put_back() {
        let tmp = TempDir::new("not-taken");
        let marker = tmp.0.join("reloaded");
        let sshd = device(&tmp, false, "true", &format!("touch {}", marker.display()));
        std::fs::write(sshd.drop_in_path(), "# old\n").unwrap();
        for err in [sshd.install(&drop_in("new")).unwrap_err(), sshd.dry_run(&drop_in("new")).unwrap_err()] {
            let text = err.to_string();
            assert!(matches!(kept(&err), Some(Problem::NotTaken { .. })), "{text}");
            let want = format!(
                "sshd's config {} does not take {} (`sshd -T` gives trustedusercakeys none): add `Include {}/*.conf` near its top",
                sshd.config.display(),
                sshd.drop_in_path().display(),
                sshd.config_dir.display()
            );
            assert!(text.starts_with(&want), "{text}");
            assert_eq!(text_at(&sshd).unwrap(), "# old\n");
        }
        assert!(!marker.exists(), "not reloaded");

        // sshd keeps the first value: a TrustedUserCAKeys of the config's own wins.
        let other = DropIn { settings: vec![("trustedusercakeys", "/other/ca.pub".into())], ..drop_in("new") };
        let sshd = device(&tmp, true, "true", "true");
        let text = sshd.install(&other).unwrap_err().to_string();
        assert!(text.contains("gives trustedusercakeys /t/user_ca.pub)"), "{text}");

        let broken = DeviceSshd { binary: tmp.0.join("no-sshd"), ..sshd };
        let err = broken.dry_run(&drop_in("new")).unwrap_err();
        let text = err.to_string();
        assert!(matches!(kept(&err), Some(Problem::NoEffectiveConfig { .. })), "{text}");
        assert!(text.contains(&format!("`{}/no-sshd -T -f", tmp.0.display())), "{text}");
    }

    #[test]
    fn the_dry_run_always_puts_back_what_was_there() {
        let tmp = TempDir::new("dry-run");
        let seen = tmp.0.join("seen");
        let sshd = device(&tmp, true, "", "false");
        let sshd = DeviceSshd { check: format!("cp {} {}", sshd.drop_in_path().display(), seen.display()), ..sshd };
        sshd.dry_run(&drop_in("new")).unwrap();
        assert_eq!(std::fs::read_to_string(&seen).unwrap(), drop_in("new").text, "the check saw the drop-in");
        assert!(text_at(&sshd).is_none());
        std::fs::write(sshd.drop_in_path(), "# old\n").unwrap();
        sshd.dry_run(&drop_in("new")).unwrap();
        assert_eq!(text_at(&sshd).unwrap(), "# old\n");
        let failing = DeviceSshd { check: "false".into(), ..sshd };
        assert!(matches!(failing.dry_run(&drop_in("new")), Err(ApplyError::Untouched { .. })));
        assert_eq!(text_at(&failing).unwrap(), "# old\n");
    }

    #[test]
    fn the_default_check_reads_the_given_config() {
        let tmp = TempDir::new("default-check");
        let dir = tmp.0.join("sshd_config.d");
        std::fs::create_dir(&dir).unwrap();
        let config = tmp.0.join("my sshd_config");
        assert!(matches!(
            DeviceSshd::new(config.clone(), dir.clone(), None, "true".into()),
            Err(ApplyError::NoSshdConfig(_))
        ));
        std::fs::write(&config, "").unwrap();
        let sshd = DeviceSshd::new(config.clone(), dir.clone(), None, "true".into()).unwrap();
        assert_eq!(sshd.check, format!("{} -t -f '{}'", sshd.binary.display(), config.display()));
        let given = DeviceSshd::new(config, dir, Some("sshd -t".into()), "true".into()).unwrap();
        assert_eq!(given.check, "sshd -t");
        assert_eq!(shell_word("/etc/ssh/sshd_config"), "/etc/ssh/sshd_config");
        assert_eq!(shell_word("/x/it's"), r"'/x/it'\''s'");
        assert_eq!(shell_word(""), "''");
    }

    #[test]
    fn sshd_t_values_are_read_by_keyword() {
        let out = "port 22\ntrustedusercakeys /a b\nauthorizedprincipalscommand /x agent  principals %u\n";
        assert_eq!(value_of(out, "trustedusercakeys"), Some("/a b"));
        assert_eq!(value_of(out, "authorizedprincipalscommand"), Some("/x agent  principals %u"));
        assert_eq!(value_of(out, "revokedkeys"), None);
        assert_eq!(value_of(out, "port"), Some("22"));
    }
}
