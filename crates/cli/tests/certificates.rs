//! Issue 14: operators reach devices with certificates from the pivot's CA,
//! with no key of theirs in any `authorized_keys`. A real sshd on the device
//! side is configured only by `burrow agent enroll --trust-operators`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use burrow_testkit::*;

const BURROW: &str = env!("CARGO_BIN_EXE_burrow");

fn ok(out: &Output) -> String {
    assert!(out.status.success(), "failed: {}\n{}", stderr(out), stdout(out));
    stdout(out)
}

/// A device whose sshd has no authorized keys at all and (unless made
/// [`without_include`](Device::without_include)) includes the drop-in
/// directory that `--trust-operators` writes to.
struct Device {
    /// Holds the agent config and the device key.
    dir: tempfile::TempDir,
    drop_in: PathBuf,
    config: PathBuf,
    sshd: Sshd,
    bin: SshdRunnable,
}

impl Device {
    fn new() -> Device {
        Self::start(true)
    }

    /// A device whose sshd_config does not Include the drop-in dir.
    fn without_include() -> Device {
        Self::start(false)
    }

    fn start(include: bool) -> Device {
        let dir = tempfile::Builder::new().prefix("burrow-device").tempdir().unwrap();
        // An agent running as nobody reads its config and key in here.
        set_mode(dir.path(), 0o755);
        let drop_in = dir.path().join("sshd_config.d");
        std::fs::create_dir(&drop_in).unwrap();
        let include = if include { format!("Include {}/*.conf\n", drop_in.display()) } else { String::new() };
        let sshd = Sshd::start_with(&[], &include);
        let config = dir.path().join("etc/agent.toml");
        Device { dir, drop_in, config, sshd, bin: SshdRunnable::copy(BURROW) }
    }

    /// The config the device's sshd runs with, for --sshd-config.
    fn sshd_config(&self) -> PathBuf {
        self.sshd.dir.path().join("sshd_config")
    }

    fn check_cmd(&self) -> String {
        format!("{} -t -f {}", SSHD, self.sshd_config().display())
    }

    fn reload_cmd(&self) -> String {
        format!("kill -HUP {}", self.sshd.proc.pid())
    }

    /// `burrow agent enroll --trust-operators` as a device would run it, from
    /// the root-owned copy of the binary that sshd will run, sshd checked
    /// as by default (`sshd -t -f` its config) unless `extra` says otherwise.
    fn enroll(&self, token: &str, extra: &[&str]) -> Output {
        self.enroll_with_trust_dir(token, &self.trust_dir(), extra)
    }

    fn enroll_with_trust_dir(&self, token: &str, trust_dir: &Path, extra: &[&str]) -> Output {
        Command::new(&self.bin.path)
            .args(["agent", "enroll", "--token", token, "--config"])
            .arg(&self.config)
            .arg("--trust-dir")
            .arg(trust_dir)
            .arg("--host-key")
            .arg(&self.sshd.host_key.public)
            .args(["--expose", &format!("22={}", self.sshd.target()), "--trust-operators", "--sshd-config"])
            .arg(self.sshd_config())
            .arg("--sshd-config-dir")
            .arg(&self.drop_in)
            .args(["--sshd-reload", &self.reload_cmd()])
            .args(extra)
            .output()
            .unwrap()
    }

    /// `burrow agent enroll` as root without --trust-operators: sshd is
    /// left alone, but root's record of the pivot goes in the trust dir.
    fn enroll_plain(&self, token: &str) -> Output {
        Command::new(&self.bin.path)
            .args(["agent", "enroll", "--token", token, "--config"])
            .arg(&self.config)
            .arg("--trust-dir")
            .arg(self.trust_dir())
            .arg("--host-key")
            .arg(&self.sshd.host_key.public)
            .args(["--expose", &format!("22={}", self.sshd.target())])
            .output()
            .unwrap()
    }

    /// `burrow agent trust-operators` as root, with the agent config `config`.
    fn trust_operators(&self, config: &Path) -> Output {
        self.trust_operators_reloading(config, &self.reload_cmd())
    }

    /// The same, reloading sshd with `reload`.
    fn trust_operators_reloading(&self, config: &Path, reload: &str) -> Output {
        Command::new(&self.bin.path)
            .args(["agent", "trust-operators", "--config"])
            .arg(config)
            .arg("--trust-dir")
            .arg(self.trust_dir())
            .arg("--sshd-config")
            .arg(self.sshd_config())
            .arg("--sshd-config-dir")
            .arg(&self.drop_in)
            .args(["--sshd-reload", reload])
            .output()
            .unwrap()
    }

