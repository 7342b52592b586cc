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
//! nofile SOFT                             the descriptor limit it raised to
//! up I NS                                 device I's tunnel came up
//! down I NS CAUSE<TAB>DETAIL              a tunnel that was up ended
//! fail I NS notup|other CAUSE<TAB>DETAIL  a connection that never got up
//! ```
//!
//! "notup" is a refused (or reset) TCP connect: nothing listens yet. Every
//! other failure (timeouts, a connection dropped by the pivot's
//! pre-authentication limits, refusals, protocol errors) is "other".
//!
//! Layout: this file runs the bench and prints the report; `generator` is
//! the generator process; `procs` starts and reads the processes (the
//! pivot, the generators, /proc, the pivot's /metrics); `tally` keeps what
//! the generators report.

mod generator;
mod procs;
mod tally;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use burrow_core::{HostKeyPin, Id};
use burrow_server::limits::MaxStartups;

use crate::mqtt_hold::{device_id, device_key};
pub use generator::generator;
use procs::{
    busiest_threads, free_low_port, http_get, proc_cpu_seconds, proc_status_kib, wait_metric, Generators, Pivot,
};
use tally::Tally;

pub struct Options {
    pub devices: usize,
    pub procs: usize,
    /// How long the storm may take, from the restart until every tunnel is back.
    pub timeout: Duration,
    /// Passed to the pivot's `--ssh-threads`.
    pub ssh_threads: Option<usize>,
    /// The pivot's registry in PostgreSQL (passed as `--database-url`, with
    /// `--pivot-name storm`); the devices are registered there too.
    pub database_url: Option<String>,
    /// Passed to the pivot's `--max-startups`; its default otherwise.
    pub max_startups: Option<String>,
    /// How long the pivot stays dead before it is started again.
    pub down: Duration,
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

/// Registers devices 0..n, each with its key, in the registry the pivot
/// uses: PostgreSQL at `database_url`, else SQLite in `data_dir`.
async fn register(database_url: Option<&str>, data_dir: &Path, n: usize) -> Result<()> {
    let registry = burrow_server::Registry::open_for(database_url, data_dir).await?;
    for i in 0..n {
        let id = Id::parse(&device_id(i))?;
        registry.add_device(&id, device_key(i).public_key(), &Default::default(), &[]).await?;
    }
    registry.close().await;
    Ok(())
}

/// The agent's stable period: a connection that lasted this long resets its backoff.
fn agent_stable_after() -> Result<Duration> {
    let pin = HostKeyPin::Fingerprint(String::new());
    let config = burrow_agent::Config::new(None, Id::parse(&device_id(0))?, device_key(0), pin, vec![]);
    Ok(config.stable_after)
}

/// The pivot's command line and where it listens.
struct Setup {
    args: Vec<String>,
    ssh_port: u16,
    http_port: u16,
    data: PathBuf,
    /// START of the pivot's `--max-startups`: it drops nothing below this.
    start: usize,
}

fn setup(o: &Options, work: &Path) -> Result<Setup> {
    // The pivot's pre-authentication cap: its own default unless given.
    let MaxStartups { start, full, .. } = match &o.max_startups {
        Some(s) => s.parse().map_err(|e: String| anyhow::anyhow!("--max-startups: {e}"))?,
        None => burrow_server::limits::Limits::default().max_startups,
    };
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
        // On loopback every device shares one source address; in a fleet
        // each has its own. The per-source cap is lifted past the global
        // one, which stays the pivot's default unless --max-startups is given.
        "--per-source-max-startups".into(),
        (full + 1).to_string(),
    ];
    if let Some(m) = &o.max_startups {
        args.extend(["--max-startups".into(), m.clone()]);
    }
    if let Some(t) = o.ssh_threads {
        args.extend(["--ssh-threads".into(), t.to_string()]);
    }
    if let Some(url) = &o.database_url {
        // A shared registry names each pivot; "local" is refused there.
        args.extend(["--database-url".into(), url.clone(), "--pivot-name".into(), "storm".into()]);
    }
    Ok(Setup { args, ssh_port, http_port, data, start })
}

