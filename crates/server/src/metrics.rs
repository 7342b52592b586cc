//! Counters the pivot keeps for `/metrics`, and the HTTP endpoint serving
//! them with `/healthz` (`burrow server --http-listen`).
//!
//! Counters are plain atomics bumped on paths that already do far more work
//! (a relayed packet, an accepted connection); gauges are read from the
//! router when scraped.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::registry::Identity;
use crate::Shared;

#[derive(Default)]
pub(crate) struct Metrics {
    pub connections_accepted: AtomicU64,
    pub channels_opened: AtomicU64,
    pub channels_closed: AtomicU64,
    /// Channels relayed through a peer pivot holding the device's tunnel.
    pub channels_relayed: AtomicU64,
    /// Operator certificates this pivot signed.
    pub certificates_issued: AtomicU64,
    pub bytes_to_device: AtomicU64,
    pub bytes_to_operator: AtomicU64,
    refusals: ByReason,
    pub auth_failures: AtomicU64,
    pub bans: AtomicU64,
    dropped: ByReason,
}

/// A counter per reason, exported with a `reason` label.
#[derive(Default)]
struct ByReason(Mutex<BTreeMap<&'static str, u64>>);

impl ByReason {
    fn bump(&self, reason: &'static str) {
        *self.0.lock().unwrap().entry(reason).or_default() += 1;
    }

    /// `({reason="…"}, count)` pairs.
    fn samples(&self) -> Vec<(String, u64)> {
        self.0.lock().unwrap().iter().map(|(k, v)| (format!("{{reason=\"{k}\"}}"), *v)).collect()
    }
}

impl Metrics {
    pub fn refused(&self, kind: &'static str) {
        self.refusals.bump(kind);
    }

    /// A connection closed at accept (banned source, or no pre-auth slot).
    pub fn dropped(&self, kind: &'static str) {
        self.dropped.bump(kind);
    }

    pub fn auth_failed(&self) {
        self.auth_failures.fetch_add(1, Ordering::Relaxed);
    }

    pub fn banned(&self) {
        self.bans.fetch_add(1, Ordering::Relaxed);
    }
}

/// Serves `/healthz` and `/metrics` until `shutdown`.
pub(crate) async fn serve(shared: Arc<Shared>, listener: TcpListener, shutdown: CancellationToken) {
    let app = axum::Router::new().route("/healthz", get(health)).route("/metrics", get(metrics)).with_state(shared);
    if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await {
        warn!(error = %e, "HTTP endpoint stopped");
    }
}

/// 200 when the registry answers; the body lists each check.
async fn health(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    let failure = match tokio::time::timeout(Duration::from_secs(2), shared.registry.ping()).await {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e.to_string()),
        Err(_) => Some("no answer within 2s".to_string()),
    };
    let signaling = match &shared.signal {
        None => "disabled".to_string(),
        Some(s) => s.unavailable().map(|why| format!("unavailable: {why}")).unwrap_or_else(|| "ok".into()),
    };
    let reachable = failure.is_none();
    let (status, registry) = match failure {
        None => (StatusCode::OK, "ok".to_string()),
        Some(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("unavailable: {e}")),
    };
    // The other pivots registered on this registry, alive or not yet reaped.
    let me = &shared.config.pivot_name;
    // A registry that did not answer is not asked again: 503 within 2 s.
    let listed = match reachable {
        true => tokio::time::timeout(Duration::from_secs(2), shared.registry.pivots()).await.ok(),
        false => None,
    };
    let peers = match listed {
        Some(Ok(all)) => {
            let now = shared.registry_now();
            let others: Vec<String> = all
                .iter()
                .filter(|p| &p.name != me)
                .map(|p| format!("{} {} ({})", p.name, p.address, if p.alive(now) { "alive" } else { "dead" }))
                .collect();
            if others.is_empty() {
                "none".to_string()
            } else {
                others.join(", ")
            }
        }
        _ => "unknown".to_string(),
    };
    let backend = shared.registry.backend().name();
    (status, format!("pivot: {me}\nregistry: {registry} ({backend})\nsignaling: {signaling}\npeers: {peers}\n"))
}

async fn metrics(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], render(&shared))
}

