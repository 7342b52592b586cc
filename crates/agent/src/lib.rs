//! The burrow agent: runs on a device, dials the pivot and serves the
//! reverse tunnel to the device's own services.
//!
//! # Layout
//! - [`Config`] and [`run`]: the reconnect loop, until shutdown; [`Event`]s
//!   for whatever watches it.
//! - `session`: one SSH connection to the pivot: host-key check, auth, forwards.
//! - `forward`: serving a `forwarded-tcpip` channel by connecting to a local target.
//! - `on_demand`: waiting on MQTT for signed wake requests, one tunnel per request.
//! - [`enroll`]: joining with a token, rotating the device key.
//! - [`pivot_client`]: one-off admin requests to the pivot over SSH.
//! - [`trust`]: operator certificates: the CA keys, revoked keys and labels
//!   sshd reads, the `principals` answer, and the sshd drop-in.
//! - `backoff`: jittered exponential backoff.
//! - [`status`]: the state `burrow agent status` reads.

mod backoff;
#[cfg(feature = "cli")]
pub mod cli;
pub mod enroll;
mod forward;
mod host_keys;
mod on_demand;
pub mod pivot_client;
mod session;
pub mod status;
pub mod tls;
pub mod trust;

use std::sync::Arc;
use std::time::{Duration, Instant};

use burrow_core::mqtt_url::{MqttUrl, TlsFiles};
use burrow_core::signal::Topics;
use burrow_core::{Expose, HostKeyPin, Id};
use russh::keys::PrivateKey;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info};

pub use session::SessionError;

/// How the agent waits for wake-ups.
#[derive(Debug, Clone)]
pub struct SignalConfig {
    pub url: MqttUrl,
    pub tls: TlsFiles,
    pub topics: Topics,
    /// Defaults to the device id.
    pub username: Option<String>,
    /// Defaults to a login token signed with the device key (what the
    /// embedded broker expects).
    pub password: Option<String>,
    /// For `mqtts://`: trust only this certificate (a pivot's embedded
    /// broker) instead of the CA in `tls`.
    pub pin: Option<burrow_core::mqtt_url::CertPin>,
}

#[derive(Debug, Clone)]
pub struct Config {
    /// The pivot, `HOST:PORT`, for always-on mode. On demand, each wake
    /// request names the pivot to dial.
    pub server: Option<String>,
    /// Other pivots (behind one host key) to fail over to, in order, when
    /// `server` cannot be reached.
    pub fallbacks: Vec<String>,
    pub id: Id,
    pub key: Arc<PrivateKey>,
    /// Where `key` came from; re-read before each connection so a rotated
    /// key takes effect without a restart.
    pub key_path: Option<std::path::PathBuf>,
    pub pivot_host_key: HostKeyPin,
    pub expose: Vec<Expose>,
    /// Keepalive period; `keepalive_max` missed in a row means reconnect.
    pub keepalive_interval: Duration,
    pub keepalive_max: usize,
    pub connect_timeout: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// A connection that lasted this long resets the backoff.
    pub stable_after: Duration,
    /// Wait on MQTT and dial only when asked; `None` keeps a permanent tunnel.
    pub signal: Option<SignalConfig>,
    /// The wait after a refusal that retrying will not fix (revoked, unknown
    /// key, wrong pin): under the pivot's ban threshold of 5 failures in 10 minutes.
    pub refused_retry: Duration,
    /// Where to keep the agent's status for `burrow agent status`.
    pub status_path: Option<std::path::PathBuf>,
    /// Serve `/healthz` over HTTP here.
    pub health_listen: Option<std::net::SocketAddr>,
    /// When the tunnel comes up, read the host keys of the sshd behind port
    /// 22 and report them to the pivot (on by default). Off only for load
    /// tests whose thousands of agents front one stand-in listener.
    pub scan_host_keys: bool,
    /// The files sshd reads to let operators in with certificates (CA keys,
    /// revoked keys, labels) are here. An agent running as root, with this
    /// dir root's alone, fetches and writes them on every connection
    /// (before the tunnel carries any login), every `trust_refresh` while
    /// connected and when the pivot nudges; any other agent never writes
    /// them and at those times touches `trust-refresh` next to its status
    /// file instead, for root's `burrow-trust.path` to refresh them: on a
    /// nudge always, otherwise only when root's last refresh is older than
    /// half of `trust_refresh`, and at most once in 10 s.
    /// `None`: the device does not trust the pivot's CA.
    pub trust_dir: Option<std::path::PathBuf>,
    /// How often a connected agent fetches the trust again (±10%).
    pub trust_refresh: Duration,
    /// Told when the tunnel comes up and when a connection ends, e.g. by a
    /// load test counting failures by cause. The log and the status file
    /// say the same for people.
    pub on_event: Option<EventHook>,
}