    fn pivot_toml(&self) -> PathBuf {
        self.trust_dir().join("pivot.toml")
    }

    fn agent(&self, extra: &[&str]) -> Proc {
        let mut cmd = Command::new(&self.bin.path);
        cmd.args(["agent", "--config"]).arg(&self.config).arg("--trust-dir").arg(self.trust_dir()).args(extra);
        Proc::spawn("burrow agent", &mut cmd, self.dir.path().join("agent.log"))
    }

    /// Root's alone, as the trust dir must be: in the 0755 root-owned
    /// directory under /run that holds the binary sshd runs.
    fn trust_dir(&self) -> PathBuf {
        self.bin.dir.path().join("trust")
    }

    /// The CA keys the device's sshd trusts now.
    fn trusted_cas(&self) -> Vec<String> {
        let text = std::fs::read_to_string(self.trust_dir().join("user_ca.pub")).unwrap_or_default();
        text.lines().filter_map(|l| l.split_whitespace().nth(1).map(str::to_string)).collect()
    }

    fn sshd_log(&self) -> String {
        self.sshd.proc.log_text()
    }

    /// ssh straight to the device's sshd, around the pivot and its checks.
    /// The device's host key stays pinned on this route too.
    fn ssh_direct(&self, laptop: &Laptop, cert: &Path) -> Output {
        let known_hosts = self.dir.path().join("direct_known_hosts");
        let line = format!("[127.0.0.1]:{} {}\n", self.sshd.port, self.sshd.host_key.public_line());
        std::fs::write(&known_hosts, line).unwrap();
        Command::new("ssh")
            .args(["-F", "/dev/null", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes"])
            .args(["-o", "StrictHostKeyChecking=yes", "-o", "LogLevel=ERROR"])
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
            .arg("-i")
            .arg(&laptop.key.private)
            .arg("-o")
            .arg(format!("CertificateFile={}", cert.display()))
            .args(["-p", &self.sshd.port.to_string(), "root@127.0.0.1", "echo direct-ok"])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn cert_path(laptop: &Laptop) -> PathBuf {
    laptop.home.path().join(".ssh/burrow/id-cert.pub")
}

fn cert_of(path: &Path) -> russh::keys::ssh_key::Certificate {
    russh::keys::ssh_key::Certificate::from_openssh(std::fs::read_to_string(path).unwrap().trim()).unwrap()
}

fn add_operator(pivot: &TestPivot, name: &str, laptop: &Laptop, extra: &[&str]) {
    let mut args = vec!["operator", "add", name, "--key", laptop.key.public.to_str().unwrap()];
    args.extend_from_slice(extra);
    pivot.admin_ok(&args);
}

/// A pivot and `cam-1` (site=berlin) enrolled with --trust-operators, its
/// agent connected.
fn fleet(agent_args: &[&str]) -> (TestPivot, Device, Proc) {
    let pivot = TestPivot::start(BURROW);
    let dev = Device::new();
    let token = pivot.admin_ok(&["device", "add", "cam-1", "--label", "site=berlin"]).trim().to_string();
    let out = dev.enroll(&token, &[]);
    let said = ok(&out);
    assert!(said.contains("enrolled device 'cam-1'"), "{said}");
    let agent = dev.agent(agent_args);
    assert!(pivot.wait_online("cam-1", true, Duration::from_secs(20)), "{}", agent.log_text());
    (pivot, dev, agent)
}

#[test]
fn operators_reach_a_device_with_certificates_only() {
    require_tool("rsync");
    let (pivot, dev, _agent) = fleet(&[]);

    // What enroll wrote: a drop-in naming the CA file and the principals command.
    let conf = std::fs::read_to_string(dev.drop_in.join("burrow.conf")).unwrap();
    assert!(conf.contains("TrustedUserCAKeys ") && conf.contains("RevokedKeys "), "{conf}");
    assert!(conf.contains("AuthorizedPrincipalsCommand ") && conf.contains(" principals %u"), "{conf}");
    let ca = pivot.admin_ok(&["ca", "show"]);
    let ca_key = ca.split_whitespace().nth(1).unwrap().to_string();
    assert_eq!(dev.trusted_cas(), [ca_key]);
    // The pivot made its CA in its data dir on first start, owner-only.
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(pivot.data.path().join("user_ca")).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let show = pivot.admin_ok(&["device", "show", "cam-1"]);
    assert!(show.contains("access:      certificates"), "{show}");
    // No operator key is on the device.
    assert_eq!(std::fs::read_to_string(dev.sshd.dir.path().join("authorized_keys")).unwrap(), "");

    // alice logs in once; stock ssh, scp and rsync then just work.
    let alice = Laptop::new(BURROW);
    add_operator(&pivot, "alice", &alice, &["--device-user", "root"]);
    let said = ok(&alice.login(&pivot));
    assert!(said.contains("certificate burrow operator=alice serial="), "{said}");
    let cert = cert_of(&cert_path(&alice));
    assert_eq!(cert.valid_principals(), ["burrow:root:*"]);
    let ssh_config = std::fs::read_to_string(alice.home.path().join(".ssh/burrow/burrow/config")).unwrap();
    assert!(ssh_config.contains(&format!("CertificateFile {}", cert_path(&alice).display())), "{ssh_config}");

    assert_eq!(ok(&alice.ssh(&["root@cam-1.burrow", "echo cert-ok"])).trim(), "cert-ok");
    let local = alice.home.path().join("fw.bin");
    std::fs::write(&local, vec![7u8; 300_000]).unwrap();
    let ssh_cfg = alice.home.path().join(".ssh/config");
    let remote_dir = dev.sshd.dir.path();
    let out = Command::new("scp")
        .arg("-F")
        .arg(&ssh_cfg)
        .args(["-o", "BatchMode=yes"])
        .arg(&local)
        .arg(format!("root@cam-1.burrow:{}/scp.bin", remote_dir.display()))
        .output()
        .unwrap();
    ok(&out);
    assert_eq!(std::fs::read(remote_dir.join("scp.bin")).unwrap().len(), 300_000);
    let out = Command::new("rsync")
        .arg("-e")
        .arg(format!("ssh -F {} -o BatchMode=yes", ssh_cfg.display()))
        .arg(&local)
        .arg(format!("root@cam-1.burrow:{}/rsync.bin", remote_dir.display()))
        .output()
        .unwrap();
    ok(&out);
    assert_eq!(std::fs::read(remote_dir.join("rsync.bin")).unwrap().len(), 300_000);

    // The device's sshd names the operator's key id and serial for each login.
    let log = dev.sshd_log();
    let accepted: Vec<&str> = log.lines().filter(|l| l.contains("Accepted publickey")).collect();
    assert!(accepted.len() >= 3, "{log}");
    let id = format!("ID burrow operator=alice serial={} ", cert.serial());
    assert!(accepted.iter().all(|l| l.contains(&id)), "{accepted:#?}");
    // The pivot's audit ties that serial to the operator and what it allowed.
    let audit = pivot.admin_ok(&["audit", "--event", "certificate", "--json"]);
    let rec: serde_json::Value = serde_json::from_str(audit.lines().next().unwrap()).unwrap();
    assert_eq!(rec["operator"], "alice", "{rec}");
    assert_eq!(rec["args"]["serial"], cert.serial(), "{rec}");
    assert_eq!(rec["args"]["principals"][0], "burrow:root:*", "{rec}");
    assert!(rec["args"]["valid_before"].as_str().is_some(), "{rec}");

    // bob may reach only site=paris. The pivot refuses him; so does the
    // device's sshd on its own, when his certificate reaches it around the
    // pivot (no pivot check at all on that route).
    let bob = Laptop::new(BURROW);
    add_operator(&pivot, "bob", &bob, &["--allow", "site=paris", "--device-user", "root"]);
    ok(&bob.login(&pivot));
    assert_eq!(cert_of(&cert_path(&bob)).valid_principals(), ["burrow:root:site=paris"]);
    let out = bob.ssh(&["root@cam-1.burrow", "true"]);
    assert!(!out.status.success());
    let out = dev.ssh_direct(&bob, &cert_path(&bob));
    assert!(!out.status.success(), "the device's sshd let a site=paris certificate into a site=berlin device");
    let log = dev.sshd_log();
    let bob_lines: Vec<&str> = log.lines().filter(|l| l.contains("operator=bob")).collect();
    assert!(!bob_lines.is_empty() && bob_lines.iter().all(|l| !l.contains("Accepted")), "{log}");
    // The same route works for alice: it is the principals that refuse bob.
    assert_eq!(ok(&dev.ssh_direct(&alice, &cert_path(&alice))).trim(), "direct-ok");

    // Removing alice stops new certificates at once.
    pivot.admin_ok(&["operator", "remove", "alice"]);
    let out = alice.remote(&pivot, &["device", "list"]);
    assert!(!out.status.success());
}

#[test]
fn an_expired_certificate_is_refused_until_burrow_renews_it() {
    let (pivot, dev, _agent) = fleet(&[]);
    let carol = Laptop::new(BURROW);
    add_operator(&pivot, "carol", &carol, &["--cert-ttl", "3s", "--device-user", "root"]);
    ok(&carol.login(&pivot));
    let first = cert_of(&cert_path(&carol));
    assert_eq!(ok(&carol.ssh(&["root@cam-1.burrow", "echo fresh"])).trim(), "fresh");
    let expired = || burrow_core::time::now_unix() as u64 >= first.valid_before();
    assert!(wait_until(Duration::from_secs(10), expired));
    let out = carol.ssh(&["root@cam-1.burrow", "true"]);
    assert!(!out.status.success(), "an expired certificate was accepted");
    let log = dev.sshd_log();
    assert!(log.contains("expired") || log.contains("Certificate invalid"), "{log}");
    // `burrow ssh` sees it ran out and gets a new one first.
    assert_eq!(ok(&carol.burrow(&["ssh", "root@cam-1", "echo renewed"])).trim(), "renewed");
    let second = cert_of(&cert_path(&carol));
    assert!(second.serial() > first.serial());
}

#[test]
fn a_ca_rotation_keeps_access_working_throughout() {
    let (pivot, dev, agent) = fleet(&["--trust-refresh", "1s"]);
    let dave = Laptop::new(BURROW);
    add_operator(&pivot, "dave", &dave, &["--device-user", "root"]);
    let can_reach = |what: &str| {
        let out = dave.ssh(&["root@cam-1.burrow", "echo in"]);
        assert!(out.status.success(), "{what}: {}\n{}", stderr(&out), agent.log_text());
    };
    ok(&dave.login(&pivot));
    can_reach("before the rotation");
    let old_cert = dave.home.path().join("old-cert.pub");
    std::fs::copy(cert_path(&dave), &old_cert).unwrap();
    let old_ca = dev.trusted_cas();
    assert_eq!(old_ca.len(), 1);

    let out = ok(&pivot.admin(&["ca", "rotate", "--overlap", "8s"]));
    assert!(out.contains("signs from"), "{out}");
    // Devices trust both keys while the old one still signs.
    assert!(wait_until(Duration::from_secs(10), || dev.trusted_cas().len() == 2), "{}", agent.log_text());
    let new_ca: String = dev.trusted_cas().into_iter().find(|k| *k != old_ca[0]).unwrap();
    let signer = |path: &Path| {
        let cert = cert_of(path);
        russh::keys::ssh_key::PublicKey::from(cert.signature_key().clone())
            .to_openssh()
            .unwrap()
            .split_whitespace()
            .nth(1)
            .unwrap()
            .to_string()
    };
    // During the overlap a login is signed by the old key; access never
    // stops, up to the switch.
    ok(&dave.login(&pivot));
    assert_eq!(signer(&cert_path(&dave)), old_ca[0]);
    let switched = || {
        let keys: serde_json::Value = serde_json::from_str(&pivot.admin_ok(&["ca", "show", "--json"])).unwrap();
        keys.as_array()
            .unwrap()
            .iter()
            .any(|k| k["state"] == "signing" && k["public_key"].as_str().unwrap().contains(&new_ca))
    };
    while !switched() {
        can_reach("during the overlap");
    }
    ok(&dave.login(&pivot));
    assert_eq!(signer(&cert_path(&dave)), new_ca);
    can_reach("with a certificate from the new key");
    // A certificate from the old key still runs out its validity.
    let out = dev.ssh_direct(&dave, &old_cert);
    assert_eq!(ok(&out).trim(), "direct-ok");

    // After a CA key theft: the new key signs at once and devices drop the old ones.
    ok(&pivot.admin(&["ca", "rotate", "--now"]));
    assert!(wait_until(Duration::from_secs(10), || dev.trusted_cas().len() == 1 && dev.trusted_cas()[0] != new_ca));
    ok(&dave.login(&pivot));
    can_reach("after rotating at once");
    let out = dev.ssh_direct(&dave, &old_cert);
    assert!(!out.status.success(), "a certificate from a dropped CA key was accepted");
}

/// `sshd -t` failing leaves the device's sshd config and process as they were.
#[test]
fn a_failing_sshd_check_leaves_sshd_as_it_was() {
    let (pivot, dev, _agent) = fleet(&[]);
    let erin = Laptop::new(BURROW);
    add_operator(&pivot, "erin", &erin, &["--device-user", "root"]);
    ok(&erin.login(&pivot));
    let before = std::fs::read_to_string(dev.drop_in.join("burrow.conf")).unwrap();

    // Another drop-in goes bad; re-applying trust must not reload anything.
    std::fs::write(dev.drop_in.join("00-local.conf"), "ThisIsNotAnSshdOption yes\n").unwrap();
    let marker = dev.dir.path().join("reloaded");
    let out = dev.trust_operators_reloading(&dev.config, &format!("touch {}", marker.display()));
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("ThisIsNotAnSshdOption"), "sshd -t's complaint is not shown: {err}");
    // The default check reads the given config.
    assert!(err.contains(&format!("sshd -t -f {}` rejects", dev.sshd_config().display())), "{err}");
    assert!(err.contains("left as it was"), "{err}");
    assert_eq!(std::fs::read_to_string(dev.drop_in.join("burrow.conf")).unwrap(), before);
    assert!(!marker.exists(), "sshd was reloaded after a failed check");
    // The running sshd still serves the config it had.
    assert_eq!(ok(&erin.ssh(&["root@cam-1.burrow", "echo still"])).trim(), "still");

    // Enrolling another device on this sshd fails before its token is used.
    let token = pivot.admin_ok(&["device", "add", "cam-2"]).trim().to_string();
    let other = Device::new();
    std::fs::write(other.drop_in.join("00-local.conf"), "ThisIsNotAnSshdOption yes\n").unwrap();
    // An explicit --sshd-check runs in place of the default.
    let out = other.enroll(&token, &["--sshd-check", &other.check_cmd()]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("ThisIsNotAnSshdOption"), "{}", stderr(&out));
    assert!(!other.drop_in.join("burrow.conf").exists(), "a drop-in that failed the check was left in place");
    let show = pivot.admin_ok(&["device", "show", "cam-2"]);
    assert!(show.contains("not-enrolled"), "the token was used by a failed enrollment: {show}");
}

/// `sshd -t` passes with a drop-in that sshd's config does not Include:
/// enroll said sshd trusted the pivot's CA, and logins then failed.
#[test]
fn an_sshd_config_without_the_include_stops_enrollment_with_the_token_still_good() {
    let pivot = TestPivot::start(BURROW);
    let dev = Device::without_include();
    let token = pivot.admin_ok(&["device", "add", "cam-3"]).trim().to_string();
    let out = dev.enroll(&token, &[]);
    assert!(!out.status.success(), "{}", stdout(&out));
    let err = stderr(&out);
    let want = format!(
        "sshd's config {} does not take {}",
        dev.sshd_config().display(),
        dev.drop_in.join("burrow.conf").display()
    );
    assert!(err.contains(&want), "{err}");
    assert!(err.contains(&format!("add `Include {}/*.conf` near its top", dev.drop_in.display())), "{err}");
    assert!(err.contains("the token is still good"), "{err}");
    assert!(!dev.drop_in.join("burrow.conf").exists(), "the drop-in sshd ignores was left in place");
    assert!(!dev.trust_dir().exists(), "the failed enrollment left its trust dir behind");
    assert!(!dev.config.exists());
    let show = pivot.admin_ok(&["device", "show", "cam-3"]);
    assert!(show.contains("not-enrolled"), "the token was used by a failed enrollment: {show}");

    // With the Include added, the same token enrolls the device.
    let mut config = std::fs::read_to_string(dev.sshd_config()).unwrap();
    config.insert_str(0, &format!("Include {}/*.conf\n", dev.drop_in.display()));
    std::fs::write(dev.sshd_config(), config).unwrap();
    let said = ok(&dev.enroll(&token, &[]));
    assert!(said.contains("sshd trusts the pivot's CA"), "{said}");
    let show = pivot.admin_ok(&["device", "show", "cam-3"]);
    assert!(!show.contains("not-enrolled"), "{show}");
}

/// Devices learned of a CA rotated at once only at their next refetch,
/// an hour later by default: the pivot now nudges connected agents.
#[test]
fn a_ca_rotated_at_once_reaches_connected_devices_without_waiting_for_the_refresh() {
    let (pivot, dev, agent) = fleet(&[]);
    let old = dev.trusted_cas();
    assert_eq!(old.len(), 1);
    pivot.admin_ok(&["ca", "rotate", "--now"]);
    let keys: Vec<String> = pivot
        .admin_ok(&["ca", "show"])
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1).map(str::to_string))
        .collect();
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert_ne!(keys, old);
    // Nudged agents fetch within 2 to 30 s.
    let fetched = wait_until(Duration::from_secs(40), || dev.trusted_cas() == keys);
    assert!(fetched, "the device still trusts {:?}\n{}", dev.trusted_cas(), agent.log_text());
    let log = agent.log_text();
    assert_eq!(log.matches("tunnel up").count(), 1, "fetched on a reconnect, not on the nudge: {log}");
    assert!(!log.contains("WARN"), "{log}");
}

/// The trust dir was writable by the agent's user, who could put a CA of
/// their own there and log in as root: one anyone can write into is refused
/// before the token is spent.
#[test]
fn a_trust_dir_others_can_write_is_refused_with_the_token_still_good() {
    let pivot = TestPivot::start(BURROW);
    let dev = Device::new();
    let token = pivot.admin_ok(&["device", "add", "cam-4"]).trim().to_string();
    let tmp = tempfile::Builder::new().prefix("burrow-trust").tempdir_in("/tmp").unwrap();
    set_mode(tmp.path(), 0o755);
    let trust_dir = tmp.path().join("trust");
    let out = dev.enroll_with_trust_dir(&token, &trust_dir, &[]);
    assert!(!out.status.success(), "{}", stdout(&out));
    let err = stderr(&out);
    assert!(
        err.contains(
            "/tmp is writable by others (mode 1777): the files sshd trusts must be root's alone; choose another --trust-dir, e.g. /etc/ssh/burrow"
        ),
        "{err}"
    );
    assert!(err.contains("the token is still good"), "{err}");
    assert!(!trust_dir.exists() && !dev.config.exists());
    assert!(!dev.drop_in.join("burrow.conf").exists());
    let show = pivot.admin_ok(&["device", "show", "cam-4"]);
    assert!(show.contains("not-enrolled"), "the token was used by a failed enrollment: {show}");
}

/// The CA keys the pivot has now, after `ca rotate --now` replaced `old`.
fn rotated_now(pivot: &TestPivot, old: &[String]) -> Vec<String> {
    pivot.admin_ok(&["ca", "rotate", "--now"]);
    let keys: Vec<String> = pivot
        .admin_ok(&["ca", "show"])
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1).map(str::to_string))
        .collect();
    assert_eq!(keys.len(), 1);
    assert_ne!(keys, old);
    keys
}

