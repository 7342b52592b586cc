//! `burrow-bench backends`: the registry engines and the pivot-to-pivot
//! relay, side by side, on loopback.
//!
//! 1. For SQLite (the data dir) and PostgreSQL (a cluster made by `initdb`):
//!    the rate at which devices connect (handshake, key lookup, forward,
//!    tunnel record written) and the latency of an operator's channel open
//!    (which reads the operator's record) on a tunnel held by a real agent.
//! 2. With two pivots on PostgreSQL: channel-open latency and scp
//!    throughput to a device on pivot A, for an operator on A (direct)
//!    and on B (relayed from B to A).

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use burrow_testkit::{KeyPair, Operator, Postgres, Sshd, TestAgent, TestPivot};
use russh::keys::PrivateKey;

use crate::vs_openssh::{connect, open_timed, tunnel};
use crate::{ms, percentile};

pub struct Options {
    /// Devices connected for the rate.
    pub devices: usize,
    /// Channel opens for the latency.
    pub samples: usize,
    /// scp size through the relay, in MiB.
    pub mib: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options { devices: 2000, samples: 300, mib: 256 }
    }
}

/// Connects every device, 64 at a time; returns devices per second.
async fn connection_rate(port: u16, devices: Vec<(String, Arc<PrivateKey>)>) -> Result<f64> {
    let n = devices.len();
    let sem = Arc::new(tokio::sync::Semaphore::new(64));
    let t0 = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for (id, key) in devices {
        let permit = sem.clone().acquire_owned().await?;
        tasks.push(tokio::spawn(async move {
            let r = tunnel(port, id.clone(), key, id, 22).await;
            drop(permit);
            r
        }));
    }
    let mut held = Vec::with_capacity(n);
    for t in tasks {
        held.push(t.await?.context("a device failed to connect")?);
    }
    let rate = n as f64 / t0.elapsed().as_secs_f64();
    drop(held);
    Ok(rate)
}

async fn open_latency(port: u16, op: &KeyPair, id: &str, samples: usize) -> Result<(Duration, Duration)> {
    let key = Arc::new(russh::keys::load_secret_key(&op.private, None)?);
    let h = connect(port, "bench", key).await?;
    for _ in 0..5 {
        open_timed(&h, id, 22).await?;
    }
    let mut v = Vec::with_capacity(samples);
    for _ in 0..samples {
        v.push(open_timed(&h, id, 22).await?.0);
    }
    v.sort();
    Ok((percentile(&v, 0.5), percentile(&v, 0.95)))
}

fn pivot_args<'a>(url: Option<&'a str>, name: &'a str) -> Vec<&'a str> {
    // Every client here comes from 127.0.0.1: lift the unauthenticated-
    // connection limits (as vs-openssh does) so the rate measures
    // handshakes and the registry, not the drop policy.
    let mut args =
        vec!["--no-mqtt", "--pivot-name", name, "--max-startups", "2000:30:4000", "--per-source-max-startups", "4000"];
    if let Some(url) = url {
        args.extend(["--database-url", url]);
    }
    args
}

pub async fn run(bin: &str, o: Options) -> Result<()> {
    let pg = Postgres::start();
    println!("registry engines: {} devices connecting (64 at a time), {} channel opens", o.devices, o.samples);
    for engine in ["sqlite", "postgres"] {
        let url = (engine == "postgres").then(|| pg.create_database());
        let pivot = TestPivot::start_with(bin, &pivot_args(url.as_deref(), "a"));
        let devices =
            crate::vs_openssh::register_devices_in(url.as_deref(), pivot.data.path(), "dev", o.devices).await?;
        let rate = connection_rate(pivot.addr.port(), devices).await?;
        let sshd = Sshd::start(&[]);
        let (dev, op) = (KeyPair::generate(sshd.dir.path(), "lat"), KeyPair::generate(sshd.dir.path(), "op"));
        pivot.add_device("lat", &dev);
        pivot.add_operator("bench", &op);
        let _agent = TestAgent::start(bin, &pivot, "lat", &dev, &[format!("22={}", sshd.target())]);
        if !pivot.wait_online("lat", true, Duration::from_secs(20)) {
            bail!("{engine}: the latency device did not come up");
        }
        let (p50, p95) = open_latency(pivot.addr.port(), &op, "lat", o.samples).await?;
        println!(
            "{engine:<9} connections {rate:>7.0}/s   channel open p50 {:>6.2} ms  p95 {:>6.2} ms",
            ms(p50),
            ms(p95)
        );
    }

    // Two pivots on one PostgreSQL registry; the device is on a.
    let url = pg.create_database();
    let a = TestPivot::start_with(bin, &pivot_args(Some(&url), "a"));
    let b = TestPivot::start_sharing_host_key(bin, &pivot_args(Some(&url), "b"), &a);
    let op = Operator::new(&a);
    let mut config = std::fs::read_to_string(&op.config)?;
    config = format!("Host pivot-b\n  HostName 127.0.0.1\n  Port {}\n\n{config}", b.addr.port());
    std::fs::write(&op.config, config)?;
    let mut kh = std::fs::read_to_string(&op.known_hosts)?;
    kh.push_str(&format!("[127.0.0.1]:{} {}\n", b.addr.port(), b.host_key_line()));
    std::fs::write(&op.known_hosts, kh)?;
    a.add_operator("bench", &op.key);
    let sshd = Sshd::start(&[&op.key]);
    let dev = KeyPair::generate(sshd.dir.path(), "dev");
    a.add_device("dev", &dev);
    op.trust_device("dev", &sshd);
    let _agent = TestAgent::start(bin, &a, "dev", &dev, &[format!("22={}", sshd.target())]);
    if !a.wait_online("dev", true, Duration::from_secs(20)) {
        bail!("the relay device did not come up");
    }
    let blob = sshd.dir.path().join("blob");
    crate::vs_openssh::write_blob(&blob, o.mib << 20)?;
    println!("relay: device on pivot a; operator on a (direct) or on b (relayed to a); {} MiB scp, best of 3", o.mib);
    for (name, pivot, jump) in [("direct", &a, "pivot"), ("via peer", &b, "pivot-b")] {
        let (p50, p95) = open_latency(pivot.addr.port(), &op.key, "dev", o.samples).await?;
        let mut best = Duration::MAX;
        for _ in 0..3 {
            let dest = op.dir.path().join("blob.copy");
            let t0 = Instant::now();
            let out = Command::new("scp")
                .arg("-F")
                .arg(&op.config)
                .args(["-q", "-J", jump])
                .arg(format!("root@dev:{}", blob.display()))
                .arg(&dest)
                .output()?;
            if !out.status.success() {
                bail!("{name} scp failed: {}", String::from_utf8_lossy(&out.stderr));
            }
            best = best.min(t0.elapsed());
            std::fs::remove_file(&dest)?;
        }
        let mibps = o.mib as f64 / best.as_secs_f64();
        println!("{name:<9} channel open p50 {:>6.2} ms  p95 {:>6.2} ms   scp {mibps:>6.0} MiB/s", ms(p50), ms(p95));
    }
    Ok(())
}
