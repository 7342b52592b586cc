//! An operator asked for `device:port`: find the device's tunnel and open a
//! `forwarded-tcpip` channel on it, or say exactly why not.

use std::sync::Arc;

use burrow_core::time::format_unix;
use burrow_core::Id;
use russh::server::{ChannelOpenHandle, Msg};
use russh::{Channel, ChannelOpenFailure};
use tracing::{info, warn};

use super::relay::relay;
use crate::router::Tunnel;
use crate::Shared;

/// Why a channel was not opened. The text reaches the operator's ssh client
/// verbatim, so it names the device and the reason.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Refusal {
    #[error("unknown device '{0}'")]
    Unknown(String),
    #[error("device '{id}' is offline ({})", last_seen_text(*.last_seen))]
    Offline { id: Id, last_seen: Option<i64> },
    #[error("device '{id}' does not expose port {port}")]
    PortNotExposed { id: Id, port: u32 },
    #[error("device '{id}' could not connect to its port {port}: {reason}")]
    DeviceRefused { id: Id, port: u32, reason: String },
    #[error("device '{id}' tunnel failed: {reason}")]
    TunnelFailed { id: Id, reason: String },
    #[error("devices may not open connections through the pivot")]
    DeviceForbidden,
    #[error("the pivot has no shell; reach a device with: ssh -J <pivot> <device-id>")]
    NoShell,
    #[error("registry unavailable; try again")]
    Registry,
    #[error("device '{id}' did not answer within {secs}s")]
    NoAnswer { id: Id, secs: u64 },
    #[error("device '{id}' could not connect to the pivot: {reason}")]
    CouldNotConnect { id: Id, reason: String },
    #[error("signaling unavailable: {0}")]
    Signaling(String),
}

fn last_seen_text(t: Option<i64>) -> String {
    match t {
        Some(t) => format!("last seen {}", format_unix(t)),
        None => "never connected".to_string(),
    }
}

impl Refusal {
    pub(crate) fn into_failure(self) -> ChannelOpenFailure {
        let code = match self {
            Refusal::DeviceForbidden | Refusal::NoShell => ChannelOpenFailure::AdministrativelyProhibited.code(),
            Refusal::Registry => ChannelOpenFailure::ResourceShortage.code(),
            _ => ChannelOpenFailure::ConnectFailed.code(),
        };
        ChannelOpenFailure::Other { code, reason: self.to_string() }
    }
}

pub(crate) struct Request {
    pub operator: Id,
    pub host: String,
    pub port: u32,
    pub originator: (String, u32),
}

/// Resolves the request, then relays until the channel closes.
pub(crate) async fn open_for_operator(
    shared: Arc<Shared>,
    req: Request,
    channel: Channel<Msg>,
    reply: ChannelOpenHandle,
) {
    let (id, tunnel) = match resolve(&shared, &req).await {
        Ok(found) => found,
        Err(refusal) => {
            info!(operator = %req.operator, host = %req.host, port = req.port, "refused: {refusal}");
            reply.reject(refusal.into_failure()).await;
            return;
        }
    };
    let (orig_addr, orig_port) = req.originator;
    let device_channel =
        match tunnel.handle.channel_open_forwarded_tcpip(id.as_str(), req.port, orig_addr, orig_port).await {
            Ok(ch) => ch,
            Err(e) => {
                let refusal = match e {
                    russh::Error::ChannelOpenFailure(f) => {
                        Refusal::DeviceRefused { id: id.clone(), port: req.port, reason: f.description().to_string() }
                    }
                    other => Refusal::TunnelFailed { id: id.clone(), reason: other.to_string() },
                };
                warn!(operator = %req.operator, device = %id, port = req.port, "refused: {refusal}");
                reply.reject(refusal.into_failure()).await;
                return;
            }
        };
    let _active = tunnel.activity.enter();
    reply.accept().await;
    info!(operator = %req.operator, device = %id, port = req.port, "channel open");
    relay(channel, device_channel).await;
    info!(operator = %req.operator, device = %id, port = req.port, "channel closed");
}

async fn resolve(shared: &Shared, req: &Request) -> Result<(Id, Tunnel), Refusal> {
    let name = strip_suffix(&req.host, &shared.config.host_suffix);
    let id = Id::parse(name).map_err(|_| Refusal::Unknown(name.to_string()))?;
    if let Some(tunnel) = shared.router.tunnel(&id) {
        if tunnel.ports.contains(&req.port) {
            return Ok((id, tunnel));
        }
        return Err(Refusal::PortNotExposed { id, port: req.port });
    }
    let dev = match shared.registry.device(&id).await {
        Ok(Some(dev)) => dev,
        Ok(None) => return Err(Refusal::Unknown(id.to_string())),
        Err(e) => {
            warn!(error = %e, "registry lookup failed");
            return Err(Refusal::Registry);
        }
    };
    let Some(signal) = &shared.signal else {
        return Err(Refusal::Offline { id, last_seen: dev.last_seen });
    };
    if let Some(why) = signal.unavailable() {
        return Err(Refusal::Signaling(why));
    }
    match signal.presence(&id) {
        Some(seen) if seen.online => {}
        seen => {
            let heard = seen.and_then(|s| s.at);
            let last_seen = dev.last_seen.max(heard);
            return Err(Refusal::Offline { id, last_seen });
        }
    }
    let tunnel = signal.wake(shared, &id, req.port).await?;
    Ok((id, tunnel))
}

/// `cam-42.burrow` and `cam-42` name the same device.
fn strip_suffix<'a>(host: &'a str, suffix: &str) -> &'a str {
    if suffix.is_empty() {
        return host;
    }
    host.strip_suffix(suffix).and_then(|h| h.strip_suffix('.')).filter(|h| !h.is_empty()).unwrap_or(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_texts_are_exact() {
        let id = Id::parse("cam-42").unwrap();
        assert_eq!(Refusal::Unknown("cam-42".into()).to_string(), "unknown device 'cam-42'");
        assert_eq!(
            Refusal::Offline { id: id.clone(), last_seen: Some(1_795_428_251) }.to_string(),
            "device 'cam-42' is offline (last seen 2026-11-23T10:04:11Z)"
        );
        assert_eq!(
            Refusal::Offline { id: id.clone(), last_seen: None }.to_string(),
            "device 'cam-42' is offline (never connected)"
        );
        assert_eq!(Refusal::PortNotExposed { id, port: 8080 }.to_string(), "device 'cam-42' does not expose port 8080");
    }

    #[test]
    fn suffix_is_optional() {
        assert_eq!(strip_suffix("cam-42.burrow", "burrow"), "cam-42");
        assert_eq!(strip_suffix("cam-42", "burrow"), "cam-42");
        assert_eq!(strip_suffix("burrow", "burrow"), "burrow");
        assert_eq!(strip_suffix("cam-42xburrow", "burrow"), "cam-42xburrow");
    }
}
