//! One connection to the pivot: check its host key against the pin,
//! authenticate with the device key, refresh the operator trust (when the
//! device's sshd trusts the pivot's CA), request a forward per exposed port,
//! and serve channels until the connection ends. The trust is refreshed again
//! every `trust_refresh`, and soon after the pivot nudges: it opens a
//! channel to [`TRUST_NUDGE_HOST`] when its CA keys or revoked keys change.
//! "Refreshed" is the [`Keeper`]'s call: fetched and written by a root
//! agent, asked of root's unit by any other (which skips asking when root
//! refreshed recently, but on a nudge).

use std::sync::Arc;
use std::time::Duration;

use burrow_core::rpc::TRUST_NUDGE_HOST;
use russh::client::{self, AuthResult, ChannelOpenHandle, Msg, Session};
use russh::keys::PrivateKeyWithHashAlg;
use russh::keys::PublicKeyOrCertificate;
use russh::{Channel, ChannelOpenFailure};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::pivot_client::Pinned;
use crate::status::{State, StatusFile};
use crate::trust::{Keeper, Occasion};
use crate::{forward, Config, Event};

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("cannot reach the pivot at {server}")]
    Connect {
        server: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no answer from the pivot at {0} in time")]
    ConnectTimeout(String),
    #[error("host key mismatch: the pivot offered {got} but {expected} is pinned; refusing to connect")]
    HostKeyMismatch { expected: String, got: String },
    #[error(
        "the pivot does not know the key {fingerprint} of device '{id}': it was never registered there, or was removed"
    )]
    AuthRejected { id: String, fingerprint: String },
    #[error("the pivot refused to forward port {port} for device '{id}'")]
    ForwardRefused { id: String, port: u16 },
    /// The pivot ended the connection with a reason of its own.
    #[error("the pivot refused device '{id}': {reason}")]
    Refused { id: String, reason: String },
    #[error("ssh connection failed")]
    Ssh(#[from] russh::Error),
}

impl SessionError {
    /// A refusal that retrying soon will not fix: the device's key, id or
    /// pin is wrong, or it was revoked. Needs a person, so it is retried slowly.
    pub fn is_lasting(&self) -> bool {
        matches!(
            self,
            SessionError::HostKeyMismatch { .. }
                | SessionError::AuthRejected { .. }
                | SessionError::ForwardRefused { .. }
                | SessionError::Refused { .. }
        )
    }
}

struct AgentHandler {
    config: Arc<Config>,
    pinned: Pinned,
    /// The message of the pivot's disconnect, and whether it refused us
    /// (as opposed to, say, shutting down).
    said: Arc<std::sync::Mutex<Option<(String, bool)>>>,
    /// Told when the pivot nudges; holds at most one nudge until the
    /// connection's loop takes it.
    trust_nudged: Arc<Notify>,
}

impl client::Handler for AgentHandler {
    type Error = russh::Error;

    async fn check_server_key(&mut self, key: &PublicKeyOrCertificate) -> Result<bool, Self::Error> {
        Ok(self.pinned.check(key))
    }

    async fn disconnected(&mut self, reason: client::DisconnectReason<Self::Error>) -> Result<(), Self::Error> {
        match reason {
            client::DisconnectReason::ReceivedDisconnect(info) => {
                let text = burrow_core::text::printable(&burrow_core::text::excerpt(&info.message, 512)).into_owned();
                if !text.is_empty() {
                    let refusal = matches!(info.reason_code, russh::Disconnect::NoMoreAuthMethodsAvailable);
                    *self.said.lock().unwrap() = Some((text, refusal));
                }
                Ok(())
            }
            client::DisconnectReason::Error(e) => Err(e),
        }
    }

    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        channel: Channel<Msg>,
        connected_address: &str,
        connected_port: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if connected_address == TRUST_NUDGE_HOST {
            // A message, not a channel: the pivot expects the refusal.
            reply.reject(ChannelOpenFailure::AdministrativelyProhibited).await;
            if self.config.trust_dir.is_some() {
                debug!("the pivot says the operator trust changed");
                self.trust_nudged.notify_one();
            } else {
                debug!("the pivot says the operator trust changed; this agent keeps none");
            }
            return Ok(());
        }
        let target = self.config.expose.iter().find(|e| u32::from(e.port) == connected_port).map(|e| e.target.clone());
        tokio::spawn(forward::serve(channel, connected_port, target, reply));
        Ok(())
    }
}

fn ssh_config(config: &Config) -> Arc<client::Config> {
    Arc::new(client::Config {
        inactivity_timeout: None,
        keepalive_interval: Some(config.keepalive_interval),
        keepalive_max: config.keepalive_max,
        window_size: 2 * 1024 * 1024,
        maximum_packet_size: 32 * 1024,
        channel_buffer_size: 64,
        nodelay: true,
        ..Default::default()
    })
}