/// What the agent's user can do to its own config: name another device,
/// pivot, pin and trust dir.
fn tamper_with(config: &Path, trust_dir: &Path) {
    let text = std::fs::read_to_string(config).unwrap();
    let wrong = "SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    let mut out: Vec<String> = text
        .lines()
        .filter(|l| !l.starts_with("trust_dir"))
        .map(|l| match l.split_once(" = ").map(|(k, _)| k) {
            Some("id") => "id = \"cam-9\"".to_string(),
            Some("server") => "server = \"127.0.0.1:1\"".to_string(),
            Some("pivot_host_key") => format!("pivot_host_key = \"{wrong}\""),
            _ => l.to_string(),
        })
        .collect();
    out.push(format!("trust_dir = \"{}\"", trust_dir.display()));
    std::fs::write(config, out.join("\n") + "\n").unwrap();
}

/// Root's `trust-operators --refresh` (burrow-trust.service) keeps the trust
/// fresh for an agent that may not write it, connecting with what root
/// recorded in pivot.toml, never with the agent's own (writable) config.
#[test]
fn a_root_refresh_fetches_the_trust_with_pivot_toml_alone() {
    let (pivot, dev, mut agent) = fleet(&[]);
    let pivot_toml = dev.pivot_toml();
    let recorded = std::fs::read_to_string(&pivot_toml).unwrap();
    assert!(recorded.contains("id = \"cam-1\""), "{recorded}");
    assert!(recorded.contains(&format!("\"{}\"", pivot.addr)), "{recorded}");
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&pivot_toml).unwrap().permissions());
    assert_eq!(mode & 0o7777, 0o644);

    agent.terminate(Duration::from_secs(10));
    assert!(pivot.wait_online("cam-1", false, Duration::from_secs(20)));
    let old = dev.trusted_cas();
    let keys = rotated_now(&pivot, &old);
    tamper_with(&dev.config, &dev.bin.dir.path().join("elsewhere"));

    let refresh = || {
        Command::new(&dev.bin.path)
            .args(["agent", "trust-operators", "--refresh", "--trust-dir"])
            .arg(dev.trust_dir())
            .output()
            .unwrap()
    };
    let said = ok(&refresh());
    assert!(said.contains(&format!("operator trust in {} updated: 1 CA keys", dev.trust_dir().display())), "{said}");
    assert_eq!(dev.trusted_cas(), keys, "the device trusts the new CA key only");
    let said = ok(&refresh());
    assert!(said.contains("unchanged"), "{said}");

    assert_eq!(std::fs::read_to_string(&pivot_toml).unwrap(), recorded);

    // --refresh touches nothing of sshd's and takes none of its flags.
    let out = Command::new(&dev.bin.path)
        .args(["agent", "trust-operators", "--refresh", "--sshd-reload", "true"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("cannot be used with"), "{}", stderr(&out));
}

