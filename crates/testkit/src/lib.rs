//! Test kit: real processes for integration tests.
//!
//! - [`Sshd`]: a real `/usr/sbin/sshd` as a device's target, in its own temp dir.
//! - [`TestPivot`]: `burrow server` on `127.0.0.1:0`, with its registry.
//! - [`TestAgent`]: `burrow agent` for one device.
//! - [`Operator`]: an OpenSSH client setup (key, ssh_config, known_hosts) that
//!   reaches devices through the pivot with strict host-key checking.
//! - [`wait_until`]: poll a condition with a deadline instead of sleeping.
//!
//! Every guard kills its process on drop and prints the process's log when
//! the test is failing, so a red test shows what the servers saw.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tempfile::TempDir;

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
        let data = tempfile::Builder::new().prefix("burrow-pivot").tempdir().unwrap();
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let (proc, addr, mqtt_addr) =
            spawn_pivot(Path::new(bin), data.path(), "127.0.0.1:0", "127.0.0.1:0", &extra, 0).unwrap();
        let mqtt_fingerprint = certificate_line(&proc.log_text());
        TestPivot { bin: bin.into(), data, addr, mqtt_addr, mqtt_fingerprint, proc, extra_args: extra }
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

    /// Runs `burrow ARGS --data-dir DATA` and returns its output.
    pub fn admin(&self, args: &[&str]) -> Output {
        Command::new(&self.bin).args(args).arg("--data-dir").arg(self.data.path()).output().expect("burrow runs")
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

pub const MOSQUITTO: &str = "/usr/sbin/mosquitto";

/// A real Mosquitto broker on a free loopback port, with the ACL burrow
/// documents: each device reads only its request topic and writes only its
/// presence and status; the pivot (user `pivot`) reads and writes all.
pub struct Mosquitto {
    pub dir: TempDir,
    pub port: u16,
    pub proc: Proc,
    starts: usize,
}

impl Mosquitto {
    pub fn start() -> Mosquitto {
        Self::start_with_listener(|_| String::new())
    }

    /// Mosquitto with TLS only, requiring client certificates whose CN is the
    /// MQTT username (as AWS IoT Core does). Issue certificates with [`Mosquitto::issue`].
    pub fn start_tls() -> Mosquitto {
        Self::start_with_listener(|dir| {
            let ca = TestCa::create(dir);
            let (cert, key) = ca.issue(dir, "127.0.0.1", true);
            format!(
                "cafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\nuse_identity_as_username true\n",
                ca.cert.display(),
                cert.display(),
                key.display()
            )
        })
    }

    /// Mosquitto with a TLS listener and no client certificates (devices
    /// authenticate as on the plain listener): the TLS anchor for
    /// benchmarks. [`Mosquitto::server_cert`] is the certificate it serves.
    pub fn start_tls_anonymous() -> Mosquitto {
        Self::start_with_listener(|dir| {
            let ca = TestCa::create(dir);
            let (cert, key) = ca.issue(dir, "127.0.0.1", true);
            format!("certfile {}\nkeyfile {}\nallow_anonymous true\n", cert.display(), key.display())
        })
    }

    /// The server certificate (PEM) of a TLS listener.
    pub fn server_cert(&self) -> PathBuf {
        self.dir.path().join("127.0.0.1.pem")
    }

    /// `(ca, cert, key)` PEM paths for a client named `cn`.
    pub fn issue(&self, cn: &str) -> (PathBuf, PathBuf, PathBuf) {
        let ca = TestCa { cert: self.dir.path().join("ca.pem"), key: self.dir.path().join("ca.key") };
        let (cert, key) = ca.issue(self.dir.path(), cn, false);
        (ca.cert, cert, key)
    }

    fn start_with_listener(tls: impl FnOnce(&Path) -> String) -> Mosquitto {
        require_tool(MOSQUITTO);
        let dir = tempfile::Builder::new().prefix("burrow-mosquitto").tempdir().unwrap();
        let tls = tls(dir.path());
        // Plain listeners take anonymous devices; a TLS one says itself.
        let anonymous = match (tls.is_empty(), tls.contains("allow_anonymous")) {
            (true, _) => "allow_anonymous true\n",
            (false, true) => "",
            (false, false) => "allow_anonymous false\n",
        };
        // free_port() can race with another test taking the port: retry.
        for attempt in 0..5 {
            let port = free_port();
            let acl = dir.path().join("acl");
            std::fs::write(
                &acl,
                "user pivot\ntopic readwrite burrow/#\n\n\
             pattern read burrow/devices/%u/request\n\
             pattern write burrow/devices/%u/presence\n\
             pattern write burrow/devices/%u/status\n",
            )
            .unwrap();
            let conf = dir.path().join("mosquitto.conf");
            std::fs::write(
                &conf,
                format!(
                    "user root\nlistener {port} 127.0.0.1\n{tls}{anonymous}acl_file {}\npersistence false\n\
                 log_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\nlog_type subscribe\n",
                    acl.display()
                ),
            )
            .unwrap();
            match Self::try_spawn(&dir, &conf, port, attempt) {
                Ok(proc) => return Mosquitto { dir, port, proc, starts: attempt + 1 },
                Err(log) if attempt == 4 => panic!("mosquitto did not start: {log}"),
                Err(_) => continue,
            }
        }
        unreachable!("the loop returns or panics")
    }

    fn spawn(dir: &TempDir, conf: &Path, port: u16, n: usize) -> Proc {
        Self::try_spawn(dir, conf, port, n).unwrap_or_else(|log| panic!("mosquitto did not start: {log}"))
    }

    /// Starts mosquitto; its log if it did not come up.
    fn try_spawn(dir: &TempDir, conf: &Path, port: u16, n: usize) -> Result<Proc, String> {
        let mut cmd = Command::new(MOSQUITTO);
        cmd.arg("-c").arg(conf);
        let mut proc = Proc::spawn("mosquitto", &mut cmd, dir.path().join(format!("mosquitto-{n}.log")));
        let up = wait_until(Duration::from_secs(10), || {
            !proc.is_running() || TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        if up && proc.is_running() {
            Ok(proc)
        } else {
            Err(proc.log_text())
        }
    }

    /// Stops the broker (clients see the connection drop) and starts it again on the same port.
    pub fn restart(&mut self) {
        self.proc.terminate(Duration::from_secs(10));
        self.proc = Self::spawn(&self.dir, &self.dir.path().join("mosquitto.conf"), self.port, self.starts);
        self.starts += 1;
    }

    pub fn stop(&mut self) {
        self.proc.terminate(Duration::from_secs(10));
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    pub fn tls_url(&self) -> String {
        format!("mqtts://127.0.0.1:{}", self.port)
    }
}

/// A throwaway certificate authority made with the openssl CLI.
struct TestCa {
    cert: PathBuf,
    key: PathBuf,
}

impl TestCa {
    fn create(dir: &Path) -> TestCa {
        require_tool("openssl");
        let ca = TestCa { cert: dir.join("ca.pem"), key: dir.join("ca.key") };
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=burrow-test-ca",
            "-keyout",
            ca.key.to_str().unwrap(),
            "-out",
            ca.cert.to_str().unwrap(),
        ]);
        ca
    }

    fn issue(&self, dir: &Path, cn: &str, server: bool) -> (PathBuf, PathBuf) {
        let (cert, key, csr, ext) = (
            dir.join(format!("{cn}.pem")),
            dir.join(format!("{cn}.key")),
            dir.join(format!("{cn}.csr")),
            dir.join(format!("{cn}.ext")),
        );
        let ext_text = if server {
            format!("subjectAltName=IP:{cn}\nextendedKeyUsage=serverAuth\n")
        } else {
            "extendedKeyUsage=clientAuth\n".to_string()
        };
        std::fs::write(&ext, ext_text).unwrap();
        openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            &format!("/CN={cn}"),
            "-keyout",
            key.to_str().unwrap(),
            "-out",
            csr.to_str().unwrap(),
        ]);
        openssl(&[
            "x509",
            "-req",
            "-in",
            csr.to_str().unwrap(),
            "-CA",
            self.cert.to_str().unwrap(),
            "-CAkey",
            self.key.to_str().unwrap(),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            ext.to_str().unwrap(),
            "-out",
            cert.to_str().unwrap(),
        ]);
        (cert, key)
    }
}

