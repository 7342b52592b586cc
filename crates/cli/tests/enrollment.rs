//! Enrollment, end-to-end host-key pinning, remote administration, label
//! access and the operator's everyday tools (`burrow login`, `burrow ssh`…).

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use burrow_core::enroll::EnrollToken;
use burrow_testkit::*;

const BURROW: &str = env!("CARGO_BIN_EXE_burrow");

/// Prints a token for `id` via `burrow device add ID` (no key).
fn token_for(pivot: &TestPivot, id: &str, extra: &[&str]) -> String {
    let mut args = vec!["device", "add", id];
    args.extend_from_slice(extra);
    pivot.admin_ok(&args).trim().to_string()
}

struct Enrolled {
    dir: tempfile::TempDir,
    config: PathBuf,
}

fn enroll(token: &str, sshd: &Sshd) -> (Enrolled, Output) {
    let dir = tempfile::Builder::new().prefix("burrow-device").tempdir().unwrap();
    let config = dir.path().join("etc/agent.toml");
    let out = Command::new(BURROW)
        .args(["agent", "enroll", "--token", token, "--config"])
        .arg(&config)
        .arg("--host-keys")
        .arg(&sshd.host_key.public)
        .args(["--expose", &format!("22={}", sshd.target())])
        // Not this machine's /etc/ssh/burrow (root's record is refused
        // under /tmp, and enrollment goes on without it).
        .arg("--trust-dir")
        .arg(dir.path().join("trust"))
        .output()
        .unwrap();
    (Enrolled { dir, config }, out)
}

fn start_enrolled_agent(e: &Enrolled, extra: &[&str]) -> Proc {
    let mut cmd = Command::new(BURROW);
    cmd.args(["agent", "--config"]).arg(&e.config).args(extra);
    Proc::spawn("burrow agent (config)", &mut cmd, e.dir.path().join(format!("agent-{}.log", extra.len())))
}

/// A pivot, an operator's laptop, and `cam-42` enrolled with a running agent.
struct Fleet {
    pivot: TestPivot,
    laptop: Laptop,
    sshd: Sshd,
    dev: Enrolled,
    agent: Proc,
}

fn enrolled_fleet() -> Fleet {
    let pivot = TestPivot::start(BURROW);
    let laptop = Laptop::new(BURROW);
    pivot.add_operator("alice", &laptop.key);
    let sshd = Sshd::start(&[&laptop.key]);
    let (dev, out) = enroll(&token_for(&pivot, "cam-42", &[]), &sshd);
    ok(&out);
    let agent = start_enrolled_agent(&dev, &[]);
    assert!(pivot.wait_online("cam-42", true, Duration::from_secs(20)));
    Fleet { pivot, laptop, sshd, dev, agent }
}

fn ok(out: &Output) -> String {
    assert!(out.status.success(), "failed: {}{}", stdout(out), stderr(out));
    stdout(out)
}