/// Root's `trust-operators` took the pivot, pin, device and trust dir
/// from the agent config, which the agent's user can write: a pivot of
/// their own, and root's files written where they chose.
#[test]
fn trust_operators_takes_the_pivot_from_pivot_toml_whatever_the_agent_config_says() {
    let (pivot, dev, mut agent) = fleet(&[]);
    agent.terminate(Duration::from_secs(10));
    let recorded = std::fs::read_to_string(dev.pivot_toml()).unwrap();
    let old = dev.trusted_cas();
    let keys = rotated_now(&pivot, &old);
    let elsewhere = dev.bin.dir.path().join("elsewhere");
    tamper_with(&dev.config, &elsewhere);

    let out = dev.trust_operators(&dev.config);
    let said = ok(&out);
    assert!(said.contains("sshd trusts the pivot's CA"), "{said}");
    // Fetched from the real pivot as cam-1, into the trust dir root was given.
    assert_eq!(dev.trusted_cas(), keys);
    assert!(!elsewhere.exists(), "root wrote where the agent config said");
    assert_eq!(std::fs::read_to_string(dev.pivot_toml()).unwrap(), recorded);
    let conf = std::fs::read_to_string(dev.drop_in.join("burrow.conf")).unwrap();
    assert!(conf.contains("device 'cam-1'"), "{conf}");
    // It says what it ignored.
    let err = stderr(&out);
    let pivot_toml = dev.pivot_toml();
    assert!(
        err.contains(&format!(
            "warning: {} has id 'cam-9', not 'cam-1', server '127.0.0.1:1', not '{}', pivot_host_key 'SHA256:AAAA",
            dev.config.display(),
            pivot.addr
        )),
        "{err}"
    );
    assert!(err.contains(&format!("this run uses root's {} and nothing of that", pivot_toml.display())), "{err}");
    // The agent config is told the trust dir root used.
    let config = std::fs::read_to_string(&dev.config).unwrap();
    assert!(config.contains(&format!("trust_dir = \"{}\"", dev.trust_dir().display())), "{config}");
}

