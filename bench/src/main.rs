//! `burrow-bench`: measurements that are too slow or too noisy for tests.
//!
//! ```text
//! cargo build --release -p burrow -p burrow-bench
//! target/release/burrow-bench wake [SAMPLES]
//! ```
//!
//! `vs-openssh` runs burrow and a stock OpenSSH pivot side by side (see
//! `vs_openssh.rs` and docs/benchmarks.md):
//!
//! ```text
//! target/release/burrow-bench vs-openssh [--gib 1] [--runs 5] [--tunnels 1000,10000]
//! ```
//!
//! `storm` kills a pivot holding N always-on tunnels and restarts it (see
//! `storm.rs`):
//!
//! ```text
//! target/release/burrow-bench storm 10000 [--procs 4] [--timeout 120s]
//! ```
//!
//! `certificates` times issuing operator certificates on the pivot and the
//! `principals` command a device's sshd runs per login (see `certs.rs`):
//!
//! ```text
//! target/release/burrow-bench certificates [--operators 200] [--runs 200] [--agent PATH]
//! ```
//!
//! `wake` measures what an on-demand wake-up adds to opening a channel: the
//! time from an operator's `direct-tcpip` open to its confirmation, for a
//! sleeping device (woken over the embedded MQTT broker) against a device
//! whose tunnel is already up. Both devices front the same real sshd.

mod agent_size;
mod certs;
mod cluster;
mod mqtt_hold;
mod storm;
mod vs_openssh;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use burrow_testkit::{KeyPair, Sshd, TestAgent, TestPivot};
use russh::keys::PrivateKeyWithHashAlg;

fn burrow_bin() -> Result<String> {
    if let Ok(bin) = std::env::var("BURROW_BIN") {
        return Ok(bin);
    }
    let exe = std::env::current_exe()?;
    let bin: PathBuf = exe.parent().context("exe dir")?.join("burrow");
    if !bin.exists() {
        bail!("{} not found; build it with cargo build --release -p burrow", bin.display());
    }
    Ok(bin.display().to_string())
}

/// russh client for benchmarks against pivots this process started on loopback.
struct Client;

