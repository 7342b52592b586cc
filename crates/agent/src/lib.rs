//! The burrow agent: runs on a device, dials the pivot and serves the
//! reverse tunnel to the device's own services.
//!
//! # Layout
//! - [`Config`] and [`run`]: the reconnect loop, until shutdown.
//! - `session`: one SSH connection to the pivot: host-key check, auth, forwards.
//! - `forward`: serving a `forwarded-tcpip` channel by connecting to a local target.
//! - `backoff`: jittered exponential backoff.

mod backoff;
mod forward;
mod session;

use std::sync::Arc;
use std::time::{Duration, Instant};

use burrow_core::{Expose, HostKeyPin, Id};
use russh::keys::PrivateKey;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

pub use session::SessionError;

#[derive(Debug, Clone)]
pub struct Config {
    /// The pivot, `HOST:PORT`.
    pub server: String,
    pub id: Id,
    pub key: Arc<PrivateKey>,
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
}

impl Config {
    pub fn new(
        server: String,
        id: Id,
        key: PrivateKey,
        pivot_host_key: HostKeyPin,
        expose: Vec<Expose>,
    ) -> Self {
        Config {
            server,
            id,
            key: Arc::new(key),
            pivot_host_key,
            expose,
            keepalive_interval: Duration::from_secs(30),
            keepalive_max: 3,
            connect_timeout: Duration::from_secs(15),
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            stable_after: Duration::from_secs(60),
        }
    }
}

/// Holds the tunnel up, reconnecting with backoff, until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) {
    let config = Arc::new(config);
    let mut backoff = backoff::Backoff::new(config.backoff_initial, config.backoff_max);
    loop {
        info!(server = %config.server, device = %config.id, "connecting");
        let started = Instant::now();
        match session::hold(config.clone(), &shutdown).await {
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
