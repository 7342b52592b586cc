//! `burrow ssh`, `burrow scp`, `burrow sftp` and `burrow forward`: the
//! system's OpenSSH with the settings `burrow login` wrote, after asking the
//! pivot whether the device can be reached, so an offline device gets the
//! same clear message as through `ssh -J`.

use std::process::{Command, ExitCode};

use anyhow::{bail, Context, Result};
use burrow_agent::pivot_client;
use burrow_core::rpc::{CaKeyInfo, DeviceInfo, Request};

use crate::remote::{LoginState, Remote};

#[derive(clap::Args)]
pub struct SshArgs {
    /// ssh's own arguments: [OPTIONS] [USER@]DEVICE[.NAME] [COMMAND]; -l, -p, -o, -i… pass through.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true, value_name = "SSH ARGS")]
    args: Vec<String>,
}

#[derive(clap::Args)]
pub struct ScpArgs {
    /// scp's own arguments; remote files as [USER@]DEVICE:PATH. Options (-r, -p, -i…) pass through.
    #[arg(required = true, num_args = 2.., trailing_var_arg = true, allow_hyphen_values = true, value_name = "SCP ARGS")]
    args: Vec<String>,
}

#[derive(clap::Args)]
pub struct SftpArgs {
    /// sftp's own arguments: [OPTIONS] [USER@]DEVICE[:PATH]; -b FILE, -l, -o… pass through.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true, value_name = "SFTP ARGS")]
    args: Vec<String>,
}

#[derive(clap::Args)]
pub struct ForwardArgs {
    /// DEVICE[.NAME]:PORT to reach.
    target: String,
    /// Local address to listen on [default: 127.0.0.1:PORT if unprivileged and free, else a free port].
    #[arg(long)]
    local: Option<String>,
}

/// Options of each OpenSSH tool that take a value (from their manuals).
const SSH_VALUED: &str = "BbcDEeFIiJLlmOoPpQRSWw";
const SCP_VALUED: &str = "cDFiJloPSX";
const SFTP_VALUED: &str = "BbcDFiJloPRSsX";

/// Indices of the operands in an OpenSSH tool's arguments, skipping
/// options and their values (`-l root`, `-lroot`, `-4v`), up to `--`.
fn operands(args: &[String], valued: &str) -> Vec<usize> {
    let mut out = Vec::new();
    let mut i = 0;
    let mut options = true;
    while i < args.len() {
        let a = &args[i];
        if options && a == "--" {
            options = false;
        } else if options && a.len() > 1 && a.starts_with('-') {
            for (pos, c) in a.char_indices().skip(1) {
                if valued.contains(c) {
                    if pos + c.len_utf8() == a.len() {
                        i += 1; // the value is the next argument
                    }
                    break;
                }
            }
        } else {
            out.push(i);
        }
        i += 1;
    }
    out
}

struct Session {
    state: LoginState,
    remote: Remote,
}

impl Session {
    /// The login that `[user@]device[.name]` points at, and the device id.
    fn for_device(target: &str) -> Result<(Session, String)> {
        let (state, id) = LoginState::for_device(target)?;
        let remote = Remote::new(&state.pivot, Some(&state.fingerprint), state.identity.as_deref())?;
        Ok((Session { state, remote }, id))
    }

    /// Asks the pivot whether `id:port` is reachable; prints its refusal if
    /// not. On the same connection, renews the login's certificate if
    /// needed, and warns when it cannot log in as `user` (`user@` given).
    async fn check(&self, id: &str, port: u32, user: Option<&str>) -> Result<bool> {
        let id = burrow_core::Id::parse(id)?;
        let handle = match self.remote.connect().await {
            Ok(h) => h,
            Err(e) => {
                eprintln!("burrow: {e:#}");
                return Ok(false);
            }
        };
        self.renew_certificate(&handle).await;
        let answer = pivot_client::call(&handle, &Request::Check { id, port }).await;
        let _ = handle.disconnect(russh::Disconnect::ByApplication, "", "en").await;
        match answer {
            Ok(device) => {
                if let (Some(user), Ok(d)) = (user, serde_json::from_value::<DeviceInfo>(device)) {
                    self.warn_unlisted_user(&d, user);
                }
                Ok(true)
            }
            Err(e) => {
                eprintln!("burrow: {:#}", anyhow::Error::from(e));
                Ok(false)
            }
        }
    }