impl russh::client::Handler for Client {
    type Error = russh::Error;
    async fn check_server_key(&mut self, _key: &russh::keys::PublicKeyOrCertificate) -> Result<bool, Self::Error> {
        // Loopback bench against a pivot this process just started.
        Ok(true)
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Opens `id:22`, returning (time to confirmation, time to the sshd banner).
async fn open_once(handle: &russh::client::Handle<Client>, id: &str) -> Result<(Duration, Duration)> {
    vs_openssh::open_timed(handle, id, 22).await
}

fn report(name: &str, samples: &mut [Duration]) -> (Duration, Duration) {
    samples.sort();
    let (p50, p95) = (percentile(samples, 0.5), percentile(samples, 0.95));
    println!(
        "{name:<28} n={:<4} p50 {:>8.2} ms  p95 {:>8.2} ms  max {:>8.2} ms",
        samples.len(),
        ms(p50),
        ms(p95),
        ms(*samples.last().unwrap())
    );
    (p50, p95)
}

async fn wake(samples: usize) -> Result<()> {
    let bin = burrow_bin()?;
    let pivot = TestPivot::start_with(&bin, &["--idle-timeout", "200ms"]);
    let sshd = Sshd::start(&[]);
    let dir = sshd.dir.path();
    let (sleepy, awake, op) =
        (KeyPair::generate(dir, "sleepy"), KeyPair::generate(dir, "awake"), KeyPair::generate(dir, "op"));
    pivot.add_device("sleepy", &sleepy);
    pivot.add_device("awake", &awake);
    pivot.add_operator("bench", &op);
    let expose = [format!("22={}", sshd.target())];
    let _awake = TestAgent::start(&bin, &pivot, "awake", &awake, &expose);
    let pin = pivot.host_key_pub();
    let mut cmd = std::process::Command::new(&bin);
    cmd.arg("agent")
        .args(pivot.agent_mqtt_args())
        .args(["--id", "sleepy", "--key"])
        .arg(&sleepy.private)
        .arg("--pivot-host-key")
        .arg(&pin)
        .args(["--expose", &expose[0]]);
    let _sleepy = burrow_testkit::Proc::spawn("sleepy agent", &mut cmd, dir.join("sleepy.log"));
    if !pivot.wait_online("awake", true, Duration::from_secs(20))
        || !burrow_testkit::wait_until(Duration::from_secs(20), || pivot.is_present("sleepy"))
    {
        bail!("agents did not come up");
    }

    let key = russh::keys::load_secret_key(&op.private, None)?;
    let config = Arc::new(russh::client::Config { nodelay: true, ..Default::default() });
    let mut handle = russh::client::connect(config, pivot.addr, Client).await?;
    let auth = handle.authenticate_publickey("bench", PrivateKeyWithHashAlg::new(Arc::new(key), None)).await?;
    if !auth.success() {
        bail!("operator key refused");
    }

    // Warm-up: first connections pay for page faults and key caches.
    for _ in 0..3 {
        open_once(&handle, "awake").await?;
    }
    let (mut warm_open, mut warm_banner) = (Vec::new(), Vec::new());
    for _ in 0..samples {
        let (o, b) = open_once(&handle, "awake").await?;
        warm_open.push(o);
        warm_banner.push(b);
    }
    let (mut cold_open, mut cold_banner) = (Vec::new(), Vec::new());
    for i in 0..samples {
        // Wait until the previous wake-up's tunnel has been closed as idle.
        if !burrow_testkit::wait_until(Duration::from_secs(10), || !pivot.is_online("sleepy")) {
            bail!("sample {i}: tunnel did not close");
        }
        let (o, b) = open_once(&handle, "sleepy").await?;
        cold_open.push(o);
        cold_banner.push(b);
    }
    println!("wake-up overhead, {samples} samples each, loopback, embedded broker");
    let (w50, w95) = report("tunnel up: open->confirm", &mut warm_open);
    report("tunnel up: open->banner", &mut warm_banner);
    let (c50, c95) = report("sleeping: open->confirm", &mut cold_open);
    report("sleeping: open->banner", &mut cold_banner);
    println!(
        "overhead (sleeping - tunnel up, open->confirm): p50 {:.2} ms, p95 {:.2} ms",
        ms(c50.saturating_sub(w50)),
        ms(c95.saturating_sub(w95))
    );
    Ok(())
}

/// Registers `count` devices in the registry under `data_dir` and holds one
/// idle tunnel for each on the pivot at `port`, for `seconds`. For profiling a
/// pivot started by hand (e.g. under valgrind's massif).
async fn hold(data_dir: &str, port: u16, count: usize, seconds: u64) -> Result<()> {
    let prefix = format!("hold-{}", std::process::id());
    let keys = vs_openssh::register_devices(std::path::Path::new(data_dir), &prefix, count).await?;
    let mut held = Vec::with_capacity(count);
    for (id, key) in keys {
        held.push(vs_openssh::tunnel(port, id.clone(), key, id, 22).await?);
    }
    println!("holding {count} tunnels for {seconds} s");
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let closed = held.iter().filter(|h| h.is_closed()).count();
    println!("{closed} of {count} closed by the pivot meanwhile");
    Ok(())
}

const USAGE: &str = "\
usage:
  burrow-bench certificates [--operators 200] [--runs 200] [--agent PATH]
      issuing operator certificates, and the principals command per device login
  burrow-bench wake [SAMPLES]
      what an on-demand wake-up adds to a channel open (default 50 samples)
  burrow-bench vs-openssh [FLAGS]        (as root: cgroups)
      burrow against a stock OpenSSH pivot, side by side
      --gib N                 scp size in GiB [1]
      --runs N                scp runs per direction [5]
      --cpu-limit F           share of a core for the limited runs [0.5]
      --skip-limited          no limited runs
      --skip-throughput       no scp runs
      --only-throughput       stop after the scp runs
      --burrow-only           burrow's scp runs alone (implies --only-throughput)
      --tunnels N[,N...]      idle tunnels for the memory figure [1000,10000]
      --openssh-tunnels N     idle tunnels on OpenSSH [1000]
      --latency-samples N     channel opens [300]
      --rate-connections N    connections for the rate [500]
  burrow-bench mqtt-hold N [FLAGS]
      N idle on-demand devices on the embedded MQTT listener, then on Mosquitto
      --procs N               generator processes [4]
      --wakes N               wake-up samples [200]
      --plaintext             burrow without TLS (--mqtt-plaintext)
      --skip-mosquitto        burrow only
  burrow-bench storm N [FLAGS]
      N always-on agents (burrow_agent::run) hold tunnels; the pivot is killed
      (SIGKILL) and restarted: time until all are back, the pivot's peak memory
      and CPU, handshake failures by cause
      --procs N               generator processes [4]
      --timeout DUR           bound from the restart until all are back [120s]
      --ssh-threads N         passed to the pivot's --ssh-threads
      --max-startups SPEC     passed to the pivot [its default, 10:30:100]
      --down DUR              how long the pivot stays dead before the restart [0]
      --database-url URL      the pivot's registry in PostgreSQL (passed on with
                              --pivot-name storm; devices are registered there)
  burrow-bench backends [FLAGS]
      the registry on SQLite and on PostgreSQL (device connection rate,
      channel-open latency), and two pivots on PostgreSQL: channel open and
      scp to a device on the other pivot (relayed) against the same pivot
      --devices N             devices connecting for the rate [2000]
      --samples N             channel opens [300]
      --mib N                 scp size [256]
  burrow-bench agent-size [AGENT_BIN]
      stripped size of burrow-agent [target/agent/burrow-agent] and the idle
      memory of an on-demand and an always-on agent (build it with
      cargo build --profile agent -p burrow-agent)
  burrow-bench hold DATA_DIR PORT COUNT [SECONDS]
      register COUNT devices and hold an idle tunnel each on a running pivot
";

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("backends") => {
            let mut o = cluster::Options::default();
            let mut it = args[1..].iter();
            while let Some(flag) = it.next() {
                let mut val = || it.next().with_context(|| format!("{flag} needs a value"));
                match flag.as_str() {
                    "--devices" => o.devices = val()?.parse()?,
                    "--samples" => o.samples = val()?.parse()?,
                    "--mib" => o.mib = val()?.parse()?,
                    other => bail!("unknown flag {other}\n{USAGE}"),
                }
            }
            cluster::run(&burrow_bin()?, o).await
        }
        Some("certificates") => certs::run(&burrow_bin()?, certs::parse(&args[1..])?).await,
        Some("wake") => {
            let n = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(50);
            wake(n).await
        }
        Some("agent-size") => {
            let default = std::env::current_exe()?.parent().context("exe dir")?.join("../agent/burrow-agent");
            let agent = args.get(1).cloned().unwrap_or_else(|| default.display().to_string());
            agent_size::run(&burrow_bin()?, &agent)
        }
        Some("hold") => {
            let arg = |i: usize| args.get(i).context("usage: burrow-bench hold DATA_DIR PORT COUNT [SECONDS]");
            let seconds = args.get(4).map(|s| s.parse()).transpose()?.unwrap_or(60);
            hold(arg(1)?, arg(2)?.parse()?, arg(3)?.parse()?, seconds).await
        }
        Some("mqtt-hold") => {
            let n = args.get(1).context("usage: burrow-bench mqtt-hold N")?.parse()?;
            let mut o =
                mqtt_hold::Options { devices: n, procs: 4, wakes: 200, skip_mosquitto: false, plaintext: false };
            let mut it = args[2..].iter();
            while let Some(flag) = it.next() {
                let mut val = || it.next().context("flag needs a value");
                match flag.as_str() {
                    "--procs" => o.procs = val()?.parse()?,
                    "--wakes" => o.wakes = val()?.parse()?,
                    "--plaintext" => o.plaintext = true,
                    "--skip-mosquitto" => o.skip_mosquitto = true,
                    other => bail!("unknown flag {other}\n{USAGE}"),
                }
            }
            mqtt_hold::run(&burrow_bin()?, o).await
        }
        // Registers mqtt-hold's devices in DATA_DIR, for profiling a pivot started by hand.
        Some("mqtt-register") => {
            let arg = |i: usize| args.get(i).context("usage: burrow-bench mqtt-register DATA_DIR N");
            mqtt_hold::register(std::path::Path::new(arg(1)?), arg(2)?.parse()?).await
        }
        Some("storm") => {
            let n = args.get(1).context("usage: burrow-bench storm N")?.parse()?;
            let mut o = storm::Options {
                devices: n,
                procs: 4,
                timeout: Duration::from_secs(120),
                ssh_threads: None,
                database_url: None,
                max_startups: None,
                down: Duration::ZERO,
            };
            let mut it = args[2..].iter();
            while let Some(flag) = it.next() {
                let mut val = || it.next().context("flag needs a value");
                match flag.as_str() {
                    "--procs" => o.procs = val()?.parse()?,
                    "--timeout" => o.timeout = storm::parse_duration(val()?)?,
                    "--ssh-threads" => o.ssh_threads = Some(val()?.parse()?),
                    "--max-startups" => o.max_startups = Some(val()?.clone()),
                    "--database-url" => o.database_url = Some(val()?.clone()),
                    "--down" => o.down = storm::parse_duration(val()?)?,
                    other => bail!("unknown flag {other}\n{USAGE}"),
                }
            }
            storm::run(&burrow_bin()?, o).await
        }
        // A generator process of storm.
        Some("storm-devices") => storm::generator(&args[1..]).await,
        // A generator process of mqtt-hold.
        Some("mqtt-devices") => mqtt_hold::generator(&args[1..]).await,
        Some("vs-openssh") => {
            let mut o = vs_openssh::Options {
                gib: 1,
                runs: 5,
                tunnels: vec![1000, 10_000],
                openssh_tunnels: 1000,
                latency_samples: 300,
                rate_connections: 500,
                skip_throughput: false,
                cpu_limit: 0.5,
                skip_limited: false,
                only_throughput: false,
                burrow_only: false,
            };
            let mut it = args[1..].iter();
            while let Some(flag) = it.next() {
                let mut val = || it.next().context("flag needs a value");
                match flag.as_str() {
                    "--gib" => o.gib = val()?.parse()?,
                    "--runs" => o.runs = val()?.parse()?,
                    "--tunnels" => o.tunnels = val()?.split(',').map(str::parse).collect::<Result<_, _>>()?,
                    "--openssh-tunnels" => o.openssh_tunnels = val()?.parse()?,
                    "--latency-samples" => o.latency_samples = val()?.parse()?,
                    "--rate-connections" => o.rate_connections = val()?.parse()?,
                    "--skip-throughput" => o.skip_throughput = true,
                    "--cpu-limit" => o.cpu_limit = val()?.parse()?,
                    "--skip-limited" => o.skip_limited = true,
                    "--only-throughput" => o.only_throughput = true,
                    "--burrow-only" => {
                        o.burrow_only = true;
                        o.only_throughput = true;
                    }
                    other => bail!("unknown flag {other}\n{USAGE}"),
                }
            }
            vs_openssh::run(&burrow_bin()?, o).await
        }
        Some("-h" | "--help" | "help") => {
            print!("{USAGE}");
            Ok(())
        }
        _ => bail!("{USAGE}"),
    }
}
