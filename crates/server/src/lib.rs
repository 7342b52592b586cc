//! The burrow pivot: an SSH server that routes operators to devices by id.
//!
//! # Layout
//! - [`Config`] and [`run`]: the entry point; takes a bound listener and a shutdown token.
//! - [`host_key`]: the pivot's ed25519 host key, created on first start.
//! - [`registry`]: devices, operators, tunnel state and the pivots, in SQLite or PostgreSQL.
//! - [`admin`]: the admin commands, run locally or over SSH (the `@burrow` channel).
//! - [`refusal`]: the reasons an operator cannot reach a device.
//! - [`limits`]: what a peer may cost before and after authenticating.
//! - [`bans`]: fail2ban-style bans of sources that keep failing.
//! - [`audit`]: the append-only audit trail and its writer.
//! - [`algorithms`]: the SSH algorithms offered, from a known-good set.
//! - `router`: in-memory map of device id to tunnel, and of live sessions.
//! - `ssh`: accept loop, russh handler, routing of operator channels, byte relay.
//! - `watch`: applies registry changes (removals) to live connections.
//! - [`signal`]: MQTT signaling for on-demand tunnels (the devices' MQTT listener, wake-ups).

pub mod admin;
pub mod algorithms;
pub mod audit;
pub mod bans;
pub mod ca;
mod health;
pub mod host_key;
pub mod leases;
pub mod limits;
mod metrics;
pub mod refusal;
pub mod registry;
mod router;
mod shards;
pub mod signal;
mod ssh;
mod watch;

use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

pub use registry::{Identity, Registry, RegistryError};

/// Everything the pivot needs, already checked.
#[derive(Debug, Clone)]
pub struct Config {
    /// Holds `host_key`, `host_key.pub` and (without `database_url`) the registry.
    pub data_dir: PathBuf,
    /// The PostgreSQL registry several pivots share; `None` for SQLite in `data_dir`.
    pub database_url: Option<String>,
    /// This pivot's name in the registry's tunnel records.
    pub pivot_name: String,
    /// `cam-42.<suffix>` names the same device as `cam-42`.
    pub host_suffix: String,
    /// Keepalive period on every connection; a peer that misses
    /// `keepalive_max` in a row is dropped (30 s x 2 = offline within 90 s).
    pub keepalive_interval: Duration,
    pub keepalive_max: usize,
    /// Connections served at once; further ones wait in the listen backlog.
    /// Lowered at start to what the descriptor limit allows.
    pub max_connections: usize,
    pub limits: limits::Limits,
    pub bans: bans::BanConfig,
    pub algorithms: algorithms::Algorithms,
    /// Audit records older than this are pruned; `None` keeps them forever.
    pub audit_retention: Option<Duration>,
    /// Also append every audit record to this file as JSON lines.
    pub audit_log: Option<PathBuf>,
    /// How often the registry is checked for removed identities.
    pub watch_interval: Duration,
    /// How long shutdown waits for connections to close.
    pub drain_timeout: Duration,
    /// `HOST:PORT` devices dial; recorded in the registry for enrollment tokens.
    pub advertise: Option<String>,
    /// On-demand wake-ups over MQTT; `None` serves always-on tunnels only.
    pub signal: Option<signal::SignalConfig>,
    /// Ports `burrow device listen` leases from.
    pub lease_range: std::ops::RangeInclusive<u16>,
    /// Which addresses leases may bind, as OpenSSH's `GatewayPorts`.
    pub lease_gateway_ports: leases::GatewayPorts,
    /// Threads that run SSH connections (see `shards`). One by default: a
    /// relay whose two connections share a thread costs about 10-15% less CPU
    /// per GiB; more threads raise the handshake rate for reconnect storms.
    pub ssh_threads: usize,
}

impl Config {
    pub fn new(data_dir: PathBuf) -> Self {
        Config {
            data_dir,
            database_url: None,
            pivot_name: "local".into(),
            host_suffix: "burrow".into(),
            keepalive_interval: Duration::from_secs(30),
            keepalive_max: 2,
            max_connections: 50_000,
            limits: Default::default(),
            bans: Default::default(),
            algorithms: Default::default(),
            audit_retention: Some(DEFAULT_AUDIT_RETENTION),
            audit_log: None,
            watch_interval: Duration::from_secs(1),
            drain_timeout: Duration::from_secs(10),
            advertise: None,
            signal: None,
            lease_range: 30000..=39999,
            lease_gateway_ports: leases::GatewayPorts::No,
            ssh_threads: 1,
        }
    }
}

