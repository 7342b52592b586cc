//! `burrow server` with its own data dir.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tempfile::TempDir;

use crate::*;

/// `burrow server` with its own data dir.
pub struct TestPivot {
    pub bin: PathBuf,
    pub data: TempDir,
    pub addr: SocketAddr,
    /// The embedded broker's device listener, if the pivot runs one.
    pub mqtt_addr: Option<SocketAddr>,
    /// Its TLS certificate's pin, unless it runs `--mqtt-plaintext`.
    pub mqtt_fingerprint: Option<String>,
    pub proc: Proc,
    pub extra_args: Vec<String>,
    /// Its `--database-url`, which admin commands then use too.
    pub database_url: Option<String>,
}

impl TestPivot {
    pub fn start(bin: &str) -> TestPivot {
        Self::start_with(bin, &[])
    }

    /// A pivot with the operator `alice` registered, and her OpenSSH setup.
    /// The port of `--http-listen 127.0.0.1:0`, as the pivot printed it.
    pub fn http_port(&self) -> u16 {
        let text = self.proc.log_text();
        let addr = text
            .lines()
            .find_map(|l| l.strip_prefix("http (/healthz, /metrics) listening on "))
            .expect("the pivot was started with --http-listen");
        addr.trim().parse::<SocketAddr>().expect("an address").port()
    }

    pub fn with_operator(bin: &str, extra: &[&str]) -> (TestPivot, Operator) {
        let pivot = Self::start_with(bin, extra);
        let op = Operator::new(&pivot);
        pivot.add_operator("alice", &op.key);
        (pivot, op)
    }

    /// Extra flags go to `burrow server`; unless they name an external broker
    /// (or `--no-mqtt`), the embedded broker listens on a free loopback port.
    pub fn start_with(bin: &str, extra: &[&str]) -> TestPivot {
        Self::start_in(bin, extra, None)
    }

    /// Another pivot behind the same name as `other`: its own data dir
    /// holding `other`'s host key (as pivots behind one DNS name do).
    pub fn start_sharing_host_key(bin: &str, extra: &[&str], other: &TestPivot) -> TestPivot {
        Self::start_in(bin, extra, Some(other.data.path()))
    }

    fn start_in(bin: &str, extra: &[&str], host_key_from: Option<&Path>) -> TestPivot {
        let data = tempfile::Builder::new().prefix("burrow-pivot").tempdir().unwrap();
        if let Some(from) = host_key_from {
            for f in ["host_key", "host_key.pub"] {
                std::fs::copy(from.join(f), data.path().join(f)).unwrap();
            }
        }
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let database_url = extra.iter().position(|a| a == "--database-url").and_then(|i| extra.get(i + 1)).cloned();
        let (proc, addr, mqtt_addr) =
            spawn_pivot(Path::new(bin), data.path(), "127.0.0.1:0", "127.0.0.1:0", &extra, 0).unwrap();
        let mqtt_fingerprint = certificate_line(&proc.log_text());
        TestPivot { bin: bin.into(), data, addr, mqtt_addr, mqtt_fingerprint, proc, extra_args: extra, database_url }
    }

    /// Stops the pivot and starts a new process on the same addresses and data dir.
    pub fn restart(&mut self) {
        self.proc.terminate(Duration::from_secs(15));
        let n = std::fs::read_dir(self.data.path()).map(|d| d.count()).unwrap_or(0);
        let mqtt = self.mqtt_addr.map(|a| a.to_string()).unwrap_or_else(|| "127.0.0.1:0".into());
        let (proc, addr, mqtt_addr) =
            spawn_pivot(&self.bin, self.data.path(), &self.addr.to_string(), &mqtt, &self.extra_args, n).unwrap();
        self.mqtt_fingerprint = certificate_line(&proc.log_text());
        self.proc = proc;
        self.addr = addr;
        self.mqtt_addr = mqtt_addr;
    }

    /// `mqtts://ADDR` of the embedded broker (`mqtt://` with `--mqtt-plaintext`).
    pub fn mqtt_url(&self) -> String {
        let addr = self.mqtt_addr.expect("pivot runs the embedded broker");
        match self.mqtt_fingerprint {
            Some(_) => format!("mqtts://{addr}"),
            None => format!("mqtt://{addr}"),
        }
    }

    /// Registers device `id` with a fresh key (kept in the data dir) and
    /// returns that key, for tests that speak MQTT as the device.
    pub fn new_device(&self, id: &str) -> ssh_key::PrivateKey {
        let pair = KeyPair::generate(self.data.path(), &format!("device-{id}"));
        self.add_device(id, &pair);
        ssh_key::PrivateKey::read_openssh_file(&pair.private).expect("the generated key loads")
    }

    /// A login token for device `id` on this pivot's embedded broker.
    pub fn login_token(&self, key: &ssh_key::PrivateKey, id: &str) -> String {
        let audience = self.mqtt_fingerprint.as_deref().unwrap_or("");
        burrow_core::signal::login_token(key, id, audience, burrow_core::time::now_unix()).unwrap()
    }