/// Holds one connection to `server` until it ends (Ok) or fails to come up
/// (Err), and tells `config.on_event`.
pub(crate) async fn hold(
    config: Arc<Config>,
    server: &str,
    shutdown: &CancellationToken,
    status: &StatusFile,
    trust: Option<&Keeper>,
) -> Result<(), SessionError> {
    let mut up = false;
    let result = connect_and_serve(config.clone(), server, shutdown, status, trust, &mut up).await;
    if let (Some(hook), false) = (&config.on_event, shutdown.is_cancelled()) {
        (hook.0)(Event::Ended { up, error: result.as_ref().err() });
    }
    result
}

async fn connect_and_serve(
    config: Arc<Config>,
    server: &str,
    shutdown: &CancellationToken,
    status: &StatusFile,
    trust: Option<&Keeper>,
    up: &mut bool,
) -> Result<(), SessionError> {
    let server = server.to_string();
    let tcp = tokio::select! {
        _ = shutdown.cancelled() => return Ok(()),
        r = tokio::time::timeout(config.connect_timeout, TcpStream::connect(&server)) => match r {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(source)) => return Err(SessionError::Connect { server, source }),
            Err(_) => return Err(SessionError::ConnectTimeout(server)),
        },
    };
    let _ = tcp.set_nodelay(true);
    let pinned = Pinned::new(config.pivot_host_key.clone());
    let mismatch = pinned.mismatch.clone();
    let said = Arc::new(std::sync::Mutex::new(None));
    let trust_nudged = Arc::new(Notify::new());
    let handler =
        AgentHandler { config: config.clone(), pinned, said: said.clone(), trust_nudged: trust_nudged.clone() };
    // The pivot's reason for refusing a key that it let in to be told why.
    let refused = |id: &crate::Id| match said.lock().unwrap().take() {
        Some((reason, true)) => Some(SessionError::Refused { id: id.to_string(), reason }),
        Some((reason, false)) => {
            info!("the pivot closed the connection: {reason}");
            None
        }
        None => None,
    };
    let connecting =
        tokio::time::timeout(config.connect_timeout, client::connect_stream(ssh_config(&config), tcp, handler));
    let mut handle = match connecting.await {
        Ok(Ok(handle)) => handle,
        Ok(Err(e)) => {
            if let Some(got) = mismatch.lock().unwrap().take() {
                return Err(SessionError::HostKeyMismatch { expected: config.pivot_host_key.fingerprint(), got });
            }
            return Err(e.into());
        }
        Err(_) => return Err(SessionError::ConnectTimeout(server)),
    };

    let current = config.current_key();
    let fingerprint = burrow_core::fingerprint(current.public_key());
    let key = PrivateKeyWithHashAlg::new(current, None);
    match handle.authenticate_publickey(config.id.as_str(), key).await {
        Ok(AuthResult::Success) => {}
        Ok(AuthResult::Failure { .. }) => {
            return Err(SessionError::AuthRejected { id: config.id.to_string(), fingerprint })
        }
        Err(e) => return Err(refused(&config.id).unwrap_or(e.into())),
    }
    // Before any forward: once the tunnel carries logins, sshd must already
    // trust a CA the pivot has just added.
    if let Some(keeper) = trust {
        tokio::select! {
            _ = keeper.refresh(&handle, config.id.as_str(), Occasion::Connect) => {}
            _ = shutdown.cancelled() => return Ok(()),
        }
    }
    for e in &config.expose {
        if handle.tcpip_forward(config.id.as_str(), u32::from(e.port)).await.is_err() {
            // A key let in only to be told why it is refused.
            if let Some(refusal) = refused(&config.id) {
                return Err(refusal);
            }
            return Err(SessionError::ForwardRefused { id: config.id.to_string(), port: e.port });
        }
    }
    let ports: Vec<u16> = config.expose.iter().map(|e| e.port).collect();
    info!(device = %config.id, ?ports, "tunnel up");
    status.set(State::Connected, None, Some(&server));
    *up = true;
    if let Some(hook) = &config.on_event {
        (hook.0)(Event::TunnelUp);
    }
    if config.scan_host_keys {
        tokio::select! {
            _ = report_host_keys(&config, &handle) => {}
            _ = shutdown.cancelled() => {}
        }
    }

    let mut trust_due = TrustSchedule::new(next_trust_refresh(&config));
    loop {
        tokio::select! {
            r = &mut handle => {
                r?;
                if let Some((why, _)) = said.lock().unwrap().take() {
                    info!("the pivot closed the tunnel: {why}");
                }
                return Ok(());
            }
            _ = shutdown.cancelled() => {
                let _ = handle.disconnect(russh::Disconnect::ByApplication, "agent stopping", "en").await;
                return Ok(());
            }
            _ = trust_nudged.notified(), if trust.is_some() => {
                let delay = rand::random_range(NUDGE_DELAY_MIN..=NUDGE_DELAY_MAX);
                if trust_due.nudge(Instant::now(), delay) {
                    debug!("fetching the operator trust in {:.0}s", delay.as_secs_f64());
                }
            }
            _ = tokio::time::sleep_until(trust_due.due()), if trust.is_some() => {
                if let Some(keeper) = trust {
                    let occasion = if trust_due.nudge_due() { Occasion::Nudge } else { Occasion::Periodic };
                    tokio::select! {
                        _ = keeper.refresh(&handle, config.id.as_str(), occasion) => {}
                        _ = shutdown.cancelled() => {}
                    }
                }
                trust_due.fetched(next_trust_refresh(&config));
            }
        }
    }
}

