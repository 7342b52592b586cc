//! Pivot-side ports for clients that do not speak SSH (seeds 000 and 001):
//! a lease makes the pivot listen on a TCP address and relay each accepted
//! connection to one exposed port of one device, waking it if it sleeps.
//!
//! Leases live in the registry (`burrow device listen`); `sync` binds what
//! is leased and closes what is not, at start and after every change.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use burrow_core::Id;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::audit::AuditRecord;
use crate::ssh::route::{device_tunnel, Route};

/// The device's end of a lease connection: its tunnel here, or a channel
/// through the peer pivot holding it.
enum DeviceStream {
    Local(russh::ChannelStream<russh::server::Msg>),
    Peer(russh::ChannelStream<russh::client::Msg>),
}
use crate::Shared;

/// OpenSSH's `GatewayPorts`, for leases: which address a lease may bind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GatewayPorts {
    /// Loopback only, whatever the lease asks (the default).
    #[default]
    No,
    /// Every address, whatever the lease asks.
    Yes,
    /// The address the lease names.
    ClientSpecified,
}

impl std::str::FromStr for GatewayPorts {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "no" => Ok(GatewayPorts::No),
            "yes" => Ok(GatewayPorts::Yes),
            "clientspecified" => Ok(GatewayPorts::ClientSpecified),
            _ => Err("give no, yes or clientspecified".into()),
        }
    }
}

impl GatewayPorts {
    pub fn name(self) -> &'static str {
        match self {
            GatewayPorts::No => "no",
            GatewayPorts::Yes => "yes",
            GatewayPorts::ClientSpecified => "clientspecified",
        }
    }

    /// The address actually bound for a lease of `asked`.
    pub fn bind(self, asked: SocketAddr) -> SocketAddr {
        match self {
            GatewayPorts::No if asked.is_ipv6() => SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, asked.port())),
            GatewayPorts::No => SocketAddr::from(([127, 0, 0, 1], asked.port())),
            GatewayPorts::Yes if asked.is_ipv6() => SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, asked.port())),
            GatewayPorts::Yes => SocketAddr::from(([0, 0, 0, 0], asked.port())),
            GatewayPorts::ClientSpecified => asked,
        }
    }
}

/// A lease connection with no byte either way for this long is closed, so
/// an idle client cannot keep an on-demand device awake.
const IDLE: std::time::Duration = std::time::Duration::from_secs(600);

/// Copies both ways until either side ends or both stay silent for
/// [`IDLE`]; returns (bytes to the device, bytes from it).
async fn pipe<D>(client: TcpStream, device: D) -> (u64, u64)
where
    D: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut cr, mut cw) = client.into_split();
    let (mut dr, mut dw) = tokio::io::split(device);
    let (mut up, mut down) = (0u64, 0u64);
    let (mut a, mut b) = (vec![0u8; 16 * 1024], vec![0u8; 16 * 1024]);
    // A side that has finished sending is half-closed on the other side,
    // and the copy goes on the other way until that ends too.
    let (mut client_done, mut device_done) = (false, false);
    while !(client_done && device_done) {
        tokio::select! {
            r = cr.read(&mut a), if !client_done => match r {
                Ok(0) => {
                    client_done = true;
                    let _ = dw.shutdown().await;
                }
                Ok(n) => {
                    if dw.write_all(&a[..n]).await.is_err() { break }
                    up += n as u64;
                }
                Err(_) => break,
            },
            r = dr.read(&mut b), if !device_done => match r {
                Ok(0) => {
                    device_done = true;
                    let _ = cw.shutdown().await;
                }
                Ok(n) => {
                    if cw.write_all(&b[..n]).await.is_err() { break }
                    down += n as u64;
                }
                Err(_) => break,
            },
            _ = tokio::time::sleep(IDLE) => break,
        }
    }
    (up, down)
}

/// Connections one lease relays at once; more wait in its listen backlog.
const PER_LEASE: usize = 256;

/// Connections and bytes of one lease, for `/metrics`.
#[derive(Default)]
pub(crate) struct LeaseStats {
    pub connections: AtomicU64,
    pub to_device: AtomicU64,
    pub from_device: AtomicU64,
}

struct Running {
    bind: String,
    stop: CancellationToken,
    stats: Arc<LeaseStats>,
}

/// The leases this pivot serves now, by (device, port).
#[derive(Default)]
pub(crate) struct Leases {
    running: Mutex<BTreeMap<(String, u16), Running>>,
}

impl Leases {
    /// (device, port, connections, bytes to device, bytes from device).
    pub fn stats(&self) -> Vec<(String, u16, u64, u64, u64)> {
        let running = self.running.lock().unwrap();
        running
            .iter()
            .map(|((d, p), r)| {
                let s = &r.stats;
                let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
                (d.clone(), *p, load(&s.connections), load(&s.to_device), load(&s.from_device))
            })
            .collect()
    }
}

