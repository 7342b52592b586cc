//! Records the commit `burrow --version` prints.

use std::path::Path;
use std::process::Command;

fn main() {
    let commit = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| "unknown commit".to_string());
    println!("cargo:rustc-env=BURROW_COMMIT={commit}");
    // Rebuilt when HEAD moves; a path that does not exist would rebuild every time.
    let git = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.git");
    let mut watched = false;
    for p in ["HEAD", "refs/heads", "packed-refs"] {
        let path = git.join(p);
        if path.exists() {
            println!("cargo:rerun-if-changed={}", path.display());
            watched = true;
        }
    }
    if !watched {
        println!("cargo:rerun-if-changed=build.rs");
    }
}
