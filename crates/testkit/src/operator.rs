//! An operator's OpenSSH setup.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use tempfile::TempDir;

use crate::*;

/// An operator's OpenSSH setup: key, an ssh_config naming the pivot `pivot`,
/// and a known_hosts file with the pivot's and the devices' host keys.
pub struct Operator {
    pub dir: TempDir,
    pub key: KeyPair,
    pub config: PathBuf,
    pub known_hosts: PathBuf,
}

impl Operator {
    pub fn new(pivot: &TestPivot) -> Operator {
        require_tool("ssh");
        let dir = tempfile::Builder::new().prefix("burrow-operator").tempdir().unwrap();
        let key = KeyPair::generate(dir.path(), "id_ed25519");
        let known_hosts = dir.path().join("known_hosts");
        std::fs::write(&known_hosts, format!("[127.0.0.1]:{} {}\n", pivot.addr.port(), pivot.host_key_line())).unwrap();
        let config = dir.path().join("ssh_config");
        std::fs::write(
            &config,
            format!(
                "Host pivot\n  HostName 127.0.0.1\n  Port {port}\n\nHost *\n  IdentityFile {key}\n  IdentitiesOnly yes\n  \
                 UserKnownHostsFile {kh}\n  StrictHostKeyChecking yes\n  BatchMode yes\n  ConnectTimeout 10\n",
                port = pivot.addr.port(),
                key = key.private.display(),
                kh = known_hosts.display(),
            ),
        )
        .unwrap();
        Operator { dir, key, config, known_hosts }
    }

    /// Trusts `sshd`'s host key for the name `host` (e.g. the device id).
    pub fn trust_device(&self, host: &str, sshd: &Sshd) {
        let line = format!("{host} {}\n", sshd.host_key.public_line());
        let mut text = std::fs::read_to_string(&self.known_hosts).unwrap();
        text.push_str(&line);
        std::fs::write(&self.known_hosts, text).unwrap();
    }

    /// `ssh -F CONFIG ARGS`.
    pub fn ssh(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ssh");
        cmd.arg("-F").arg(&self.config).args(args);
        cmd
    }

    /// `ssh -F CONFIG -J pivot root@ID CMD`.
    pub fn ssh_device(&self, id: &str, remote: &str) -> Output {
        self.ssh(&["-J", "pivot", &format!("root@{id}"), remote]).stdin(Stdio::null()).output().expect("ssh runs")
    }

    pub fn scp(&self, args: &[&str]) -> Output {
        require_tool("scp");
        Command::new("scp")
            .arg("-F")
            .arg(&self.config)
            .args(["-q", "-J", "pivot"])
            .args(args)
            .output()
            .expect("scp runs")
    }

    /// `ssh` to the pivot as a bare OpenSSH client with `key` (no config
    /// file), trusting the pivot through this operator's known_hosts. Add
    /// `-N -R …`, `-W …` and the `user@127.0.0.1` destination.
    pub fn bare_ssh(&self, pivot: &TestPivot, key: &KeyPair) -> Command {
        let mut cmd = Command::new("ssh");
        cmd.args(["-F", "/dev/null", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes"])
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", self.known_hosts.display()))
            .args(["-o", "StrictHostKeyChecking=yes", "-i"])
            .arg(&key.private)
            .args(["-p", &pivot.addr.port().to_string()])
            .stdin(Stdio::null());
        cmd
    }

    /// A device that has nothing but the OpenSSH client: `ssh -N -R
    /// ID:22:<sshd>` into the pivot as `id` with `key`, logging to `log` in
    /// the sshd's directory.
    pub fn stock_device(&self, pivot: &TestPivot, id: &str, key: &KeyPair, sshd: &Sshd, log: &str) -> Proc {
        let mut cmd = self.bare_ssh(pivot, key);
        cmd.args(["-N", "-o", "ExitOnForwardFailure=yes", "-R"])
            .arg(format!("{id}:22:{}", sshd.target()))
            .arg(format!("{id}@127.0.0.1"));
        Proc::spawn(log, &mut cmd, sshd.dir.path().join(log))
    }

    pub fn ssh_cmdline(&self) -> String {
        format!("ssh -F {} -J pivot", self.config.display())
    }
}

/// The SHA256 fingerprint of a `.pub` file, as `--pivot-host-key` takes it.
pub fn fingerprint(pub_file: &std::path::Path) -> String {
    let key = burrow_core::keys::read_public_key(pub_file).unwrap();
    burrow_core::fingerprint(&key)
}

/// An operator's laptop: its own HOME, so `burrow login` writes only there.
pub struct Laptop {
    pub bin: PathBuf,
    pub home: TempDir,
    pub key: KeyPair,
}

impl Laptop {
    pub fn new(bin: &str) -> Laptop {
        require_tool("ssh");
        let home = tempfile::Builder::new().prefix("burrow-home").tempdir().unwrap();
        let key = KeyPair::generate(home.path(), "id_operator");
        Laptop { bin: bin.into(), home, key }
    }

    /// `burrow ARGS` with this laptop's HOME and no ssh-agent.
    pub fn burrow(&self, args: &[&str]) -> Output {
        Command::new(&self.bin)
            .env("HOME", self.home.path())
            .env_remove("SSH_AUTH_SOCK")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// `burrow login` to `pivot` with this laptop's key.
    pub fn login(&self, pivot: &TestPivot) -> Output {
        let fp = fingerprint(&pivot.host_key_pub());
        let addr = pivot.addr.to_string();
        self.burrow(&["login", &addr, "--pivot-host-key", &fp, "--identity", self.key.private.to_str().unwrap()])
    }

    /// The stock ssh client with the user config `burrow login` extended.
    pub fn ssh(&self, args: &[&str]) -> Output {
        Command::new("ssh")
            .arg("-F")
            .arg(self.home.path().join(".ssh/config"))
            .args(["-o", "BatchMode=yes"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// `burrow --pivot ADDR …` with this laptop's key and the pivot's pinned fingerprint.
    pub fn remote(&self, pivot: &TestPivot, args: &[&str]) -> Output {
        let fp = fingerprint(&pivot.host_key_pub());
        let addr = pivot.addr.to_string();
        let mut all = args.to_vec();
        all.extend_from_slice(&[
            "--pivot",
            &addr,
            "--pivot-host-key",
            &fp,
            "--identity",
            self.key.private.to_str().unwrap(),
        ]);
        self.burrow(&all)
    }
}
