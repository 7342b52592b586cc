//! `burrow ssh`, `burrow scp`, `burrow sftp` and `burrow forward`: the
//! system's OpenSSH with the settings `burrow login` wrote, after asking the
//! pivot whether the device can be reached, so an offline device gets the
//! same clear message as through `ssh -J`.

use std::process::{Command, ExitCode};

use anyhow::{bail, Context, Result};
use burrow_core::rpc::Request;

use crate::remote::{LoginState, Remote};

#[derive(clap::Args)]
pub struct SshArgs {
    /// [USER@]DEVICE
    target: String,
    /// Passed to ssh after the target (a remote command, or options before `--`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

#[derive(clap::Args)]
pub struct ScpArgs {
    /// Files; remote ones as [USER@]DEVICE:PATH. Options (-r, -p…) pass through.
    #[arg(required = true, num_args = 2.., allow_hyphen_values = true)]
    paths: Vec<String>,
}

#[derive(clap::Args)]
pub struct SftpArgs {
    /// [USER@]DEVICE
    target: String,
}

#[derive(clap::Args)]
pub struct ForwardArgs {
    /// DEVICE:PORT to reach.
    target: String,
    /// Local address to listen on [default: 127.0.0.1:PORT if unprivileged and free, else a free port].
    #[arg(long)]
    local: Option<String>,
}

struct Session {
    state: LoginState,
    remote: Remote,
}

fn session() -> Result<Session> {
    let state = LoginState::load().context("not logged in: run `burrow login HOST:PORT` first")?;
    let remote = Remote::new(&state.pivot, Some(&state.fingerprint), state.identity.as_deref())?;
    Ok(Session { state, remote })
}

impl Session {
    /// Asks the pivot whether `id:port` is reachable; prints its refusal if not.
    async fn check(&self, id: &str, port: u32) -> Result<bool> {
        match self.remote.call(&Request::Check { id: id.to_string(), port }).await {
            Ok(_) => Ok(true),
            Err(e) => {
                eprintln!("burrow: {e:#}");
                Ok(false)
            }
        }
    }

    fn host(&self, id: &str) -> String {
        format!("{id}.{}", self.state.suffix)
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
    let s = session()?;
    let (user, id) = split_user(&a.target);
    if !s.check(id, 22).await? {
        return Ok(ExitCode::FAILURE);
    }
    let mut cmd = s.command("ssh");
    cmd.arg(format!("{user}{}", s.host(id))).args(&a.args);
    run(cmd).await
}

pub async fn sftp(a: SftpArgs) -> Result<ExitCode> {
    let s = session()?;
    let (user, id) = split_user(&a.target);
    if !s.check(id, 22).await? {
        return Ok(ExitCode::FAILURE);
    }
    let mut cmd = s.command("sftp");
    cmd.arg(format!("{user}{}", s.host(id)));
    run(cmd).await
}

pub async fn scp(a: ScpArgs) -> Result<ExitCode> {
    let s = session()?;
    let mut args = Vec::new();
    for p in &a.paths {
        // A remote path is [user@]device:path; local paths with '/' before ':' stay local.
        match p.split_once(':') {
            Some((target, path)) if !p.starts_with('-') && !target.contains('/') => {
                let (user, id) = split_user(target);
                if !s.check(id, 22).await? {
                    return Ok(ExitCode::FAILURE);
                }
                args.push(format!("{user}{}:{path}", s.host(id)));
            }
            _ => args.push(p.clone()),
        }
    }
    let mut cmd = s.command("scp");
    cmd.args(&args);
    run(cmd).await
}

pub async fn forward(a: ForwardArgs) -> Result<ExitCode> {
    let s = session()?;
    let Some((id, port)) = a.target.rsplit_once(':') else { bail!("forward takes DEVICE:PORT") };
    let port: u16 = port.parse().context("port")?;
    if !s.check(id, u32::from(port)).await? {
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
    cmd.args(["-N", "-o", "ExitOnForwardFailure=yes", "-L", &format!("{local}:{id}:{port}"), "burrow-pivot"]);
    eprintln!("forwarding {local} to {id}:{port}; Ctrl-C to stop");
    run(cmd).await
}
