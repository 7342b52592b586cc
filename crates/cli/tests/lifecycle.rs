//! Recovery and administration against a running pivot: restarts, removals,
//! replaced and dead connections, host-key pinning, registry validation.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use burrow_testkit::*;

const BURROW: &str = env!("CARGO_BIN_EXE_burrow");

#[test]
fn agent_reconnects_after_the_pivot_restarts() {
    let (mut pivot, op) = TestPivot::with_operator(BURROW, &[]);
    let dev = Device::start(BURROW, &pivot, &op, "cam-42");
    pivot.restart();
    assert!(pivot.wait_online("cam-42", true, Duration::from_secs(30)), "agent did not come back");
    let out = op.ssh_device("cam-42", "echo back");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "back");
    assert!(dev.agent.proc.log_text().contains("reconnecting in"));
}

#[test]
fn removed_operator_is_disconnected() {
    let (pivot, op) = TestPivot::with_operator(BURROW, &[]);
    let _dev = Device::start(BURROW, &pivot, &op, "cam-42");
    let mut session = op
        .ssh(&["-J", "pivot", "root@cam-42", "echo ready; sleep 120"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(read_line_until(&mut session, Duration::from_secs(20), |l| l == "ready"));
    pivot.admin_ok(&["operator", "remove", "alice"]);
    let removed = Instant::now();
    assert!(
        wait_until(Duration::from_secs(10), || matches!(session.try_wait(), Ok(Some(_)))),
        "operator session survived removal"
    );
    let out = session.wait_with_output().unwrap();
    eprintln!("disconnected {:?} after removal", removed.elapsed());
    assert!(stderr(&out).contains("operator 'alice' was removed"), "{}", stderr(&out));
    let again = op.ssh_device("cam-42", "true");
    assert!(!again.status.success());
    assert!(stderr(&again).contains("Permission denied (publickey)"), "{}", stderr(&again));
}

#[test]
fn removed_device_loses_its_tunnel() {
    let (pivot, op) = TestPivot::with_operator(BURROW, &[]);
    let dev = Device::start(BURROW, &pivot, &op, "cam-42");
    pivot.admin_ok(&["device", "remove", "cam-42"]);
    assert!(wait_until(Duration::from_secs(10), || dev.agent.proc.log_text().contains("was removed")
        || dev.agent.proc.log_text().contains("refused the key")));
    let out = op.ssh_device("cam-42", "true");
    assert!(stderr(&out).contains("unknown device 'cam-42'"), "{}", stderr(&out));
}

#[test]
fn a_new_connection_of_the_same_device_replaces_the_old_one() {
    let (pivot, op) = TestPivot::with_operator(BURROW, &[]);
    let sshd = Sshd::start(&[&op.key]);
    let key = KeyPair::generate(sshd.dir.path(), "device");
    pivot.add_device("cam-42", &key);
    op.trust_device("cam-42", &sshd);
    let mut first = op.stock_device(&pivot, "cam-42", &key, &sshd, "first.log");
    assert!(pivot.wait_online("cam-42", true, Duration::from_secs(20)));
    let mut second = op.stock_device(&pivot, "cam-42", &key, &sshd, "second.log");
    assert!(wait_until(Duration::from_secs(10), || !first.is_running()), "old connection was not replaced");
    assert!(first.log_text().contains("replaced by a newer connection"), "{}", first.log_text());
    assert!(second.is_running());
    let out = op.ssh_device("cam-42", "echo via-second");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(pivot.is_online("cam-42"));
}

#[test]
fn dead_device_connection_goes_offline_after_missed_keepalives() {
    // 1 s keepalives so the test is quick; the default of 30 s x 2 gives 90 s.
    let (pivot, op) = TestPivot::with_operator(BURROW, &["--keepalive", "1s"]);
    let dev = Device::start(BURROW, &pivot, &op, "cam-42");
    // A frozen agent keeps its TCP connection but answers nothing.
    let pid = dev.agent.proc.pid().to_string();
    assert!(Command::new("kill").args(["-STOP", &pid]).status().unwrap().success());
    let offline = pivot.wait_online("cam-42", false, Duration::from_secs(15));
    let _ = Command::new("kill").args(["-CONT", &pid]).status();
    assert!(offline, "a silent device stayed online");
}

#[test]
fn agent_refuses_a_pivot_with_the_wrong_host_key() {
    let (pivot, op) = TestPivot::with_operator(BURROW, &[]);
    let sshd = Sshd::start(&[&op.key]);
    let key = KeyPair::generate(sshd.dir.path(), "device");
    pivot.add_device("cam-42", &key);
    let impostor = KeyPair::generate(sshd.dir.path(), "impostor");
    let pin = Command::new("ssh-keygen").arg("-lf").arg(&impostor.public).output().unwrap();
    let fp = stdout(&pin).split_whitespace().nth(1).unwrap().to_string();
    let agent = TestAgent::start_pinned(
        BURROW,
        &pivot.addr.to_string(),
        "cam-42",
        &key,
        &fp,
        &[format!("22={}", sshd.target())],
    );
    assert!(wait_until(Duration::from_secs(15), || agent.proc.log_text().contains("host key mismatch")));
    assert!(agent.proc.log_text().contains(&fp));
    assert!(!pivot.is_online("cam-42"));
}

#[test]
fn invalid_registrations_change_nothing() {
    let (pivot, op) = TestPivot::with_operator(BURROW, &[]);
    let key = KeyPair::generate(op.dir.path(), "dev");
    pivot.add_device("cam-1", &key);
    let before = pivot.admin_ok(&["device", "list", "--json"]);

    let bad_id = pivot.admin(&["device", "add", "Cam_42!", "--key", key.public.to_str().unwrap()]);
    assert!(!bad_id.status.success());
    assert!(stderr(&bad_id).contains("must start with a lowercase letter or a digit"), "{}", stderr(&bad_id));
    let long = "a".repeat(64);
    let too_long = pivot.admin(&["device", "add", &long, "--key", key.public.to_str().unwrap()]);
    assert!(stderr(&too_long).contains("longer than 63"), "{}", stderr(&too_long));

    let junk = op.dir.path().join("junk.pub");
    std::fs::write(&junk, "ssh-ed25519 not-base64 x\n").unwrap();
    let malformed = pivot.admin(&["device", "add", "cam-2", "--key", junk.to_str().unwrap()]);
    assert!(!malformed.status.success());
    assert!(stderr(&malformed).contains("is not an OpenSSH public key"), "{}", stderr(&malformed));

    let dup = pivot.admin(&["device", "add", "cam-3", "--key", key.public.to_str().unwrap()]);
    assert!(!dup.status.success());
    assert!(stderr(&dup).contains("already registered to device 'cam-1'"), "{}", stderr(&dup));
    let dup_op = pivot.admin(&["operator", "add", "bob", "--key", op.key.public.to_str().unwrap()]);
    assert!(stderr(&dup_op).contains("already registered to operator 'alice'"), "{}", stderr(&dup_op));
    let dup_across = pivot.admin(&["operator", "add", "bob", "--key", key.public.to_str().unwrap()]);
    assert!(stderr(&dup_across).contains("already registered to device 'cam-1'"), "{}", stderr(&dup_across));

    assert_eq!(pivot.admin_ok(&["device", "list", "--json"]), before);
    let ops = pivot.admin_ok(&["operator", "list", "--json"]);
    assert!(!ops.contains("bob"), "{ops}");
}

#[test]
fn device_list_show_and_labels() {
    let (pivot, op) = TestPivot::with_operator(BURROW, &[]);
    let key = KeyPair::generate(op.dir.path(), "dev");
    pivot.admin_ok(&[
        "device",
        "add",
        "cam-9",
        "--key",
        key.public.to_str().unwrap(),
        "--label",
        "site=berlin",
        "--label",
        "rack=3",
    ]);
    let _dev = Device::start(BURROW, &pivot, &op, "cam-42");
    let d = pivot.device_json("cam-9").unwrap();
    assert_eq!(d["labels"]["site"], "berlin");
    assert_eq!(d["online"], false);
    assert!(d["last_seen"].is_null());
    let d = pivot.device_json("cam-42").unwrap();
    assert_eq!(d["online"], true);
    assert_eq!(d["ports"], serde_json::json!([22]));
    let table = pivot.admin_ok(&["device", "list"]);
    assert!(
        table.lines().any(|l| l.starts_with("cam-9") && l.contains("rack=3,site=berlin") && l.contains("never")),
        "{table}"
    );
    let show = pivot.admin_ok(&["device", "show", "cam-42"]);
    assert!(show.contains("tunnel:      open"), "{show}");
    let missing = pivot.admin(&["device", "show", "nope"]);
    assert!(stderr(&missing).contains("unknown device 'nope'"));
    let ops = pivot.admin_ok(&["operator", "list"]);
    assert!(ops.contains("alice"), "{ops}");
}

/// Issue 13 (part): an always-on agent given several pivots behind one host
/// key fails over to the next when its pivot dies, within seconds.
#[test]
fn an_agent_fails_over_to_the_next_pivot_when_its_pivot_dies() {
    let mut a = TestPivot::start(BURROW);
    let mut b = TestPivot::start(BURROW);
    // Pivots behind one name share one host key.
    b.proc.terminate(Duration::from_secs(10));
    for f in ["host_key", "host_key.pub"] {
        std::fs::copy(a.data.path().join(f), b.data.path().join(f)).unwrap();
    }
    b.restart();
    let sshd_op = Operator::new(&b);
    b.add_operator("alice", &sshd_op.key);
    let sshd = Sshd::start(&[&sshd_op.key]);
    let key = KeyPair::generate(sshd.dir.path(), "cam-9");
    a.add_device("cam-9", &key);
    b.add_device("cam-9", &key);
    let mut cmd = std::process::Command::new(BURROW);
    cmd.args(["agent", "--id", "cam-9", "--expose", &format!("22={}", sshd.target())])
        .args(["--pivot", &a.addr.to_string(), "--pivot", &b.addr.to_string(), "--key"])
        .arg(&key.private)
        .arg("--pivot-host-key")
        .arg(a.host_key_pub());
    let agent = Proc::spawn("burrow agent (two pivots)", &mut cmd, sshd.dir.path().join("agent.log"));
    assert!(a.wait_online("cam-9", true, Duration::from_secs(20)), "{}", agent.log_text());
    assert!(!b.is_online("cam-9"));

    a.proc.kill();
    let died = std::time::Instant::now();
    assert!(b.wait_online("cam-9", true, Duration::from_secs(10)), "no failover: {}", agent.log_text());
    assert!(died.elapsed() < Duration::from_secs(10));
    sshd_op.trust_device("cam-9", &sshd);
    let out = sshd_op.ssh_device("cam-9", "echo through-b");
    assert_eq!(stdout(&out).trim(), "through-b", "{}", stderr(&out));
}