#[test]
fn from_token_to_strict_ssh_by_name() {
    let pivot = TestPivot::start(BURROW);
    let laptop = Laptop::new(BURROW);
    pivot.add_operator("alice", &laptop.key);
    let sshd = Sshd::start(&[&laptop.key]);
    let token = token_for(&pivot, "cam-42", &["--label", "site=lab"]);
    assert!(token.starts_with("burrow-enroll-v1."), "{token}");
    let decoded = EnrollToken::decode(&token).unwrap();
    assert_eq!(decoded.pivot, pivot.addr.to_string());
    assert_eq!(decoded.fingerprint, fingerprint(&pivot.host_key_pub()));

    let (dev, out) = enroll(&token, &sshd);
    ok(&out);
    let key_file = dev.config.with_file_name("device_key");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777, 0o600);
    let config = std::fs::read_to_string(&dev.config).unwrap();
    assert!(config.contains("id = \"cam-42\"") && config.contains(&sshd.target()), "{config}");
    // No broker given: the config says what the agent will do.
    assert!(config.contains("always_on = true"), "{config}");
    let _agent = start_enrolled_agent(&dev, &[]);
    assert!(pivot.wait_online("cam-42", true, Duration::from_secs(20)));

    ok(&laptop.login(&pivot));
    let cfg = std::fs::read_to_string(laptop.home.path().join(".ssh/burrow/burrow/config")).unwrap();
    assert!(cfg.contains("StrictHostKeyChecking yes") && cfg.contains("ProxyJump burrow-pivot"), "{cfg}");
    assert!(!cfg.contains("StrictHostKeyChecking no"));
    let out = laptop.ssh(&["-o", "StrictHostKeyChecking=yes", "root@cam-42.burrow", "echo strict-ok"]);
    assert_eq!(ok(&out).trim(), "strict-ok");

    // The wrappers use the same settings.
    assert_eq!(ok(&laptop.burrow(&["ssh", "root@cam-42", "echo wrapped"])).trim(), "wrapped");
    let local = laptop.home.path().join("fw.bin");
    std::fs::write(&local, b"firmware").unwrap();
    let remote_path = format!("root@cam-42:{}/fw.bin", sshd.dir.path().display());
    ok(&laptop.burrow(&["scp", local.to_str().unwrap(), &remote_path]));
    assert_eq!(std::fs::read(sshd.dir.path().join("fw.bin")).unwrap(), b"firmware");

    // OpenSSH's own options pass through: ssh -l, sftp -b.
    assert_eq!(ok(&laptop.burrow(&["ssh", "-l", "root", "-o", "BatchMode=yes", "cam-42", "echo l-ok"])).trim(), "l-ok");
    let batch = laptop.home.path().join("batch.txt");
    std::fs::write(
        &batch,
        format!("get {}/fw.bin {}/back.bin\n", sshd.dir.path().display(), laptop.home.path().display()),
    )
    .unwrap();
    ok(&laptop.burrow(&["sftp", "-b", batch.to_str().unwrap(), "root@cam-42"]));
    assert_eq!(std::fs::read(laptop.home.path().join("back.bin")).unwrap(), b"firmware");

    // A second login under another name: its devices are ID.NAME; a bare id
    // still means the default login.
    let fp = fingerprint(&pivot.host_key_pub());
    let addr = pivot.addr.to_string();
    let key = laptop.key.private.to_str().unwrap();
    ok(&laptop.burrow(&["login", &addr, "--name", "lab", "--pivot-host-key", &fp, "--identity", key]));
    let out = laptop.ssh(&["root@cam-42.lab", "echo lab-ok"]);
    assert_eq!(ok(&out).trim(), "lab-ok");
    assert_eq!(ok(&laptop.burrow(&["ssh", "root@cam-42.lab", "echo lab-wrapped"])).trim(), "lab-wrapped");
    assert_eq!(ok(&laptop.burrow(&["ssh", "root@cam-42", "echo default"])).trim(), "default");
}

#[test]
fn wrappers_print_the_pivots_refusal_for_an_offline_device() {
    let pivot = TestPivot::start(BURROW);
    let laptop = Laptop::new(BURROW);
    pivot.add_operator("alice", &laptop.key);
    let key = KeyPair::generate(laptop.home.path(), "dev");
    pivot.add_device("cam-42", &key);
    ok(&laptop.login(&pivot));
    let out = laptop.burrow(&["ssh", "root@cam-42", "true"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("device 'cam-42' is offline (never connected)"), "{}", stderr(&out));
    let out = laptop.burrow(&["forward", "cam-42:8081"]);
    assert!(stderr(&out).contains("device 'cam-42' is offline"), "{}", stderr(&out));
}

#[test]
fn reused_expired_and_tampered_tokens_are_refused() {
    let pivot = TestPivot::start(BURROW);
    let sshd = Sshd::start(&[]);

    let token = token_for(&pivot, "cam-1", &[]);
    let (_first, out) = enroll(&token, &sshd);
    ok(&out);
    let fp = pivot.device_json("cam-1").unwrap()["fingerprint"].clone();
    let (again, out) = enroll(&token, &sshd);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("enrollment token was already used"), "{}", stderr(&out));
    assert_eq!(stderr(&out).matches("already used").count(), 1, "the reason is repeated: {}", stderr(&out));
    assert_eq!(pivot.device_json("cam-1").unwrap()["fingerprint"], fp, "reuse changed the key");
    assert!(!again.config.exists());

    // The shortest lifetime is 1s (0s is refused as a mistake): wait until
    // the clock has passed it (expiry is checked in whole seconds).
    let issued = std::time::SystemTime::now();
    let expired = token_for(&pivot, "cam-2", &["--ttl", "1s"]);
    assert!(wait_until(Duration::from_secs(5), || issued.elapsed().unwrap_or_default() > Duration::from_secs(2)));
    let (e, out) = enroll(&expired, &sshd);
    assert!(stderr(&out).contains("enrollment token expired at"), "{}", stderr(&out));
    assert!(!e.config.exists() && !e.config.with_file_name("device_key").exists());
    assert_eq!(pivot.device_json("cam-2").unwrap()["enrolled"], false);

    let good = token_for(&pivot, "cam-3", &[]);
    let mut t = EnrollToken::decode(&good).unwrap();
    let flipped = if t.secret.ends_with('A') { 'B' } else { 'A' };
    t.secret = format!("{}{flipped}", &t.secret[..t.secret.len() - 1]);
    let (_, out) = enroll(&t.encode(), &sshd);
    assert!(stderr(&out).contains("enrollment token is not valid here"), "{}", stderr(&out));
    let mut t = EnrollToken::decode(&good).unwrap();
    t.device = "cam-1".into();
    let (_, out) = enroll(&t.encode(), &sshd);
    assert!(stderr(&out).contains("enrollment token is not valid here"), "{}", stderr(&out));
    let mut t = EnrollToken::decode(&good).unwrap();
    t.fingerprint = fingerprint(&sshd.host_key.public);
    let (_, out) = enroll(&t.encode(), &sshd);
    assert!(stderr(&out).contains("host key mismatch"), "{}", stderr(&out));
    let (_, out) = enroll(&good[..good.len() - 5], &sshd);
    assert!(stderr(&out).contains("enrollment token is damaged"), "{}", stderr(&out));
    assert_eq!(pivot.device_json("cam-3").unwrap()["enrolled"], false);
    // The untouched token still works after all that.
    let (_, out) = enroll(&good, &sshd);
    ok(&out);
}

