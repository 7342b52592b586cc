//! `burrow-bench storm N`: a reconnect storm. N always-on devices hold
//! tunnels to a real pivot; the pivot is killed (SIGKILL) and started again
//! on the same data dir and port, and the bench measures how long until
//! every tunnel is back, what the restarted pivot spent on it (peak memory,
//! CPU), and which handshakes failed on the way, by cause.
//!
//! Each device is the agent itself: `burrow_agent::run` with its own
//! reconnect loop and backoff, many per generator process (this binary,
//! `storm-devices`), since every process here may hold at most 20,000
//! descriptors. A generator exposes port 22 of its devices to a TCP listener
//! of its own, where the pivot's probes of new tunnels land, and turns the
//! agents' host-key scan off (`Config::scan_host_keys`): no sshd stands
//! behind that listener. Generators report what the agents tell
//! `Config::on_event` on stdout, stamped with the wall clock (unix ns):
//!
//! ```text
//! nofile SOFT                                  the descriptor limit it raised to
//! up I NS                                      device I's tunnel came up
//! down I NS                                    a tunnel that was up ended
//! fail I NS notup|other CAUSE<TAB>DETAIL        a connection that never got up
//! ```
//!
//! "notup" is a refused (or reset) TCP connect: nothing listens yet. Every
//! other failure (timeouts, a connection dropped by the pivot's
//! pre-authentication limits, refusals, protocol errors) is "other".

use std::collections::BTreeMap;
use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use burrow_agent::{Event, EventHook, SessionError};
use burrow_core::{Expose, HostKeyPin, Id};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::mqtt_hold::{device_id, device_key, register};

/// The pivot's own default, `--max-startups` unless the bench is given one.
const DEFAULT_MAX_STARTUPS: &str = "10:30:100";

pub struct Options {
    pub devices: usize,
    pub procs: usize,
    /// How long the storm may take, from the restart until every tunnel is back.
    pub timeout: Duration,
    pub ssh_threads: Option<usize>,
    /// Passed to the pivot as is; registration still writes the data dir's registry.
    pub database_url: Option<String>,
    pub max_startups: Option<String>,
}

/// "120s", "2m", "500ms" or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len()));
    let n: f64 = num.parse().with_context(|| format!("'{s}' is not a duration such as 120s or 2m"))?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        _ => bail!("'{s}' is not a duration such as 120s or 2m"),
    };
    Ok(Duration::from_secs_f64(secs))
}

fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("after 1970").as_nanos() as u64
}

fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}

pub async fn run(bin: &str, o: Options) -> Result<()> {
    if o.devices == 0 {
        bail!("storm needs at least one device");
    }
    let work = tempfile::Builder::new().prefix("burrow-storm").tempdir()?;
    let result = storm(bin, &o, work.path()).await;
    if result.is_err() {
        eprintln!("storm: logs kept in {}", work.keep().display());
    }
    result
}

/// START and FULL of `--max-startups` (START:RATE:FULL, or one number).
fn startups(s: &str) -> Result<(usize, usize)> {
    let parts: Vec<&str> = s.split(':').collect();
    let num = |p: &str| p.trim().parse::<usize>().with_context(|| format!("--max-startups {s}"));
    match parts.as_slice() {
        [full] => Ok((num(full)?, num(full)?)),
        [start, _, full] => Ok((num(start)?, num(full)?)),
        _ => bail!("--max-startups {s}: give START:RATE:FULL or one number"),
    }
}

/// The agent's stable period: a connection that lasted this long resets its backoff.
fn agent_stable_after() -> Result<Duration> {
    let pin = HostKeyPin::Fingerprint(String::new());
    let config = burrow_agent::Config::new(None, Id::parse(&device_id(0))?, device_key(0), pin, vec![]);
    Ok(config.stable_after)
}

