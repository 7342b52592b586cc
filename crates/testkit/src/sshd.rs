//! A real OpenSSH server as a device's target.

use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use tempfile::TempDir;

use crate::*;

/// A real OpenSSH server, standing in for a device's own sshd.
pub struct Sshd {
    pub dir: TempDir,
    pub port: u16,
    pub host_key: KeyPair,
    pub proc: Proc,
}

impl Sshd {
    /// Starts sshd on a free loopback port, accepting `authorized` keys for root.
    pub fn start(authorized: &[&KeyPair]) -> Sshd {
        Self::start_with(authorized, "")
    }

    /// Like [`start`](Self::start), with extra `sshd_config` lines (e.g. to act as an OpenSSH pivot).
    pub fn start_with(authorized: &[&KeyPair], extra_config: &str) -> Sshd {
        require_tool(SSHD);
        std::fs::create_dir_all("/run/sshd").expect("privilege separation dir /run/sshd");
        let dir = tempfile::Builder::new().prefix("burrow-sshd").tempdir().unwrap();
        let host_key = KeyPair::generate(dir.path(), "ssh_host_ed25519_key");
        let keys: String = authorized.iter().map(|k| k.public_line() + "\n").collect();
        std::fs::write(dir.path().join("authorized_keys"), keys).unwrap();
        for _ in 0..5 {
            let port = free_port();
            let config = dir.path().join("sshd_config");
            std::fs::write(
                &config,
                format!(
                    "Port {port}\nListenAddress 127.0.0.1\nHostKey {hk}\nAuthorizedKeysFile {ak}\n\
                     PasswordAuthentication no\nKbdInteractiveAuthentication no\n\
                     PermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\nPidFile none\n\
                     Subsystem sftp internal-sftp\nLogLevel VERBOSE\n{extra_config}",
                    hk = host_key.private.display(),
                    ak = dir.path().join("authorized_keys").display(),
                ),
            )
            .unwrap();
            let mut cmd = Command::new(SSHD);
            cmd.arg("-D").arg("-e").arg("-f").arg(&config);
            let mut proc = Proc::spawn("sshd", &mut cmd, dir.path().join("sshd.log"));
            let up = wait_until(Duration::from_secs(10), || {
                !proc.is_running() || TcpStream::connect(("127.0.0.1", port)).is_ok()
            });
            if up && proc.is_running() {
                return Sshd { dir, port, host_key, proc };
            }
        }
        panic!("sshd did not start");
    }

    /// `127.0.0.1:PORT`, the target an agent exposes.
    pub fn target(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

/// A copy of a binary where sshd agrees to run it as an
/// `AuthorizedPrincipalsCommand`: a root-owned directory no one else can
/// write, under `/run` (a build tree in `/tmp` is not). Removed on drop.
pub struct SshdRunnable {
    pub dir: TempDir,
    pub path: std::path::PathBuf,
}

impl SshdRunnable {
    pub fn copy(bin: &str) -> SshdRunnable {
        use std::os::unix::fs::PermissionsExt;
        let dir =
            tempfile::Builder::new().prefix("burrow-bin").tempdir_in("/run").expect("a directory under /run (root)");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = dir.path().join("burrow");
        std::fs::copy(bin, &path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        SshdRunnable { dir, path }
    }
}