#[test]
fn changed_device_host_key_makes_ssh_refuse() {
    let Fleet { pivot, laptop, sshd: _sshd, dev, mut agent } = enrolled_fleet();
    ok(&laptop.login(&pivot));
    ok(&laptop.ssh(&["root@cam-42.burrow", "true"]));

    // Same device id, but now its port 22 leads to an sshd with another host key.
    agent.terminate(Duration::from_secs(10));
    let impostor = Sshd::start(&[&laptop.key]);
    let _agent2 = start_enrolled_agent(&dev, &["--expose", &format!("22={}", impostor.target())]);
    assert!(pivot.wait_online("cam-42", true, Duration::from_secs(20)));
    let out = laptop.ssh(&["root@cam-42.burrow", "echo should-not-run"]);
    assert!(!out.status.success());
    assert!(!stdout(&out).contains("should-not-run"));
    let err = stderr(&out);
    assert!(
        err.contains("REMOTE HOST IDENTIFICATION HAS CHANGED") || err.contains("Host key verification failed"),
        "{err}"
    );
}

#[test]
fn revoking_a_device_disconnects_it_and_refuses_it() {
    let pivot = TestPivot::start(BURROW);
    let sshd = Sshd::start(&[]);
    let (dev, out) = enroll(&token_for(&pivot, "cam-42", &[]), &sshd);
    ok(&out);
    let agent = start_enrolled_agent(&dev, &[]);
    assert!(pivot.wait_online("cam-42", true, Duration::from_secs(20)));
    let laptop = Laptop::new(BURROW);
    pivot.add_operator("root", &laptop.key);
    pivot.admin_ok(&["operator", "remove", "root"]);
    pivot.admin_ok(&["device", "revoke", "cam-42"]);
    assert!(pivot.wait_online("cam-42", false, Duration::from_secs(5)), "revoked device still connected");
    // The agent names the pivot's reason once, and retries slowly.
    let said = "the pivot refused device 'cam-42': device 'cam-42' was revoked on";
    assert!(wait_until(Duration::from_secs(10), || agent.log_text().contains(said)), "{}", agent.log_text());
    assert!(
        agent.log_text().contains("needs a fix on the device or the pivot, retrying every"),
        "{}",
        agent.log_text()
    );
    assert_eq!(pivot.device_json("cam-42").unwrap()["revoked"], true);
    assert!(!pivot.is_online("cam-42"));
    // `agent status` says so, and fails.
    let out =
        Command::new(BURROW).args(["agent", "status", "--status-file"]).arg(agent.status_file()).output().unwrap();
    assert!(!out.status.success());
    let text = stdout(&out);
    assert!(text.contains("state:   refused") && text.contains("was revoked on"), "{text}");
}