async fn storm(bin: &str, o: &Options, work: &Path) -> Result<()> {
    let procs = o.procs.clamp(1, o.devices);
    let max_startups = o.max_startups.as_deref().unwrap_or(DEFAULT_MAX_STARTUPS);
    let (start, full) = startups(max_startups)?;
    let n = o.devices;
    let data = work.join("data");
    let ssh_port = free_low_port()?;
    let http_port = loop {
        let p = free_low_port()?;
        if p != ssh_port {
            break p;
        }
    };
    let mut args: Vec<String> = vec![
        "server".into(),
        "--listen".into(),
        format!("127.0.0.1:{ssh_port}"),
        "--http-listen".into(),
        format!("127.0.0.1:{http_port}"),
        "--data-dir".into(),
        data.display().to_string(),
        "--no-mqtt".into(),
        "--max-startups".into(),
        max_startups.into(),
        // On loopback every device shares one source address; in a fleet
        // each has its own. The per-source cap is lifted to the global one,
        // which stays the pivot's default unless --max-startups is given.
        "--per-source-max-startups".into(),
        full.to_string(),
    ];
    if let Some(t) = o.ssh_threads {
        args.extend(["--ssh-threads".into(), t.to_string()]);
    }
    if let Some(url) = &o.database_url {
        args.extend(["--database-url".into(), url.clone()]);
    }
    println!(
        "storm: {n} always-on devices (burrow_agent::run) over {procs} generator processes; pivot {}",
        args[1..].iter().filter(|a| !a.starts_with('/')).cloned().collect::<Vec<_>>().join(" ")
    );
    if o.database_url.is_some() {
        println!("  note: devices are registered in the data dir's registry; --database-url only goes to the pivot");
    }

    let mut pivot = Pivot::spawn(bin, &args, work.join("pivot-1.log"))?;
    pivot.wait_healthy(http_port, Duration::from_secs(30)).await?;
    let t = Instant::now();
    register(&data, n).await.context("cannot register the devices")?;
    println!("  registered {n} devices in {:.1} s", t.elapsed().as_secs_f64());

    // The ramp stays under the pivot's first drop threshold (START of
    // --max-startups), so the fleet comes up without failures and the storm
    // starts from agents whose backoff is at its first step.
    let ramp = (start.saturating_sub(2) / procs).max(1);
    let tally = Arc::new(Mutex::new(Tally::new(n)));
    let mut gens = Generators::start(ssh_port, &data.join("host_key.pub"), n, procs, ramp, &tally, work)?;

    // 1. Every tunnel up.
    let t = Instant::now();
    let (mut last, mut last_change) = (0, Instant::now());
    loop {
        let (up, failed) = {
            let t = tally.lock().unwrap();
            (t.up_count, t.ramp_failures.values().map(|c| c.0).sum::<usize>())
        };
        if up == n {
            break;
        }
        if up + failed != last {
            (last, last_change) = (up + failed, Instant::now());
        }
        if last_change.elapsed() > Duration::from_secs(30) {
            bail!("the fleet stalled at {up} of {n} tunnels up:\n{}", tally.lock().unwrap().causes(false));
        }
        gens.check()?;
        pivot.check()?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ramp_time = t.elapsed();
    let seen = wait_metric(http_port, "burrow_tunnels", n as u64, Duration::from_secs(10)).await;
    let nofile = tally.lock().unwrap().nofile.clone();
    println!(
        "  ramp: {n} tunnels up in {:.1} s ({:.0}/s, {ramp} handshakes at a time per generator); pivot /metrics burrow_tunnels {}; generators' descriptor limit {:?}",
        ramp_time.as_secs_f64(),
        n as f64 / ramp_time.as_secs_f64(),
        seen.map_or("unreadable".into(), |v| v.to_string()),
        nofile
    );
    let ramp_failed: usize = tally.lock().unwrap().ramp_failures.values().map(|c| c.0).sum();
    if ramp_failed > 0 {
        // An agent resets its backoff once a connection has lasted its
        // stable period; until then a failure in the ramp would slow its
        // return in the storm, which a long-running fleet would not see.
        let stable = agent_stable_after()? + Duration::from_secs(1);
        println!(
            "  {ramp_failed} handshakes failed in the ramp:\n{}  holding until every agent has been up {:.0} s, so each backoff starts afresh",
            tally.lock().unwrap().causes(false),
            stable.as_secs_f64()
        );
        let deadline = Instant::now() + stable + o.timeout;
        loop {
            let (up, since) = {
                let t = tally.lock().unwrap();
                (t.up_count, now_ns().saturating_sub(t.last_up))
            };
            if up == n && Duration::from_nanos(since) >= stable {
                break;
            }
            if Instant::now() > deadline {
                bail!("the fleet did not settle: {up} of {n} up");
            }
            gens.check()?;
            pivot.check()?;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    // 2. Kill the pivot, start it again on the same data dir and ports.
    let gen_cpu_before = gens.cpu_seconds();
    tally.lock().unwrap().kill = Some(now_ns());
    pivot.kill();
    let restart_ns = now_ns();
    let restarted = Instant::now();
    let mut pivot = Pivot::spawn(bin, &args, work.join("pivot-2.log"))?;
    let pid = pivot.child.id();

    // 3. Until every device has had its tunnel up again.
    let deadline = restarted + o.timeout;
    let healthy = tokio::spawn(async move {
        while http_get(http_port, "/healthz").await.is_none_or(|r| r.0 != 200) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        restarted.elapsed()
    });
    let mut listening = None;
    let done = loop {
        if listening.is_none() && pivot.printed("burrow pivot listening on ") {
            listening = Some(restarted.elapsed());
        }
        if tally.lock().unwrap().back_count == n {
            break true;
        }
        if Instant::now() >= deadline {
            break false;
        }
        gens.check()?;
        pivot.check()?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let wall = restarted.elapsed();
    let cpu = proc_cpu_seconds(pid).unwrap_or(f64::NAN);
    let hwm = proc_status_kib(pid, "VmHWM:").unwrap_or(0);
    let rss = proc_status_kib(pid, "VmRSS:").unwrap_or(0);
    let gen_cpu = gens.cpu_seconds() - gen_cpu_before;
    let tunnels = wait_metric(http_port, "burrow_tunnels", n as u64, Duration::from_secs(if done { 10 } else { 1 })).await;
    let metrics = http_get(http_port, "/metrics").await.map(|r| r.1).unwrap_or_default();
    let healthy = if healthy.is_finished() { healthy.await.ok() } else { None };

    // 4. The report.
    let t = tally.lock().unwrap();
    let kill_ns = t.kill.expect("set before the kill");
    let mut back: Vec<u64> = t.back.iter().flatten().map(|ns| ns.saturating_sub(restart_ns)).collect();
    back.sort_unstable();
    let pct = |p: f64| back.get(((back.len() as f64 - 1.0) * p).round() as usize).map_or(f64::NAN, |ns| secs(*ns));
    let ms = |d: Option<Duration>| d.map_or("-".to_string(), |d| format!("{:.0} ms", d.as_secs_f64() * 1000.0));
    println!(
        "  kill -9 at +0, restart at +{:.0} ms; the pivot printed its listener after {}, /healthz answered after {}",
        secs(restart_ns - kill_ns) * 1000.0,
        ms(listening),
        ms(healthy)
    );
    println!("  tunnels lost at the kill (agent reports): {}", t.storm_downs);
    if done {
        println!(
            "  all {n} tunnels back {:.2} s after the restart (last agent report); p50 {:.2} s, p90 {:.2} s, p99 {:.2} s",
            pct(1.0),
            pct(0.5),
            pct(0.9),
            pct(0.99)
        );
    } else {
        println!("  NOT all back: {} of {n} tunnels back within {:.0} s", t.back_count, o.timeout.as_secs_f64());
    }
    println!("  pivot /metrics burrow_tunnels: {}", tunnels.map_or("unreadable".into(), |v| v.to_string()));
    println!(
        "  restarted pivot over {:.2} s: peak memory (VmHWM) {:.1} MiB (RSS now {:.1} MiB); CPU {:.2} s user+sys = {:.0}% of one core ({:.0}% of the machine's {} cores)",
        wall.as_secs_f64(),
        hwm as f64 / 1024.0,
        rss as f64 / 1024.0,
        cpu,
        100.0 * cpu / wall.as_secs_f64(),
        100.0 * cpu / wall.as_secs_f64() / cores() as f64,
        cores()
    );
    println!("  generators over the same time: CPU {gen_cpu:.2} s user+sys (all {procs} together)");
    let failed: usize = t.storm_failures.values().map(|c| c.0).sum();
    let not_up: usize = t.storm_failures.iter().filter(|(k, _)| k.0).map(|(_, c)| c.0).sum();
    println!(
        "  handshake failures in the storm: {failed}; pivot not up yet: {not_up}; other: {}",
        failed - not_up
    );
    print!("{}", t.causes(true));
    println!("  pivot's own count: {}", pivot_counts(&metrics));
    let met = done && pct(1.0) <= 30.0 && failed == not_up;
    println!(
        "  goal (all {n} back within 30 s, no handshake failing but for \"pivot not up yet\"): {}",
        if met { "met" } else { "NOT met" }
    );
    drop(t);
    drop(gens);
    drop(pivot);
    if !done {
        bail!("not all {n} tunnels came back within {:.0} s", o.timeout.as_secs_f64());
    }
    Ok(())
}

/// Cores this process may run on.
fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// What the pivot counted: connections accepted, dropped at accept (by
/// reason) and failed logins.
fn pivot_counts(metrics: &str) -> String {
    if metrics.is_empty() {
        return "unreadable".into();
    }
    let value = |name: &str| {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse::<u64>().ok())
            .map_or("-".into(), |v| v.to_string())
    };
    let dropped: Vec<String> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("burrow_connections_dropped_total{"))
        .filter_map(|l| l.split_once("} "))
        .map(|(labels, v)| format!("{labels} {v}"))
        .collect();
    format!(
        "accepted {}, dropped at accept {}, failed logins {}",
        value("burrow_connections_accepted_total"),
        if dropped.is_empty() { "0".into() } else { dropped.join(", ") },
        value("burrow_auth_failures_total")
    )
}

/// A loopback port below the kernel's ephemeral range. The pivot's port is
/// dead between the kill and the restart, while thousands of agents dial
/// it: an ephemeral port could be taken by one of their own connections (a
/// self-connect to 127.0.0.1:P), and the restart could not bind it.
fn free_low_port() -> Result<u16> {
    use std::hash::{BuildHasher, Hasher};
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let from = (low / 2).max(1024);
    for _ in 0..200 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(now_ns());
        let port = from + (h.finish() % u64::from(low - from)) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free loopback port below {low}")
}

/// Polls /metrics until `name` reads `want` or `bound` passes; the last value read.
async fn wait_metric(port: u16, name: &str, want: u64, bound: Duration) -> Option<u64> {
    let deadline = Instant::now() + bound;
    let mut last = None;
    loop {
        if let Some((200, body)) = http_get(port, "/metrics").await {
            last = body.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok());
        }
        if last == Some(want) || Instant::now() >= deadline {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `GET path` on the pivot's HTTP listener: (status, body), within 5 s.
async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let get = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf);
        let code = text.split_whitespace().nth(1)?.parse().ok()?;
        Some((code, text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()))
    };
    tokio::time::timeout(Duration::from_secs(5), get).await.ok().flatten()
}

/// utime + stime of a process (all its threads), seconds.
fn proc_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which may hold spaces: state is the
    // first, utime the 12th and stime the 13th.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Some(ticks as f64 / hz.max(1) as f64)
}

