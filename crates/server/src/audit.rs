//! The audit trail: an append-only table in the registry, written off the
//! connection path.
//!
//! Connections hand records to [`Audit::record`], which never waits: a
//! bounded queue feeds one writer task that inserts them in batches. A flood
//! of failures from one source is summarised (the first few records per
//! source and minute in full, then one record with the count), so the audit
//! cannot be used to fill the disk. Admin changes from local CLI commands are
//! inserted directly by the command. With `--audit-log FILE` the pivot also
//! appends every new row, whoever wrote it, to FILE as JSON lines.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use burrow_core::time::now_unix;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::registry::Registry;

/// Records queued for the writer before new ones are dropped (and counted).
const QUEUE: usize = 8192;
/// Failures per source and minute recorded in full before summarising.
const FLOOD_FULL: u32 = 5;
const FLOOD_WINDOW: Duration = Duration::from_secs(60);
const BATCH: usize = 512;

/// One audit record. Empty fields are left out of the JSON form.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct AuditRecord {
    /// Row number, set by the registry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<i64>,
    /// Unix seconds.
    pub at: i64,
    /// What happened: `auth`, `tunnel_up`, `channel_open`, `ban`, `admin`, …
    pub event: String,
    /// `success` or `failure` where that applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The pivot that wrote it, or `cli` for a local command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pivot: Option<String>,
    /// `ip:port` of the peer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// The connection, unique across restarts: `<pivot start, hex>-<number>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Key fingerprint of the peer (any key, registered or not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// The SSH user name the client asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// `device:port` of a channel or wake-up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// The other pivot a channel was relayed through, holding the device's tunnel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended: Option<i64>,
    /// Bytes from the operator to the device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_to_device: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_to_operator: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cipher: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kex: Option<String>,
    /// `banned 203.0.113.7/32 until …`, when this record caused a ban.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ban: Option<String>,
    /// Who made an admin change: `operator:alice`, `local:root`, `device:cam-42`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// An admin change's arguments (never secrets or token values).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<serde_json::Value>,
    /// How many events a summary record stands for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
}

impl AuditRecord {
    pub fn new(event: &str) -> Self {
        AuditRecord { at: now_unix(), event: event.to_string(), ..Default::default() }
    }

    pub fn outcome(mut self, ok: bool, reason: Option<String>) -> Self {
        self.outcome = Some(if ok { "success" } else { "failure" }.into());
        self.reason = reason;
        self
    }

    /// The source address, without the port.
    pub fn source_ip(&self) -> Option<String> {
        let s = self.source.as_deref()?;
        Some(s.parse::<std::net::SocketAddr>().map(|a| a.ip().to_string()).unwrap_or_else(|_| s.to_string()))
    }
}

/// Every event kind the audit writes.
pub const EVENTS: &[&str] = &[
    "auth",
    "auth_failures",
    "connection_dropped",
    "tunnel_up",
    "tunnel_down",
    "wake",
    "channel_open",
    "channel_refused",
    "channel_close",
    "ban",
    "ban_add",
    "ban_remove",
    "device_add",
    "device_remove",
    "device_revoke",
    "operator_add",
    "operator_remove",
    "enroll",
    "rotate_key",
    "host_keys",
    "host_keys_reset",
    "lease_add",
    "lease_remove",
    "certificate",
    "ca_rotate",
    "admin_denied",
];

/// Which records `burrow audit` wants.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AuditQuery {
    pub since: Option<i64>,
    pub until: Option<i64>,
    pub device: Option<String>,
    pub operator: Option<String>,
    pub source: Option<String>,
    pub event: Option<String>,
    pub limit: Option<u32>,
}

enum Queued {
    Record(AuditRecord),
    /// Flood-summarised per source.
    Failure(IpAddr, AuditRecord),
}

/// The pivot's handle on its audit writer.
pub(crate) struct Audit {
    tx: mpsc::Sender<Queued>,
    pub dropped: AtomicU64,
    pub pivot: String,
}

