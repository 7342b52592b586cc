//! burrow against stock OpenSSH as the pivot, on the same machine, in one run.
//!
//! Both pivots get the same device sshd, the same clients (stock `ssh`/`scp`
//! with the same cipher for transfers; the same russh load generator for
//! tunnels, latency and connection rate), and their own cgroups, from which
//! CPU time is read and where the CPU limit is applied.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use burrow_testkit::{free_port, wait_until, KeyPair, Proc, Sshd, TestPivot};
use russh::keys::{PrivateKey, PrivateKeyWithHashAlg};
use russh::ChannelMsg;
use tokio::sync::Semaphore;

use crate::Client;

pub struct Options {
    pub gib: u64,
    pub runs: usize,
    pub tunnels: Vec<usize>,
    pub openssh_tunnels: usize,
    pub latency_samples: usize,
    pub rate_connections: usize,
    pub skip_throughput: bool,
    /// Share of one core the pivots get in the limited throughput runs.
    pub cpu_limit: f64,
    /// Leave out the runs with the pivot held to `cpu_limit`.
    pub skip_limited: bool,
    /// Stop after the throughput runs (no latency, rate or memory).
    pub only_throughput: bool,
    /// Throughput of burrow alone, for tuning runs (no ratios).
    pub burrow_only: bool,
}

/// A v1 cgroup pair (cpu + cpuacct) for one pivot.
struct Cgroup {
    cpu: PathBuf,
    acct: PathBuf,
}