async fn storm(bin: &str, o: &Options, work: &Path) -> Result<()> {
    let n = o.devices;
    let procs = o.procs.clamp(1, n);
    let s = setup(o, work)?;
    println!(
        "storm: {n} always-on devices (burrow_agent::run) over {procs} generator processes; pivot {}",
        s.args[1..].iter().map(|a| if a.starts_with('/') { "DIR" } else { a }).collect::<Vec<_>>().join(" ")
    );
    let mut pivot = Pivot::spawn(bin, &s.args, work.join("pivot-1.log"))?;
    pivot.wait_healthy(s.http_port, Duration::from_secs(30)).await?;
    let t = Instant::now();
    register(o.database_url.as_deref(), &s.data, n).await.context("cannot register the devices")?;
    println!("  registered {n} devices in {:.1} s", t.elapsed().as_secs_f64());

    // The ramp stays under the pivot's first drop threshold (START of
    // --max-startups), so the fleet comes up without failures and the storm
    // starts from agents whose backoff is at its first step.
    let ramp = (s.start.saturating_sub(2) / procs).max(1);
    let tally = Arc::new(Mutex::new(Tally::new(n)));
    let mut gens = Generators::start(s.ssh_port, &s.data.join("host_key.pub"), n, procs, ramp, &tally, work)?;
    ramp_up(o, &s, ramp, &tally, &mut gens, &mut pivot).await?;
    settle(o, &tally, &mut gens, &mut pivot).await?;
    let m = restart(bin, o, &s, work, &tally, &mut gens, &mut pivot).await?;
    print_report(o, procs, &m, &tally.lock().unwrap());
    drop(gens);
    drop(pivot);
    if !m.done {
        bail!("not all {n} tunnels came back within {:.0} s", o.timeout.as_secs_f64());
    }
    Ok(())
}