impl Audit {
    /// Starts the writer; it ends after `shutdown`, once the queue is written.
    pub fn start(
        registry: Registry,
        pivot: String,
        retention: Option<Duration>,
        export: Option<PathBuf>,
        shutdown: CancellationToken,
        tracker: &tokio_util::task::TaskTracker,
    ) -> Arc<Audit> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let audit = Arc::new(Audit { tx, dropped: AtomicU64::new(0), pivot });
        tracker.spawn(writer(registry.clone(), rx, retention, shutdown.clone()));
        if let Some(path) = export {
            tracker.spawn(exporter(registry, path, shutdown));
        }
        audit
    }

    pub fn record(&self, mut rec: AuditRecord) {
        rec.pivot.get_or_insert_with(|| self.pivot.clone());
        self.push(Queued::Record(rec));
    }

    /// A failure from `ip`: recorded in full up to a few per minute, then summarised.
    pub fn failure(&self, ip: IpAddr, mut rec: AuditRecord) {
        rec.pivot.get_or_insert_with(|| self.pivot.clone());
        self.push(Queued::Failure(ip, rec));
    }

    fn push(&self, q: Queued) {
        if self.tx.try_send(q).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

struct Flood {
    since: Instant,
    seen: u32,
    first: AuditRecord,
}

async fn writer(
    registry: Registry,
    mut rx: mpsc::Receiver<Queued>,
    retention: Option<Duration>,
    shutdown: CancellationToken,
) {
    let mut batch: Vec<AuditRecord> = Vec::new();
    let mut floods: HashMap<IpAddr, Flood> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut last_prune: Option<Instant> = None;
    loop {
        // Records gather until the tick (or a full batch): one transaction
        // per quarter second, whatever the connection rate.
        let (open, flush) = tokio::select! {
            q = rx.recv() => match q {
                Some(q) => { take(q, &mut batch, &mut floods); (true, batch.len() >= BATCH) }
                None => (false, true),
            },
            _ = tick.tick() => (true, true),
            _ = shutdown.cancelled() => (false, true),
        };
        if !flush {
            continue;
        }
        if !open {
            // Shutdown: take what is still queued too.
            rx.close();
            while let Some(q) = rx.recv().await {
                take(q, &mut batch, &mut floods);
            }
        }
        summarise(&mut floods, &mut batch, !open);
        if !batch.is_empty() {
            if let Err(e) = registry.insert_audit(&batch).await {
                warn!(error = %e, records = batch.len(), "cannot write audit records");
            }
            batch.clear();
        }
        if !open {
            return;
        }
        if last_prune.is_none_or(|t| t.elapsed() >= Duration::from_secs(3600)) {
            last_prune = Some(Instant::now());
            if let Err(e) = registry.prune_bans().await {
                warn!(error = %e, "cannot delete expired bans");
            }
            if let Some(keep) = retention {
                let before = now_unix().saturating_sub(keep.as_secs() as i64);
                match registry.prune_audit(before).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(records = n, "pruned audit records past retention"),
                    Err(e) => warn!(error = %e, "cannot prune audit records"),
                }
            }
        }
    }
}

fn take(q: Queued, batch: &mut Vec<AuditRecord>, floods: &mut HashMap<IpAddr, Flood>) {
    match q {
        Queued::Record(r) => batch.push(r),
        Queued::Failure(ip, r) => {
            let now = Instant::now();
            let f = floods.entry(ip).or_insert_with(|| Flood { since: now, seen: 0, first: r.clone() });
            f.seen += 1;
            if f.seen <= FLOOD_FULL {
                batch.push(r);
            }
        }
    }
}

/// Closes flood windows older than a minute (all of them when `all`),
/// writing one summary for each that went past the records kept in full.
fn summarise(floods: &mut HashMap<IpAddr, Flood>, batch: &mut Vec<AuditRecord>, all: bool) {
    floods.retain(|ip, f| {
        if !all && f.since.elapsed() < FLOOD_WINDOW {
            return true;
        }
        if f.seen > FLOOD_FULL {
            let mut s = AuditRecord::new("auth_failures");
            s.outcome = Some("failure".into());
            s.reason = Some(format!(
                "{} more failures from {ip} in {}s not recorded one by one",
                f.seen - FLOOD_FULL,
                f.since.elapsed().as_secs()
            ));
            s.source = Some(ip.to_string());
            s.pivot = f.first.pivot.clone();
            s.started = Some(f.first.at);
            s.ended = Some(now_unix());
            s.count = Some((f.seen - FLOOD_FULL) as u64);
            batch.push(s);
        }
        false
    });
}

