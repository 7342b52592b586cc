//! Issue 12: `burrow server --config FILE` and `--check-config`.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use burrow_testkit::*;

const BURROW: &str = env!("CARGO_BIN_EXE_burrow");

fn check(config: &Path, extra: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(BURROW);
    cmd.args(["server", "--config"]).arg(config).arg("--check-config").args(extra);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

/// The example in deploy/ is a valid configuration.
#[test]
fn the_example_config_loads() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/server.toml");
    let dir = tempfile::tempdir().unwrap();
    // Its data dir need not exist here; its parent must.
    let out = check(&example, &["--data-dir", dir.path().join("data").to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("configuration OK"));
}

/// Every mistake names the file, the line and the key; the exit code is 1.
#[test]
fn mistakes_name_the_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("server.toml");
    std::fs::write(
        &file,
        "# a pivot\nlisten = \"127.0.0.1:0\"\nban_findtime = \"nope\"\nbogus = 1\nmqtt_plaintext = \"yes\"\n[mqtt]\nx = 1\n",
    )
    .unwrap();
    let out = check(&file, &[], &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    let name = file.display().to_string();
    assert!(err.contains(&format!("{name}:3: ban_findtime: invalid value 'nope'")), "{err}");
    assert!(err.contains(&format!("{name}:4: bogus: unknown key")), "{err}");
    assert!(err.contains(&format!("{name}:5: mqtt_plaintext: is a switch")), "{err}");
    assert!(err.contains(&format!("{name}:6: mqtt: sections are not used")), "{err}");
    // Bad TOML names the place too.
    std::fs::write(&file, "listen = [\n").unwrap();
    let out = check(&file, &[], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains(&name) && stderr(&out).contains("line"), "{}", stderr(&out));
    // A rule broken by a valid-looking value (as `sshd -t` would say).
    std::fs::write(&file, "max_auth_tries = 0\n").unwrap();
    let out = check(&file, &[], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("--max-auth-tries must be between 1 and 100"), "{}", stderr(&out));
}

/// Flags and BURROW_* variables override the file.
#[test]
fn flags_and_variables_override_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("server.toml");
    std::fs::write(&file, "audit_log = \"/nonexistent-dir/audit.jsonl\"\n").unwrap();
    assert_eq!(check(&file, &[], &[]).status.code(), Some(1));
    let ok = dir.path().join("audit.jsonl");
    let out = check(&file, &["--audit-log", ok.to_str().unwrap()], &[]);
    assert!(out.status.success(), "the flag did not win: {}", stderr(&out));
    let out = check(&file, &[], &[("BURROW_AUDIT_LOG", ok.to_str().unwrap())]);
    assert!(out.status.success(), "the variable did not win: {}", stderr(&out));
}

/// A pivot started from a file runs with its settings.
#[test]
fn a_pivot_runs_with_the_files_settings() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("server.toml");
    std::fs::write(&file, "host_suffix = \"corp\"\npivot_name = \"from-file\"\n").unwrap();
    let (pivot, op) = TestPivot::with_operator(BURROW, &["--config", file.to_str().unwrap()]);
    let dev = Device::start(BURROW, &pivot, &op, "cam-42");
    assert!(pivot.wait_online("cam-42", true, Duration::from_secs(20)));
    assert_eq!(pivot.device_json("cam-42").unwrap()["pivot"], "from-file");
    // Devices answer to ID.corp.
    op.trust_device("cam-42.corp", &dev.sshd);
    let out = op.ssh(&["-J", "pivot", "root@cam-42.corp", "echo corp"]).output().unwrap();
    assert_eq!(stdout(&out).trim(), "corp", "{}", stderr(&out));
}