/// What the agent tells [`Config::on_event`].
#[derive(Debug)]
pub enum Event<'a> {
    /// The tunnel is up: authenticated, and every exposed port forwarded.
    TunnelUp,
    /// A connection to the pivot ended, other than by shutdown. `up` says
    /// whether its tunnel had come up (if not, the handshake failed);
    /// `error` is why, `None` when the pivot closed the connection.
    Ended { up: bool, error: Option<&'a SessionError> },
}

/// A callback for [`Event`]s. It runs on the agent's task: return quickly.
#[derive(Clone)]
pub struct EventHook(pub Arc<dyn Fn(Event<'_>) + Send + Sync>);

impl std::fmt::Debug for EventHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EventHook")
    }
}

impl Config {
    pub fn new(
        server: Option<String>,
        id: Id,
        key: PrivateKey,
        pivot_host_key: HostKeyPin,
        expose: Vec<Expose>,
    ) -> Self {
        Config {
            server,
            fallbacks: Vec::new(),
            id,
            key: Arc::new(key),
            key_path: None,
            pivot_host_key,
            expose,
            keepalive_interval: Duration::from_secs(30),
            keepalive_max: 3,
            connect_timeout: Duration::from_secs(15),
            backoff_initial: Duration::from_secs(1),
            // A device should be back within seconds of its pivot; jitter
            // still spreads a fleet's reconnects.
            backoff_max: Duration::from_secs(15),
            stable_after: Duration::from_secs(60),
            signal: None,
            refused_retry: Duration::from_secs(180),
            status_path: None,
            health_listen: None,
            scan_host_keys: true,
            trust_dir: None,
            trust_refresh: Duration::from_secs(3600),
            on_event: None,
        }
    }
}

impl Config {
    /// The device key as it is on disk now (after a rotation), or as loaded.
    pub fn current_key(&self) -> Arc<PrivateKey> {
        if let Some(path) = &self.key_path {
            match russh::keys::load_secret_key(path, None) {
                Ok(k) => return Arc::new(k),
                Err(e) => {
                    tracing::warn!(key = %path.display(), error = %e, "cannot re-read the device key; using the loaded one")
                }
            }
        }
        self.key.clone()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("always-on mode needs --server HOST:PORT")]
    NoServer,
    #[error("cannot read the MQTT TLS files")]
    Tls(#[source] std::io::Error),
    #[error("cannot listen for /healthz on {0}")]
    Health(std::net::SocketAddr, #[source] std::io::Error),
}

/// Runs until `shutdown`: on demand when signaling is configured, otherwise
/// holding a permanent tunnel.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), AgentError> {
    let mode = if config.signal.is_some() { "on-demand" } else { "always-on" };
    let status = Arc::new(status::StatusFile::new(config.status_path.clone(), config.id.as_str(), mode));
    if let Some(addr) = config.health_listen {
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| AgentError::Health(addr, e))?;
        info!(%addr, "serving /healthz");
        if !addr.ip().is_loopback() {
            tracing::warn!(%addr, "/healthz on a non-loopback address: anyone who reaches it reads the agent's state");
        }
        tokio::spawn(status::serve_health(listener, status.clone(), shutdown.clone()));
    }
    let trust = config
        .trust_dir
        .clone()
        .map(|dir| Arc::new(trust::Keeper::new(dir, config.status_path.as_deref(), config.trust_refresh)));
    let result = if config.signal.is_some() {
        on_demand::run(Arc::new(config), shutdown, status.clone(), trust).await
    } else {
        let server = config.server.clone().ok_or(AgentError::NoServer)?;
        let mut pivots = vec![server];
        pivots.extend(config.fallbacks.iter().cloned());
        always_on(Arc::new(config), &pivots, shutdown, &status, trust.as_deref()).await;
        Ok(())
    };
    status.set(status::State::Stopped, None, None);
    result
}