#[test]
fn rotated_key_replaces_the_old_one() {
    let Fleet { pivot, laptop, sshd, dev, agent: _agent } = enrolled_fleet();
    let old_fp = pivot.device_json("cam-42").unwrap()["fingerprint"].as_str().unwrap().to_string();
    let old_key = std::fs::read(dev.config.with_file_name("device_key")).unwrap();
    let out = Command::new(BURROW).args(["agent", "rotate-key", "--config"]).arg(&dev.config).output().unwrap();
    let text = ok(&out);
    let new_fp = pivot.device_json("cam-42").unwrap()["fingerprint"].as_str().unwrap().to_string();
    assert_ne!(new_fp, old_fp);
    assert!(text.contains(&new_fp), "{text}");
    assert_ne!(std::fs::read(dev.config.with_file_name("device_key")).unwrap(), old_key);
    // The running agent is dropped with its old key and comes back with the new one.
    let op = operator_as(&pivot, &laptop);
    op.trust_device("cam-42", &sshd);
    assert!(wait_until(Duration::from_secs(20), || op.ssh_device("cam-42", "true").status.success()));
    assert!(pivot.is_online("cam-42"));
}

/// A stock OpenSSH setup (`ssh -J pivot`, strict host keys) using `laptop`'s key.
fn operator_as(pivot: &TestPivot, laptop: &Laptop) -> Operator {
    let op = Operator::new(pivot);
    let cfg = std::fs::read_to_string(&op.config)
        .unwrap()
        .replace(op.key.private.to_str().unwrap(), laptop.key.private.to_str().unwrap());
    std::fs::write(&op.config, cfg).unwrap();
    op
}

#[test]
fn remote_administration_by_role() {
    let pivot = TestPivot::start(BURROW);
    let admin = Laptop::new(BURROW);
    let bob = Laptop::new(BURROW);
    pivot.admin_ok(&["operator", "add", "root-op", "--key", admin.key.public.to_str().unwrap(), "--admin"]);
    let dev_key = KeyPair::generate(admin.home.path(), "cam7");

    // The admin manages from a laptop, over the pivot's SSH port.
    let out = admin.remote(
        &pivot,
        &["device", "add", "cam-7", "--key", dev_key.public.to_str().unwrap(), "--label", "site=berlin"],
    );
    assert!(ok(&out).contains("added device 'cam-7'"));
    let out = admin.remote(&pivot, &["operator", "add", "bob", "--key", bob.key.public.to_str().unwrap()]);
    ok(&out);
    let token = ok(&admin.remote(&pivot, &["device", "add", "cam-8"]));
    assert!(token.trim().starts_with("burrow-enroll-v1."));
    let list = ok(&admin.remote(&pivot, &["device", "list", "--json"]));
    assert!(list.contains("cam-7") && list.contains("cam-8"), "{list}");
    assert!(pivot.device_json("cam-7").is_some());
    assert!(ok(&admin.remote(&pivot, &["operator", "list"])).contains("bob"));

    // bob has the operator role: he may list and look, not manage.
    let list = ok(&bob.remote(&pivot, &["device", "list"]));
    assert!(list.contains("cam-7"), "{list}");
    for args in [
        vec!["device", "remove", "cam-7"],
        vec!["device", "revoke", "cam-7"],
        vec!["operator", "list"],
        vec!["device", "add", "cam-9", "--key", dev_key.public.to_str().unwrap()],
    ] {
        let out = bob.remote(&pivot, &args);
        assert!(!out.status.success(), "{args:?} was allowed");
        assert!(
            stderr(&out).contains("permission denied: operator 'bob' does not have the admin role"),
            "{}",
            stderr(&out)
        );
    }
    assert!(pivot.device_json("cam-7").is_some());

    // An unregistered key and a wrong pin are refused.
    let stranger = Laptop::new(BURROW);
    let out = stranger.remote(&pivot, &["device", "list"]);
    assert!(stderr(&out).contains("the pivot refused our key"), "{}", stderr(&out));
    let addr = pivot.addr.to_string();
    let wrong = fingerprint(&dev_key.public);
    let out = admin.burrow(&[
        "device",
        "list",
        "--pivot",
        &addr,
        "--pivot-fingerprint", // the old name still works
        &wrong,
        "--identity",
        admin.key.private.to_str().unwrap(),
    ]);
    assert!(stderr(&out).contains("host key mismatch"), "{}", stderr(&out));
}