/// Binds every lease in the registry that is not served yet, and stops the
/// ones no longer there.
pub(crate) async fn sync(shared: &Arc<Shared>, shutdown: &CancellationToken) {
    let wanted = match shared.registry.listens().await {
        Ok(l) => l,
        Err(e) => {
            warn!(error = %e, "cannot read the leases");
            return;
        }
    };
    let mut running = shared.leases.running.lock().unwrap();
    let keys: Vec<(String, u16)> = running.keys().cloned().collect();
    for key in keys {
        let still = wanted.iter().any(|(d, p, b, _)| (d, p) == (&key.0, &key.1) && *b == running[&key].bind);
        if !still {
            let r = running.remove(&key).expect("listed");
            r.stop.cancel();
            info!(device = %key.0, port = key.1, bind = %r.bind, "lease ended");
        }
    }
    for (device, port, bind, _) in wanted {
        if running.contains_key(&(device.clone(), port)) {
            continue;
        }
        let (Ok(id), Ok(asked)) = (Id::parse(&device), bind.parse::<SocketAddr>()) else {
            warn!(device = %device, bind = %bind, "lease ignored: unreadable");
            continue;
        };
        if !shared.config.lease_range.contains(&asked.port()) {
            warn!(device = %id, port, bind = %asked, "lease outside --lease-range; not served (unlisten it, or widen the range)");
            continue;
        }
        let addr = shared.config.lease_gateway_ports.bind(asked);
        let listener = match std::net::TcpListener::bind(addr).and_then(|l| {
            l.set_nonblocking(true)?;
            TcpListener::from_std(l)
        }) {
            Ok(l) => l,
            Err(e) => {
                warn!(device = %id, port, %addr, error = %e, "cannot listen for a lease; retried at the next change");
                continue;
            }
        };
        info!(device = %id, port, %addr, "lease listening");
        let stop = shutdown.child_token();
        let stats = Arc::new(LeaseStats::default());
        running.insert((device, port), Running { bind, stop: stop.clone(), stats: stats.clone() });
        shared.tracker.spawn(accept(shared.clone(), listener, id, port, stats, stop));
    }
}

async fn accept(
    shared: Arc<Shared>,
    listener: TcpListener,
    id: Id,
    port: u16,
    stats: Arc<LeaseStats>,
    stop: CancellationToken,
) {
    let own = Arc::new(tokio::sync::Semaphore::new(PER_LEASE));
    loop {
        // A place of this lease's own, and one of the pivot's connections
        // (the descriptor budget SSH and MQTT share), before accepting.
        let mine = tokio::select! {
            _ = stop.cancelled() => return,
            p = own.clone().acquire_owned() => p.expect("never closed"),
        };
        let pivot_wide = tokio::select! {
            _ = stop.cancelled() => return,
            p = shared.connections.clone().acquire_owned() => p.expect("never closed"),
        };
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(a) => a,
                Err(e) => {
                    warn!(device = %id, port, error = %e, "lease accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // A lease is an operator's door: banned sources stay out here too.
        if shared.bans.banned(peer.ip()) {
            continue;
        }
        stats.connections.fetch_add(1, Ordering::Relaxed);
        let (shared, id, stats, stop) = (shared.clone(), id.clone(), stats.clone(), stop.clone());
        shared.tracker.clone().spawn(async move {
            let _held = (mine, pivot_wide);
            tokio::select! {
                _ = relay(&shared, id, port, stream, peer, &stats) => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}

/// One client connection: find (or wake) the device's tunnel, open a
/// channel to its port, and copy both ways until either side closes.
async fn relay(shared: &Shared, id: Id, port: u16, stream: TcpStream, peer: SocketAddr, stats: &LeaseStats) {
    let audit = |event: &str| {
        let mut rec = AuditRecord::new(event);
        rec.source = Some(peer.to_string());
        rec.device = Some(id.to_string());
        rec.target = Some(format!("{id}:{port} (lease)"));
        rec
    };
    let route = match device_tunnel(shared, id.clone(), u32::from(port), &audit).await {
        Ok((_, route)) => route,
        Err(refusal) => {
            info!(device = %id, port, %peer, "lease connection refused: {refusal}");
            // Merged per source, as failures are: a flood cannot crowd out the audit.
            shared.audit.failure(peer.ip(), audit("channel_refused").outcome(false, Some(refusal.to_string())));
            return;
        }
    };
    let originator = (peer.ip().to_string(), u32::from(peer.port()));
    let (device, _active) = match route {
        Route::Local(tunnel) => {
            match tunnel
                .handle
                .channel_open_forwarded_tcpip(id.as_str(), u32::from(port), originator.0, originator.1)
                .await
            {
                Ok(ch) => (DeviceStream::Local(ch.into_stream()), Some(tunnel.activity.enter())),
                Err(e) => {
                    info!(device = %id, port, %peer, error = %e, "lease connection refused by the device");
                    shared.audit.record(audit("channel_refused").outcome(false, Some(e.to_string())));
                    return;
                }
            }
        }
        Route::Peer(pivot) => match shared.peers.open(&pivot, &id, u32::from(port), originator).await {
            Ok(ch) => (DeviceStream::Peer(ch.into_stream()), None),
            Err(refusal) => {
                info!(device = %id, port, %peer, via = %pivot.name, "lease connection refused: {refusal}");
                shared.audit.record(audit("channel_refused").outcome(false, Some(refusal.to_string())));
                return;
            }
        },
    };
    let mut rec = audit("channel_open").outcome(true, None);
    rec.started = Some(rec.at);
    let opened = rec.at;
    shared.audit.record(rec);
    let (up, down) = match device {
        DeviceStream::Local(ch) => pipe(stream, ch).await,
        DeviceStream::Peer(ch) => pipe(stream, ch).await,
    };
    stats.to_device.fetch_add(up, Ordering::Relaxed);
    stats.from_device.fetch_add(down, Ordering::Relaxed);
    shared.metrics.bytes_to_device.fetch_add(up, Ordering::Relaxed);
    shared.metrics.bytes_to_operator.fetch_add(down, Ordering::Relaxed);
    let mut rec = audit("channel_close");
    rec.started = Some(opened);
    rec.ended = Some(rec.at);
    rec.bytes_to_device = Some(up);
    rec.bytes_to_operator = Some(down);
    shared.audit.record(rec);
}
