//! An operator asked for `device:port`: find the device's tunnel and open a
//! `forwarded-tcpip` channel on it, or say exactly why not.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use burrow_core::rpc::{allowed, Selector};
use burrow_core::text::excerpt;
use burrow_core::Id;
use russh::server::{ChannelOpenHandle, Msg};
use russh::Channel;
use std::time::Instant;
use tracing::{info, warn};

use crate::audit::AuditRecord;

use super::relay::relay;
pub(crate) use crate::refusal::Refusal;
use crate::registry::PivotRecord;
use crate::router::{ActivityGuard, Tunnel};
use crate::Shared;

pub(crate) struct Request {
    pub operator: Id,
    pub host: String,
    pub port: u32,
    pub originator: (String, u32),
    pub peer: std::net::SocketAddr,
    pub conn: u64,
}

impl Request {
    fn audit(&self, shared: &Shared, event: &str) -> AuditRecord {
        let mut rec = AuditRecord::new(event);
        rec.source = Some(self.peer.to_string());
        rec.session = Some(shared.session_id(self.conn));
        rec.operator = Some(self.operator.to_string());
        rec.target = Some(format!("{}:{}", excerpt(&self.host, 80), self.port));
        rec
    }
}

/// Where a device's tunnel is.
pub(crate) enum Route {
    /// On this pivot.
    Local(Tunnel),
    /// On this other pivot, alive: relay through it.
    Peer(PivotRecord),
}

