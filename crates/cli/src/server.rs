//! `burrow server`.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use burrow_core::mqtt_url::MqttUrl;
use burrow_server::algorithms::Algorithms;
use burrow_server::bans::{parse_net, BanConfig, IpNet};
use burrow_server::host_key;
use burrow_server::limits::{Limits, MaxStartups};
use burrow_server::signal::{BrokerConfig, SignalConfig};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::DataDir;
use burrow_agent::cli::mqtt_args::MqttClientArgs;

#[derive(clap::Args)]
pub struct ServerArgs {
    /// Read settings from this TOML file (see docs/configuration.md); flags and BURROW_* variables override it.
    #[arg(long, env = "BURROW_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Check the whole configuration, print what is wrong, and exit 0 or 1 without starting (as `sshd -t`).
    #[arg(long)]
    check_config: bool,
    #[command(flatten)]
    data: DataDir,
    /// Keep the registry in this PostgreSQL database, shared by several pivots (postgres://USER@HOST/DB) [default: SQLite in --data-dir].
    #[arg(long, env = "BURROW_DATABASE_URL", value_name = "URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Address of the SSH listener (production uses 443); repeatable, e.g. 0.0.0.0:443 and [::]:443.
    #[arg(long, env = "BURROW_LISTEN", default_value = "0.0.0.0:2222", value_delimiter = ',')]
    listen: Vec<SocketAddr>,
    /// HOST:PORT this pivot is reached at by woken devices, enrollment tokens and other pivots [default: the first --listen].
    #[arg(long, env = "BURROW_ADVERTISE", value_name = "HOST:PORT")]
    advertise: Option<String>,
    /// This pivot's name in the registry; pivots sharing a --database-url each need their own.
    #[arg(long, env = "BURROW_PIVOT_NAME", default_value = "local")]
    pivot_name: String,
    /// Devices answer to `ID` and `ID.<suffix>`.
    #[arg(long, default_value = "burrow")]
    host_suffix: String,
    /// Keepalive period on every connection; two missed keepalives drop it.
    #[arg(long, default_value = "30s", value_parser = crate::parse_duration)]
    keepalive: Duration,
    /// Serve `/healthz` and `/metrics` (Prometheus text) over HTTP on this address.
    #[arg(long, env = "BURROW_HTTP_LISTEN")]
    http_listen: Option<SocketAddr>,
    /// Threads that run SSH connections [default: 1]; more raise the handshake
    /// rate during reconnect storms, at some CPU cost per relayed byte.
    #[arg(long, env = "BURROW_SSH_THREADS")]
    ssh_threads: Option<usize>,
    #[command(flatten)]
    mqtt: MqttArgs,
    #[command(flatten)]
    limits: LimitArgs,
    #[command(flatten)]
    bans: BanArgs,
    #[command(flatten)]
    algorithms: AlgorithmArgs,
    /// Ports `burrow device listen` leases from, FIRST-LAST.
    #[arg(long, default_value = "30000-39999", value_parser = burrow_server::admin::parse_lease_range)]
    lease_range: std::ops::RangeInclusive<u16>,
    /// Which addresses leases bind, as OpenSSH's GatewayPorts: no (loopback), yes (all), clientspecified.
    #[arg(long, default_value = "no")]
    lease_gateway_ports: burrow_server::leases::GatewayPorts,
    /// Also append every audit record to FILE as JSON lines.
    #[arg(long, env = "BURROW_AUDIT_LOG")]
    audit_log: Option<PathBuf>,
    /// Prune audit records older than this (at least 90d); 0 keeps them forever.
    #[arg(long, default_value = "90d", value_parser = parse_retention)]
    audit_retention: Retention,
}

/// What one peer may cost the pivot (OpenSSH's equivalents in brackets).
#[derive(clap::Args)]
struct LimitArgs {
    /// Time from accept to authentication, key exchange included [LoginGraceTime].
    #[arg(long, default_value = "30s", value_parser = crate::parse_duration)]
    login_grace_time: Duration,
    /// Authentication attempts per connection [MaxAuthTries].
    #[arg(long, default_value_t = 6)]
    max_auth_tries: usize,
    /// Unauthenticated connections: START:RATE:FULL random early drop, or one cap [MaxStartups].
    #[arg(long, default_value = "10:30:100")]
    max_startups: MaxStartups,
    /// Unauthenticated connections from one source address [PerSourceMaxStartups].
    #[arg(long, default_value_t = 10)]
    per_source_max_startups: usize,
    /// Channels one operator connection may hold open (enrollment keys get 2).
    #[arg(long, default_value_t = 64)]
    max_channels: usize,
    /// Ports one device connection may forward.
    #[arg(long, default_value_t = 16)]
    max_forwards: usize,
    /// Connections one key (operator or device) may hold at once.
    #[arg(long, default_value_t = 32)]
    max_sessions_per_key: usize,
    /// Bytes of admin requests buffered across the whole pivot.
    #[arg(long, default_value_t = 4 * 1024 * 1024)]
    admin_buffer: usize,
    /// File descriptors held back for registered peers, the registry and MQTT.
    #[arg(long, default_value_t = 128)]
    fd_reserve: u64,
}

