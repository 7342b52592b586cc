//! Issue 12: the systemd units in deploy/systemd pass `systemd-analyze
//! verify` (no warning either) and score as well sandboxed by `systemd-analyze
//! security`. What a real boot would still have to prove is listed in the
//! README's Deploy section.

use std::path::{Path, PathBuf};
use std::process::Command;

use burrow_testkit::*;

const BURROW: &str = env!("CARGO_BIN_EXE_burrow");

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

/// The units with their ExecStart pointing at binaries that exist here
/// (verify checks that each command is executable).
fn units_here(dir: &Path) -> Vec<PathBuf> {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::os::unix::fs::symlink(BURROW, bin.join("burrow")).unwrap();
    std::os::unix::fs::symlink(BURROW, bin.join("burrow-agent")).unwrap();
    ["burrow-server.service", "burrow-agent.service"]
        .iter()
        .map(|name| {
            let text = std::fs::read_to_string(deploy().join("systemd").join(name)).unwrap();
            let here = dir.join(name);
            std::fs::write(&here, text.replace("/usr/local/bin/", &format!("{}/", bin.display()))).unwrap();
            here
        })
        .collect()
}

#[test]
fn the_units_verify_cleanly_and_are_sandboxed() {
    require_tool("systemd-analyze");
    let dir = tempfile::tempdir().unwrap();
    let units = units_here(dir.path());
    let out = Command::new("systemd-analyze").arg("verify").args(&units).output().unwrap();
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    // An unknown or misspelt key is only a warning to verify: none is allowed.
    assert_eq!(stderr(&out).trim(), "", "systemd-analyze verify warned");
    for unit in &units {
        let out = Command::new("systemd-analyze").args(["security", "--offline=true"]).arg(unit).output().unwrap();
        let text = stdout(&out);
        let score: f64 = text
            .lines()
            .find_map(|l| l.split("Overall exposure level for ").nth(1))
            .and_then(|l| l.split(": ").nth(1))
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no exposure level: {text}{}", stderr(&out)));
        assert!(score <= 2.0, "{}: exposure {score}", unit.display());
    }
    // The server's unit grants exactly one capability: binding 443.
    let server = std::fs::read_to_string(deploy().join("systemd/burrow-server.service")).unwrap();
    assert!(server.contains("\nCapabilityBoundingSet=CAP_NET_BIND_SERVICE\n"));
    assert!(server.contains("\nAmbientCapabilities=CAP_NET_BIND_SERVICE\n"));
    for key in ["Restart=always", "ProtectSystem=strict", "ProtectHome=true", "PrivateTmp=true", "NoNewPrivileges=true"]
    {
        assert!(server.contains(key), "{key}");
    }
}

/// The local plugin directory that holds hashicorp/aws: these machines
/// cannot download providers.
fn terraform_plugins() -> PathBuf {
    let out = Command::new("find")
        .args(["/", "-xdev", "-name", "terraform-provider-aws*", "-path", "*registry.terraform.io*"])
        .output()
        .unwrap();
    let found = stdout(&out);
    let binary = found.lines().next().unwrap_or_else(|| panic!("no local hashicorp/aws provider found"));
    // DIR/registry.terraform.io/hashicorp/aws/VERSION/OS_ARCH/terraform-provider-aws_…
    let at = binary.find("/registry.terraform.io/").expect("a plugin-dir layout");
    PathBuf::from(&binary[..at])
}

#[test]
fn the_terraform_is_formatted_and_valid() {
    require_tool("terraform");
    let dir = tempfile::tempdir().unwrap();
    // A copy: init writes .terraform and a lock file next to the code.
    let copy = Command::new("cp").arg("-r").arg(deploy()).arg(dir.path()).output().unwrap();
    assert!(copy.status.success(), "{}", stderr(&copy));
    let aws = dir.path().join("deploy/terraform/aws");
    let tf = |args: &[&str]| {
        Command::new("terraform").args(args).current_dir(&aws).env("TF_IN_AUTOMATION", "1").output().unwrap()
    };
    let out = tf(&["fmt", "-check", "-recursive", "-diff"]);
    assert!(out.status.success(), "terraform fmt:\n{}", stdout(&out));
    let plugins = terraform_plugins();
    let out =
        tf(&["init", "-backend=false", "-input=false", "-no-color", &format!("-plugin-dir={}", plugins.display())]);
    assert!(out.status.success(), "terraform init:\n{}{}", stdout(&out), stderr(&out));
    let out = tf(&["validate", "-no-color"]);
    assert!(
        out.status.success() && stdout(&out).contains("The configuration is valid"),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
}