/// Appends every audit row to `path` as JSON lines, starting after the
/// newest row present when the pivot started.
async fn exporter(registry: Registry, path: PathBuf, shutdown: CancellationToken) {
    let mut file = match tokio::fs::OpenOptions::new().create(true).append(true).open(&path).await {
        Ok(f) => f,
        Err(e) => {
            warn!(path = %path.display(), error = %e, "cannot open the audit log; not exporting");
            return;
        }
    };
    let mut after = registry.audit_last_seq().await.unwrap_or(0);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        let stopping = tokio::select! {
            _ = tick.tick() => false,
            // Give the writer a moment to flush its last batch.
            _ = shutdown.cancelled() => { tokio::time::sleep(Duration::from_millis(600)).await; true }
        };
        loop {
            let rows = match registry.audit_after(after, 1000).await {
                Ok(rows) => rows,
                Err(e) => {
                    warn!(error = %e, "cannot read audit records to export");
                    break;
                }
            };
            let mut out = Vec::new();
            for r in &rows {
                after = after.max(r.seq.unwrap_or(after));
                if let Ok(line) = serde_json::to_string(r) {
                    out.extend_from_slice(line.as_bytes());
                    out.push(b'\n');
                }
            }
            if !out.is_empty() {
                if let Err(e) = file.write_all(&out).await {
                    warn!(path = %path.display(), error = %e, "cannot write the audit log");
                }
                let _ = file.flush().await;
            }
            if rows.len() < 1000 {
                break;
            }
        }
        if stopping {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(event: &str, at: i64, source: &str) -> AuditRecord {
        AuditRecord { at, source: Some(source.into()), ..AuditRecord::new(event) }
    }

    #[tokio::test]
    async fn records_are_queried_by_filter_and_pruned_past_retention() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(dir.path()).await.unwrap();
        let now = now_unix();
        let mut old = rec("auth", now - 100 * 86_400, "203.0.113.7:5000");
        old.device = Some("cam-42".into());
        reg.insert_audit(&[old, rec("auth", now, "203.0.113.7:5001"), rec("ban", now, "198.51.100.1:1")])
            .await
            .unwrap();
        let q = |f: AuditQuery| {
            let reg = reg.clone();
            async move { reg.audit(&f).await.unwrap() }
        };
        assert_eq!(q(AuditQuery::default()).await.len(), 3);
        assert_eq!(q(AuditQuery { source: Some("203.0.113.7".into()), ..Default::default() }).await.len(), 2);
        assert_eq!(q(AuditQuery { event: Some("ban".into()), ..Default::default() }).await.len(), 1);
        assert_eq!(q(AuditQuery { device: Some("cam-42".into()), ..Default::default() }).await.len(), 1);
        assert_eq!(q(AuditQuery { since: Some(now - 60), ..Default::default() }).await.len(), 2);
        let pruned = reg.prune_audit(now - crate::DEFAULT_AUDIT_RETENTION.as_secs() as i64).await.unwrap();
        assert_eq!(pruned, 1);
        assert_eq!(q(AuditQuery::default()).await.len(), 2);
    }

    #[tokio::test]
    async fn a_flood_from_one_source_is_summarised() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(dir.path()).await.unwrap();
        let stop = CancellationToken::new();
        let tasks = tokio_util::task::TaskTracker::new();
        let audit = Audit::start(reg.clone(), "p".into(), None, None, stop.clone(), &tasks);
        let ip: IpAddr = "203.0.113.7".parse().unwrap();
        for _ in 0..1000 {
            audit.failure(ip, rec("auth", now_unix(), "203.0.113.7:1"));
        }
        audit.record(rec("tunnel_up", now_unix(), "192.0.2.1:1"));
        stop.cancel();
        tasks.close();
        tasks.wait().await;
        let all = reg.audit(&AuditQuery::default()).await.unwrap();
        let full = all.iter().filter(|r| r.event == "auth").count();
        let summary: Vec<_> = all.iter().filter(|r| r.event == "auth_failures").collect();
        assert_eq!(full, FLOOD_FULL as usize);
        assert_eq!(summary.len(), 1);
        assert_eq!(summary[0].count, Some(1000 - FLOOD_FULL as u64));
        assert!(all.iter().any(|r| r.event == "tunnel_up"));
    }
}