/// Holds the tunnel up, reconnecting with backoff, until `shutdown`. With
/// several pivots, a lost or unreachable one is followed at once by the
/// next; the backoff applies once every pivot has been tried.
async fn always_on(
    config: Arc<Config>,
    given: &[String],
    shutdown: CancellationToken,
    status: &status::StatusFile,
    trust: Option<&trust::Keeper>,
) {
    let mut pivots = expand(given).await;
    let mut backoff = backoff::Backoff::new(config.backoff_initial, config.backoff_max);
    let mut last_refusal: Option<String> = None;
    let mut at = 0;
    let mut tried = 0;
    loop {
        let server = pivots[at].as_str();
        info!(server, device = %config.id, "connecting");
        status.set(status::State::Connecting, None, Some(server));
        let started = Instant::now();
        let mut delay = None;
        match session::hold(config.clone(), server, &shutdown, status, trust).await {
            Ok(()) if shutdown.is_cancelled() => {
                info!("stopped");
                return;
            }
            Ok(()) => {
                info!("connection to the pivot closed");
                last_refusal = None;
                tried = 0; // it was up: every pivot may be tried again at once
            }
            Err(e) if e.is_lasting() => {
                // Said once; the same refusal again is only a debug line.
                let text = error_chain(&e);
                let wait = config.refused_retry.mul_f64(rand::random_range(0.9..=1.1));
                if last_refusal.as_deref() != Some(text.as_str()) {
                    error!(
                        "{text}; this needs a fix on the device or the pivot, retrying every {:.0}s",
                        wait.as_secs_f64()
                    );
                } else {
                    debug!("still refused: {text}");
                }
                status.set(status::State::Refused, Some(text.clone()), Some(server));
                last_refusal = Some(text);
                delay = Some(wait);
            }
            Err(e) => {
                let text = error_chain(&e);
                error!("{text}");
                status.set(status::State::Retrying, Some(text), Some(server));
                last_refusal = None;
            }
        }
        if started.elapsed() >= config.stable_after {
            backoff.reset();
        }
        // Another pivot is tried at once (after a short jitter, so that a
        // fleet does not move in one wave), until each has been tried.
        if delay.is_none() && tried + 1 < pivots.len() {
            tried += 1;
            at = (at + 1) % pivots.len();
            let d = Duration::from_millis(rand::random_range(0..250));
            info!(next = %pivots[at], "trying the next pivot");
            tokio::select! {
                _ = tokio::time::sleep(d) => continue,
                _ = shutdown.cancelled() => {
                    info!("stopped");
                    return;
                }
            }
        }
        tried = 0;
        // A round is over: names are looked up again for the next one.
        pivots = expand(given).await;
        at = (at + 1) % pivots.len();
        let delay = match delay {
            Some(d) => d,
            None => {
                let d = backoff.next_delay();
                info!("reconnecting in {:.1}s", d.as_secs_f64());
                d
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.cancelled() => {
                info!("stopped");
                return;
            }
        }
    }
}

/// The pivots to try in turn: each given `HOST:PORT`, and a name with
/// several addresses as each of its addresses (so a dead pivot behind a
/// shared name costs one connect timeout, not all of them). A name that
/// does not resolve now stays as given, to fail and be retried.
async fn expand(given: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for pivot in given {
        let addrs: Vec<std::net::SocketAddr> = match tokio::net::lookup_host(pivot.as_str()).await {
            Ok(a) => a.collect(),
            Err(_) => Vec::new(),
        };
        if addrs.len() > 1 {
            out.extend(addrs.iter().map(|a| a.to_string()).filter(|a| !out.contains(a)).collect::<Vec<_>>());
        } else if !out.contains(pivot) {
            out.push(pivot.clone());
        }
    }
    out
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(cause) = src {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        src = cause.source();
    }
    s
}