/// A device enrolled without --trust-operators had no pivot.toml, so a
/// later `trust-operators` took everything from the agent config.
#[test]
fn a_device_enrolled_without_trust_operators_gets_pivot_toml_and_trusts_operators_later() {
    let pivot = TestPivot::start(BURROW);
    let dev = Device::new();
    let token = pivot.admin_ok(&["device", "add", "cam-6"]).trim().to_string();
    let said = ok(&dev.enroll_plain(&token));
    assert!(said.contains(&format!("root's record of the pivot written to {}", dev.pivot_toml().display())), "{said}");
    let recorded = std::fs::read_to_string(dev.pivot_toml()).unwrap();
    assert!(recorded.contains("id = \"cam-6\""), "{recorded}");
    assert!(recorded.contains(&format!("\"{}\"", pivot.addr)), "{recorded}");
    assert!(!dev.drop_in.join("burrow.conf").exists(), "sshd is left alone");
    assert!(dev.trusted_cas().is_empty());
    assert!(!std::fs::read_to_string(&dev.config).unwrap().contains("trust_dir"));

    // The agent config is under /tmp, which anyone can write into: only
    // pivot.toml can have served.
    let said = ok(&dev.trust_operators(&dev.config));
    assert!(said.contains("sshd trusts the pivot's CA"), "{said}");
    let ca = pivot.admin_ok(&["ca", "show"]);
    assert_eq!(dev.trusted_cas(), [ca.split_whitespace().nth(1).unwrap().to_string()]);
    assert!(dev.drop_in.join("burrow.conf").exists());
    assert_eq!(std::fs::read_to_string(dev.pivot_toml()).unwrap(), recorded);

    // Without pivot.toml (a device enrolled by an older burrow), that agent
    // config does not stand in for it...
    std::fs::remove_file(dev.pivot_toml()).unwrap();
    let out = dev.trust_operators(&dev.config);
    assert!(!out.status.success(), "{}", stdout(&out));
    let err = stderr(&out);
    let want = format!(
        "there is no {}, and {} cannot stand in for it: /tmp is writable by others (mode 1777), so another user may have changed the pivot, pin or device in it",
        dev.pivot_toml().display(),
        dev.config.display()
    );
    assert!(err.contains(&want), "{err}");
    assert!(err.contains("chown root:root") && err.contains("re-enroll the device as root"), "{err}");
    assert!(!dev.pivot_toml().exists());
    // ...but one root's alone does.
    let roots = dev.bin.dir.path().join("agent.toml");
    std::fs::copy(&dev.config, &roots).unwrap();
    set_mode(&roots, 0o644);
    ok(&dev.trust_operators(&roots));
    assert_eq!(std::fs::read_to_string(dev.pivot_toml()).unwrap(), recorded);
}