/// A `KEY: N kB` line of /proc/PID/status, in KiB.
fn proc_status_kib(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix(key)?.split_whitespace().next()?.parse().ok())
}

/// Children die with the bench, however it ends: SIGKILL when the thread
/// that started them (the main thread, which runs the bench) goes away.
fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe and touches nothing of the parent's.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

/// One `burrow server` process, killed (SIGKILL) on drop.
struct Pivot {
    child: Child,
    log: PathBuf,
}

impl Pivot {
    fn spawn(bin: &str, args: &[String], log: PathBuf) -> Result<Pivot> {
        let file = std::fs::File::create(&log)?;
        let mut cmd = Command::new(bin);
        cmd.args(args).stdin(Stdio::null()).stdout(file.try_clone()?).stderr(file);
        die_with_parent(&mut cmd);
        let child = cmd.spawn().with_context(|| format!("cannot start {bin}"))?;
        Ok(Pivot { child, log })
    }

    /// The log's head holds a line starting with `prefix`.
    fn printed(&self, prefix: &str) -> bool {
        let mut head = vec![0u8; 8192];
        let n = std::fs::File::open(&self.log).and_then(|mut f| f.read(&mut head)).unwrap_or(0);
        String::from_utf8_lossy(&head[..n]).lines().any(|l| l.starts_with(prefix))
    }

