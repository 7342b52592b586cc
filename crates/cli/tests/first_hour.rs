//! Issue 11: what went wrong around the Quickstart for a new user.

use std::process::Command;
use std::time::Duration;

use burrow_testkit::*;

const BURROW: &str = env!("CARGO_BIN_EXE_burrow");

/// A wrong or missing --data-dir used to create an empty registry that the
/// pivot never reads, and report success into it.
#[test]
fn admin_commands_never_create_a_registry() {
    let dir = tempfile::tempdir().unwrap();
    let typo = dir.path().join("burrow-dta");
    for args in [&["device", "list"][..], &["device", "add", "cam-42", "--address", "p:22"], &["ban", "list"]] {
        let out = Command::new(BURROW).args(args).arg("--data-dir").arg(&typo).output().unwrap();
        assert!(!out.status.success(), "{args:?} succeeded on a data dir with no registry");
        let err = stderr(&out);
        assert!(err.contains("no registry in") && err.contains(typo.to_str().unwrap()), "{args:?}: {err}");
        assert!(err.contains("burrow server --data-dir"), "{args:?}: no hint: {err}");
    }
    assert!(!typo.exists(), "an admin command created the data dir");
}

/// A second pivot on one data dir used to start without a word and clear
/// the first one's tunnel records.
#[test]
fn a_second_pivot_on_the_same_data_dir_is_refused() {
    let pivot = TestPivot::start(BURROW);
    let out = Command::new(BURROW)
        .args(["server", "--listen", "127.0.0.1:0", "--mqtt-listen", "127.0.0.1:0", "--data-dir"])
        .arg(pivot.data.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    let pid = pivot.proc.pid().to_string();
    assert!(err.contains("another burrow server") && err.contains(&pid), "{err}");
    // The first one is untouched and still answers.
    assert!(pivot.admin(&["device", "list"]).status.success());
    let mut s = std::net::TcpStream::connect(pivot.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut banner = [0u8; 7];
    std::io::Read::read_exact(&mut s, &mut banner).unwrap();
    assert_eq!(&banner, b"SSH-2.0");
}

#[test]
fn admin_messages_read_as_sentences() {
    let pivot = TestPivot::start(BURROW);
    let dir = tempfile::tempdir().unwrap();
    let alice = KeyPair::generate(dir.path(), "alice");
    let out = pivot.admin_ok(&["operator", "add", "alice", "--key", alice.public.to_str().unwrap()]);
    assert!(out.starts_with("added operator 'alice' (SHA256:"), "{out}");
    let root = KeyPair::generate(dir.path(), "root");
    let out = pivot.admin_ok(&["operator", "add", "root", "--admin", "--key", root.public.to_str().unwrap()]);
    assert!(out.starts_with("added operator 'root' with admin rights (SHA256:"), "{out}");
    let out = pivot.admin(&["device", "add", "cam-42", "--address", "pivot.example.com:22"]);
    assert!(stderr(&out).contains("enroll it within 1 day (until "), "{}", stderr(&out));
}

/// `BURROW_MQTT_PASSWORD=x burrow agent --help` printed `x`.
#[test]
fn help_never_echoes_a_secret_from_the_environment() {
    for sub in ["agent", "server"] {
        let out =
            Command::new(BURROW).args([sub, "--help"]).env("BURROW_MQTT_PASSWORD", "s3cret-from-env").output().unwrap();
        assert!(out.status.success());
        assert!(!stdout(&out).contains("s3cret-from-env"), "`burrow {sub} --help` echoed the password");
    }
}

/// Passing the `.pub` file as `--key` said `readable by other users`.
#[test]
fn a_public_key_given_as_the_device_key_is_named_as_such() {
    let dir = tempfile::tempdir().unwrap();
    let key = KeyPair::generate(dir.path(), "cam-1");
    let pin = "SHA256:uNiVztksCsDhcc0u9e8BujQXVUpKZIDTMczCvj3tD2s";
    let out = Command::new(BURROW)
        .args(["agent", "--server", "127.0.0.1:1", "--id", "cam-1", "--expose", "22=127.0.0.1:22"])
        .args(["--pivot-host-key", pin, "--key"])
        .arg(&key.public)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("is a public key; --key takes the device's private key"), "{err}");
    assert!(!err.contains("chmod"), "{err}");
}

/// After a 40 s pivot outage an agent waited almost a minute more: the
/// reconnect backoff is capped lower, and the cap is a flag.
#[test]
fn reconnect_waits_are_capped_by_reconnect_max() {
    let dir = tempfile::tempdir().unwrap();
    let key = KeyPair::generate(dir.path(), "cam-1");
    let pin = "SHA256:uNiVztksCsDhcc0u9e8BujQXVUpKZIDTMczCvj3tD2s";
    let mut cmd = Command::new(BURROW);
    cmd.args(["agent", "--server", &format!("127.0.0.1:{}", free_port()), "--id", "cam-1"])
        .args(["--expose", "22=127.0.0.1:22", "--pivot-host-key", pin, "--reconnect-max", "2s", "--key"])
        .arg(&key.private);
    let agent = Proc::spawn("burrow agent", &mut cmd, dir.path().join("agent.log"));
    let waits = || -> Vec<f64> {
        let text = agent.log_text();
        text.lines().filter_map(|l| l.split("reconnecting in ").nth(1)?.trim_end_matches('s').parse().ok()).collect()
    };
    assert!(wait_until(Duration::from_secs(15), || waits().len() >= 5), "{}", agent.log_text());
    assert!(waits().iter().all(|w| *w <= 2.0), "{:?}", waits());
}

/// An exported BURROW_PIVOT made `server`, `agent`, `agent enroll` and
/// `login` try to reach that pivot before doing their own work.
#[test]
fn an_exported_burrow_pivot_only_affects_admin_commands() {
    let run = |args: &[&str]| Command::new(BURROW).args(args).env("BURROW_PIVOT", "127.0.0.1:1").output().unwrap();
    let out = run(&["agent", "enroll", "--token", "nope", "--config", "/nonexistent/agent.toml"]);
    assert!(stderr(&out).contains("not a burrow enrollment token"), "{}", stderr(&out));
    let out = run(&["server", "--help"]);
    assert!(out.status.success(), "{}", stderr(&out));
    // An admin command does use it.
    let out = run(&["device", "list"]);
    assert!(!out.status.success());
    assert!(!stderr(&out).contains("no registry in"), "device list ignored BURROW_PIVOT: {}", stderr(&out));
}

/// `burrow --version` names the commit it was built from.
#[test]
fn version_names_the_commit() {
    require_tool("git");
    let head = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    let head = String::from_utf8_lossy(&head.stdout).trim().to_string();
    let out = Command::new(BURROW).arg("--version").output().unwrap();
    assert!(stdout(&out).contains(&format!("({head})")), "{} vs {head}", stdout(&out));
}

/// A near-miss id gets "did you mean", from admin commands and from the
/// pivot to an operator's ssh; a restricted operator learns nothing.
#[test]
fn a_near_miss_id_gets_did_you_mean() {
    let (pivot, op) = TestPivot::with_operator(BURROW, &[]);
    let key = KeyPair::generate(op.dir.path(), "cam-42");
    pivot.add_device("cam-42", &key);
    let out = pivot.admin(&["device", "show", "cam-24"]);
    assert!(stderr(&out).contains("unknown device 'cam-24'; did you mean 'cam-42'?"), "{}", stderr(&out));
    let out = op.ssh_device("cam-24", "true");
    assert!(stderr(&out).contains("did you mean 'cam-42'?"), "{}", stderr(&out));
    let out = op.ssh_device("printer-9", "true");
    assert!(stderr(&out).contains("unknown device 'printer-9'") && !stderr(&out).contains("did you mean"));
}

/// `--listen` is repeatable: IPv4 and IPv6 on one pivot.
#[test]
fn the_pivot_listens_on_ipv4_and_ipv6_at_once() {
    let pivot = TestPivot::start_with(BURROW, &["--listen", "[::1]:0"]);
    let text = pivot.proc.log_text();
    let v6: std::net::SocketAddr = text
        .lines()
        .find_map(|l| l.split("burrow pivot also listening on ").nth(1))
        .expect("a second listener")
        .trim()
        .parse()
        .unwrap();
    assert!(v6.is_ipv6());
    for addr in [pivot.addr, v6] {
        use std::io::Read;
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut banner = [0u8; 8];
        s.read_exact(&mut banner).unwrap();
        assert_eq!(&banner, b"SSH-2.0-", "{addr}");
    }
}