impl Cgroup {
    fn new(name: &str) -> Result<Cgroup> {
        let cpu = PathBuf::from(format!("/sys/fs/cgroup/cpu/burrow-bench-{name}-{}", std::process::id()));
        let acct = PathBuf::from(format!("/sys/fs/cgroup/cpuacct/burrow-bench-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&cpu)
            .with_context(|| format!("cannot create {} (need root and cgroup v1 cpu)", cpu.display()))?;
        std::fs::create_dir_all(&acct).with_context(|| format!("cannot create {}", acct.display()))?;
        Ok(Cgroup { cpu, acct })
    }

    fn add(&self, pid: u32) -> Result<()> {
        std::fs::write(self.cpu.join("cgroup.procs"), pid.to_string())?;
        std::fs::write(self.acct.join("cgroup.procs"), pid.to_string())?;
        Ok(())
    }

    /// Limits the group to `fraction` of one core, or lifts the limit.
    fn limit(&self, fraction: Option<f64>) -> Result<()> {
        let quota = fraction.map(|f| ((100_000.0 * f) as i64).to_string()).unwrap_or_else(|| "-1".into());
        std::fs::write(self.cpu.join("cpu.cfs_period_us"), "100000")?;
        std::fs::write(self.cpu.join("cpu.cfs_quota_us"), quota)?;
        Ok(())
    }

    fn cpu_seconds(&self) -> f64 {
        let ns: u64 = std::fs::read_to_string(self.acct.join("cpuacct.usage"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        ns as f64 / 1e9
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for (dir, root) in [(&self.cpu, "/sys/fs/cgroup/cpu"), (&self.acct, "/sys/fs/cgroup/cpuacct")] {
            if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
                for pid in procs.lines() {
                    let _ = std::fs::write(Path::new(root).join("cgroup.procs"), pid);
                }
            }
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// `pid` and all its descendants.
fn process_tree(pid: u32) -> Vec<u32> {
    let mut parent: BTreeMap<u32, u32> = BTreeMap::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else { continue };
        let Some(after) = stat.rsplit_once(')').map(|(_, a)| a) else { continue };
        if let Some(pp) = after.split_whitespace().nth(1).and_then(|s| s.parse().ok()) {
            parent.insert(p, pp);
        }
    }
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let cur = tree[i];
        tree.extend(parent.iter().filter(|(_, pp)| **pp == cur).map(|(p, _)| *p));
        i += 1;
    }
    tree
}

/// Proportional set size of a process tree, KiB.
pub(crate) fn pss_kib(root: u32) -> u64 {
    process_tree(root)
        .iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/smaps_rollup")).ok())
        .filter_map(|s| {
            s.lines().find(|l| l.starts_with("Pss:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .sum()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

type Handle = russh::client::Handle<Client>;

pub(crate) async fn connect(port: u16, user: &str, key: Arc<PrivateKey>) -> Result<Handle> {
    let config = Arc::new(russh::client::Config { nodelay: true, inactivity_timeout: None, ..Default::default() });
    let mut h = russh::client::connect(config, ("127.0.0.1", port), Client).await?;
    if !h.authenticate_publickey(user, PrivateKeyWithHashAlg::new(key, None)).await?.success() {
        bail!("{user}: key refused");
    }
    Ok(h)
}

/// One device connection holding a reverse forward.
pub(crate) async fn tunnel(
    port: u16,
    user: String,
    key: Arc<PrivateKey>,
    bind: String,
    bind_port: u32,
) -> Result<Handle> {
    let h = connect(port, &user, key).await?;
    h.tcpip_forward(bind, bind_port).await?;
    Ok(h)
}

/// Opens a `direct-tcpip` channel to `host:port`: (time to confirmation,
/// time to the sshd banner).
pub(crate) async fn open_timed(h: &Handle, host: &str, port: u32) -> Result<(Duration, Duration)> {
    let t0 = Instant::now();
    let mut ch = h.channel_open_direct_tcpip(host, port, "127.0.0.1", 40000).await?;
    let confirmed = t0.elapsed();
    loop {
        match ch.wait().await {
            Some(ChannelMsg::Data { data }) if data.starts_with(b"SSH-") => break,
            Some(_) => {}
            None => bail!("channel closed before the banner"),
        }
    }
    let banner = t0.elapsed();
    let _ = ch.close().await;
    Ok((confirmed, banner))
}

async fn open_to_banner(h: &Handle, host: &str, port: u32) -> Result<Duration> {
    Ok(open_timed(h, host, port).await?.1)
}

/// Opens `n` tunnels with `open(i)`, `at_once` at a time: (held, errors).
async fn open_tunnels<F, Fut>(n: usize, at_once: usize, open: F) -> (Vec<Handle>, usize)
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<Handle>> + Send + 'static,
{
    let sem = Arc::new(Semaphore::new(at_once));
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let permit = sem.clone().acquire_owned().await.expect("never closed");
        let opening = open(i);
        tasks.push(tokio::spawn(async move {
            let r = opening.await;
            drop(permit);
            r
        }));
    }
    let (mut held, mut errors) = (Vec::with_capacity(n), 0);
    for t in tasks {
        match t.await {
            Ok(Ok(h)) => held.push(h),
            _ => errors += 1,
        }
    }
    (held, errors)
}

struct Side {
    name: &'static str,
    /// SSH port of the pivot.
    port: u16,
    /// Process whose tree is the pivot.
    pid: u32,
    cg: Cgroup,
    /// `-J` alias and destination for scp.
    jump: &'static str,
    dest: String,
    scp_port: Option<u16>,
}

fn scp(cfg: &Path, side: &Side, from: &str, to: &str) -> Result<Duration> {
    let mut cmd = Command::new("scp");
    cmd.arg("-F").arg(cfg).args(["-q", "-J", side.jump]);
    if let Some(p) = side.scp_port {
        cmd.args(["-P", &p.to_string()]);
    }
    let t0 = Instant::now();
    let out = cmd.arg(from).arg(to).output()?;
    if !out.status.success() {
        bail!("{} scp failed: {}", side.name, String::from_utf8_lossy(&out.stderr));
    }
    Ok(t0.elapsed())
}

pub async fn run(bin: &str, o: Options) -> Result<()> {
    let shm = Path::new("/dev/shm");
    let work = tempfile::Builder::new().prefix("burrow-bench").tempdir_in(if shm.is_dir() {
        shm
    } else {
        Path::new("/tmp")
    })?;
    let w = work.path();
    let op = KeyPair::generate(w, "operator");
    let dev = KeyPair::generate(w, "device");
    let target = Sshd::start(&[&op]);
    let ossh = Sshd::start_with(
        &[&dev, &op],
        "AllowTcpForwarding yes\nMaxStartups 2000:30:4000\nClientAliveInterval 30\nClientAliveCountMax 2\nUseDNS no\n",
    );
    // The same pre-authentication allowance OpenSSH gets above: the load
    // generator opens many connections at once from one address. (A binary
    // from before the limits existed has no such flags.)
    let help = Command::new(bin).args(["server", "--help"]).output()?;
    let mut args = vec!["--no-mqtt"];
    if String::from_utf8_lossy(&help.stdout).contains("--per-source-max-startups") {
        args.extend(["--max-startups", "2000:30:4000", "--per-source-max-startups", "4000"]);
    }
    let burrow = TestPivot::start_with(bin, &args);
    burrow.add_operator("bench", &op);
    burrow.add_device("dev", &dev);
    let fwd_port = free_port();

    let mut report = String::new();
    let versions = Command::new("ssh").arg("-V").output()?;
    writeln!(report, "OpenSSH: {}", String::from_utf8_lossy(&versions.stderr).trim())?;
    writeln!(
        report,
        "burrow: {}",
        String::from_utf8_lossy(&Command::new(bin).arg("--version").output()?.stdout).trim()
    )?;

    // Client side: one config for operators, one for devices, strict host keys.
    let kh = w.join("known_hosts");
    let target_key = target.host_key.public_line();
    std::fs::write(
        &kh,
        format!(
            "[127.0.0.1]:{} {}\n[127.0.0.1]:{} {}\ndev {}\n[127.0.0.1]:{} {}\n",
            burrow.addr.port(),
            burrow.host_key_line(),
            ossh.port,
            ossh.host_key.public_line(),
            target_key,
            fwd_port,
            target_key
        ),
    )?;
    let common = format!(
        "  UserKnownHostsFile {}\n  StrictHostKeyChecking yes\n  BatchMode yes\n  Ciphers aes128-gcm@openssh.com\n  Compression no\n  IdentitiesOnly yes\n",
        kh.display()
    );
    let cfg = w.join("ssh_config");
    std::fs::write(
        &cfg,
        format!(
            "Host bpivot\n  HostName 127.0.0.1\n  Port {}\n  User bench\nHost opivot\n  HostName 127.0.0.1\n  Port {}\n  User root\nHost *\n  IdentityFile {}\n{common}",
            burrow.addr.port(),
            ossh.port,
            op.private.display()
        ),
    )?;
    let dcfg = w.join("device_config");
    std::fs::write(&dcfg, format!("Host *\n  IdentityFile {}\n{common}", dev.private.display()))?;

    // Devices: stock `ssh -R` into each pivot, so only the pivot differs.
    let dev_b = Proc::spawn(
        "device ssh -R (burrow)",
        Command::new("ssh")
            .arg("-F")
            .arg(&dcfg)
            .args(["-N", "-o", "ExitOnForwardFailure=yes", "-R"])
            .arg(format!("dev:22:{}", target.target()))
            .args(["-p", &burrow.addr.port().to_string(), "dev@127.0.0.1"]),
        w.join("dev-b.log"),
    );
    let dev_o = Proc::spawn(
        "device ssh -R (openssh)",
        Command::new("ssh")
            .arg("-F")
            .arg(&dcfg)
            .args(["-N", "-o", "ExitOnForwardFailure=yes", "-R"])
            .arg(format!("127.0.0.1:{fwd_port}:{}", target.target()))
            .args(["-p", &ossh.port.to_string(), "root@127.0.0.1"]),
        w.join("dev-o.log"),
    );
    if !burrow.wait_online("dev", true, Duration::from_secs(20))
        || !wait_until(Duration::from_secs(20), || std::net::TcpStream::connect(("127.0.0.1", fwd_port)).is_ok())
    {
        bail!("device tunnels did not come up:\n{}\n{}", dev_b.log_text(), dev_o.log_text());
    }

    let sides = [
        Side {
            name: "burrow",
            port: burrow.addr.port(),
            pid: burrow.proc.pid(),
            cg: Cgroup::new("burrow")?,
            jump: "bpivot",
            dest: "root@dev".into(),
            scp_port: None,
        },
        Side {
            name: "openssh",
            port: ossh.port,
            pid: ossh.proc.pid(),
            cg: Cgroup::new("openssh")?,
            jump: "opivot",
            dest: "root@127.0.0.1".into(),
            scp_port: Some(fwd_port),
        },
    ];
    for s in &sides {
        for p in process_tree(s.pid) {
            s.cg.add(p)?;
        }
    }

    // 1 + 2. Throughput and CPU per GiB, as is and with the pivot held to half a core.
    if !o.skip_throughput {
        let blob = w.join("blob.bin");
        write_blob(&blob, o.gib << 30)?;
        let gib = o.gib as f64;
        let limits = if o.skip_limited { vec![None] } else { vec![None, Some(o.cpu_limit)] };
        for limit in limits {
            for s in &sides {
                s.cg.limit(limit)?;
            }
            let label = match limit {
                Some(f) => format!("pivot limited to {f} core"),
                None => "unlimited".to_string(),
            };
            let mut rows: Vec<(String, f64, f64)> = Vec::new();
            // Per run, burrow's CPU per GiB over OpenSSH's in the run next to
            // it: steadier than a ratio of medians on a shared machine, where
            // both drift with what the endpoints get from the other core.
            let mut paired: Vec<f64> = Vec::new();
            for (dir, up) in [("upload", true), ("download", false)] {
                let mut mibs: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
                let mut cpu: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
                for _ in 0..o.runs {
                    for (i, s) in sides.iter().enumerate().take(if o.burrow_only { 1 } else { 2 }) {
                        let remote = format!("{}:{}", s.dest, w.join("up.bin").display());
                        let c0 = s.cg.cpu_seconds();
                        let t = if up {
                            scp(&cfg, s, blob.to_str().unwrap(), &remote)?
                        } else {
                            scp(&cfg, s, &format!("{}:{}", s.dest, blob.display()), "/dev/null")?
                        };
                        cpu[i].push((s.cg.cpu_seconds() - c0) / gib);
                        mibs[i].push(gib * 1024.0 / t.as_secs_f64());
                        eprintln!(
                            "  {} {dir}: {:.1} MiB/s, {:.2} CPU s/GiB",
                            s.name,
                            mibs[i].last().unwrap(),
                            cpu[i].last().unwrap()
                        );
                    }
                }
                if !o.burrow_only {
                    let mut r: Vec<f64> = cpu[0].iter().zip(&cpu[1]).map(|(b, o)| b / o).collect();
                    paired.push(median(&mut r));
                }
                for i in 0..if o.burrow_only { 1 } else { 2 } {
                    rows.push((format!("{} {dir}", sides[i].name), median(&mut mibs[i]), median(&mut cpu[i])));
                }
            }
            writeln!(report, "\n### Throughput, scp {} GiB, median of {} ({label})\n", o.gib, o.runs)?;
            writeln!(report, "| pivot, direction | MiB/s | pivot CPU s/GiB |\n|---|---|---|")?;
            for (name, mibs, cpu) in &rows {
                writeln!(report, "| {name} | {mibs:.1} | {cpu:.2} |")?;
            }
            for (k, dir) in [(0, "upload"), (2, "download")].into_iter().filter(|_| !o.burrow_only) {
                writeln!(
                    report,
                    "\n{dir}: throughput burrow/openssh = **{:.2}x**, CPU per GiB burrow/openssh = **{:.2}x** \
                     (median of per-run ratios {:.2}x)",
                    rows[k].1 / rows[k + 1].1,
                    rows[k].2 / rows[k + 1].2,
                    paired[k / 2]
                )?;
            }
            eprint!("{report}");
        }
        for s in &sides {
            s.cg.limit(None)?;
        }
        let _ = std::fs::remove_file(&blob);
        let _ = std::fs::remove_file(w.join("up.bin"));
    }
    if o.only_throughput {
        println!("{report}");
        return Ok(());
    }

    // 4. Channel-open latency through an open tunnel: direct-tcpip to the sshd banner.
    let opk = Arc::new(russh::keys::load_secret_key(&op.private, None)?);
    let hb = connect(sides[0].port, "bench", opk.clone()).await?;
    let ho = connect(sides[1].port, "root", opk.clone()).await?;
    let (mut lb, mut lo) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        open_to_banner(&hb, "dev", 22).await?;
        open_to_banner(&ho, "127.0.0.1", u32::from(fwd_port)).await?;
    }
    for _ in 0..o.latency_samples {
        lb.push(open_to_banner(&hb, "dev", 22).await?);
        lo.push(open_to_banner(&ho, "127.0.0.1", u32::from(fwd_port)).await?);
    }
    lb.sort();
    lo.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    writeln!(report, "\n### Channel-open latency (direct-tcpip to sshd banner), {} samples\n", o.latency_samples)?;
    writeln!(report, "| pivot | p50 ms | p99 ms |\n|---|---|---|")?;
    writeln!(report, "| burrow | {:.2} | {:.2} |", ms(pct(&lb, 0.5)), ms(pct(&lb, 0.99)))?;
    writeln!(report, "| openssh | {:.2} | {:.2} |", ms(pct(&lo, 0.5)), ms(pct(&lo, 0.99)))?;
    writeln!(
        report,
        "\nratio burrow/openssh: p50 **{:.2}x**, p99 **{:.2}x**",
        ms(pct(&lb, 0.5)) / ms(pct(&lo, 0.5)),
        ms(pct(&lb, 0.99)) / ms(pct(&lo, 0.99))
    )?;
    drop(hb);
    drop(ho);

    // Device identities for the load generator: burrow needs one key per device.
    let max_tunnels = o.tunnels.iter().copied().max().unwrap_or(0);
    let total = max_tunnels + o.rate_connections;
    eprintln!("registering {total} devices…");
    let keys = register_devices(burrow.data.path(), "load", total).await?;
    let devk = Arc::new(russh::keys::load_secret_key(&dev.private, None)?);

    // 5. Connection rate: handshake + auth + forward, then hang up.
    let rate = |side: usize| {
        let (keys, devk) = (keys[max_tunnels..].to_vec(), devk.clone());
        let port = sides[side].port;
        async move {
            let sem = Arc::new(Semaphore::new(16));
            let t0 = Instant::now();
            let mut tasks = Vec::new();
            for (id, key) in keys {
                let permit = sem.clone().acquire_owned().await.expect("open");
                let devk = devk.clone();
                tasks.push(tokio::spawn(async move {
                    let r = if side == 0 {
                        tunnel(port, id.clone(), key, id, 22).await
                    } else {
                        tunnel(port, "root".into(), devk, "127.0.0.1".into(), 0).await
                    };
                    if let Ok(h) = &r {
                        let _ = h.disconnect(russh::Disconnect::ByApplication, "", "en").await;
                    }
                    drop(permit);
                    r.is_ok()
                }));
            }
            let mut ok = 0;
            for t in tasks {
                ok += t.await.unwrap_or(false) as usize;
            }
            (ok, t0.elapsed())
        }
    };
    let (okb, tb) = rate(0).await;
    let (oko, to) = rate(1).await;
    let (rb, ro) = (okb as f64 / tb.as_secs_f64(), oko as f64 / to.as_secs_f64());
    writeln!(
        report,
        "\n### Connection rate ({} device connections, 16 at a time: handshake, auth, forward)\n",
        o.rate_connections
    )?;
    writeln!(
        report,
        "| pivot | ok | conn/s |\n|---|---|---|\n| burrow | {okb} | {rb:.0} |\n| openssh | {oko} | {ro:.0} |"
    )?;
    writeln!(report, "\nratio burrow/openssh: **{:.2}x**", rb / ro)?;
    tokio::time::sleep(Duration::from_secs(2)).await;

    // 3. Memory per idle tunnel.
    writeln!(report, "\n### Memory per idle device tunnel (pivot PSS delta / tunnels)\n")?;
    writeln!(
        report,
        "| pivot | tunnels | held | PSS before KiB | PSS after KiB | KiB per tunnel |\n|---|---|---|---|---|---|"
    )?;
    let mut per: BTreeMap<(&str, usize), f64> = BTreeMap::new();
    let base_b = pss_kib(sides[0].pid);
    let mut held_b: Vec<Handle> = Vec::new();
    let mut tunnels = o.tunnels.clone();
    tunnels.sort();
    for n in tunnels {
        let (port, new) = (sides[0].port, &keys[held_b.len()..n]);
        let (more, errors) = open_tunnels(new.len(), 64, |i| {
            let (id, key) = new[i].clone();
            tunnel(port, id.clone(), key, id, 22)
        })
        .await;
        held_b.extend(more);
        tokio::time::sleep(Duration::from_secs(3)).await;
        let still = held_b.iter().filter(|h| !h.is_closed()).count();
        let after = pss_kib(sides[0].pid);
        let kib = (after.saturating_sub(base_b)) as f64 / n as f64;
        per.insert(("burrow", n), kib);
        writeln!(report, "| burrow | {n} | {still} ({errors} errors) | {base_b} | {after} | {kib:.1} |")?;
    }
    drop(held_b);
    let base_o = pss_kib(sides[1].pid);
    let port = sides[1].port;
    let (held_o, errors) =
        open_tunnels(o.openssh_tunnels, 16, |_| tunnel(port, "root".into(), devk.clone(), "127.0.0.1".into(), 0)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after_o = pss_kib(sides[1].pid);
    let n = o.openssh_tunnels;
    let kib_o = after_o.saturating_sub(base_o) as f64 / n as f64;
    writeln!(report, "| openssh | {n} | {} ({errors} errors) | {base_o} | {after_o} | {kib_o:.1} |", held_o.len())?;
    if let Some(b) = per.get(&("burrow", n)) {
        writeln!(
            report,
            "\nat {n} tunnels: burrow/openssh memory per tunnel = **{:.3}x** (1/{:.0})",
            b / kib_o,
            kib_o / b
        )?;
    }
    drop(held_o);
    println!("{report}");
    drop(dev_b);
    drop(dev_o);
    Ok(())
}

/// Registers `count` devices named `{prefix}-{i}`, each with a fresh key, in
/// the registry under `data_dir`; returns (id, key) pairs.
pub(crate) async fn register_devices(
    data_dir: &Path,
    prefix: &str,
    count: usize,
) -> Result<Vec<(String, Arc<PrivateKey>)>> {
    register_devices_in(None, data_dir, prefix, count).await
}

/// Like [`register_devices`], in the PostgreSQL registry at `url` if given.
pub(crate) async fn register_devices_in(
    url: Option<&str>,
    data_dir: &Path,
    prefix: &str,
    count: usize,
) -> Result<Vec<(String, Arc<PrivateKey>)>> {
    let registry = burrow_server::Registry::open_for(url, data_dir).await?;
    let mut keys = Vec::with_capacity(count);
    for i in 0..count {
        let key = burrow_core::keys::generate_ed25519();
        let id = burrow_core::Id::parse(&format!("{prefix}-{i}"))?;
        registry.add_device(&id, key.public_key(), &BTreeMap::new(), &[]).await?;
        keys.push((id.to_string(), Arc::new(key)));
    }
    registry.close().await;
    Ok(keys)
}

/// Incompressible bytes, fast.
pub(crate) fn write_blob(path: &Path, len: u64) -> Result<()> {
    use std::io::Write;
    let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..(len >> 20) {
        for c in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&buf)?;
    }
    f.flush()?;
    Ok(())
}
