//! The processes the storm starts, and what it reads of them: the pivot,
//! the generators, /proc and the pivot's HTTP listener.

use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::now_ns;
use super::tally::Tally;

/// A loopback port below the kernel's ephemeral range. The pivot's port is
/// dead between the kill and the restart, while thousands of agents dial
/// it: an ephemeral port could be taken by one of their own connections (a
/// self-connect to 127.0.0.1:P), and the restart could not bind it.
pub(super) fn free_low_port() -> Result<u16> {
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
pub(super) async fn wait_metric(port: u16, name: &str, want: u64, bound: Duration) -> Option<u64> {
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
pub(super) async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
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
pub(super) fn proc_cpu_seconds(pid: u32) -> Option<f64> {
    stat_cpu_seconds(Path::new(&format!("/proc/{pid}/stat")))
}

/// utime + stime from a `stat` file of /proc, seconds.
fn stat_cpu_seconds(path: &Path) -> Option<f64> {
    let stat = std::fs::read_to_string(path).ok()?;
    // Fields after the command name, which may hold spaces: state is the
    // first, utime the 12th and stime the 13th.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Some(ticks as f64 / hz.max(1) as f64)
}

/// The `count` threads of `pid` that used the most CPU: (name, seconds).
pub(super) fn busiest_threads(pid: u32, count: usize) -> Vec<(String, f64)> {
    let mut threads: Vec<(String, f64)> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|t| {
            let name = std::fs::read_to_string(t.path().join("comm")).ok()?.trim().to_string();
            Some((name, stat_cpu_seconds(&t.path().join("stat"))?))
        })
        .collect();
    threads.sort_by(|a, b| b.1.total_cmp(&a.1));
    threads.truncate(count);
    threads
}

/// A `KEY: N kB` line of /proc/PID/status, in KiB.
pub(super) fn proc_status_kib(pid: u32, key: &str) -> Option<u64> {
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
pub(super) struct Pivot {
    pub(super) child: Child,
    log: PathBuf,
}

impl Pivot {
    pub(super) fn spawn(bin: &str, args: &[String], log: PathBuf) -> Result<Pivot> {
        let file = std::fs::File::create(&log)?;
        let mut cmd = Command::new(bin);
        cmd.args(args).stdin(Stdio::null()).stdout(file.try_clone()?).stderr(file);
        die_with_parent(&mut cmd);
        let child = cmd.spawn().with_context(|| format!("cannot start {bin}"))?;
        Ok(Pivot { child, log })
    }

    /// The log's head holds a line starting with `prefix`.
    pub(super) fn printed(&self, prefix: &str) -> bool {
        let mut head = vec![0u8; 8192];
        let n = std::fs::File::open(&self.log).and_then(|mut f| f.read(&mut head)).unwrap_or(0);
        String::from_utf8_lossy(&head[..n]).lines().any(|l| l.starts_with(prefix))
    }

    pub(super) fn check(&mut self) -> Result<()> {
        if let Ok(Some(status)) = self.child.try_wait() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            bail!("the pivot exited ({status}):\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
        }
        Ok(())
    }

    pub(super) async fn wait_healthy(&mut self, http_port: u16, bound: Duration) -> Result<()> {
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

    pub(super) fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Pivot {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The generator processes, killed (SIGKILL) on drop.
pub(super) struct Generators {
    children: Vec<Child>,
}

impl Generators {
    pub(super) fn start(
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
    pub(super) fn check(&mut self) -> Result<()> {
        for (p, c) in self.children.iter_mut().enumerate() {
            if let Ok(Some(status)) = c.try_wait() {
                bail!("generator {p} exited ({status}); see generator-{p}.log");
            }
        }
        Ok(())
    }

    pub(super) fn cpu_seconds(&self) -> f64 {
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
