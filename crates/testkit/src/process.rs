//! Processes and polling: [`Proc`], [`wait_until`], [`require_tool`], ports and keys.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const SSHD: &str = "/usr/sbin/sshd";

/// Fails loudly when a tool the tests need is missing: CI installs them, and a
/// test that skips proves nothing.
pub fn require_tool(path: &str) {
    let found = if path.contains('/') {
        Path::new(path).exists()
    } else {
        Command::new("sh").arg("-c").arg(format!("command -v {path}")).output().is_ok_and(|o| o.status.success())
    };
    assert!(found, "{path} is required by this test; install it (see .ci/run)");
}

/// Polls `cond` every 50 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A free loopback port, picked by the kernel.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// An ed25519 key pair made by ssh-keygen.
#[derive(Debug, Clone)]
pub struct KeyPair {
    pub private: PathBuf,
    pub public: PathBuf,
}

impl KeyPair {
    pub fn generate(dir: &Path, name: &str) -> KeyPair {
        let private = dir.join(name);
        let out = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
            .arg(&private)
            .output()
            .expect("ssh-keygen runs");
        assert!(out.status.success(), "ssh-keygen failed: {}", String::from_utf8_lossy(&out.stderr));
        KeyPair { public: private.with_extension("pub"), private }
    }

    pub fn public_line(&self) -> String {
        std::fs::read_to_string(&self.public).unwrap().trim().to_string()
    }
}

/// A child process that is killed on drop; its log is printed if the test fails.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command, log: PathBuf) -> Proc {
        let file = std::fs::File::create(&log).unwrap();
        // An agent keeps its status next to its log, not in the machine's
        // /run, where parallel tests would overwrite each other's.
        if std::env::var_os("BURROW_STATUS_FILE").is_none() {
            cmd.env("BURROW_STATUS_FILE", log.with_extension("status.json"));
        }
        let child = cmd
            .stdin(Stdio::null())
            .stderr(file.try_clone().unwrap())
            .stdout(file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc { name: name.to_string(), child, log }
    }

    /// The status an agent started by `spawn` keeps (`burrow agent status --status-file`).
    pub fn status_file(&self) -> PathBuf {
        self.log.with_extension("status.json")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then wait up to `timeout` for exit; SIGKILL after that.
    pub fn terminate(&mut self, timeout: Duration) {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        if !wait_until(timeout, || !self.is_running()) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }

    /// SIGKILL: the process gets no chance to say goodbye.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("----- {} log ({}) -----\n{}", self.name, self.log.display(), self.log_text());
        }
    }
}

/// The stderr of an output, for assertions on refusal texts.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Reads lines from a child's stdout until one satisfies `pred`, or the deadline passes.
pub fn read_line_until(child: &mut Child, timeout: Duration, pred: impl Fn(&str) -> bool + Send + 'static) -> bool {
    let stdout = child.stdout.take().expect("stdout is piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if pred(&line) {
                let _ = tx.send(());
                break;
            }
        }
    });
    rx.recv_timeout(timeout).is_ok()
}

/// TCP connections of process `pid` to `port` on loopback, from `ss`.
pub fn connections_to(pid: u32, port: u16) -> usize {
    require_tool("ss");
    let out = Command::new("ss").args(["-tnpH", "state", "established"]).output().expect("ss runs");
    let needle = format!("pid={pid},");
    stdout(&out)
        .lines()
        .filter(|l| l.contains(&needle))
        .filter(|l| l.split_whitespace().nth(3).is_some_and(|peer| peer.ends_with(&format!(":{port}"))))
        .count()
}
