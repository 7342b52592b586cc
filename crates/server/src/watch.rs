//! Applies registry changes to a running pivot: bans, and a removed device
//! or operator loses its open connections. On SQLite the registry is polled
//! every tick (one second); on PostgreSQL its triggers notify every pivot as
//! a change commits, and a slow poll backs the notifications up.
//!
//! Also keeps this pivot's heartbeat in the registry, clears the tunnel
//! records of pivots that stopped beating, and keeps the devices'
//! last-seen time fresh while their tunnels stay up.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::Receiver;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::registry::{Change, Identity};
use crate::Shared;

/// How often an open tunnel refreshes its device's `last_seen`.
const TOUCH_EVERY: Duration = Duration::from_secs(60);
/// New tunnels probed at once per tick; more wait for the regular rounds.
const FRESH_PROBES: usize = 32;
/// How often this pivot beats, well within `PIVOT_DEAD_AFTER`.
const BEAT_EVERY: Duration = Duration::from_secs(2);
/// With notifications, how often the registry is still polled, in case one was missed.
const POLL_BACKUP: Duration = Duration::from_secs(30);
/// How often tunnel records naming no registered pivot are looked for.
const ORPHANS_EVERY: Duration = Duration::from_secs(60);

pub(crate) async fn watch(shared: Arc<Shared>, mut changes: Option<Receiver<Change>>, shutdown: CancellationToken) {
    let mut seen = None;
    let mut seen_bans = None;
    let mut last_touch = Instant::now();
    let mut last_poll = Instant::now();
    // Tunnels (by connection) probed since they came up, and the rounds.
    let mut probed: std::collections::HashSet<u64> = Default::default();
    let mut rounds = 0u64;
    let mut seen_generation = u64::MAX;
    let mut seen_trust = None;
    crate::ca::nudge_if_changed(&shared, &mut seen_trust).await;
    // One full round at a time: a slow one is not stacked on.
    let busy = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tick = tokio::time::interval(shared.config.watch_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut change = None;
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
            got = next_change(&mut changes) => match got {
                Some(c) => change = Some(c),
                None => {
                    warn!("registry notifications ended; polling every {:?} instead", shared.config.watch_interval);
                    changes = None;
                }
            },
        }
        // Without notifications (SQLite), or as their backup, poll.
        let poll = changes.is_none() || last_poll.elapsed() >= POLL_BACKUP;
        if poll {
            last_poll = Instant::now();
        }
        // Bans made by a CLI command or another pivot hold here within a tick.
        if poll || matches!(change, Some(Change::Bans | Change::Unknown)) {
            if let Some(bans) = active_bans(&shared.registry).await {
                if seen_bans.as_ref() != Some(&bans) {
                    seen_bans = Some(bans.clone());
                    shared.bans.reload(bans);
                    drop_banned(&shared).await;
                }
            }
        }
        if poll || matches!(change, Some(Change::Identities | Change::Unknown)) {
            match shared.registry.revision().await {
                Ok(rev) if seen != Some(rev) => {
                    if seen.is_some() {
                        enforce(&shared).await;
                        crate::leases::sync(&shared, &shutdown).await;
                    }
                    crate::ca::nudge_if_changed(&shared, &mut seen_trust).await;
                    seen = Some(rev);
                }
                Ok(_) => {}
                Err(e) => warn!(error = %e, "cannot read registry revision"),
            }
        }
        if change.is_some() {
            continue;
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
            // A new tunnel is checked at once, its targets too; in a burst (a
            // reconnect storm) only the first few, and the rest wait for the
            // regular rounds rather than add two channels each to the storm.
            let mut fresh: Vec<_> = tunnels.into_iter().filter(|(_, t)| !probed.contains(&t.conn)).collect();
            probed.extend(fresh.iter().map(|(_, t)| t.conn));
            fresh.truncate(FRESH_PROBES);
            if !fresh.is_empty() {
                let s = shared.clone();
                shared.tracker.spawn(async move { crate::health::probe_all(&s, fresh, true).await });
            }
        }
    }
}