    /// What `burrow agent` needs to wait on this pivot's embedded broker.
    pub fn agent_mqtt_args(&self) -> Vec<String> {
        let mut args = vec!["--mqtt-url".to_string(), self.mqtt_url()];
        if let Some(fp) = &self.mqtt_fingerprint {
            args.extend(["--mqtt-fingerprint".to_string(), fp.clone()]);
        }
        args
    }

    /// A raw MQTT client's options for the embedded broker, TLS pinned like
    /// an agent's; credentials are the caller's.
    pub fn mqtt_options(&self, client_id: &str) -> rumqttc::MqttOptions {
        let addr = self.mqtt_addr.expect("pivot runs the embedded broker");
        let mut opts = rumqttc::MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
        if let Some(fp) = &self.mqtt_fingerprint {
            let pin = fp.parse().expect("the pivot prints a valid pin");
            let tls = burrow_agent::tls::pinned_client_config(pin);
            opts.set_transport(rumqttc::Transport::Tls(rumqttc::TlsConfiguration::Rustls(tls)));
        }
        opts
    }

    pub fn host_key_pub(&self) -> PathBuf {
        self.data.path().join("host_key.pub")
    }

    pub fn host_key_line(&self) -> String {
        std::fs::read_to_string(self.host_key_pub()).unwrap().trim().to_string()
    }

    /// Runs `burrow ARGS --data-dir DATA` (and the pivot's
    /// `--database-url`, if it has one) and returns its output.
    pub fn admin(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(&self.bin);
        cmd.args(args).arg("--data-dir").arg(self.data.path());
        if let Some(url) = &self.database_url {
            cmd.args(["--database-url", url]);
        }
        cmd.output().expect("burrow runs")
    }

    /// Like [`admin`](Self::admin), but panics unless it succeeds.
    pub fn admin_ok(&self, args: &[&str]) -> String {
        let out = self.admin(args);
        assert!(
            out.status.success(),
            "burrow {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn add_device(&self, id: &str, key: &KeyPair) {
        self.admin_ok(&["device", "add", id, "--key", key.public.to_str().unwrap()]);
    }

    pub fn add_operator(&self, name: &str, key: &KeyPair) {
        self.admin_ok(&["operator", "add", name, "--key", key.public.to_str().unwrap()]);
    }

    /// The device's entry from `burrow device list --json`.
    pub fn device_json(&self, id: &str) -> Option<serde_json::Value> {
        let out = self.admin_ok(&["device", "list", "--json"]);
        let list: Vec<serde_json::Value> = serde_json::from_str(&out).expect("device list --json is JSON");
        list.into_iter().find(|d| d["id"] == id)
    }

    /// The device's tunnel is open.
    pub fn is_online(&self, id: &str) -> bool {
        self.device_json(id).is_some_and(|d| d["tunnel"] == true)
    }

    /// The device's presence over MQTT is "online".
    pub fn is_present(&self, id: &str) -> bool {
        self.device_json(id).is_some_and(|d| d["presence"] == "online")
    }

    pub fn wait_online(&self, id: &str, online: bool, timeout: Duration) -> bool {
        wait_until(timeout, || self.is_online(id) == online)
    }
}

/// The pin `burrow server` prints for its MQTT certificate.
fn certificate_line(log: &str) -> Option<String> {
    let rest = log.lines().find_map(|l| l.strip_prefix("mqtt certificate "))?;
    rest.split_whitespace().next().map(str::to_string)
}

fn spawn_pivot(
    bin: &Path,
    data: &Path,
    listen: &str,
    mqtt_listen: &str,
    extra: &[String],
    n: usize,
) -> Result<(Proc, SocketAddr, Option<SocketAddr>)> {
    let log = data.join(format!("server-{n}.log"));
    let mut cmd = Command::new(bin);
    cmd.args(["server", "--listen", listen, "--data-dir"]).arg(data);
    let embedded = !extra.iter().any(|a| a == "--mqtt-url" || a == "--no-mqtt");
    if embedded {
        cmd.args(["--mqtt-listen", mqtt_listen]);
    }
    cmd.args(extra);
    let mut proc = Proc::spawn("burrow server", &mut cmd, log);
    let deadline = Instant::now() + Duration::from_secs(20);
    let after = |text: &str, prefix: &str| -> Option<String> {
        text.lines().find_map(|l| l.strip_prefix(prefix)).map(|s| s.trim().to_string())
    };
    loop {
        let text = proc.log_text();
        let ssh = after(&text, "burrow pivot listening on ");
        let mqtt = after(&text, "mqtt (embedded broker) listening on ");
        // The embedded broker's address comes last, after its certificate.
        let ready = if embedded { mqtt.is_some() } else { text.lines().any(|l| l.starts_with("mqtt ")) };
        if let (Some(ssh), true) = (ssh, ready) {
            let mqtt = mqtt.map(|m| m.parse()).transpose().context("mqtt address")?;
            return Ok((proc, ssh.parse().context("listen address")?, mqtt));
        }
        if !proc.is_running() || Instant::now() > deadline {
            bail!("burrow server did not start:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
