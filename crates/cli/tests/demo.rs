//! Issue 12: demo/nat.sh runs as a test. Two devices behind a real NAT
//! (network namespaces, nftables) whose firewalls drop every inbound
//! connection; the operator reaches both by id with stock ssh and scp.

use std::path::Path;
use std::process::Command;

use burrow_testkit::*;

const BURROW: &str = env!("CARGO_BIN_EXE_burrow");

#[test]
fn the_nat_demo_runs_and_cleans_up() {
    for tool in ["ip", "nft", "ssh", "scp", "ssh-keygen", SSHD] {
        require_tool(tool);
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../demo/nat.sh");
    let out = Command::new("timeout").arg("180").arg(&script).env("BURROW", BURROW).output().unwrap();
    let text = stdout(&out);
    assert!(out.status.success(), "demo failed:\n{text}\n{}", stderr(&out));
    for line in [
        "a direct connection to cam-1 (192.168.50.2:22) fails",
        "cam-1                    connected",
        "cam-2                    waiting",
        "copied 1 MiB through the pivot, identical",
        "ssh to a sleeping device took",
        "device 'cam-2' is offline (last seen",
        "tunnel_up",
        "10.77.0.2:",
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
    // Nothing is left behind.
    let netns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(!stdout(&netns).contains("bw-router-"), "{}", stdout(&netns));
}
