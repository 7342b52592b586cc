//! Applies registry changes to a running pivot: bans, and a removed device or operator
//! loses its open connections within one poll interval. Also keeps the
//! devices' last-seen time fresh while their tunnels stay up.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::registry::Identity;
use crate::Shared;

/// How often an open tunnel refreshes its device's `last_seen`.
const TOUCH_EVERY: Duration = Duration::from_secs(60);

pub(crate) async fn watch(shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut seen = None;
    let mut last_touch = Instant::now();
    // Tunnels (by connection) probed since they came up, and the rounds.
    let mut probed: std::collections::HashSet<u64> = Default::default();
    let mut rounds = 0u64;
    let mut seen_generation = u64::MAX;
    // One full round at a time: a slow one is not stacked on.
    let busy = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tick = tokio::time::interval(shared.config.watch_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        // Bans made by a CLI command or another pivot hold here within a tick.
        if let Some(bans) = active_bans(&shared.registry).await {
            shared.bans.reload(bans);
        }
        match shared.registry.revision().await {
            Ok(rev) if seen != Some(rev) => {
                if seen.is_some() {
                    enforce(&shared).await;
                    crate::leases::sync(&shared, &shutdown).await;
                }
                seen = Some(rev);
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "cannot read registry revision"),
        }
        // The tunnel list is read only when a tunnel came up or a round is due.
        let due = last_touch.elapsed() >= TOUCH_EVERY;
        let generation = shared.router.generation();
        if !due && generation == seen_generation {
            continue;
        }
        seen_generation = generation;
        let tunnels = shared.router.tunnels();
        let live: std::collections::HashSet<u64> = tunnels.iter().map(|(_, t)| t.conn).collect();
        probed.retain(|c| live.contains(c));
        if due {
            last_touch = Instant::now();
            let ids: Vec<_> = tunnels.iter().map(|(id, _)| id.clone()).collect();
            if let Err(e) = shared.registry.touch(&ids).await {
                warn!(error = %e, "cannot refresh last-seen times");
            }
            rounds += 1;
            probed.extend(live);
            if !busy.swap(true, std::sync::atomic::Ordering::AcqRel) {
                let (s, busy) = (shared.clone(), busy.clone());
                let targets = rounds.is_multiple_of(5);
                shared.tracker.spawn(async move {
                    crate::health::probe_all(&s, tunnels, targets).await;
                    busy.store(false, std::sync::atomic::Ordering::Release);
                });
            }
        } else {
            // A new tunnel is checked at once, its targets too.
            let fresh: Vec<_> = tunnels.into_iter().filter(|(_, t)| !probed.contains(&t.conn)).collect();
            if !fresh.is_empty() {
                probed.extend(fresh.iter().map(|(_, t)| t.conn));
                let s = shared.clone();
                shared.tracker.spawn(async move { crate::health::probe_all(&s, fresh, true).await });
            }
        }
    }
}

/// Disconnects every session whose key no longer maps to the same identity.
pub(crate) async fn enforce(shared: &Shared) {
    enforce_mqtt(shared).await;
    for (conn, session) in shared.router.sessions() {
        let now = match shared.registry.identify(&session.fingerprint).await {
            Ok(now) => now,
            Err(e) => {
                warn!(error = %e, "cannot re-check sessions");
                return;
            }
        };
        if now.as_ref() == Some(&session.identity) {
            continue;
        }
        let why = match (&session.identity, now) {
            (Identity::Operator { name, .. }, Some(Identity::Operator { .. })) => {
                format!("operator '{name}' changed role; reconnect")
            }
            (Identity::Device(id), _) if revoked(shared, id).await => format!("device '{id}' was revoked"),
            (who, _) => format!("{who} was removed from the registry"),
        };
        info!(conn, "{why}; disconnecting");
        shared.router.remove_session(conn);
        let _ = session.handle.disconnect(russh::Disconnect::ByApplication, why, "en".into()).await;
    }
}

/// Ends MQTT sessions of devices that were revoked or removed, or whose key
/// changed, since they logged in: one registry read for all of them.
async fn enforce_mqtt(shared: &Shared) {
    let Some(hub) = shared.signal.as_ref().and_then(|s| s.hub()) else { return };
    let sessions = hub.list();
    if sessions.is_empty() {
        return;
    }
    let devices = match shared.registry.devices().await {
        Ok(d) => d,
        Err(e) => {
            warn!(error = %e, "cannot re-check MQTT sessions");
            return;
        }
    };
    let allowed: std::collections::HashMap<&str, &str> = devices
        .iter()
        .filter(|d| d.revoked_at.is_none())
        .filter_map(|d| Some((d.id.as_str(), d.fingerprint.as_deref()?)))
        .collect();
    for (id, session) in sessions {
        if allowed.get(id.as_str()) != Some(&session.fingerprint.as_str()) {
            info!(device = %id, "device revoked, removed or re-keyed; closing its MQTT session");
            session.revoke(&id);
        }
    }
}

async fn revoked(shared: &Shared, id: &burrow_core::Id) -> bool {
    matches!(shared.registry.device(id).await, Ok(Some(d)) if d.revoked_at.is_some())
}

/// The registry's bans in force, for [`crate::bans::Bans::reload`].
/// `None` if the registry could not be read (the bans in force then stay).
pub(crate) async fn active_bans(registry: &crate::Registry) -> Option<Vec<(crate::bans::IpNet, i64)>> {
    match registry.bans().await {
        Ok(list) => Some(list.iter().filter_map(|b| Some((b.net.parse().ok()?, b.until))).collect()),
        Err(e) => {
            warn!(error = %e, "cannot read bans");
            None
        }
    }
}