/// Waits until every tunnel is up: bounded by a rate no working pivot falls
/// below, and by a minute without a new tunnel.
async fn ramp_up(
    o: &Options,
    s: &Setup,
    ramp: usize,
    tally: &Mutex<Tally>,
    gens: &mut Generators,
    pivot: &mut Pivot,
) -> Result<()> {
    let n = o.devices;
    let t = Instant::now();
    let bound = o.timeout + Duration::from_secs_f64(n as f64 / 50.0);
    let (mut last, mut last_change) = (0, Instant::now());
    loop {
        let up = tally.lock().unwrap().up_count;
        if up == n {
            break;
        }
        if up != last {
            (last, last_change) = (up, Instant::now());
        }
        if last_change.elapsed() > Duration::from_secs(60) || t.elapsed() > bound {
            bail!("the fleet got stuck at {up} of {n} tunnels up:\n{}", tally.lock().unwrap().causes(false));
        }
        gens.check()?;
        pivot.check()?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = t.elapsed();
    let seen = wait_metric(s.http_port, "burrow_tunnels", n as u64, Duration::from_secs(10)).await;
    println!(
        "  ramp: {n} tunnels up in {:.1} s ({:.0}/s, at most {ramp} handshakes at a time per generator); pivot /metrics burrow_tunnels {}; generators' descriptor limit {:?}",
        took.as_secs_f64(),
        n as f64 / took.as_secs_f64(),
        seen.map_or("unreadable".into(), |v| v.to_string()),
        tally.lock().unwrap().nofile
    );
    Ok(())
}

/// After failures in the ramp, holds until every agent has been up for its
/// stable period. An agent resets its backoff only after a connection
/// lasted that long; until then a failure in the ramp would slow its return
/// in the storm, which a long-running fleet would not see.
async fn settle(o: &Options, tally: &Mutex<Tally>, gens: &mut Generators, pivot: &mut Pivot) -> Result<()> {
    let n = o.devices;
    let failed: usize = tally.lock().unwrap().ramp_failures.values().map(|c| c.0).sum();
    if failed == 0 {
        return Ok(());
    }
    let stable = agent_stable_after()? + Duration::from_secs(1);
    println!(
        "  {failed} handshakes failed in the ramp:\n{}  holding until every agent has been up {:.0} s, so each backoff starts afresh",
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
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the fleet did not settle: {up} of {n} up");
        }
        gens.check()?;
        pivot.check()?;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What the restarted pivot and the fleet did, from the restart on.
struct Measured {
    /// Every device had its tunnel back within the timeout.
    done: bool,
    /// Devices back within the timeout.
    back: usize,
    restart_ns: u64,
    /// From the restart until the pivot printed its listener, and until /healthz answered.
    listening: Option<Duration>,
    healthy: Option<Duration>,
    /// From the restart until all were back (or the timeout), as polled.
    wall: Duration,
    /// The restarted pivot's CPU (user + sys) seconds, its busiest threads,
    /// and its peak and current resident memory, KiB.
    cpu: f64,
    threads: Vec<(String, f64)>,
    hwm_kib: u64,
    rss_kib: u64,
    /// Each second: (tunnels back by its end, the pivot's CPU seconds so far).
    timeline: Vec<(usize, f64)>,
    /// The generators' CPU seconds over the same time.
    gen_cpu: f64,
    /// The pivot's `burrow_tunnels` at the end, and its whole /metrics.
    tunnels: Option<u64>,
    metrics: String,
}

/// Kills the pivot (SIGKILL), starts it again on the same data dir and
/// ports, and waits until every device has had its tunnel up again.
#[allow(clippy::too_many_arguments)]
async fn restart(
    bin: &str,
    o: &Options,
    s: &Setup,
    work: &Path,
    tally: &Mutex<Tally>,
    gens: &mut Generators,
    pivot: &mut Pivot,
) -> Result<Measured> {
    let n = o.devices;
    let gen_cpu_before = gens.cpu_seconds();
    tally.lock().unwrap().kill = Some(now_ns());
    pivot.kill();
    if !o.down.is_zero() {
        // The outage itself, not a wait for something to happen.
        tokio::time::sleep(o.down).await;
    }
    let restart_ns = now_ns();
    let restarted = Instant::now();
    *pivot = Pivot::spawn(bin, &s.args, work.join("pivot-2.log"))?;
    let pid = pivot.child.id();

    let http_port = s.http_port;
    let healthy = tokio::spawn(async move {
        while http_get(http_port, "/healthz").await.is_none_or(|r| r.0 != 200) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        restarted.elapsed()
    });
    let deadline = restarted + o.timeout;
    let mut listening = None;
    let mut timeline = Vec::new();
    let done = loop {
        if listening.is_none() && pivot.printed("burrow pivot listening on ") {
            listening = Some(restarted.elapsed());
        }
        if restarted.elapsed() >= Duration::from_secs(timeline.len() as u64 + 1) {
            let back = tally.lock().unwrap().back_count;
            timeline.push((back, proc_cpu_seconds(pid).unwrap_or(0.0)));
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
    let mut m = Measured {
        done,
        back: tally.lock().unwrap().back_count,
        restart_ns,
        listening,
        healthy: None,
        wall: restarted.elapsed(),
        cpu: proc_cpu_seconds(pid).unwrap_or(f64::NAN),
        threads: busiest_threads(pid, 3),
        hwm_kib: proc_status_kib(pid, "VmHWM:").unwrap_or(0),
        rss_kib: proc_status_kib(pid, "VmRSS:").unwrap_or(0),
        timeline,
        gen_cpu: gens.cpu_seconds() - gen_cpu_before,
        tunnels: None,
        metrics: String::new(),
    };
    let bound = Duration::from_secs(if done { 10 } else { 1 });
    m.tunnels = wait_metric(http_port, "burrow_tunnels", n as u64, bound).await;
    m.metrics = http_get(http_port, "/metrics").await.map(|r| r.1).unwrap_or_default();
    if healthy.is_finished() {
        m.healthy = healthy.await.ok();
    } else {
        healthy.abort();
    }
    Ok(m)
}

fn print_report(o: &Options, procs: usize, m: &Measured, t: &Tally) {
    let n = o.devices;
    let kill_ns = t.kill.expect("set before the kill");
    let mut back: Vec<u64> = t.back.iter().flatten().map(|ns| ns.saturating_sub(m.restart_ns)).collect();
    back.sort_unstable();
    let pct = |p: f64| back.get(((back.len() as f64 - 1.0) * p).round() as usize).map_or(f64::NAN, |ns| secs(*ns));
    let ms = |d: Option<Duration>| d.map_or("-".to_string(), |d| format!("{:.0} ms", d.as_secs_f64() * 1000.0));
    let wall = m.wall.as_secs_f64();
    println!(
        "  kill -9 at +0 (the pivot reaped), restart at +{:.0} ms; the pivot printed its listener after {}, /healthz answered after {}",
        secs(m.restart_ns - kill_ns) * 1000.0,
        ms(m.listening),
        ms(m.healthy)
    );
    let lost_again: usize = t.lost_after_back.values().map(|c| c.0).sum();
    println!(
        "  tunnels lost at the kill (agent reports): {}; lost again after coming back: {lost_again}; up now: {}",
        t.storm_downs, t.up_count
    );
    for (cause, (count, detail)) in &t.lost_after_back {
        println!("    {count:>7}  {cause}  (e.g. \"{detail}\")");
    }
    if m.done {
        println!(
            "  all {n} tunnels back {:.2} s after the restart (last agent report); p50 {:.2} s, p90 {:.2} s, p99 {:.2} s",
            pct(1.0),
            pct(0.5),
            pct(0.9),
            pct(0.99)
        );
    } else {
        println!("  NOT all back: {} of {n} tunnels back within {:.0} s", m.back, o.timeout.as_secs_f64());
    }
    println!("  pivot /metrics burrow_tunnels: {}", m.tunnels.map_or("unreadable".into(), |v| v.to_string()));
    println!(
        "  restarted pivot over {wall:.2} s: peak memory (VmHWM) {:.1} MiB (RSS now {:.1} MiB); CPU {:.2} s user+sys = {:.0}% of one core ({:.0}% of the machine's {} cores)",
        m.hwm_kib as f64 / 1024.0,
        m.rss_kib as f64 / 1024.0,
        m.cpu,
        100.0 * m.cpu / wall,
        100.0 * m.cpu / wall / cores() as f64,
        cores()
    );
    let threads: Vec<String> =
        m.threads.iter().map(|(name, cpu)| format!("{name} {cpu:.2} s ({:.0}%)", 100.0 * cpu / wall)).collect();
    println!("  busiest pivot threads: {}", threads.join(", "));
    println!("  second after the restart: tunnels back by its end, the pivot's CPU in it (% of one core):");
    let mut prev = 0.0;
    for (row, chunk) in m.timeline.chunks(8).enumerate() {
        let cells: Vec<String> = chunk
            .iter()
            .enumerate()
            .map(|(k, (back, cpu))| {
                let share = 100.0 * (cpu - std::mem::replace(&mut prev, *cpu));
                format!("{:>3}: {back:>6} {share:>4.0}%", row * 8 + k + 1)
            })
            .collect();
        println!("    {}", cells.join("   "));
    }
    println!("  generators over the same time: CPU {:.2} s user+sys (all {procs} together)", m.gen_cpu);
    let failed: usize = t.storm_failures.values().map(|c| c.0).sum();
    let not_up: usize = t.storm_failures.iter().filter(|(k, _)| k.0).map(|(_, c)| c.0).sum();
    println!("  handshake failures in the storm: {failed}; pivot not up yet: {not_up}; other: {}", failed - not_up);
    print!("{}", t.causes(true));
    println!("  pivot's own count: {}", pivot_counts(&m.metrics));
    let met = m.done && pct(1.0) <= 30.0 && failed == not_up;
    println!(
        "  goal (all {n} back within 30 s, no handshake failing but for \"pivot not up yet\"): {}",
        if met { "met" } else { "NOT met" }
    );
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
