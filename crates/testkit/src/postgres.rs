//! [`Postgres`]: a real PostgreSQL cluster made by `initdb` in a temp dir,
//! on a loopback port, for the registry's PostgreSQL backend.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::{free_port, wait_until, Proc};

/// The cluster's superuser; it logs in without a password over loopback.
const USER: &str = "burrow";

pub struct Postgres {
    proc: Proc,
    pub port: u16,
    bin: PathBuf,
    databases: AtomicUsize,
    dir: tempfile::TempDir,
}

/// The directory of `initdb` and `postgres`: `BURROW_PG_BIN`, or the newest
/// of Debian's `/usr/lib/postgresql/*/bin`.
fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("BURROW_PG_BIN") {
        return dir.into();
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, p): &(u32, PathBuf)| p.join("initdb").exists())
        .collect();
    found.sort();
    match found.pop() {
        Some((_, dir)) => dir,
        None => panic!(
            "PostgreSQL's initdb is required by this test; install postgresql (see .ci/run) or set BURROW_PG_BIN"
        ),
    }
}

/// PostgreSQL refuses to run as root: as root, run it as the `postgres`
/// user Debian's package makes.
fn unprivileged(cmd: &mut Command) -> Option<(u32, u32)> {
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 {
        return None;
    }
    let out = Command::new("id").args(["-u", "postgres"]).output().expect("id");
    let uid: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().expect("no 'postgres' user; install postgresql");
    let out = Command::new("id").args(["-g", "postgres"]).output().expect("id");
    let gid: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().expect("postgres group");
    cmd.uid(uid).gid(gid);
    Some((uid, gid))
}

impl Postgres {
    /// `initdb`, then `postgres` on `127.0.0.1:PORT`, tuned for tests
    /// (no fsync). Panics with the reason if either fails.
    pub fn start() -> Postgres {
        let bin = bin_dir();
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let mut initdb = Command::new(bin.join("initdb"));
        initdb.arg("-D").arg(&data).args(["-U", USER, "-A", "trust", "-E", "UTF8", "--no-sync"]);
        if let Some((uid, gid)) = unprivileged(&mut initdb) {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
        }
        let out = initdb.output().expect("run initdb");
        assert!(out.status.success(), "initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        let port = free_port();
        let mut cmd = Command::new(bin.join("postgres"));
        cmd.arg("-D").arg(&data).arg("-k").arg(dir.path()).args([
            "-p",
            &port.to_string(),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
            "-c",
            "max_connections=300",
        ]);
        unprivileged(&mut cmd);
        let proc = Proc::spawn("postgres", &mut cmd, dir.path().join("postgres.log"));
        let pg = Postgres { proc, port, bin, databases: AtomicUsize::new(0), dir };
        let ready = wait_until(Duration::from_secs(30), || {
            Command::new(pg.bin.join("pg_isready"))
                .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", USER, "-d", "postgres", "-q"])
                .status()
                .is_ok_and(|s| s.success())
        });
        assert!(ready, "postgres did not start:\n{}", pg.proc.log_text());
        pg
    }

    /// A new, empty database; returns its URL.
    pub fn create_database(&self) -> String {
        let name = format!("burrow_{}", self.databases.fetch_add(1, Ordering::SeqCst));
        let out = Command::new(self.bin.join("psql"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                USER,
                "-d",
                "postgres",
                "-v",
                "ON_ERROR_STOP=1",
            ])
            .args(["-c", &format!("CREATE DATABASE {name}")])
            .output()
            .expect("run psql");
        assert!(out.status.success(), "CREATE DATABASE failed: {}", String::from_utf8_lossy(&out.stderr));
        self.url(&name)
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://{USER}@127.0.0.1:{}/{database}", self.port)
    }

    /// Runs one SQL statement with psql on `database`; returns its output (unaligned, tuples only).
    pub fn psql(&self, database_url: &str, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", database_url, "-c", sql])
            .output()
            .expect("run psql");
        assert!(out.status.success(), "psql failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    pub fn log_text(&self) -> String {
        self.proc.log_text()
    }

    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }
}

impl Drop for Postgres {
    /// A fast shutdown (SIGINT) that ends every backend; SIGKILL after 10 s.
    fn drop(&mut self) {
        let _ = Command::new("kill").arg("-INT").arg(self.proc.pid().to_string()).status();
        wait_until(Duration::from_secs(10), || !self.proc.is_running());
    }
}
