//! `burrow-bench agent-size`: what the device agent costs a small device.
//!
//! The stripped size of `burrow-agent`, and the resident memory of an idle
//! agent in each mode, next to the full `burrow agent` doing the same:
//! on demand (one TLS MQTT connection to the pivot's embedded broker,
//! waiting for a wake-up) and always on (one SSH connection holding the
//! tunnel). RSS and PSS are read from /proc once the agent has been idle
//! for a few seconds.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Result};
use burrow_testkit::{wait_until, KeyPair, Proc, Sshd, TestPivot};

/// `VmRSS` of a process, KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// `Anonymous` memory of a process (heap and stacks, not the mapped binary), KiB.
fn anon_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("Anonymous:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Starts `bin` (`burrow-agent`, or `burrow` with `agent` first) as device
/// `id`, waits until the pivot sees it and it has idled, and returns (RSS,
/// PSS, anonymous) in KiB.
fn measure(
    bin: &str,
    sub: Option<&str>,
    pivot: &TestPivot,
    id: &str,
    key: &KeyPair,
    mode: &[String],
    expose: &str,
) -> Result<(u64, u64, u64)> {
    let mut cmd = Command::new(bin);
    cmd.args(sub).args(mode).args(["--id", id, "--key"]).arg(&key.private);
    cmd.arg("--pivot-host-key").arg(pivot.host_key_pub()).args(["--expose", expose]);
    let log = key.private.with_extension("log");
    let agent = Proc::spawn(id, &mut cmd, log);
    let always_on = mode.iter().any(|a| a == "--server");
    let up = wait_until(Duration::from_secs(20), || if always_on { pivot.is_online(id) } else { pivot.is_present(id) });
    if !up {
        bail!("{id} did not come up: {}", agent.log_text());
    }
    std::thread::sleep(Duration::from_secs(5));
    Ok((rss_kib(agent.pid()), crate::vs_openssh::pss_kib(agent.pid()), anon_kib(agent.pid())))
}

pub(crate) fn run(burrow: &str, agent_bin: &str) -> Result<()> {
    let size = std::fs::metadata(agent_bin)?.len();
    let pivot = TestPivot::start(burrow);
    let sshd = Sshd::start(&[]);
    let expose = format!("22={}", sshd.target());
    let on_demand = pivot.agent_mqtt_args();
    let always_on = vec!["--server".to_string(), pivot.addr.to_string()];
    println!("burrow-agent: {} ({size} bytes, {:.2} MiB)", Path::new(agent_bin).display(), size as f64 / 1048576.0);
    println!("{:<26} {:>10} {:>10} {:>10}", "idle agent", "RSS KiB", "PSS KiB", "anon KiB");
    let runs: [(&str, &str, Option<&str>, &Vec<String>); 4] = [
        ("burrow-agent, on demand", agent_bin, None, &on_demand),
        ("burrow-agent, always on", agent_bin, None, &always_on),
        ("burrow agent, on demand", burrow, Some("agent"), &on_demand),
        ("burrow agent, always on", burrow, Some("agent"), &always_on),
    ];
    for (i, (name, bin, sub, mode)) in runs.into_iter().enumerate() {
        let id = format!("size-{i}");
        let key = KeyPair::generate(sshd.dir.path(), &id);
        pivot.add_device(&id, &key);
        let (rss, pss, anon) = measure(bin, sub, &pivot, &id, &key, mode, &expose)?;
        println!("{name:<26} {rss:>10} {pss:>10} {anon:>10}");
    }
    Ok(())
}