fn openssl(args: &[&str]) {
    let out = Command::new("openssl").args(args).output().expect("openssl runs");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
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

/// Publishes `messages` (topic, retained, payload) at QoS 1 to the broker at
/// `url` (`mqtt://HOST:PORT`) as its user `pivot`, waiting for every PUBACK:
/// an MQTT client with broker access, for tests that inject what a device or
/// an attacker could send.
pub fn mqtt_publish(url: &str, client_id: &str, messages: &[(String, bool, Vec<u8>)]) {
    let port: u16 = url.rsplit(':').next().and_then(|p| p.parse().ok()).expect("mqtt://HOST:PORT");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut opts = rumqttc::MqttOptions::new(client_id, "127.0.0.1", port);
        opts.set_credentials("pivot", "");
        opts.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut ev) = rumqttc::AsyncClient::new(opts, 10);
        for (topic, retain, payload) in messages {
            client.publish(topic, rumqttc::QoS::AtLeastOnce, *retain, payload.clone()).await.unwrap();
        }
        let mut acks = 0;
        while acks < messages.len() {
            match tokio::time::timeout(Duration::from_secs(5), ev.poll()).await {
                Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)))) => acks += 1,
                Ok(Ok(_)) => {}
                other => panic!("publish failed: {other:?}"),
            }
        }
    });
}