#[test]
fn label_selectors_allow_and_deny() {
    let pivot = TestPivot::start(BURROW);
    let bob = Laptop::new(BURROW);
    let sshd = Sshd::start(&[&bob.key]);
    pivot.admin_ok(&["operator", "add", "bob", "--key", bob.key.public.to_str().unwrap(), "--allow", "site=berlin"]);
    let expose = [format!("22={}", sshd.target())];
    let mut agents = Vec::new();
    for (id, site) in [("cam-b", "berlin"), ("cam-p", "paris")] {
        let key = KeyPair::generate(sshd.dir.path(), id);
        pivot.admin_ok(&[
            "device",
            "add",
            id,
            "--key",
            key.public.to_str().unwrap(),
            "--label",
            &format!("site={site}"),
        ]);
        agents.push(TestAgent::start(BURROW, &pivot, id, &key, &expose));
        assert!(pivot.wait_online(id, true, Duration::from_secs(20)));
    }
    // bob's own ssh config, as a stock OpenSSH user would have it.
    let op = Operator::new(&pivot);
    let cfg = std::fs::read_to_string(&op.config)
        .unwrap()
        .replace(op.key.private.to_str().unwrap(), bob.key.private.to_str().unwrap());
    std::fs::write(&op.config, cfg).unwrap();
    op.trust_device("cam-b", &sshd);
    op.trust_device("cam-p", &sshd);
    let out = op.ssh_device("cam-b", "echo berlin");
    assert_eq!(ok(&out).trim(), "berlin");
    let out = op.ssh_device("cam-p", "echo paris");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not allowed to reach device 'cam-p'"), "{}", stderr(&out));
    let list = ok(&bob.remote(&pivot, &["device", "list"]));
    assert!(list.contains("cam-b") && !list.contains("cam-p"), "{list}");
    let out = bob.remote(&pivot, &["device", "show", "cam-p"]);
    assert!(stderr(&out).contains("not allowed to reach device 'cam-p'"), "{}", stderr(&out));
}

