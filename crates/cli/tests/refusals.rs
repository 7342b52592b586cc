//! Every refusal reaches the stock ssh client with its reason, and nothing a
//! peer is not allowed to do gets through.

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use burrow_testkit::*;

const BURROW: &str = env!("CARGO_BIN_EXE_burrow");

#[test]
fn unknown_device_is_named_in_the_refusal() {
    let (_pivot, op) = TestPivot::with_operator(BURROW, &[]);
    let out = op.ssh_device("cam-42", "true");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("unknown device 'cam-42'"), "{}", stderr(&out));
}

#[test]
fn registered_device_that_never_connected_is_offline() {
    let (pivot, op) = TestPivot::with_operator(BURROW, &[]);
    let key = KeyPair::generate(op.dir.path(), "dev");
    pivot.add_device("cam-42", &key);
    let out = op.ssh_device("cam-42", "true");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("device 'cam-42' is offline (never connected)"), "{}", stderr(&out));
}

#[test]
fn disconnected_device_is_offline_with_last_seen_time() {
    let (pivot, op) = TestPivot::with_operator(BURROW, &[]);
    let mut dev = Device::start(BURROW, &pivot, &op, "cam-42");
    dev.agent.proc.kill();
    assert!(pivot.wait_online("cam-42", false, Duration::from_secs(10)));
    let last_seen = pivot.device_json("cam-42").unwrap()["last_seen"].as_str().unwrap().to_string();
    assert!(last_seen.ends_with('Z') && last_seen.len() == 20, "{last_seen}");
    let out = op.ssh_device("cam-42", "true");
    assert!(!out.status.success());
    let expected = format!("device 'cam-42' is offline (last seen {last_seen})");
    assert!(stderr(&out).contains(&expected), "wanted {expected:?} in {}", stderr(&out));
}

#[test]
fn port_not_exposed_is_named_in_the_refusal() {
    let (pivot, op) = TestPivot::with_operator(BURROW, &[]);
    let _dev = Device::start(BURROW, &pivot, &op, "cam-42");
    let out = op.ssh(&["-J", "pivot", "-p", "8080", "root@cam-42", "true"]).output().unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("device 'cam-42' does not expose port 8080"), "{}", stderr(&out));
}

/// `ssh -N -R BIND:22:... -i KEY USER@pivot` with ExitOnForwardFailure, as a stock device would.
fn stock_forward(pivot: &TestPivot, op: &Operator, key: &KeyPair, user: &str, bind: &str) -> std::process::Output {
    op.bare_ssh(pivot, key)
        .args(["-N", "-o", "ExitOnForwardFailure=yes", "-R", &format!("{bind}:22:127.0.0.1:22")])
        .arg(format!("{user}@127.0.0.1"))
        .output()
        .unwrap()
}

#[test]
fn device_key_cannot_claim_another_devices_id() {
    let (pivot, op) = TestPivot::with_operator(BURROW, &[]);
    let k42 = KeyPair::generate(op.dir.path(), "cam-42");
    let k43 = KeyPair::generate(op.dir.path(), "cam-43");
    pivot.add_device("cam-42", &k42);
    pivot.add_device("cam-43", &k43);
    let out = stock_forward(&pivot, &op, &k42, "cam-42", "cam-43");
    assert!(!out.status.success(), "forward for another id was accepted");
    assert!(stderr(&out).contains("remote port forwarding failed"), "{}", stderr(&out));
    assert!(!pivot.is_online("cam-43"));
    // Logging in under another id is refused with the reason, which only
    // the key's holder sees.
    let out = stock_forward(&pivot, &op, &k42, "cam-43", "cam-43");
    assert!(!out.status.success(), "login as another id was accepted");
    assert!(stderr(&out).contains("this key belongs to device 'cam-42', not 'cam-43'"), "{}", stderr(&out));
    assert!(!pivot.is_online("cam-43"));

    // The agent with a mismatched id is told the same, and its status says so.
    let agent = TestAgent::start(BURROW, &pivot, "cam-43", &k42, &["22=127.0.0.1:22".to_string()]);
    assert!(wait_until(Duration::from_secs(15), || agent
        .proc
        .log_text()
        .contains("the pivot refused device 'cam-43': this key belongs to device 'cam-42', not 'cam-43'")));
    assert!(!pivot.is_online("cam-43"));
    let status: serde_json::Value = serde_json::from_slice(&std::fs::read(agent.proc.status_file()).unwrap()).unwrap();
    assert_eq!(status["state"], "refused", "{status}");
}