/// Bans after repeated failures, as fail2ban's sshd jail (the pivot's own,
/// or the jail `burrow openssh render` writes).
#[derive(clap::Args)]
pub struct BanArgs {
    /// Failures from one source that ban it (1-19).
    #[arg(long, default_value_t = 5)]
    ban_maxretry: u32,
    /// Window in which failures are counted (at least 60s).
    #[arg(long, default_value = "10m", value_parser = crate::parse_duration)]
    ban_findtime: Duration,
    /// How long a ban lasts (at least --ban-findtime).
    #[arg(long, default_value = "1h", value_parser = crate::parse_duration)]
    ban_bantime: Duration,
    /// Never ban these addresses or CIDRs (repeatable; replaces the default, must include 127.0.0.1).
    #[arg(long, value_parser = parse_net, default_values = ["127.0.0.1/8", "::1/128"])]
    ban_ignoreip: Vec<IpNet>,
}

impl BanArgs {
    /// The rules, checked (maxretry, findtime, bantime, ignoreip).
    pub fn config(&self) -> Result<BanConfig> {
        let c = BanConfig {
            maxretry: self.ban_maxretry,
            findtime: self.ban_findtime,
            bantime: self.ban_bantime,
            ignoreip: self.ban_ignoreip.clone(),
        };
        c.check().map_err(anyhow::Error::msg)?;
        Ok(c)
    }
}

/// SSH algorithms offered, in order; only names from a known-good set are accepted.
#[derive(clap::Args)]
struct AlgorithmArgs {
    /// Key exchange algorithms offered, comma-separated, best first.
    #[arg(
        long,
        default_value = "mlkem768x25519-sha256,curve25519-sha256,curve25519-sha256@libssh.org,ecdh-sha2-nistp256,ecdh-sha2-nistp384,ecdh-sha2-nistp521"
    )]
    kex_algorithms: String,
    /// Ciphers offered, comma-separated, best first.
    #[arg(
        long,
        default_value = "aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com,aes256-ctr,aes192-ctr,aes128-ctr"
    )]
    ciphers: String,
    /// MACs offered for the CTR ciphers, comma-separated, best first.
    #[arg(
        long,
        default_value = "hmac-sha2-256-etm@openssh.com,hmac-sha2-512-etm@openssh.com,hmac-sha2-256,hmac-sha2-512"
    )]
    macs: String,
}

#[derive(Clone, Copy)]
struct Retention(Option<Duration>);

fn parse_retention(s: &str) -> Result<Retention, String> {
    if s.trim() == "0" {
        return Ok(Retention(None));
    }
    crate::parse_duration(s).map(|d| Retention(Some(d)))
}

#[derive(clap::Args)]
struct MqttArgs {
    /// Where the embedded MQTT broker listens for devices (TLS).
    #[arg(long, env = "BURROW_MQTT_LISTEN", default_value = "0.0.0.0:8883")]
    mqtt_listen: SocketAddr,
    /// Serve the embedded broker without TLS (mqtt://): for tests on loopback only.
    #[arg(long, conflicts_with_all = ["mqtt_url", "no_mqtt"])]
    mqtt_plaintext: bool,
    /// Use an external broker (mqtt[s]://HOST:PORT) instead of the embedded one.
    #[arg(long, env = "BURROW_MQTT_URL")]
    mqtt_url: Option<MqttUrl>,
    #[command(flatten)]
    client: MqttClientArgs,
    /// How long an operator's request waits for a sleeping device to dial in.
    #[arg(long, default_value = "15s", value_parser = crate::parse_duration)]
    wake_timeout: Duration,
    /// An on-demand tunnel closes after this long without channels.
    #[arg(long, default_value = "60s", value_parser = crate::parse_duration)]
    idle_timeout: Duration,
    /// Serve always-on tunnels only: no broker, no wake-ups.
    #[arg(long)]
    no_mqtt: bool,
}

/// Takes an exclusive lock on `DIR/lock` (released by the kernel when the
/// process ends, however it ends) and writes our pid in it.
fn lock_data_dir(dir: &std::path::Path) -> Result<std::fs::File> {
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsRawFd;
    let path = dir.join("lock");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let mut pid = String::new();
        let _ = file.read_to_string(&mut pid);
        let pid = pid.trim();
        bail!(
            "another burrow server{} is using the data dir {}; stop it first, or give this one its own --data-dir",
            if pid.is_empty() { String::new() } else { format!(" (pid {pid})") },
            dir.display()
        );
    }
    file.set_len(0)?;
    file.rewind()?;
    writeln!(file, "{}", std::process::id())?;
    Ok(file)
}

