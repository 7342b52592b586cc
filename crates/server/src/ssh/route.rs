//! An operator asked for `device:port`: find the device's tunnel and open a
//! `forwarded-tcpip` channel on it, or say exactly why not.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use burrow_core::rpc::{allowed, Selector};
use burrow_core::Id;
use russh::server::{ChannelOpenHandle, Msg};
use russh::Channel;
use tracing::{info, warn};

use super::relay::relay;
pub(crate) use crate::refusal::Refusal;
use crate::router::Tunnel;
use crate::Shared;

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
    let (orig_addr, orig_port) = req.originator.clone();
    // A tunnel can go away between resolving and opening (closed as idle,
    // or replaced by the device's newer connection). Then resolve once more:
    // that finds the new tunnel or wakes the device again.
    let mut attempts = 0;
    let (id, tunnel, device_channel) = loop {
        attempts += 1;
        let (id, tunnel) = match resolve(&shared, &req).await {
            Ok(found) => found,
            Err(refusal) => {
                info!(operator = %req.operator, host = %req.host, port = req.port, "refused: {refusal}");
                refuse(&shared, reply, refusal).await;
                return;
            }
        };
        let opened =
            tunnel.handle.channel_open_forwarded_tcpip(id.as_str(), req.port, orig_addr.clone(), orig_port).await;
        let refusal = match opened {
            Ok(ch) => break (id, tunnel, ch),
            Err(russh::Error::ChannelOpenFailure(f)) => {
                Refusal::DeviceRefused { id: id.clone(), port: req.port, reason: f.description().to_string() }
            }
            Err(other) => {
                let moved = shared.router.tunnel(&id).is_none_or(|now| now.conn != tunnel.conn);
                if moved && attempts < 2 {
                    info!(device = %id, error = %other, "tunnel went away while opening a channel; resolving again");
                    continue;
                }
                Refusal::TunnelFailed { id: id.clone(), reason: other.to_string() }
            }
        };
        warn!(operator = %req.operator, device = %id, port = req.port, "refused: {refusal}");
        refuse(&shared, reply, refusal).await;
        return;
    };
    let _active = tunnel.activity.enter();
    reply.accept().await;
    info!(operator = %req.operator, device = %id, port = req.port, "channel open");
    let m = &shared.metrics;
    m.channels_opened.fetch_add(1, Ordering::Relaxed);
    relay(channel, device_channel, &m.bytes_to_device, &m.bytes_to_operator).await;
    m.channels_closed.fetch_add(1, Ordering::Relaxed);
    info!(operator = %req.operator, device = %id, port = req.port, "channel closed");
}

/// Rejects an operator's channel with `refusal`'s text, counted by reason.
pub(crate) async fn refuse(shared: &Shared, reply: ChannelOpenHandle, refusal: Refusal) {
    shared.metrics.refused(refusal.kind());
    reply.reject(refusal.into_failure()).await;
}

async fn resolve(shared: &Shared, req: &Request) -> Result<(Id, Tunnel), Refusal> {
    let name = strip_suffix(&req.host, &shared.config.host_suffix);
    let id = Id::parse(name).map_err(|_| Refusal::Unknown(name.to_string()))?;
    check_allowed(shared, &req.operator, &id).await?;
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
    if dev.revoked_at.is_some() {
        return Err(Refusal::Revoked(id));
    }
    if dev.fingerprint.is_none() {
        return Err(Refusal::NotEnrolled(id));
    }
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

/// Operators limited by label selectors reach only matching devices.
async fn check_allowed(shared: &Shared, operator: &Id, id: &Id) -> Result<(), Refusal> {
    let reg = &shared.registry;
    let op = reg.operator(operator).await.map_err(|_| Refusal::Registry)?;
    let selectors: Vec<Selector> =
        op.map(|o| o.allow.iter().filter_map(|s| s.parse().ok()).collect()).unwrap_or_default();
    if selectors.is_empty() {
        return Ok(());
    }
    match reg.device(id).await.map_err(|_| Refusal::Registry)? {
        Some(dev) if allowed(&selectors, &dev.labels) => Ok(()),
        Some(_) => Err(Refusal::NotAllowed(id.clone())),
        None => Err(Refusal::Unknown(id.to_string())),
    }
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
    fn suffix_is_optional() {
        assert_eq!(strip_suffix("cam-42.burrow", "burrow"), "cam-42");
        assert_eq!(strip_suffix("cam-42", "burrow"), "cam-42");
        assert_eq!(strip_suffix("burrow", "burrow"), "burrow");
        assert_eq!(strip_suffix("cam-42xburrow", "burrow"), "cam-42xburrow");
    }
}