/// An agent that is not root never writes the files sshd trusts: where it
/// would fetch them (on connect, periodically, on a nudge) it touches
/// `trust-refresh` next to its status file, which burrow-trust.path turns
/// into a root refresh.
#[test]
fn an_unprivileged_agent_asks_root_to_refresh_and_never_writes_the_trust() {
    require_tool("setpriv");
    let pivot = TestPivot::start(BURROW);
    let dev = Device::new();
    let token = pivot.admin_ok(&["device", "add", "cam-5"]).trim().to_string();
    ok(&dev.enroll(&token, &[]));
    // As deploy/systemd has it: the agent's user owns its key and its
    // runtime dir, and nothing in the trust dir.
    const NOBODY: u32 = 65534;
    let key = dev.config.with_file_name("device_key");
    std::os::unix::fs::chown(&key, Some(NOBODY), Some(NOBODY)).unwrap();
    let run = dev.dir.path().join("run");
    std::fs::create_dir(&run).unwrap();
    std::os::unix::fs::chown(&run, Some(NOBODY), Some(NOBODY)).unwrap();
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&dev.bin.path)
        .args(["agent", "--config"])
        .arg(&dev.config)
        .arg("--trust-dir")
        .arg(dev.trust_dir())
        .arg("--status-file")
        .arg(run.join("status.json"));
    let mut agent = Proc::spawn("burrow agent (nobody)", &mut cmd, dev.dir.path().join("agent.log"));
    assert!(pivot.wait_online("cam-5", true, Duration::from_secs(20)), "{}", agent.log_text());

    // On connect: told why once; root refreshed at enrollment, moments
    // ago, so no need to ask (the ask comes before the tunnel is up).
    let marker = run.join("trust-refresh");
    let log = agent.log_text();
    assert_eq!(log.matches("a root unit refreshes the operator trust files").count(), 1, "{log}");
    assert!(!marker.exists(), "asked though root had just refreshed: {log}");
    let ca_file = dev.trust_dir().join("user_ca.pub");
    let written = std::fs::metadata(&ca_file).unwrap().modified().unwrap();
    let old = dev.trusted_cas();

    // On a nudge: asked, however recent the last refresh, and nothing written.
    pivot.admin_ok(&["ca", "rotate", "--now"]);
    assert!(wait_until(Duration::from_secs(40), || marker.exists()), "{}", agent.log_text());
    assert_eq!(dev.trusted_cas(), old);
    assert_eq!(std::fs::metadata(&ca_file).unwrap().modified().unwrap(), written);
    let log = agent.log_text();
    assert!(!log.contains("WARN"), "{log}");

    // What the path unit starts, as root.
    let out = Command::new(&dev.bin.path)
        .args(["agent", "trust-operators", "--refresh", "--trust-dir"])
        .arg(dev.trust_dir())
        .output()
        .unwrap();
    ok(&out);
    assert_ne!(dev.trusted_cas(), old);
    assert_eq!(dev.trusted_cas().len(), 1);

    // A refresh older than half of --trust-refresh (1h): asked on connect.
    agent.terminate(Duration::from_secs(10));
    assert!(pivot.wait_online("cam-5", false, Duration::from_secs(20)));
    let ops_file = dev.trust_dir().join("operators.json");
    let mut ops: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&ops_file).unwrap()).unwrap();
    ops["pivot_time"] = (burrow_core::time::now_unix() - 7200).into();
    std::fs::write(&ops_file, ops.to_string()).unwrap();
    std::fs::remove_file(&marker).unwrap();
    let again = Proc::spawn("burrow agent (nobody, again)", &mut cmd, dev.dir.path().join("agent-again.log"));
    assert!(pivot.wait_online("cam-5", true, Duration::from_secs(20)), "{}", again.log_text());
    assert!(marker.exists(), "not asked on connect with a stale refresh: {}", again.log_text());
}