    fn check(&mut self) -> Result<()> {
        if let Ok(Some(status)) = self.child.try_wait() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            bail!("the pivot exited ({status}):\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
        }
        Ok(())
    }

    async fn wait_healthy(&mut self, http_port: u16, bound: Duration) -> Result<()> {
        let deadline = Instant::now() + bound;
        while http_get(http_port, "/healthz").await.is_none_or(|r| r.0 != 200) {
            self.check()?;
            if Instant::now() > deadline {
                bail!("the pivot's /healthz did not answer 200 within {bound:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Pivot {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Failures by (pivot not up yet?, cause): (count, first detail).
type Causes = BTreeMap<(bool, String), (usize, String)>;

/// What the generators reported, device by device.
struct Tally {
    nofile: Vec<u64>,
    up: Vec<bool>,
    up_count: usize,
    /// The latest "up" (unix ns).
    last_up: u64,
    /// When the pivot was killed: later events belong to the storm.
    kill: Option<u64>,
    /// Each device's first tunnel after the kill.
    back: Vec<Option<u64>>,
    back_count: usize,
    storm_downs: usize,
    ramp_failures: Causes,
    storm_failures: Causes,
}

impl Tally {
    fn new(n: usize) -> Tally {
        Tally {
            nofile: Vec::new(),
            up: vec![false; n],
            up_count: 0,
            last_up: 0,
            kill: None,
            back: vec![None; n],
            back_count: 0,
            storm_downs: 0,
            ramp_failures: Causes::new(),
            storm_failures: Causes::new(),
        }
    }

    fn event(&mut self, line: &str) {
        if let Some(limit) = line.strip_prefix("nofile ") {
            self.nofile.extend(limit.trim().parse().ok());
            return;
        }
        let mut it = line.splitn(4, ' ');
        let (Some(kind), Some(i), Some(ns)) = (it.next(), it.next(), it.next()) else {
            return;
        };
        let (Ok(i), Ok(ns)) = (i.parse::<usize>(), ns.parse::<u64>()) else { return };
        if i >= self.up.len() {
            return;
        }
        let storm = self.kill.is_some_and(|k| ns >= k);
        match kind {
            "up" => {
                if !self.up[i] {
                    self.up[i] = true;
                    self.up_count += 1;
                }
                self.last_up = self.last_up.max(ns);
                if storm && self.back[i].is_none() {
                    self.back[i] = Some(ns);
                    self.back_count += 1;
                }
            }
            "down" => {
                if self.up[i] {
                    self.up[i] = false;
                    self.up_count -= 1;
                }
                if storm {
                    self.storm_downs += 1;
                }
            }
            "fail" => {
                let rest = it.next().unwrap_or("");
                let (class, rest) = rest.split_once(' ').unwrap_or((rest, ""));
                let (cause, detail) = rest.split_once('\t').unwrap_or((rest, ""));
                let causes = if storm { &mut self.storm_failures } else { &mut self.ramp_failures };
                let c = causes.entry((class == "notup", cause.to_string())).or_insert((0, detail.to_string()));
                c.0 += 1;
            }
            _ => {}
        }
    }

    /// The failures of the ramp or of the storm, one cause a line.
    fn causes(&self, storm: bool) -> String {
        let causes = if storm { &self.storm_failures } else { &self.ramp_failures };
        let mut out = String::new();
        for ((not_up, cause), (count, detail)) in causes {
            let class = if *not_up { "pivot not up yet" } else { "other" };
            out.push_str(&format!("    {count:>7}  {class}: {cause}  (e.g. \"{detail}\")\n"));
        }
        out
    }
}

/// The generator processes, killed (SIGKILL) on drop.
struct Generators {
    children: Vec<Child>,
}

impl Generators {
    fn start(
        port: u16,
        pin: &Path,
        n: usize,
        procs: usize,
        ramp: usize,
        tally: &Arc<Mutex<Tally>>,
        work: &Path,
    ) -> Result<Generators> {
        let exe = std::env::current_exe()?;
        let per = n.div_ceil(procs);
        let mut g = Generators { children: Vec::new() };
        for p in 0..procs {
            let first = p * per;
            let count = per.min(n.saturating_sub(first));
            if count == 0 {
                break;
            }
            let mut cmd = Command::new(&exe);
            cmd.arg("storm-devices")
                .arg(format!("127.0.0.1:{port}"))
                .arg(pin)
                .args([first.to_string(), count.to_string(), ramp.to_string()])
                // Its stdin closing (the bench gone) stops it too.
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(std::fs::File::create(work.join(format!("generator-{p}.log")))?);
            die_with_parent(&mut cmd);
            let mut child = cmd.spawn().context("cannot start a generator")?;
            let out = child.stdout.take().expect("piped");
            let tally = tally.clone();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                    tally.lock().unwrap().event(&line);
                }
            });
            g.children.push(child);
        }
        Ok(g)
    }

    /// Fails if a generator has exited.
    fn check(&mut self) -> Result<()> {
        for (p, c) in self.children.iter_mut().enumerate() {
            if let Ok(Some(status)) = c.try_wait() {
                bail!("generator {p} exited ({status}); see generator-{p}.log");
            }
        }
        Ok(())
    }

    fn cpu_seconds(&self) -> f64 {
        self.children.iter().filter_map(|c| proc_cpu_seconds(c.id())).sum()
    }
}

impl Drop for Generators {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `storm-devices PIVOT PIN FIRST COUNT RAMP`: runs devices FIRST.. as
/// agents of the pivot at PIVOT (host key file PIN), starting at most RAMP
/// at a time until each has had its first outcome, and reports their events
/// on stdout until stdin closes.
pub async fn generator(args: &[String]) -> Result<()> {
    let [pivot, pin, first, count, ramp] = args else {
        bail!("usage: burrow-bench storm-devices PIVOT PIN FIRST COUNT RAMP")
    };
    let (first, count, ramp): (usize, usize, usize) = (first.parse()?, count.parse()?, ramp.parse()?);
    // Each device holds a descriptor, and one more while a probe is relayed.
    let nofile = burrow_server::limits::raise_nofile();
    println!("nofile {nofile}");
    let pin = HostKeyPin::parse(pin).context("the pivot's host key")?;

    // Stands in for every device's sshd: takes each connection and closes it.
    let target = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let expose = vec![Expose { port: 22, target: target.local_addr()?.to_string() }];
    tokio::spawn(async move {
        loop {
            if target.accept().await.is_err() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    });

    let shutdown = CancellationToken::new();
    let stdin_closed = tokio::task::spawn_blocking(|| {
        let mut buf = [0u8; 64];
        while std::io::stdin().read(&mut buf).is_ok_and(|n| n > 0) {}
    });
    let gate = Arc::new(tokio::sync::Semaphore::new(ramp.max(1)));
    for i in first..first + count {
        let permit = gate.clone().acquire_owned().await.expect("never closed");
        let mut config =
            burrow_agent::Config::new(Some(pivot.clone()), Id::parse(&device_id(i))?, device_key(i), pin.clone(), expose.clone());
        config.scan_host_keys = false;
        // The ramp's slot goes back at the device's first outcome.
        let slot = Mutex::new(Some(permit));
        config.on_event = Some(EventHook(Arc::new(move |e| {
            slot.lock().unwrap().take();
            report(i, &e);
        })));
        tokio::spawn(burrow_agent::run(config, shutdown.clone()));
    }
    stdin_closed.await?;
    shutdown.cancel();
    Ok(())
}

fn report(i: usize, e: &Event<'_>) {
    let ns = now_ns();
    match e {
        Event::TunnelUp => println!("up {i} {ns}"),
        Event::Ended { up: true, .. } => println!("down {i} {ns}"),
        Event::Ended { up: false, error } => {
            let (not_up, cause, detail) = match error {
                Some(e) => classify(e),
                None => (false, "closed before the tunnel came up".into(), String::new()),
            };
            let class = if not_up { "notup" } else { "other" };
            println!("fail {i} {ns} {class} {cause}\t{detail}");
        }
    }
}

/// (nothing listens yet?, a short cause, the error's whole text).
fn classify(e: &SessionError) -> (bool, String, String) {
    use std::io::ErrorKind::{ConnectionRefused, ConnectionReset};
    let mut detail = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        detail.push_str(": ");
        detail.push_str(&s.to_string());
        src = s.source();
    }
    let detail = detail.replace(['\t', '\n'], " ");
    let (not_up, cause) = match e {
        SessionError::Connect { source, .. } => {
            (matches!(source.kind(), ConnectionRefused | ConnectionReset), format!("TCP connect: {:?}", source.kind()))
        }
        SessionError::ConnectTimeout(_) => (false, "no connection or key exchange within the agent's timeout".into()),
        SessionError::HostKeyMismatch { .. } => (false, "host key mismatch".into()),
        SessionError::AuthRejected { .. } => (false, "device key refused".into()),
        SessionError::ForwardRefused { .. } => (false, "forward refused".into()),
        SessionError::Refused { .. } => (false, "refused by the pivot".into()),
        SessionError::Ssh(russh::Error::IO(io)) => (false, format!("SSH handshake: I/O {:?}", io.kind())),
        SessionError::Ssh(other) => (false, format!("SSH handshake: {other}")),
    };
    (not_up, cause, detail)
}