/// A nudged agent fetches at a random time in this range: a fleet's
/// fetches spread out, and none comes within the 2 s in which the pivot
/// refuses a second fetch on one connection.
const NUDGE_DELAY_MIN: Duration = Duration::from_secs(2);
const NUDGE_DELAY_MAX: Duration = Duration::from_secs(30);

/// When a connected agent fetches the operator trust next: `trust_refresh`
/// from now, ±10% so that a fleet connected together spreads out.
fn next_trust_refresh(config: &Config) -> Instant {
    Instant::now() + config.trust_refresh.mul_f64(rand::random_range(0.9..=1.1))
}

/// The next trust fetch on one connection: the periodic one, or sooner
/// when the pivot has nudged since the last fetch.
#[derive(Debug)]
struct TrustSchedule {
    periodic: Instant,
    nudged: Option<Instant>,
}

impl TrustSchedule {
    fn new(periodic: Instant) -> Self {
        TrustSchedule { periodic, nudged: None }
    }

    fn due(&self) -> Instant {
        self.nudged.map_or(self.periodic, |n| n.min(self.periodic))
    }

    /// Whether a nudge is what the next fetch answers (it does even when
    /// the periodic one comes first).
    fn nudge_due(&self) -> bool {
        self.nudged.is_some()
    }

    /// A nudge at `now`: a fetch `delay` later, unless one is already
    /// pending (then this nudge is part of it). Returns whether it
    /// scheduled one.
    fn nudge(&mut self, now: Instant, delay: Duration) -> bool {
        if self.nudged.is_some() {
            return false;
        }
        self.nudged = Some(now + delay);
        true
    }

    /// A fetch done: it answers every nudge before it. The next periodic
    /// one is at `next`.
    fn fetched(&mut self, next: Instant) {
        self.periodic = next;
        self.nudged = None;
    }
}

/// Tells the pivot which host keys the device's sshd (the target of port 22)
/// shows. The pivot registers them if it has none for this device and only
/// flags a different set; the device key vouches for the report.
async fn report_host_keys(config: &Config, handle: &client::Handle<AgentHandler>) {
    let Some(sshd) = config.expose.iter().find(|e| e.port == 22) else { return };
    let keys = crate::host_keys::scan(&sshd.target).await;
    if keys.is_empty() {
        tracing::warn!(target = %sshd.target, "cannot read the host keys of the device's sshd; operators may not be able to pin them");
        return;
    }
    let req = burrow_core::rpc::Request::HostKeys { keys };
    match tokio::time::timeout(std::time::Duration::from_secs(10), crate::pivot_client::call(handle, &req)).await {
        Ok(Ok(answer)) => match answer["host_keys"].as_str() {
            Some("registered") => info!("registered the device sshd's host keys with the pivot"),
            Some("changed") => tracing::warn!(
                "the device sshd's host keys differ from those the pivot has registered; an admin must accept them with `burrow device host-keys reset {}`",
                config.id
            ),
            _ => tracing::debug!("the pivot knows the device sshd's host keys"),
        },
        Ok(Err(e)) => tracing::warn!("cannot report the host keys to the pivot: {e}"),
        Err(_) => tracing::warn!("cannot report the host keys to the pivot: no answer in time"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nudges_while_a_fetch_is_pending_are_one_fetch() {
        let t0 = Instant::now();
        let hour = Duration::from_secs(3600);
        let mut s = TrustSchedule::new(t0 + hour);
        assert_eq!(s.due(), t0 + hour);
        assert!(s.nudge(t0, Duration::from_secs(20)));
        assert_eq!(s.due(), t0 + Duration::from_secs(20));
        // More nudges before that fetch: still the one fetch, not sooner.
        assert!(!s.nudge(t0 + Duration::from_secs(1), Duration::from_secs(2)));
        assert!(!s.nudge(t0 + Duration::from_secs(19), Duration::from_secs(30)));
        assert_eq!(s.due(), t0 + Duration::from_secs(20));
        assert!(s.nudge_due(), "the fetch answers a nudge: an unprivileged agent asks root whatever");
        s.fetched(t0 + 2 * hour);
        assert_eq!(s.due(), t0 + 2 * hour);
        assert!(!s.nudge_due());
        // A nudge after the fetch schedules another.
        assert!(s.nudge(t0 + Duration::from_secs(40), Duration::from_secs(5)));
        assert_eq!(s.due(), t0 + Duration::from_secs(45));
        // A periodic fetch due first answers the nudge too.
        let mut s = TrustSchedule::new(t0 + Duration::from_secs(3));
        s.nudge(t0, Duration::from_secs(10));
        assert_eq!(s.due(), t0 + Duration::from_secs(3));
        assert!(s.nudge_due());
        s.fetched(t0 + hour);
        assert_eq!(s.due(), t0 + hour);
    }
}