/// A channel to the device, and what keeps its tunnel counted as busy.
enum Opened {
    Local(Channel<Msg>, ActivityGuard),
    Peer(Channel<russh::client::Msg>, String),
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
    let (id, opened) = loop {
        attempts += 1;
        let (id, route) = match resolve(&shared, &req).await {
            Ok(found) => found,
            Err(refusal) => {
                info!(operator = %req.operator, peer = %req.peer, conn = req.conn, host = %excerpt(&req.host, 80), port = req.port, "refused: {refusal}");
                refused(&shared, &req, reply, refusal).await;
                return;
            }
        };
        let tunnel = match route {
            Route::Local(tunnel) => tunnel,
            Route::Peer(pivot) => {
                match shared.peers.open(&pivot, &id, req.port, (orig_addr.clone(), orig_port)).await {
                    Ok(ch) => break (id, Opened::Peer(ch, pivot.name)),
                    Err(refusal) => {
                        warn!(operator = %req.operator, peer = %req.peer, conn = req.conn, device = %id, port = req.port, via = %pivot.name, "refused: {refusal}");
                        refused(&shared, &req, reply, refusal).await;
                        return;
                    }
                }
            }
        };
        let opened =
            tunnel.handle.channel_open_forwarded_tcpip(id.as_str(), req.port, orig_addr.clone(), orig_port).await;
        let refusal = match opened {
            Ok(ch) => break (id, Opened::Local(ch, tunnel.activity.enter())),
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
        warn!(operator = %req.operator, peer = %req.peer, conn = req.conn, device = %id, port = req.port, "refused: {refusal}");
        refused(&shared, &req, reply, refusal).await;
        return;
    };
    reply.accept().await;
    let started = Instant::now();
    let via = match &opened {
        Opened::Local(..) => None,
        Opened::Peer(_, pivot) => Some(pivot.clone()),
    };
    info!(operator = %req.operator, peer = %req.peer, conn = req.conn, device = %id, port = req.port, via = via.as_deref().unwrap_or("-"), "channel open");
    let mut rec = req.audit(&shared, "channel_open").outcome(true, None);
    rec.device = Some(id.to_string());
    rec.via = via;
    rec.started = Some(rec.at);
    let opened_at = rec.at;
    shared.audit.record(rec);
    let m = &shared.metrics;
    m.channels_opened.fetch_add(1, Ordering::Relaxed);
    let (up, down) = match opened {
        Opened::Local(device_channel, _active) => {
            relay(channel, device_channel, &m.bytes_to_device, &m.bytes_to_operator).await
        }
        Opened::Peer(device_channel, _) => {
            m.channels_relayed.fetch_add(1, Ordering::Relaxed);
            relay(channel, device_channel, &m.bytes_to_device, &m.bytes_to_operator).await
        }
    };
    m.channels_closed.fetch_add(1, Ordering::Relaxed);
    let ms = started.elapsed().as_millis() as u64;
    info!(
        operator = %req.operator, peer = %req.peer, conn = req.conn, device = %id, port = req.port,
        bytes_to_device = up, bytes_to_operator = down, duration_ms = ms,
        "channel closed"
    );
    let mut rec = req.audit(&shared, "channel_close");
    rec.device = Some(id.to_string());
    rec.started = Some(opened_at);
    rec.ended = Some(rec.at);
    rec.bytes_to_device = Some(up);
    rec.bytes_to_operator = Some(down);
    shared.audit.record(rec);
}

/// A peer pivot relays an operator's channel (checked there) to a device
/// whose tunnel this pivot holds. Only a tunnel held here is used: no
/// wake-up, no further relay.
pub(crate) async fn open_for_peer(
    shared: Arc<Shared>,
    pivot: Id,
    host: String,
    port: u32,
    originator: (String, u32),
    channel: Channel<Msg>,
    reply: ChannelOpenHandle,
) {
    let me = &shared.config.pivot_name;
    let name = strip_suffix(&host, &shared.config.host_suffix);
    let found = match Id::parse(name) {
        Err(_) => Err(Refusal::Unknown(excerpt(name, 80))),
        Ok(id) => match shared.router.tunnel(&id) {
            Some(t) if t.ports.contains(&port) => Ok((id, t)),
            Some(_) => Err(Refusal::PortNotExposed { id, port }),
            None => {
                Err(Refusal::TunnelFailed { reason: format!("its tunnel is no longer on pivot '{me}'; retry"), id })
            }
        },
    };
    let (id, tunnel) = match found {
        Ok(found) => found,
        Err(refusal) => {
            info!(via = %pivot, host = %excerpt(&host, 80), port, "relay refused: {refusal}");
            refuse(&shared, reply, refusal).await;
            return;
        }
    };
    let device_channel =
        match tunnel.handle.channel_open_forwarded_tcpip(id.as_str(), port, originator.0, originator.1).await {
            Ok(ch) => ch,
            Err(e) => {
                let refusal = match e {
                    russh::Error::ChannelOpenFailure(f) => {
                        Refusal::DeviceRefused { id: id.clone(), port, reason: f.description().to_string() }
                    }
                    other => Refusal::TunnelFailed { id: id.clone(), reason: other.to_string() },
                };
                info!(via = %pivot, device = %id, port, "relay refused: {refusal}");
                refuse(&shared, reply, refusal).await;
                return;
            }
        };
    let _active = tunnel.activity.enter();
    reply.accept().await;
    info!(via = %pivot, device = %id, port, "relayed channel open");
    let m = &shared.metrics;
    let (up, down) = relay(channel, device_channel, &m.bytes_to_device, &m.bytes_to_operator).await;
    info!(via = %pivot, device = %id, port, bytes_to_device = up, bytes_to_operator = down, "relayed channel closed");
}

/// Refuses and audits an operator's channel.
async fn refused(shared: &Shared, req: &Request, reply: ChannelOpenHandle, refusal: Refusal) {
    let mut rec = req.audit(shared, "channel_refused").outcome(false, Some(refusal.to_string()));
    if let Refusal::NotAllowed(id) | Refusal::Offline { id, .. } | Refusal::Revoked(id) = &refusal {
        rec.device = Some(id.to_string());
    }
    shared.audit.record(rec);
    refuse(shared, reply, refusal).await;
}

/// Rejects an operator's channel with `refusal`'s text, counted by reason.
pub(crate) async fn refuse(shared: &Shared, reply: ChannelOpenHandle, refusal: Refusal) {
    shared.metrics.refused(refusal.kind());
    reply.reject(refusal.into_failure()).await;
}

async fn resolve(shared: &Shared, req: &Request) -> Result<(Id, Route), Refusal> {
    let name = strip_suffix(&req.host, &shared.config.host_suffix);
    let id = match Id::parse(name) {
        Ok(id) => id,
        Err(_) => return Err(Refusal::Unknown(excerpt(name, 80))),
    };
    check_allowed(shared, &req.operator, &id).await?;
    device_tunnel(shared, id, req.port, &|event| req.audit(shared, event)).await
}

/// The tunnel of device `id` exposing `port`: on this pivot, on another
/// live pivot of the registry, or this pivot's after waking the device if
/// it sleeps; `audit` makes the record of a wake-up.
pub(crate) async fn device_tunnel(
    shared: &Shared,
    id: Id,
    port: u32,
    audit: &(dyn Fn(&str) -> AuditRecord + Sync),
) -> Result<(Id, Route), Refusal> {
    if let Some(tunnel) = shared.router.tunnel(&id) {
        if tunnel.ports.contains(&port) {
            return Ok((id, Route::Local(tunnel)));
        }
        return Err(Refusal::PortNotExposed { id, port });
    }
    let dev = match shared.registry.device(&id).await {
        Ok(Some(dev)) => dev,
        // Operators limited by labels were refused above, so naming a
        // near-miss id tells them nothing they may not see.
        Ok(None) => {
            return Err(match shared.registry.near_miss(id.as_str()).await {
                Ok(Some(near)) => Refusal::UnknownNear { id: id.to_string(), near },
                _ => Refusal::Unknown(id.to_string()),
            })
        }
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
    if let Some(pivot) = holding_peer(shared, &dev).await {
        if !dev.ports.contains(&port) {
            return Err(Refusal::PortNotExposed { id, port });
        }
        return Ok((id, Route::Peer(pivot)));
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
    let woken = signal.wake(shared, &id, port).await;
    let mut rec = audit("wake").outcome(woken.is_ok(), woken.as_ref().err().map(|r| r.to_string()));
    rec.device = Some(id.to_string());
    shared.audit.record(rec);
    Ok((id, Route::Local(woken?)))
}

/// The other pivot holding the device's tunnel, if its record names one
/// that is alive. A dead pivot's records are cleared by the survivors
/// within seconds; until then the device is treated as not connected.
async fn holding_peer(shared: &Shared, dev: &crate::registry::DeviceRecord) -> Option<PivotRecord> {
    let name = dev.tunnel_pivot.as_deref().filter(|p| *p != shared.config.pivot_name)?;
    match shared.registry.pivot(name).await {
        Ok(Some(pivot)) if pivot.alive(shared.registry_now()) => Some(pivot),
        Ok(_) => None,
        Err(e) => {
            warn!(error = %e, "registry lookup failed");
            None
        }
    }
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
    // An id that does not exist gets the same refusal as one that is not
    // allowed: a restricted operator must not learn what else is registered.
    match reg.device(id).await.map_err(|_| Refusal::Registry)? {
        Some(dev) if allowed(&selectors, &dev.labels) => Ok(()),
        _ => Err(Refusal::NotAllowed(id.clone())),
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