fn render(shared: &Shared) -> String {
    let m = &shared.metrics;
    let (mut devices, mut operators, mut peers) = (0, 0, 0);
    for (_, s) in shared.router.sessions() {
        match s.identity {
            Identity::Device(_) => devices += 1,
            Identity::Operator { .. } => operators += 1,
            Identity::Pivot(_) => peers += 1,
        }
    }
    let opened = m.channels_opened.load(Ordering::Relaxed);
    let closed = m.channels_closed.load(Ordering::Relaxed);
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, u64)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(out, "{name}{labels} {v}");
        }
    };
    let info = format!("{{pivot=\"{}\",backend=\"{}\"}}", shared.config.pivot_name, shared.registry.backend().name());
    metric("burrow_pivot_info", "gauge", "This pivot's name and registry backend.", &[(info.as_str(), 1)]);
    metric(
        "burrow_tunnels",
        "gauge",
        "Devices with a tunnel on this pivot.",
        &[("", shared.router.tunnel_ids().len() as u64)],
    );
    metric(
        "burrow_sessions",
        "gauge",
        "Authenticated SSH connections.",
        &[("{role=\"device\"}", devices), ("{role=\"operator\"}", operators)],
    );
    metric(
        "burrow_connections_accepted_total",
        "counter",
        "TCP connections accepted on the SSH port.",
        &[("", m.connections_accepted.load(Ordering::Relaxed))],
    );
    metric("burrow_channels_opened_total", "counter", "Operator channels relayed to a device.", &[("", opened)]);
    metric(
        "burrow_channels_via_peer_total",
        "counter",
        "Operator channels relayed through the peer pivot holding the device's tunnel.",
        &[("", m.channels_relayed.load(Ordering::Relaxed))],
    );
    metric(
        "burrow_certificates_issued_total",
        "counter",
        "Operator certificates this pivot signed.",
        &[("", m.certificates_issued.load(Ordering::Relaxed))],
    );
    metric(
        "burrow_peer_sessions",
        "gauge",
        "Peer pivots logged in to this one, to reach tunnels it holds.",
        &[("", peers)],
    );
    metric(
        "burrow_peer_connections",
        "gauge",
        "This pivot's connections to peer pivots.",
        &[("", shared.peers.connected() as u64)],
    );
    metric(
        "burrow_channels_open",
        "gauge",
        "Operator channels being relayed now.",
        &[("", opened.saturating_sub(closed))],
    );
    metric(
        "burrow_relayed_bytes_total",
        "counter",
        "Channel data relayed between operators and devices.",
        &[
            ("{direction=\"to_device\"}", m.bytes_to_device.load(Ordering::Relaxed)),
            ("{direction=\"to_operator\"}", m.bytes_to_operator.load(Ordering::Relaxed)),
        ],
    );
    let refusals = m.refusals.samples();
    metric("burrow_refusals_total", "counter", "Operator channels refused, by reason.", &labelled(&refusals));
    metric(
        "burrow_auth_failures_total",
        "counter",
        "Failed logins: unknown or refused keys, grace time expired, protocol errors, refused enrollment tokens.",
        &[("", m.auth_failures.load(Ordering::Relaxed))],
    );
    metric("burrow_bans_total", "counter", "Sources banned by this pivot.", &[("", m.bans.load(Ordering::Relaxed))]);
    metric("burrow_banned_sources", "gauge", "Bans in force.", &[("", shared.bans.active() as u64)]);
    metric(
        "burrow_preauth_connections",
        "gauge",
        "Connections not authenticated yet.",
        &[("", shared.preauth.in_use() as u64)],
    );
    let dropped = m.dropped.samples();
    metric(
        "burrow_connections_dropped_total",
        "counter",
        "Connections closed at accept, by reason.",
        &labelled(&dropped),
    );
    metric(
        "burrow_admin_buffered_bytes",
        "gauge",
        "Bytes of admin requests buffered now.",
        &[("", shared.admin_buffered.get() as u64)],
    );
    if let Some(hub) = shared.signal.as_ref().and_then(|s| s.hub()) {
        metric(
            "burrow_mqtt_devices_connected",
            "gauge",
            "Devices logged in to the embedded MQTT broker.",
            &[("", hub.connected() as u64)],
        );
    }
    let leases = shared.leases.stats();
    let conns: Vec<(String, u64)> =
        leases.iter().map(|(d, p, c, _, _)| (format!("{{device=\"{d}\",port=\"{p}\"}}"), *c)).collect();
    metric("burrow_lease_connections_total", "counter", "Connections accepted on a lease.", &labelled(&conns));
    let bytes: Vec<(String, u64)> = leases
        .iter()
        .flat_map(|(d, p, _, up, down)| {
            [
                (format!("{{device=\"{d}\",port=\"{p}\",direction=\"to_device\"}}"), *up),
                (format!("{{device=\"{d}\",port=\"{p}\",direction=\"from_device\"}}"), *down),
            ]
        })
        .collect();
    metric("burrow_lease_bytes_total", "counter", "Bytes relayed through a lease.", &labelled(&bytes));
    metric(
        "burrow_audit_dropped_total",
        "counter",
        "Audit records lost because the writer fell behind.",
        &[("", shared.audit.dropped.load(Ordering::Relaxed))],
    );
    out
}

fn labelled(samples: &[(String, u64)]) -> Vec<(&str, u64)> {
    samples.iter().map(|(k, v)| (k.as_str(), *v)).collect()
}