    /// Gets a new certificate if the login's has run out (or will within a
    /// minute), or its CA key is no longer trusted (`burrow ca rotate
    /// --now`): the device's sshd would refuse it.
    async fn renew_certificate<H: russh::client::Handler>(&self, handle: &russh::client::Handle<H>) {
        let Some(path) = &self.state.certificate else { return };
        let mut stale = !crate::login::certificate_fresh(path, std::time::Duration::from_secs(60));
        if !stale {
            if let Some(signer) = crate::login::certificate_signer(path) {
                if let Ok(v) = pivot_client::call(handle, &Request::CaShow).await {
                    let keys: Vec<CaKeyInfo> = serde_json::from_value(v).unwrap_or_default();
                    stale = !keys.is_empty() && !keys.iter().any(|k| k.fingerprint == signer && k.state != "next");
                }
            }
        }
        if !stale {
            return;
        }
        let answer = pivot_client::call(handle, &Request::Certificate).await.map_err(anyhow::Error::from);
        match answer.and_then(|v| crate::login::write_certificate(path, v)) {
            Ok(c) => tracing::debug!(serial = c.serial, "renewed the certificate"),
            Err(e) => eprintln!("burrow: cannot renew the certificate {}: {e:#}", path.display()),
        }
    }

    /// On a device that takes certificates, says so if the certificate does
    /// not name `user`: sshd's answer would only be "Permission denied".
    fn warn_unlisted_user(&self, d: &DeviceInfo, user: &str) {
        let Some(path) = &self.state.certificate else { return };
        if d.access != "certificates" {
            return;
        }
        let Some(users) = crate::login::certificate_users(path) else { return };
        if !users.iter().any(|u| u == user || u == burrow_core::cert::ANY) {
            eprintln!(
                "burrow: your certificate logs in to devices as {}, not '{}'; an admin gives more with `burrow operator add … --device-user {}`",
                users.join(", "),
                burrow_core::text::printable(user),
                burrow_core::text::printable(user)
            );
        }
    }

    fn host(&self, id: &str) -> String {
        format!("{id}.{}", self.state.name)
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.arg("-F").arg(&self.state.ssh_config);
        cmd
    }
}

/// `[user@]id` → (`user@` or "", id)
fn split_user(target: &str) -> (&str, &str) {
    match target.rfind('@') {
        Some(i) => (&target[..=i], &target[i + 1..]),
        None => ("", target),
    }
}

/// Runs the OpenSSH tool to completion. Awaited, not blocking: the runtime
/// is single-threaded and must keep running so the SSH connection of the
/// reachability check above closes now rather than when the pivot times it out.
/// The child gets SIGTERM when this process dies, however it dies, so a
/// killed `burrow forward` does not leave its ssh holding the port.
async fn run(mut cmd: Command) -> Result<ExitCode> {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs in the child between fork and exec and only
    // makes async-signal-safe calls (prctl, getppid, kill).
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if libc::getppid() != parent {
                libc::kill(libc::getpid(), libc::SIGTERM);
            }
            Ok(())
        });
    }
    let program = cmd.get_program().to_owned();
    let status =
        tokio::process::Command::from(cmd).status().await.with_context(|| format!("cannot run {program:?}"))?;
    Ok(ExitCode::from(status.code().unwrap_or(1).clamp(0, 255) as u8))
}

pub async fn ssh(a: SshArgs) -> Result<ExitCode> {
    let mut args = a.args;
    let Some(&at) = operands(&args, SSH_VALUED).first() else { bail!("give the device: burrow ssh [USER@]DEVICE") };
    let (user, name) = split_user(&args[at]);
    let user = user.to_string();
    let (s, id) = Session::for_device(name)?;
    if !s.check(&id, 22, user.strip_suffix('@')).await? {
        return Ok(ExitCode::FAILURE);
    }
    args[at] = format!("{user}{}", s.host(&id));
    let mut cmd = s.command("ssh");
    cmd.args(&args);
    run(cmd).await
}