#[test]
fn sftp_and_forward_wrappers_reach_an_enrolled_device() {
    let Fleet { pivot, laptop, sshd, dev: _dev, agent: _agent } = enrolled_fleet();
    ok(&laptop.login(&pivot));

    std::fs::write(sshd.dir.path().join("notes.txt"), "hello sftp\n").unwrap();
    let mut sftp = Command::new(BURROW)
        .env("HOME", laptop.home.path())
        .env_remove("SSH_AUTH_SOCK")
        .args(["sftp", "root@cam-42"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    writeln!(sftp.stdin.take().unwrap(), "ls {}", sshd.dir.path().display()).unwrap();
    let out = sftp.wait_with_output().unwrap();
    assert!(stdout(&out).contains("notes.txt"), "{}{}", stdout(&out), stderr(&out));

    let port = free_port();
    let mut cmd = Command::new(BURROW);
    cmd.env("HOME", laptop.home.path()).env_remove("SSH_AUTH_SOCK").args([
        "forward",
        "cam-42:22",
        "--local",
        &format!("127.0.0.1:{port}"),
    ]);
    let mut fwd = Proc::spawn("burrow forward", &mut cmd, laptop.home.path().join("forward.log"));
    let mut banner = String::new();
    assert!(
        wait_until(Duration::from_secs(15), || {
            use std::io::Read;
            let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return false };
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut buf = [0u8; 64];
            let n = s.read(&mut buf).unwrap_or(0);
            banner = String::from_utf8_lossy(&buf[..n]).into_owned();
            banner.starts_with("SSH-2.0-OpenSSH")
        }),
        "no sshd banner through the forward: {banner:?}"
    );
    // Issue 11: killing `burrow forward` left its ssh child holding the port.
    fwd.kill();
    assert!(
        wait_until(Duration::from_secs(10), || std::net::TcpStream::connect(("127.0.0.1", port)).is_err()),
        "the ssh child outlived `burrow forward`"
    );

    // Without --local, a privileged port is never taken: a free one is, and printed.
    let mut cmd = Command::new(BURROW);
    cmd.env("HOME", laptop.home.path()).env_remove("SSH_AUTH_SOCK").args(["forward", "cam-42:22"]);
    let fwd = Proc::spawn("burrow forward (default)", &mut cmd, laptop.home.path().join("forward2.log"));
    assert!(
        wait_until(Duration::from_secs(15), || fwd.log_text().contains("forwarding 127.0.0.1:")),
        "{}",
        fwd.log_text()
    );
    let text = fwd.log_text();
    let local = text.split("forwarding ").nth(1).and_then(|r| r.split_whitespace().next()).unwrap();
    let local_port: u16 = local.rsplit(':').next().unwrap().parse().unwrap();
    assert!(local_port >= 1024, "forward took port {local_port}");
}

#[test]
fn remote_admin_signs_with_keys_from_ssh_agent() {
    require_tool("ssh-agent");
    require_tool("ssh-add");
    let pivot = TestPivot::start(BURROW);
    let admin = Laptop::new(BURROW);
    pivot.admin_ok(&["operator", "add", "root-op", "--key", admin.key.public.to_str().unwrap(), "--admin"]);
    let stranger = KeyPair::generate(admin.home.path(), "id_unregistered");
    let cam_key = KeyPair::generate(admin.home.path(), "cam1");

    // A real ssh-agent on its own socket; no key file is given to burrow.
    let sock = admin.home.path().join("agent.sock");
    let _agent = Proc::spawn(
        "ssh-agent",
        Command::new("ssh-agent").arg("-D").arg("-a").arg(&sock),
        admin.home.path().join("agent.log"),
    );
    assert!(wait_until(Duration::from_secs(10), || sock.exists()), "ssh-agent did not start");
    let add = |key: &KeyPair| {
        let out = Command::new("ssh-add").arg(&key.private).env("SSH_AUTH_SOCK", &sock).output().unwrap();
        assert!(out.status.success(), "ssh-add: {}", stderr(&out));
    };
    let with_agent = |args: &[&str]| {
        let fp = fingerprint(&pivot.host_key_pub());
        let addr = pivot.addr.to_string();
        Command::new(BURROW)
            .env("HOME", admin.home.path())
            .env("SSH_AUTH_SOCK", &sock)
            .args(args)
            .args(["--pivot", &addr, "--pivot-host-key", &fp])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };

    // Only a key the pivot does not know: refused, and nothing is changed.
    add(&stranger);
    let out = with_agent(&["device", "add", "cam-1", "--key", cam_key.public.to_str().unwrap()]);
    assert!(!out.status.success(), "an unknown agent key was accepted");
    assert!(stderr(&out).contains("refused"), "{}", stderr(&out));
    assert!(pivot.device_json("cam-1").is_none());

    // With the admin's key added too, the agent's keys are tried in turn.
    add(&admin.key);
    let out = with_agent(&["device", "add", "cam-1", "--key", cam_key.public.to_str().unwrap()]);
    assert!(ok(&out).contains("added device 'cam-1'"));
    assert!(ok(&with_agent(&["device", "list"])).contains("cam-1"));
}

/// Issue 11: a device added with --key had no host keys, `login` pinned
/// nothing for it without saying so, and strict checking then failed.
#[test]
fn host_keys_given_at_device_add_are_pinned_and_login_names_devices_without() {
    let pivot = TestPivot::start(BURROW);
    let laptop = Laptop::new(BURROW);
    pivot.add_operator("alice", &laptop.key);
    let sshd = Sshd::start(&[&laptop.key]);
    let dir = tempfile::tempdir().unwrap();
    let (k9, k10) = (KeyPair::generate(dir.path(), "cam-9"), KeyPair::generate(dir.path(), "cam-10"));
    let host_key = sshd.host_key.public.to_str().unwrap();
    pivot.admin_ok(&["device", "add", "cam-9", "--key", k9.public.to_str().unwrap(), "--host-key", host_key]);
    pivot.add_device("cam-10", &k10);
    // Host keys go with --key only: an enrolling device registers its own.
    let out = pivot.admin(&["device", "add", "cam-11", "--host-key", host_key, "--address", "p:22"]);
    assert!(!out.status.success(), "{}", stdout(&out));

    let out = ok(&laptop.login(&pivot));
    assert!(out.contains("(1 device host keys pinned)"), "{out}");
    assert!(out.contains("no host keys registered for: cam-10 "), "{out}");
    let known = std::fs::read_to_string(laptop.home.path().join(".ssh/burrow/burrow/known_hosts")).unwrap();
    let key_body = sshd.host_key.public_line();
    let key_body = key_body.split_whitespace().nth(1).unwrap();
    assert!(known.lines().any(|l| l.starts_with("cam-9.burrow,cam-9 ") && l.contains(key_body)), "{known}");
}

/// Issue 11: the agent registers its sshd's host keys when the pivot has
/// none; a changed key is flagged, not taken, until an admin resets it.
#[test]
fn the_agent_registers_its_sshds_host_keys_and_a_change_waits_for_an_admin() {
    let pivot = TestPivot::start(BURROW);
    let laptop = Laptop::new(BURROW);
    pivot.add_operator("alice", &laptop.key);
    let sshd = Sshd::start(&[&laptop.key]);
    let key = KeyPair::generate(laptop.home.path(), "cam-5");
    pivot.add_device("cam-5", &key);
    let agent = TestAgent::start(BURROW, &pivot, "cam-5", &key, &[format!("22={}", sshd.target())]);
    let first = sshd.host_key.public_line();
    let first = first.split_whitespace().nth(1).unwrap().to_string();
    let has = |body: &str, field: &str| pivot.device_json("cam-5").is_some_and(|d| d[field].to_string().contains(body));
    assert!(wait_until(Duration::from_secs(20), || has(&first, "host_keys")), "{}", agent.proc.log_text());

    // Strict host-key checking works with no key copied by hand.
    ok(&laptop.login(&pivot));
    assert_eq!(ok(&laptop.ssh(&["root@cam-5.burrow", "echo pinned"])).trim(), "pinned");

    // The same device now shows another sshd (say, reinstalled): flagged only.
    drop(agent);
    let other = Sshd::start(&[&laptop.key]);
    let second = other.host_key.public_line();
    let second = second.split_whitespace().nth(1).unwrap().to_string();
    let _agent = TestAgent::start(BURROW, &pivot, "cam-5", &key, &[format!("22={}", other.target())]);
    assert!(wait_until(Duration::from_secs(20), || has(&second, "host_keys_changed")));
    assert!(has(&first, "host_keys") && !has(&second, "host_keys"), "a changed key replaced the registered one");
    let list = pivot.admin_ok(&["device", "list"]);
    assert!(list.lines().any(|l| l.starts_with("cam-5 ") && l.contains("connected!")), "{list}");
    let show = pivot.admin_ok(&["device", "show", "cam-5"]);
    assert!(show.contains("CHANGED") && show.contains("burrow device host-keys reset cam-5"), "{show}");
    // The operator's pin holds: ssh refuses the new key.
    ok(&laptop.login(&pivot));
    let out = laptop.ssh(&["root@cam-5.burrow", "true"]);
    assert!(!out.status.success(), "strict checking let a changed host key through");

    // The admin accepts the change; a fresh login pins the new key.
    let out = pivot.admin_ok(&["device", "host-keys", "reset", "cam-5"]);
    assert!(out.contains("now has the 1 host keys its agent reported"), "{out}");
    assert!(has(&second, "host_keys") && !has(&first, "host_keys"));
    // With nothing reported, a reset drops nothing unless asked to.
    let out = pivot.admin(&["device", "host-keys", "reset", "cam-5"]);
    assert!(!out.status.success() && stderr(&out).contains("add --forget"), "{}", stderr(&out));
    assert!(has(&second, "host_keys"));
    // Run again, login keeps its saved pin and key.
    ok(&laptop.burrow(&["login", &pivot.addr.to_string()]));
    assert_eq!(ok(&laptop.ssh(&["root@cam-5.burrow", "echo repinned"])).trim(), "repinned");
}

/// Issue 11: `agent enroll --config dev/agent.toml` wrote `key = "dev/key"`,
/// which an agent started from another directory could not find.
#[test]
fn enrollment_writes_absolute_paths_from_a_relative_config() {
    let pivot = TestPivot::start(BURROW);
    let sshd = Sshd::start(&[]);
    let token = token_for(&pivot, "cam-42", &["--address", &pivot.addr.to_string()]);
    let cwd = tempfile::tempdir().unwrap();
    let out = Command::new(BURROW)
        .current_dir(cwd.path())
        .args([
            "agent",
            "enroll",
            "--token",
            &token,
            "--config",
            "dev/agent.toml",
            "--trust-dir",
            "trust",
            "--host-keys",
        ])
        .arg(&sshd.host_key.public)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let written = std::fs::read_to_string(cwd.path().join("dev/agent.toml")).unwrap();
    let want = format!("key = \"{}\"", cwd.path().join("dev/device_key").display());
    assert!(written.contains(&want), "{written}");
}