/// Audit records are kept 90 days by default (and at least that long).
pub const DEFAULT_AUDIT_RETENTION: Duration = Duration::from_secs(90 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("cannot load the host key")]
    HostKey(#[from] host_key::HostKeyError),
    #[error("cannot set up the user CA")]
    Ca(#[from] ca::CaError),
    #[error("cannot open the registry")]
    Registry(#[from] RegistryError),
    #[error("cannot set up signaling")]
    Signal(#[from] signal::SignalSetupError),
    #[error("cannot start the SSH threads")]
    Threads(#[source] std::io::Error),
}

/// Sockets the pivot serves, bound by the caller.
pub struct Listeners {
    /// Operators' and devices' SSH; several, e.g. IPv4 and IPv6.
    pub ssh: Vec<TcpListener>,
    /// Device-facing MQTT, for the embedded broker.
    pub mqtt: Option<TcpListener>,
    /// `/healthz` and `/metrics` over HTTP.
    pub http: Option<TcpListener>,
}

/// State shared by every connection of one pivot.
pub(crate) struct Shared {
    pub config: Config,
    pub registry: Registry,
    pub router: router::Router,
    pub tracker: TaskTracker,
    pub next_conn: AtomicU64,
    pub signal: Option<Arc<signal::Signal>>,
    /// The public host key (OpenSSH line), for enrollment tokens and `whoami`.
    pub host_key: String,
    pub metrics: metrics::Metrics,
    pub preauth: Arc<limits::PreAuth>,
    /// Bytes of `@burrow` requests buffered now, across the pivot.
    pub admin_buffered: Arc<limits::Counter>,
    pub bans: bans::Bans,
    pub audit: Arc<audit::Audit>,
    /// Names this run of the pivot in session ids (start time, hex).
    pub boot: String,
    pub ssh_lists: Arc<ssh::kexinit::ServerLists>,
    /// Connections held, SSH and devices' MQTT together, under the
    /// descriptor-derived cap (`Config::max_connections`).
    pub connections: Arc<tokio::sync::Semaphore>,
    /// Pivot-side ports served now.
    pub leases: leases::Leases,
    /// Connections to the other pivots of the registry, for relays.
    pub peers: ssh::peers::Peers,
    /// The registry's clock minus this machine's, in seconds, as of the last heartbeat.
    pub clock_offset: AtomicI64,
    /// A round of trust nudges runs, and another is wanted after it.
    pub nudging: std::sync::atomic::AtomicBool,
    pub nudge_again: std::sync::atomic::AtomicBool,
    /// Certificates issued per operator in the current minute.
    pub certificates: std::sync::Mutex<std::collections::HashMap<String, (std::time::Instant, u32)>>,
}

impl Shared {
    /// Now by the registry's clock (Unix seconds), which judges pivots' liveness.
    pub fn registry_now(&self) -> i64 {
        burrow_core::time::now_unix() + self.clock_offset.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A connection's id in audit records, unique across restarts.
    pub fn session_id(&self, conn: u64) -> String {
        format!("{}-{conn}", self.boot)
    }
}

/// Checks everything that can be checked before binding or opening anything;
/// `burrow server` calls it first. Returns how many connections the pivot
/// may hold at once under the descriptor limit now in force.
pub fn check_config(config: &Config) -> Result<usize, ServerError> {
    config.bans.check().map_err(ServerError::Config)?;
    config.algorithms.check().map_err(ServerError::Config)?;
    if let Some(r) = config.audit_retention {
        if r < DEFAULT_AUDIT_RETENTION {
            return Err(ServerError::Config(format!(
                "--audit-retention {} is under the 90 days audit logs must be kept",
                humantime::format_duration(r)
            )));
        }
    }
    let nofile = limits::raise_nofile();
    let connections = config.limits.check(nofile, config.max_connections).map_err(ServerError::Config)?;
    info!(nofile, max_connections = connections, "descriptor limit");
    Ok(connections)
}

/// Serves SSH on `listener` until `shutdown` is cancelled, then closes every
/// connection and waits (up to `drain_timeout`) for their tasks.
pub async fn run(mut config: Config, listeners: Listeners, shutdown: CancellationToken) -> Result<(), ServerError> {
    config.max_connections = check_config(&config)?;
    let key = host_key::load_or_create(&config.data_dir)?;
    let registry = Registry::open_for(config.database_url.as_deref(), &config.data_dir).await?;
    info!(backend = registry.backend().name(), "registry open");
    ca::ensure(&registry, &config.data_dir, burrow_core::time::now_unix()).await?;
    let host_key = burrow_core::keys::openssh_line(key.public_key());
    let boot = format!("{:x}", burrow_core::time::now_unix());
    // Peers reach this pivot where devices do: its own address, never a
    // load balancer's (a wake-up names it for the same reason).
    let address = config.advertise.clone().unwrap_or_default();
    let now = registry.db_now().await?;
    let clock_offset = AtomicI64::new(now - burrow_core::time::now_unix());
    // Another live pivot under this name elsewhere is a misconfiguration
    // that would clear its tunnel records: refuse. The same name at the same
    // address is this pivot restarting.
    if let Some(old) = registry.pivot(&config.pivot_name).await? {
        if old.alive(now) && old.address != address {
            return Err(ServerError::Config(format!(
                "a pivot named '{}' at {} beat {} s ago: give each pivot its own --pivot-name (or wait {} s if that one is gone)",
                old.name,
                old.address,
                now - old.seen_at,
                crate::registry::PIVOT_DEAD_AFTER
            )));
        }
    }
    registry.register_pivot(&config.pivot_name, &address, &host_key, &boot, now).await?;
    for other in registry.pivots().await? {
        if other.name != config.pivot_name && other.alive(now) && other.host_key != host_key {
            warn!(
                peer = %other.name,
                "pivot '{}' has another host key: devices and operators pin one key, so copy host_key and host_key.pub from one pivot to every other",
                other.name
            );
        }
    }
    registry.clear_tunnels(&config.pivot_name).await?;
    // Changes other pivots and admin commands make, as they commit
    // (PostgreSQL); SQLite is polled instead.
    let changes = registry.listen().await?;
    if let Some(addr) = &config.advertise {
        registry.set_meta(admin::ADVERTISE_KEY, addr).await?;
    }
    let peers = ssh::peers::Peers::new(&config.pivot_name, key.clone(), config.keepalive_interval);
    let (signal, driver) = match &config.signal {
        Some(sc) => {
            let (s, driver) = signal::setup(sc.clone(), key.clone(), &config.pivot_name, &config.data_dir)?;
            (Some(Arc::new(s)), Some(driver))
        }
        None => (None, None),
    };
    // Enrollment tokens (made here or by a local admin command) carry the
    // certificate pin devices need for this pivot's MQTT listener.
    if signal.as_ref().is_some_and(|s| s.hub().is_some()) {
        // Devices' presence lives in this process now: none is connected yet.
        registry.clear_presence().await?;
    }
    let pin = signal.as_ref().and_then(|s| s.certificate_pin()).map(|p| p.to_string()).unwrap_or_default();
    registry.set_meta(admin::MQTT_FINGERPRINT_KEY, &pin).await?;
    let range = format!("{}-{}", config.lease_range.start(), config.lease_range.end());
    registry.set_meta(admin::LEASE_RANGE_KEY, &range).await?;
    registry.set_meta(admin::LEASE_GATEWAY_KEY, config.lease_gateway_ports.name()).await?;
    let (ssh, ssh_lists) = ssh::ssh_config(&config, key).map_err(ServerError::Config)?;
    // The audit writer outlives the connections: it stops after the drain.
    let audit_stop = CancellationToken::new();
    let audit_tasks = TaskTracker::new();
    let audit = audit::Audit::start(
        registry.clone(),
        config.pivot_name.clone(),
        config.audit_retention,
        config.audit_log.clone(),
        audit_stop.clone(),
        &audit_tasks,
    );
    let bans = bans::Bans::new(config.bans.clone());
    bans.reload(watch::active_bans(&registry).await.unwrap_or_default());
    let shared = Arc::new(Shared {
        preauth: limits::PreAuth::new(&config.limits),
        admin_buffered: Default::default(),
        bans,
        audit,
        boot,
        ssh_lists,
        connections: Arc::new(tokio::sync::Semaphore::new(config.max_connections)),
        config,
        registry,
        router: router::Router::default(),
        tracker: TaskTracker::new(),
        next_conn: AtomicU64::new(1),
        signal,
        host_key,
        metrics: Default::default(),
        leases: Default::default(),
        peers,
        clock_offset,
        certificates: Default::default(),
        nudging: Default::default(),
        nudge_again: Default::default(),
    });
    leases::sync(&shared, &shutdown).await;
    if let Some(driver) = driver {
        signal::spawn(&shared, driver, listeners.mqtt, &shutdown)?;
    }

    shared.tracker.spawn(watch::watch(shared.clone(), changes, shutdown.clone()));
    shared.tracker.spawn(watch::heartbeat(shared.clone(), shutdown.clone()));
    if let Some(http) = listeners.http {
        shared.tracker.spawn(metrics::serve(shared.clone(), http, shutdown.clone()));
    }
    let shards = shards::Shards::start(shared.config.ssh_threads).map_err(ServerError::Threads)?;
    ssh::accept::serve(shared.clone(), listeners.ssh, ssh, &shards, shutdown.clone()).await;

    info!("shutting down");
    shared.tracker.close();
    if tokio::time::timeout(shared.config.drain_timeout, shared.tracker.wait()).await.is_err() {
        warn!("connections still open after {:?}; exiting anyway", shared.config.drain_timeout);
    }
    shards.stop().await;
    audit_stop.cancel();
    audit_tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(5), audit_tasks.wait()).await;
    shared.registry.clear_tunnels(&shared.config.pivot_name).await?;
    shared.registry.unregister_pivot(&shared.config.pivot_name, &shared.boot).await?;
    shared.registry.close().await;
    Ok(())
}
