//! `burrow agent` for one device, and a whole device (sshd and agent).

use std::process::Command;
use std::time::Duration;

use tempfile::TempDir;

use crate::*;

/// `burrow agent` for one device.
pub struct TestAgent {
    pub proc: Proc,
    pub dir: TempDir,
}

impl TestAgent {
    pub fn start(bin: &str, pivot: &TestPivot, id: &str, key: &KeyPair, expose: &[String]) -> TestAgent {
        let pin = pivot.host_key_pub();
        Self::start_pinned(bin, &pivot.addr.to_string(), id, key, pin.to_str().unwrap(), expose)
    }

    /// An on-demand agent waiting on the broker at `url` (the pivot's own
    /// embedded one is pinned by its certificate), exposing `target` as port 22.
    pub fn on_demand(
        bin: &str,
        pivot: &TestPivot,
        id: &str,
        key: &KeyPair,
        target: &str,
        url: &str,
        extra: &[&str],
    ) -> TestAgent {
        let dir = tempfile::Builder::new().prefix("burrow-agent").tempdir().unwrap();
        let mut cmd = Command::new(bin);
        cmd.args(["agent", "--mqtt-url", url, "--id", id, "--key"]).arg(&key.private);
        if let (Some(fp), true) = (&pivot.mqtt_fingerprint, pivot.mqtt_addr.is_some() && url == pivot.mqtt_url()) {
            cmd.args(["--mqtt-fingerprint", fp]);
        }
        cmd.arg("--pivot-host-key").arg(pivot.host_key_pub()).args(["--expose", &format!("22={target}")]).args(extra);
        let proc = Proc::spawn(&format!("burrow agent {id}"), &mut cmd, dir.path().join("agent.log"));
        TestAgent { proc, dir }
    }

    pub fn start_pinned(bin: &str, server: &str, id: &str, key: &KeyPair, pin: &str, expose: &[String]) -> TestAgent {
        let dir = tempfile::Builder::new().prefix("burrow-agent").tempdir().unwrap();
        let mut cmd = Command::new(bin);
        cmd.args(["agent", "--server", server, "--id", id, "--key"]).arg(&key.private).args(["--pivot-host-key", pin]);
        for e in expose {
            cmd.args(["--expose", e]);
        }
        let proc = Proc::spawn(&format!("burrow agent {id}"), &mut cmd, dir.path().join("agent.log"));
        TestAgent { proc, dir }
    }
}

/// A registered device with its own sshd and a running agent.
pub struct Device {
    pub id: String,
    pub key: KeyPair,
    pub sshd: Sshd,
    pub agent: TestAgent,
}

impl Device {
    /// Registers `id`, starts its sshd (trusting `op`'s key for root) and an
    /// agent exposing port 22, and waits until its tunnel is up.
    pub fn start(bin: &str, pivot: &TestPivot, op: &Operator, id: &str) -> Device {
        Self::start_exposing(bin, pivot, op, id, &[])
    }

    /// Like [`start`](Self::start), with more `--expose` specs besides port 22.
    pub fn start_exposing(bin: &str, pivot: &TestPivot, op: &Operator, id: &str, extra: &[String]) -> Device {
        let sshd = Sshd::start(&[&op.key]);
        let key = KeyPair::generate(sshd.dir.path(), &format!("device-{id}"));
        pivot.add_device(id, &key);
        op.trust_device(id, &sshd);
        let mut expose = vec![format!("22={}", sshd.target())];
        expose.extend(extra.iter().cloned());
        let agent = TestAgent::start(bin, pivot, id, &key, &expose);
        assert!(pivot.wait_online(id, true, Duration::from_secs(20)), "device {id} did not come online");
        Device { id: id.to_string(), key, sshd, agent }
    }
}