/// Several pivots on one registry, each with its embedded broker.
fn m_url_missing(args: &ServerArgs) -> bool {
    args.mqtt.mqtt_url.is_none() && !args.mqtt.no_mqtt
}

pub async fn run(args: ServerArgs, shutdown: CancellationToken) -> Result<()> {
    let dir = &args.data.data_dir;
    let mut config = burrow_server::Config::new(dir.clone());
    let l = &args.limits;
    config.limits = Limits {
        login_grace: l.login_grace_time,
        max_auth_tries: l.max_auth_tries,
        max_startups: l.max_startups,
        per_source_startups: l.per_source_max_startups,
        max_channels: l.max_channels,
        max_forwards: l.max_forwards,
        max_sessions_per_key: l.max_sessions_per_key,
        admin_buffer: l.admin_buffer,
        fd_reserve: l.fd_reserve,
    };
    config.bans = BanConfig {
        maxretry: args.bans.ban_maxretry,
        findtime: args.bans.ban_findtime,
        bantime: args.bans.ban_bantime,
        ignoreip: args.bans.ban_ignoreip.clone(),
    };
    let a = &args.algorithms;
    config.algorithms = Algorithms {
        kex: Algorithms::list(&a.kex_algorithms),
        ciphers: Algorithms::list(&a.ciphers),
        macs: Algorithms::list(&a.macs),
    };
    config.audit_log = args.audit_log.clone();
    config.lease_range = args.lease_range.clone();
    config.lease_gateway_ports = args.lease_gateway_ports;
    config.audit_retention = args.audit_retention.0;
    config.database_url = args.database_url.clone();
    // Refuse a bad configuration before touching anything.
    burrow_server::check_config(&config)?;
    burrow_core::Id::parse(&args.pivot_name).map_err(|e| anyhow::anyhow!("--pivot-name: {e}"))?;
    if let Some(url) = &args.database_url {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            bail!(
                "--database-url {}: give a PostgreSQL URL (postgres://USER@HOST/DB), or leave it out for SQLite in --data-dir",
                burrow_server::registry::redact_url(url)
            );
        }
        if args.pivot_name == "local" {
            bail!("--database-url is shared by several pivots: give this one its own --pivot-name (not 'local')");
        }
        if m_url_missing(&args) {
            bail!(
                "--database-url is shared by several pivots: give them one broker with --mqtt-url (or --no-mqtt); each pivot's embedded broker would know only its own devices"
            );
        }
    }
    if args.check_config {
        return check_more(&args);
    }
    // The data dir holds the host key, every registered key and the audit:
    // private to the pivot's user, and so is everything created in it.
    // SAFETY: umask only sets this process's file creation mask.
    unsafe { libc::umask(0o077) };
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create data dir {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot make data dir {} private (chmod 700)", dir.display()))?;
    // One pivot per data dir: a second one would clear the first one's
    // tunnel records and fight over the registry. Held until exit.
    let _lock = lock_data_dir(dir)?;
    let key = host_key::load_or_create(dir).context("cannot load the host key")?;
    let mut ssh = Vec::new();
    for addr in &args.listen {
        // With an IPv4 address beside it, [::] takes IPv6 only.
        let v6only = addr.is_ipv6() && args.listen.len() > 1;
        ssh.push(bind_listener(*addr, v6only).with_context(|| format!("cannot listen on {addr}"))?);
    }
    let local = ssh[0].local_addr()?;
    let m = &args.mqtt;
    let mut mqtt = None;
    let broker = match (&m.mqtt_url, m.no_mqtt) {
        (_, true) => None,
        (Some(url), false) => Some(BrokerConfig::External {
            url: url.clone(),
            tls: m.client.tls(),
            username: m.client.mqtt_username.clone(),
            password: m.client.mqtt_password.clone(),
        }),
        (None, false) => {
            let l = tokio::net::TcpListener::bind(m.mqtt_listen)
                .await
                .with_context(|| format!("cannot listen for MQTT on {}", m.mqtt_listen))?;
            mqtt = Some(l);
            Some(BrokerConfig::Embedded { plaintext: m.mqtt_plaintext })
        }
    };
    if let Some(a) = &args.advertise {
        if a.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok()).is_none() {
            bail!("--advertise {a}: give HOST:PORT");
        }
    }
    if args.database_url.is_some() && args.advertise.is_none() && local.ip().is_unspecified() {
        bail!(
            "--advertise HOST:PORT is needed with --database-url when listening on {local}: the other pivots and woken devices dial this pivot there"
        );
    }
    let advertise = args.advertise.clone().unwrap_or_else(|| {
        if local.ip().is_unspecified() {
            warn!(
                "listening on {local}: wake requests will name 127.0.0.1:{}; set --advertise HOST:PORT",
                local.port()
            );
            format!("127.0.0.1:{}", local.port())
        } else {
            local.to_string()
        }
    });

    let http = match args.http_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen for HTTP on {addr}"))?,
        ),
        None => None,
    };

    println!("burrow pivot listening on {local}");
    for l in &ssh[1..] {
        println!("burrow pivot also listening on {}", l.local_addr()?);
    }
    if let Some(h) = &http {
        println!("http (/healthz, /metrics) listening on {}", h.local_addr()?);
    }
    println!("host key {} ({})", burrow_core::fingerprint(key.public_key()), dir.join("host_key.pub").display());
    match (&mqtt, &broker) {
        (Some(l), _) => {
            if m.mqtt_plaintext {
                println!("mqtt without TLS (--mqtt-plaintext): login tokens cross the network in the clear");
            } else {
                let pin = burrow_server::signal::certificate_pin(dir).context("cannot set up the MQTT certificate")?;
                let file = dir.join(burrow_server::signal::CERT_FILE);
                println!("mqtt certificate {pin} ({}); devices pin it with --mqtt-fingerprint", file.display());
            }
            println!("mqtt (embedded broker) listening on {}", l.local_addr()?);
        }
        (None, Some(BrokerConfig::External { url, .. })) => println!("mqtt broker {url}"),
        _ => println!("mqtt disabled: always-on tunnels only"),
    }

    config.pivot_name = args.pivot_name;
    config.host_suffix = args.host_suffix;
    config.keepalive_interval = args.keepalive;
    if let Some(n) = args.ssh_threads {
        config.ssh_threads = n;
    }
    config.advertise = Some(advertise.clone());
    config.signal = broker.map(|broker| SignalConfig {
        broker,
        topics: m.client.topics(),
        advertise,
        wake_timeout: m.wake_timeout,
        idle_timeout: m.idle_timeout,
    });
    let listeners = burrow_server::Listeners { ssh, mqtt, http };
    burrow_server::run(config, listeners, shutdown).await?;
    Ok(())
}

