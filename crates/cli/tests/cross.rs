//! Issue 11: `burrow-agent` built for a small device's CPU (aarch64) with a
//! cross toolchain, run under qemu-user, holding a real tunnel through the
//! pivot to a real sshd that an operator reaches with stock ssh.
//!
//! Needs Debian's `gcc-aarch64-linux-gnu`, `libc6-dev-arm64-cross` and
//! `qemu-user`, and `rustup target add aarch64-unknown-linux-gnu` (all in
//! `.ci/run`). The build goes to its own target dir, so it never waits on
//! the `cargo test` that runs it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use burrow_testkit::*;

const BURROW: &str = env!("CARGO_BIN_EXE_burrow");
const TARGET: &str = "aarch64-unknown-linux-gnu";

/// Builds `burrow-agent` for aarch64 (debug, to keep CI short).
fn cross_build() -> PathBuf {
    require_tool("aarch64-linux-gnu-gcc");
    require_tool("qemu-aarch64");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let target_dir = root.join("target/cross");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(&root)
        .args(["build", "--locked", "-p", "burrow-agent", "--bin", "burrow-agent", "--target", TARGET])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER", "aarch64-linux-gnu-gcc")
        .env("CC_aarch64_unknown_linux_gnu", "aarch64-linux-gnu-gcc")
        .env("AR_aarch64_unknown_linux_gnu", "aarch64-linux-gnu-ar")
        .output()
        .expect("cargo runs");
    assert!(
        out.status.success(),
        "cross build failed (is the target installed? rustup target add {TARGET}):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    target_dir.join(TARGET).join("debug/burrow-agent")
}

#[test]
fn an_aarch64_agent_under_qemu_holds_a_tunnel_an_operator_uses() {
    let bin = cross_build();
    let file = Command::new("file").arg(&bin).output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    if let Ok(kind) = file {
        assert!(kind.contains("aarch64") || kind.contains("ARM"), "not an aarch64 binary: {kind}");
    }
    // qemu-user runs the binary with the cross libc as its root.
    let qemu = |args: &[&str]| {
        let mut cmd = Command::new("qemu-aarch64");
        cmd.args(["-L", "/usr/aarch64-linux-gnu"]).arg(&bin).args(args);
        cmd
    };
    let out = qemu(&["--version"]).output().unwrap();
    assert!(out.status.success() && stdout(&out).starts_with("burrow-agent "), "{}", stderr(&out));

    let (pivot, op) = TestPivot::with_operator(BURROW, &[]);
    let sshd = Sshd::start(&[&op.key]);
    let key = KeyPair::generate(sshd.dir.path(), "arm-1");
    pivot.add_device("arm-1", &key);
    let pin = pivot.host_key_pub();
    let mut cmd = qemu(&["--pivot", &pivot.addr.to_string(), "--id", "arm-1", "--expose"]);
    cmd.arg(format!("22={}", sshd.target())).arg("--key").arg(&key.private).arg("--pivot-host-key").arg(&pin);
    let agent = Proc::spawn("burrow-agent (aarch64)", &mut cmd, sshd.dir.path().join("arm-agent.log"));
    // Emulated, the handshake takes longer than natively.
    assert!(pivot.wait_online("arm-1", true, Duration::from_secs(60)), "{}", agent.log_text());
    // The agent registered its sshd's host key, so strict checking passes.
    assert!(wait_until(Duration::from_secs(30), || pivot
        .device_json("arm-1")
        .is_some_and(|d| d["host_keys"].as_array().is_some_and(|k| !k.is_empty()))));
    op.trust_device("arm-1", &sshd);
    let out = op.ssh_device("arm-1", "echo from-arm");
    assert_eq!(stdout(&out).trim(), "from-arm", "{}", stderr(&out));
}
