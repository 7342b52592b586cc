//! The burrow agent: runs on a device, dials the pivot and serves the
//! reverse tunnel to the device's own services.
//!
//! # Layout
//! - [`Config`] and [`run`]: the reconnect loop, until shutdown.
//! - `session`: one SSH connection to the pivot: host-key check, auth, forwards.
//! - `forward`: serving a `forwarded-tcpip` channel by connecting to a local target.
//! - `on_demand`: waiting on MQTT for signed wake requests, one tunnel per request.
//! - [`enroll`]: joining with a token, rotating the device key.
//! - [`pivot_client`]: one-off admin requests to the pivot over SSH.
//! - `backoff`: jittered exponential backoff.

mod backoff;
pub mod enroll;
mod forward;
mod on_demand;
pub mod pivot_client;
mod session;
pub mod tls;

use std::sync::Arc;
use std::time::{Duration, Instant};

use burrow_core::mqtt_url::{MqttUrl, TlsFiles};
use burrow_core::signal::Topics;
use burrow_core::{Expose, HostKeyPin, Id};
use russh::keys::PrivateKey;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

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
}

/// Runs until `shutdown`: on demand when signaling is configured, otherwise
/// holding a permanent tunnel.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), AgentError> {
    if config.signal.is_some() {
        return on_demand::run(Arc::new(config), shutdown).await;
    }
    let server = config.server.clone().ok_or(AgentError::NoServer)?;
    always_on(Arc::new(config), &server, shutdown).await;
    Ok(())
}

/// Holds the tunnel up, reconnecting with backoff, until `shutdown`.
async fn always_on(config: Arc<Config>, server: &str, shutdown: CancellationToken) {
    let mut backoff = backoff::Backoff::new(config.backoff_initial, config.backoff_max);
    loop {
        info!(server, device = %config.id, "connecting");
        let started = Instant::now();
        match session::hold(config.clone(), server, &shutdown).await {
            Ok(()) if shutdown.is_cancelled() => {
                info!("stopped");
                return;
            }
            Ok(()) => info!("connection to the pivot closed"),
            Err(e) => error!("{}", error_chain(&e)),
        }
        if started.elapsed() >= config.stable_after {
            backoff.reset();
        }
        let delay = backoff.next_delay();
        info!("reconnecting in {:.1}s", delay.as_secs_f64());
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.cancelled() => {
                info!("stopped");
                return;
            }
        }
    }
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