pub async fn sftp(a: SftpArgs) -> Result<ExitCode> {
    let mut args = a.args;
    let Some(&at) = operands(&args, SFTP_VALUED).first() else { bail!("give the device: burrow sftp [USER@]DEVICE") };
    // [user@]device[:path]
    let (target, path) = match args[at].split_once(':') {
        Some((t, p)) => (t.to_string(), format!(":{p}")),
        None => (args[at].clone(), String::new()),
    };
    let (user, name) = split_user(&target);
    let (s, id) = Session::for_device(name)?;
    if !s.check(&id, 22, user.strip_suffix('@')).await? {
        return Ok(ExitCode::FAILURE);
    }
    args[at] = format!("{user}{}{path}", s.host(&id));
    let mut cmd = s.command("sftp");
    cmd.args(&args);
    run(cmd).await
}

pub async fn scp(a: ScpArgs) -> Result<ExitCode> {
    let mut args = a.args;
    let mut session: Option<Session> = None;
    for at in operands(&args, SCP_VALUED) {
        // A remote path is [user@]device:path; local paths with '/' before ':' stay local.
        let Some((target, path)) = args[at].split_once(':') else { continue };
        if target.contains('/') || target.is_empty() {
            continue;
        }
        let (user, name) = split_user(target);
        let (s, id) = Session::for_device(name)?;
        if session.as_ref().is_some_and(|prev| prev.state.name != s.state.name) {
            bail!("scp between devices behind different pivots is not supported; copy through this machine");
        }
        if !s.check(&id, 22, user.strip_suffix('@')).await? {
            return Ok(ExitCode::FAILURE);
        }
        args[at] = format!("{user}{}:{path}", s.host(&id));
        session = Some(s);
    }
    let Some(s) = session else { bail!("no remote path: name one as [USER@]DEVICE:PATH") };
    let mut cmd = s.command("scp");
    cmd.args(&args);
    run(cmd).await
}

pub async fn forward(a: ForwardArgs) -> Result<ExitCode> {
    let Some((name, port)) = a.target.rsplit_once(':') else { bail!("forward takes DEVICE:PORT") };
    let port: u16 = port.parse().context("port")?;
    let (s, id) = Session::for_device(name)?;
    let id = id.as_str();
    if !s.check(id, u32::from(port), None).await? {
        return Ok(ExitCode::FAILURE);
    }
    // Without --local: the same port if it is unprivileged and free,
    // otherwise any free one (never a privileged port such as 22).
    let local = match a.local {
        Some(l) => l,
        None => {
            let same = (port >= 1024).then(|| std::net::TcpListener::bind(("127.0.0.1", port)).ok()).flatten();
            let free = match same {
                Some(l) => l,
                None => std::net::TcpListener::bind("127.0.0.1:0").context("cannot find a free local port")?,
            };
            free.local_addr()?.to_string()
        }
    };
    let mut cmd = s.command("ssh");
    cmd.args(["-N", "-o", "ExitOnForwardFailure=yes", "-L", &format!("{local}:{id}:{port}"), &s.state.pivot_alias()]);
    eprintln!("forwarding {local} to {id}:{port}; Ctrl-C to stop");
    run(cmd).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ops(args: &[&str], valued: &str) -> Vec<usize> {
        operands(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>(), valued)
    }

    #[test]
    fn finds_the_destination_past_options() {
        assert_eq!(ops(&["-l", "root", "cam-43", "uname"], SSH_VALUED), [2, 3]);
        assert_eq!(ops(&["-lroot", "-4v", "cam-43"], SSH_VALUED), [2]);
        assert_eq!(ops(&["-o", "BatchMode=yes", "-t", "cam-43"], SSH_VALUED), [3]);
        assert_eq!(ops(&["--", "-cam"], SSH_VALUED), [1]);
        assert_eq!(ops(&["-b", "batch.txt", "root@cam-43"], SFTP_VALUED), [2]);
        assert_eq!(ops(&["-r", "-i", "k:ey", "a", "cam:/b"], SCP_VALUED), [3, 4]);
    }
}