#[test]
fn device_cannot_open_direct_tcpip() {
    let (pivot, op) = TestPivot::with_operator(BURROW, &[]);
    let k42 = KeyPair::generate(op.dir.path(), "cam-42");
    pivot.add_device("cam-42", &k42);
    let _other = Device::start(BURROW, &pivot, &op, "cam-43");
    let out = op.bare_ssh(&pivot, &k42).args(["-W", "cam-43:22", "cam-42@127.0.0.1"]).output().unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("administratively prohibited: devices may not open connections through the pivot"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn operator_cannot_forward() {
    let (pivot, op) = TestPivot::with_operator(BURROW, &[]);
    let k42 = KeyPair::generate(op.dir.path(), "cam-42");
    pivot.add_device("cam-42", &k42);
    let out = stock_forward(&pivot, &op, &op.key, "device", "cam-42");
    assert!(!out.status.success(), "operator forward was accepted");
    assert!(stderr(&out).contains("remote port forwarding failed"), "{}", stderr(&out));
    assert!(!pivot.is_online("cam-42"));
}

#[test]
fn pivot_gives_no_shell_exec_or_subsystem() {
    let (_pivot, op) = TestPivot::with_operator(BURROW, &[]);
    for args in [vec!["-tt", "pivot"], vec!["pivot", "id"], vec!["-s", "pivot", "sftp"]] {
        let out = op.ssh(&args).stdin(Stdio::null()).output().unwrap();
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(stderr(&out).contains("the pivot has no shell"), "{args:?}: {}", stderr(&out));
    }
}

#[test]
fn unknown_key_is_refused() {
    let (pivot, op) = TestPivot::with_operator(BURROW, &[]);
    let stranger = KeyPair::generate(op.dir.path(), "stranger");
    let out = op.bare_ssh(&pivot, &stranger).args(["-W", "cam-42:22", "alice@127.0.0.1"]).output().unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("Permission denied (publickey)"), "{}", stderr(&out));
    drop(pivot);
}

#[test]
fn password_authentication_is_not_offered() {
    let (_pivot, op) = TestPivot::with_operator(BURROW, &[]);
    let out = op
        .ssh(&[
            "-o",
            "PubkeyAuthentication=no",
            "-o",
            "PreferredAuthentications=password,keyboard-interactive",
            "-W",
            "x:22",
            "pivot",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("Permission denied (publickey)"), "{}", stderr(&out));
}

struct Pinned(String);

impl russh::client::Handler for Pinned {
    type Error = russh::Error;
    async fn check_server_key(&mut self, key: &russh::keys::PublicKeyOrCertificate) -> Result<bool, Self::Error> {
        Ok(matches!(key, russh::keys::PublicKeyOrCertificate::PublicKey { key, .. }
            if key.fingerprint(Default::default()).to_string() == self.0))
    }
}

#[tokio::test]
async fn password_none_and_keyboard_interactive_are_refused_when_tried() {
    let (pivot, op) = TestPivot::with_operator(BURROW, &[]);
    let pub_line = pivot.host_key_line();
    let host_key = russh::keys::ssh_key::PublicKey::from_openssh(&pub_line).unwrap();
    let fp = host_key.fingerprint(Default::default()).to_string();
    let mut handle = russh::client::connect(Arc::new(Default::default()), pivot.addr, Pinned(fp)).await.unwrap();
    assert!(!handle.authenticate_none("alice").await.unwrap().success());
    assert!(!handle.authenticate_password("alice", "hunter2").await.unwrap().success());
    let ki = handle.authenticate_keyboard_interactive_start("alice", None::<String>).await.unwrap();
    assert!(matches!(ki, russh::client::KeyboardInteractiveAuthResponse::Failure { .. }), "{ki:?}");
    drop(op);
}
