//! How each tunnel is doing, for `device show`: the round trip to the
//! agent, and whether each exposed target answers.
//!
//! The round trip is the time the agent takes to refuse a channel to port
//! 0 (it exposes no such port), so no target is touched. Targets are
//! checked by opening a channel to each exposed port and closing it at
//! once. A new tunnel is checked within a second; then round trips every
//! minute and targets every five.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use burrow_core::Id;
use tracing::warn;

use crate::router::Tunnel;
use crate::Shared;

/// How long one probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// Probes running at once.
const PARALLEL: usize = 64;

/// What one tunnel's probe found.
pub(crate) struct Health {
    pub id: Id,
    pub rtt_ms: Option<u64>,
    /// Port to "answers" or why not; `None` when targets were not checked.
    pub targets: Option<BTreeMap<u32, String>>,
}

/// Probes `tunnels` (with their targets when `targets`), at most
/// [`PARALLEL`] at once, and records the results in the registry.
pub(crate) async fn probe_all(shared: &Arc<Shared>, tunnels: Vec<(Id, Tunnel)>, targets: bool) {
    if tunnels.is_empty() {
        return;
    }
    let limit = Arc::new(tokio::sync::Semaphore::new(PARALLEL));
    let mut set = tokio::task::JoinSet::new();
    for (id, tunnel) in tunnels {
        let limit = limit.clone();
        set.spawn(async move {
            let _permit = limit.acquire_owned().await.expect("never closed");
            // A device that stops reading cannot hold the round: every
            // probe, closes included, ends within its bound.
            let bound = PROBE_TIMEOUT * (2 + 2 * tunnel.ports.len() as u32);
            let fallback = Health { id: id.clone(), rtt_ms: None, targets: None };
            tokio::time::timeout(bound, probe(id, tunnel, targets)).await.unwrap_or(fallback)
        });
    }
    let mut found = Vec::new();
    while let Some(r) = set.join_next().await {
        if let Ok(h) = r {
            found.push(h);
        }
    }
    if let Err(e) = shared.registry.record_health(&found).await {
        warn!(error = %e, "cannot record tunnel health");
    }
}

async fn probe(id: Id, tunnel: Tunnel, with_targets: bool) -> Health {
    let started = Instant::now();
    let opened =
        tokio::time::timeout(PROBE_TIMEOUT, tunnel.handle.channel_open_forwarded_tcpip(id.as_str(), 0, "127.0.0.1", 0))
            .await;
    let rtt_ms = match opened {
        // Refused (as it should be) or, from an agent that took it, closed:
        // either way one round trip.
        Ok(Err(russh::Error::ChannelOpenFailure(_))) => Some(started.elapsed().as_millis() as u64),
        Ok(Ok(ch)) => {
            let rtt = started.elapsed().as_millis() as u64;
            let _ = tokio::time::timeout(PROBE_TIMEOUT, ch.close()).await;
            Some(rtt)
        }
        _ => None,
    };
    let mut targets = None;
    if with_targets {
        let mut found = BTreeMap::new();
        for port in &tunnel.ports {
            let r = tokio::time::timeout(
                PROBE_TIMEOUT,
                tunnel.handle.channel_open_forwarded_tcpip(id.as_str(), *port, "127.0.0.1", 0),
            )
            .await;
            let state = match r {
                Ok(Ok(ch)) => {
                    let _ = tokio::time::timeout(PROBE_TIMEOUT, ch.close()).await;
                    "answers".to_string()
                }
                Ok(Err(russh::Error::ChannelOpenFailure(f))) => format!("refused: {}", f.description()),
                Ok(Err(e)) => format!("failed: {e}"),
                Err(_) => "no answer in 10s".to_string(),
            };
            found.insert(*port, state);
        }
        targets = Some(found);
    }
    Health { id, rtt_ms, targets }
}