async fn next_change(changes: &mut Option<Receiver<Change>>) -> Option<Change> {
    match changes {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// This pivot's heartbeat, in a task of its own so that no other work (an
/// enforcement pass over many sessions, a slow disconnect) can delay it past
/// `PIVOT_DEAD_AFTER`. Each beat also reads the database's clock, by which
/// every pivot judges liveness, and rechecks peer pivots' sessions.
pub(crate) async fn heartbeat(shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(BEAT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_orphans = Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let orphans = last_orphans.elapsed() >= ORPHANS_EVERY;
        if orphans {
            last_orphans = Instant::now();
        }
        let _ = tokio::time::timeout(BEAT_EVERY * 2, beat(&shared, orphans)).await;
        if orphans {
            let s = shared.clone();
            shared.tracker.spawn(async move { crate::ca::tidy(&s).await });
        }
    }
}

/// This pivot is alive; pivots that stopped beating lose their tunnel
/// records. If the others took this pivot for dead (its beats did not reach
/// the registry for a while), it registers again and republishes its tunnels.
async fn beat(shared: &Arc<Shared>, orphans: bool) {
    let reg = &shared.registry;
    let me = &shared.config.pivot_name;
    let now = match reg.db_now().await {
        Ok(now) => now,
        Err(e) => {
            warn!(error = %e, "cannot reach the registry to beat");
            return;
        }
    };
    shared.clock_offset.store(now - burrow_core::time::now_unix(), std::sync::atomic::Ordering::Relaxed);
    match reg.pivot_beat(me, &shared.boot, now).await {
        Ok(true) => {}
        Ok(false) => {
            match reg.pivot(me).await {
                Ok(Some(other)) => error!(
                    pivot = %me,
                    "another pivot at {} registered as '{me}'; taking the name back (give each pivot its own --pivot-name)",
                    other.address
                ),
                _ => error!(
                    pivot = %me,
                    "the other pivots took this one for dead (its beats did not reach the registry for {} s); registering again",
                    crate::registry::PIVOT_DEAD_AFTER
                ),
            }
            let address = shared.config.advertise.clone().unwrap_or_default();
            if let Err(e) = reg.register_pivot(me, &address, &shared.host_key, &shared.boot, now).await {
                warn!(error = %e, "cannot register this pivot");
                return;
            }
            // Apart from the beat, which must not wait on thousands of rows.
            let s = shared.clone();
            shared.tracker.spawn(async move {
                for (id, tunnel) in s.router.tunnels() {
                    let ports: Vec<u32> = tunnel.ports.iter().copied().collect();
                    if let Err(e) = s.registry.tunnel_up(&id, &s.config.pivot_name, &ports).await {
                        warn!(error = %e, "cannot republish tunnel records");
                        break;
                    }
                }
            });
        }
        Err(e) => {
            warn!(error = %e, "cannot beat in the registry");
            return;
        }
    }
    let pivots = match reg.pivots().await {
        Ok(all) => all,
        Err(_) => return,
    };
    if orphans || pivots.iter().any(|p| !p.alive(now)) {
        match reg.reap_pivots(now).await {
            Ok(0) => {}
            Ok(n) => info!(cleared = n, "cleared the tunnel records of pivots that stopped"),
            Err(e) => warn!(error = %e, "cannot clear dead pivots' records"),
        }
    }
    // A peer stays logged in only while it is a live pivot with that key.
    for (conn, session) in shared.router.sessions() {
        let Identity::Pivot(name) = session.identity.clone() else { continue };
        let still = pivots.iter().any(|p| {
            p.name == name.as_str()
                && p.alive(now)
                && burrow_core::keys::parse_public_key(&p.host_key, "pivot host key")
                    .is_ok_and(|k| burrow_core::fingerprint(&k) == session.fingerprint)
        });
        if !still {
            end_session(shared, conn, session, format!("pivot '{name}' is no longer a live pivot of this registry"))
                .await;
        }
    }
}

/// Ends one session with `why`, without waiting long on a peer that does
/// not read.
async fn end_session(shared: &Shared, conn: u64, session: crate::router::Session, why: String) {
    info!(conn, peer = %session.peer, "{why}; disconnecting");
    shared.router.remove_session(conn);
    let bye = session.handle.disconnect(russh::Disconnect::ByApplication, why, "en".into());
    let _ = tokio::time::timeout(Duration::from_secs(2), bye).await;
}

/// Ends the sessions whose source an admin's ban now covers, made here or
/// on another pivot. Bans a pivot made by itself (failures) refuse new
/// connections only: one device failing behind a NAT must not cut every
/// device behind that address off every pivot.
async fn drop_banned(shared: &Shared) {
    if shared.bans.active() == 0 {
        return;
    }
    let manual: Vec<crate::bans::IpNet> = match shared.registry.bans().await {
        Ok(list) => list.iter().filter(|b| !b.actor.starts_with("pivot:")).filter_map(|b| b.net.parse().ok()).collect(),
        Err(_) => return,
    };
    if manual.is_empty() {
        return;
    }
    for (conn, session) in shared.router.sessions() {
        if shared.bans.ignored(session.peer) || !manual.iter().any(|n| n.contains(&session.peer)) {
            continue;
        }
        let why = format!("source {} is banned", session.peer);
        end_session(shared, conn, session, why).await;
    }
}

/// Disconnects every session whose key no longer maps to the same identity.
pub(crate) async fn enforce(shared: &Shared) {
    enforce_mqtt(shared).await;
    for (conn, session) in shared.router.sessions() {
        // Peer pivots are checked at login against the live pivots.
        if let Identity::Pivot(_) = session.identity {
            continue;
        }
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
        end_session(shared, conn, session, why).await;
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