/// A stand-in for device `id` on the broker at `url` (as user `pivot`): it
/// publishes an on-demand "online" presence, then answers every wake request
/// on its status topic with `{"state": state, "reason": reason}` and the
/// request's nonce, for `for_how_long`. Returns once subscribed.
pub fn mqtt_standin(
    url: &str,
    id: &str,
    state: &str,
    reason: &str,
    for_how_long: Duration,
) -> std::thread::JoinHandle<usize> {
    let port: u16 = url.rsplit(':').next().and_then(|p| p.parse().ok()).expect("mqtt://HOST:PORT");
    let (id, state, reason) = (id.to_string(), state.to_string(), reason.to_string());
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let topics = burrow_core::signal::Topics::new("burrow");
            let mut opts = rumqttc::MqttOptions::new(format!("{id}-standin"), "127.0.0.1", port);
            opts.set_credentials("pivot", "");
            let (client, mut ev) = rumqttc::AsyncClient::new(opts, 10);
            client.subscribe(topics.request(&id), rumqttc::QoS::AtLeastOnce).await.unwrap();
            let online = serde_json::json!({"state": "online", "mode": "on-demand"});
            client.publish(topics.presence(&id), rumqttc::QoS::AtLeastOnce, true, online.to_string()).await.unwrap();
            let deadline = tokio::time::Instant::now() + for_how_long;
            let (mut answered, mut told) = (0, false);
            loop {
                match tokio::time::timeout_at(deadline, ev.poll()).await {
                    Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)))) => {
                        let Some(nonce) = burrow_core::signal::WakeRequest::claimed_nonce(&p.payload) else { continue };
                        let at = burrow_core::time::now_unix();
                        let status = serde_json::json!({"nonce": nonce, "pivot": "", "state": state, "reason": reason, "at": at});
                        let _ = client.try_publish(topics.status(&id), rumqttc::QoS::AtLeastOnce, false, status.to_string());
                        answered += 1;
                    }
                    Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_)))) if !told => {
                        told = true;
                        let _ = ready_tx.send(());
                    }
                    Ok(_) => {}
                    Err(_) => return answered,
                }
            }
        })
    });
    ready_rx.recv_timeout(Duration::from_secs(10)).expect("the stand-in device subscribed");
    handle
}