/// What `--check-config` checks beyond the limits, bans and algorithms,
/// without binding or creating anything.
fn check_more(args: &ServerArgs) -> Result<()> {
    let mut wrong = Vec::new();
    if let Some(a) = &args.advertise {
        if a.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok()).is_none() {
            wrong.push(format!("--advertise {a}: give HOST:PORT"));
        }
    }
    let dir = &args.data.data_dir;
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    if !dir.is_dir() && !parent.is_dir() {
        wrong.push(format!("--data-dir {}: neither it nor its parent exists", dir.display()));
    }
    if let Some(log) = &args.audit_log {
        let parent = log.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
        if !parent.is_dir() {
            wrong.push(format!("--audit-log {}: its directory does not exist", log.display()));
        }
    }
    if let Some(url) = &args.mqtt.mqtt_url {
        if url.tls {
            if let Err(e) = args.mqtt.client.tls().load() {
                wrong.push(format!("--mqtt-url {url}: cannot read the TLS files: {e}"));
            }
        }
    }
    if args.listen.is_empty() {
        wrong.push("--listen: give at least one address".into());
    }
    if let Some(url) = &args.database_url {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            wrong.push(format!(
                "--database-url {}: give a PostgreSQL URL (postgres://USER@HOST/DB)",
                burrow_server::registry::redact_url(url)
            ));
        }
    }
    if let Err(e) = burrow_core::Id::parse(&args.pivot_name) {
        wrong.push(format!("--pivot-name: {e}"));
    }
    if !wrong.is_empty() {
        bail!("the configuration is wrong:\n  {}", wrong.join("\n  "));
    }
    println!("configuration OK");
    Ok(())
}

/// A listening socket on `addr`; `v6only` keeps an IPv6 wildcard from also
/// taking IPv4, so `0.0.0.0:P` and `[::]:P` can both be given.
fn bind_listener(addr: SocketAddr, v6only: bool) -> std::io::Result<tokio::net::TcpListener> {
    use std::os::fd::AsRawFd;
    let socket = if addr.is_ipv6() { tokio::net::TcpSocket::new_v6()? } else { tokio::net::TcpSocket::new_v4()? };
    socket.set_reuseaddr(true)?;
    if v6only {
        let on: libc::c_int = 1;
        // SAFETY: a valid socket, and an int option of the right size.
        let r = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_IPV6,
                libc::IPV6_V6ONLY,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    socket.bind(addr)?;
    socket.listen(1024)
}
