//! The accept loop: one task per connection, bounded in number, with a
//! deadline for the handshake and for authentication.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use russh::server::Config as SshConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use super::handler::{ConnState, Connection};
use super::kexinit::Sniffer;
use super::stream::PacketStream;
use crate::audit::AuditRecord;
use crate::limits::source_of;
use crate::registry::Identity;
use crate::shards::Shards;
use crate::Shared;

/// The next connection on any of `listeners`, asking them in turn from
/// `*next` so a flood on one cannot starve another.
async fn accept_any(
    listeners: &[TcpListener],
    next: &mut usize,
) -> std::io::Result<(tokio::net::TcpStream, std::net::SocketAddr)> {
    let n = listeners.len();
    std::future::poll_fn(|cx| {
        for k in 0..n {
            let i = (*next + k) % n;
            if let std::task::Poll::Ready(r) = listeners[i].poll_accept(cx) {
                *next = (i + 1) % n;
                return std::task::Poll::Ready(r);
            }
        }
        std::task::Poll::Pending
    })
    .await
}

/// How long the accept loop waits for an unauthenticated slot to free
/// before it accepts anyway (and the drop policy decides).
const STALL: Duration = Duration::from_millis(250);

pub(crate) async fn serve(
    shared: Arc<Shared>,
    listeners: Vec<TcpListener>,
    ssh: Arc<SshConfig>,
    shards: &Shards,
    shutdown: CancellationToken,
) {
    let limit = shared.connections.clone();
    let start = shared.config.limits.max_startups.start;
    let mut backoff = Duration::from_millis(10);
    let mut next = 0;
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => return,
            p = limit.clone().acquire_owned() => p.expect("semaphore is never closed"),
        };
        // In a reconnect storm the unauthenticated slots turn over in
        // milliseconds: while they are at the drop threshold, leave new
        // connections in the kernel's listen queue for a moment instead of
        // accepting and dropping them (a dropped device backs off for
        // seconds). Slots that do not turn over (slow or hostile peers) end
        // the wait after STALL, and the drop policy applies as before.
        let stall_until = Instant::now() + STALL;
        while shared.preauth.in_use() >= start && Instant::now() < stall_until {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(2)) => {}
            }
        }
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = accept_any(&listeners, &mut next) => match r {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Usually EMFILE: wait for connections to finish rather than spin.
                    warn!(error = %e, "accept failed; backing off {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
        };
        backoff = Duration::from_millis(10);
        let accepted = Instant::now();
        shared.metrics.connections_accepted.fetch_add(1, Ordering::Relaxed);
        let source = source_of(peer.ip());
        // A banned source gets not a byte: the socket closes unanswered.
        if shared.bans.banned(peer.ip()) {
            shared.metrics.dropped("banned");
            debug!(%peer, "connection from a banned address dropped");
            let mut rec = AuditRecord::new("connection_dropped").outcome(false, Some("banned".into()));
            rec.source = Some(peer.to_string());
            shared.audit.failure(source, rec);
            continue;
        }
        let slot = match shared.preauth.admit(source) {
            Ok(slot) => slot,
            Err(why) => {
                shared.metrics.dropped(why.kind());
                debug!(%peer, reason = why.kind(), "connection dropped before authentication");
                let mut rec = AuditRecord::new("connection_dropped").outcome(false, Some(why.kind().into()));
                rec.source = Some(peer.to_string());
                shared.audit.failure(source, rec);
                continue;
            }
        };
        let conn = shared.next_conn.fetch_add(1, Ordering::Relaxed);
        let span = tracing::info_span!("conn", conn, %peer);
        // Re-registered on its shard's reactor in `handle`: a socket polled by
        // this thread's reactor would have every read wake-up cross threads.
        let stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "cannot hand the connection to an SSH thread");
                continue;
            }
        };
        // The grace time closes the socket through this duplicate; without
        // one (no descriptor left) the connection cannot be served safely.
        let Ok(killer) = stream.try_clone() else {
            shared.metrics.dropped("no_descriptor");
            continue;
        };
        let state = Arc::new(ConnState::new(slot, killer));
        let task = handle(shared.clone(), ssh.clone(), stream, peer, conn, state, accepted, shutdown.child_token());
        shards.spawn(
            &shared.tracker,
            async move {
                task.await;
                drop(permit);
            }
            .instrument(span),
        );
    }
}

#[allow(clippy::too_many_arguments)]
async fn handle(
    shared: Arc<Shared>,
    ssh: Arc<SshConfig>,
    stream: std::net::TcpStream,
    peer: SocketAddr,
    conn: u64,
    state: Arc<ConnState>,
    accepted: Instant,
    cancel: CancellationToken,
) {
    let stream = match TcpStream::from_std(stream) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "cannot register the connection");
            return;
        }
    };
    let _ = stream.set_nodelay(true);
    let handler = Connection::new(shared.clone(), conn, peer, state.clone());
    let grace = shared.config.limits.login_grace;
    let deadline = tokio::time::Instant::from_std(accepted + grace);
    let sniffer = Sniffer::new(shared.ssh_lists.clone(), state.negotiated.clone(), state.spoke.clone());
    let stream = PacketStream::new(stream).sniffing(sniffer);
    // Boxed: the handshake future is large and would otherwise stay inside
    // this task for the whole life of an idle tunnel.
    let handshake = Box::pin(russh::server::run_stream(ssh, stream, handler));
    let running = match tokio::time::timeout_at(deadline, handshake).await {
        Ok(Ok(running)) => running,
        Ok(Err(e)) => {
            debug!(error = %e, "handshake failed");
            // A bare connect-and-close (a health check, `nc -z`) is no failure.
            if state.spoke.load(Ordering::Relaxed) {
                failed(&shared, &state, peer, conn, format!("protocol error: {e}"));
            }
            return;
        }
        Err(_) => {
            info!("no SSH version line within {grace:?}; closing");
            failed(&shared, &state, peer, conn, "login grace time expired before the version line".into());
            return;
        }
    };
    tokio::pin!(running);
    let grace_over = tokio::time::sleep_until(deadline);
    tokio::pin!(grace_over);
    let mut grace_checked = false;
    let result = loop {
        tokio::select! {
            r = &mut running => break r,
            _ = &mut grace_over, if !grace_checked => {
                grace_checked = true;
                if state.identity.get().is_none() {
                    // Key exchange may still be running, and russh handles
                    // no disconnect request until it is done: close the
                    // socket under it instead.
                    info!("not authenticated within {grace:?}; closing");
                    state.kill();
                    failed(&shared, &state, peer, conn, "login grace time expired".into());
                    state.counted.store(true, Ordering::Relaxed);
                }
            }
            _ = cancel.cancelled() => {
                let handle = running.handle();
                let _ = Box::pin(handle.disconnect(russh::Disconnect::ByApplication, "pivot shutting down".into(), "en".into())).await;
                state.kill();
                break tokio::time::timeout(Duration::from_secs(5), &mut running).await.unwrap_or(Ok(()));
            }
        }
    };
    if let Err(e) = &result {
        debug!(error = %e, "connection ended with error");
    }
    // The slot and the socket duplicate go back with the connection, whatever
    // task may still hold its state.
    state.release_preauth();
    let identity = state.identity.get();
    if identity.is_none() && !state.counted.load(Ordering::Relaxed) && !cancel.is_cancelled() {
        // Rejected keys count only for connections that never got in: a
        // client trying its keys in turn before the right one is no attack.
        let rejected = state.take_rejected();
        if rejected.is_empty() {
            // A client that agreed on algorithms and left without trying a
            // key (ssh-keyscan, or a user whose ssh refused our host key) is
            // no failure; garbage, or nothing in common, is.
            let why = match (state.negotiated.get(), &result) {
                (None, Err(e)) => Some(format!("protocol error before key exchange: {e}")),
                (Some(n), _) if n.disagrees() => {
                    Some(format!("no algorithm in common (kex: {}, cipher: {}, mac: {})", n.kex, n.cipher, n.mac))
                }
                _ => None,
            };
            if let Some(why) = why {
                failed(&shared, &state, peer, conn, why);
            }
        }
        // One failure per connection, however many keys it tried: a client
        // with a full ssh-agent is not five attackers.
        if !rejected.is_empty() {
            failed(&shared, &state, peer, conn, rejected.join("; "));
        }
    }
    shared.router.remove_session(conn);
    if let Some(Identity::Device(id)) = identity {
        if shared.router.drop_tunnel(id, conn) {
            info!(device = %id, "tunnel closed");
            let mut rec = AuditRecord::new("tunnel_down");
            rec.device = Some(id.to_string());
            rec.source = Some(peer.to_string());
            rec.session = Some(shared.session_id(conn));
            rec.started = state.tunnel_since.get().copied();
            rec.ended = Some(rec.at);
            shared.audit.record(rec);
            // Boxed: a query's future is large, and this task's size is paid
            // by every idle tunnel for as long as it is up.
            if let Err(e) = Box::pin(shared.registry.tunnel_down(id, &shared.config.pivot_name)).await {
                warn!(device = %id, error = %e, "could not record tunnel close");
            }
        }
    }
    if let Some(identity) = identity {
        info!(duration_s = accepted.elapsed().as_secs(), "{identity} disconnected");
    }
}

/// One failure of an SSH connection from `peer`: logged, counted, audited,
/// and banned at `maxretry`.
pub(crate) fn failed(shared: &Arc<Shared>, state: &ConnState, peer: SocketAddr, conn: u64, reason: String) {
    let reason = burrow_core::text::printable(&reason).into_owned();
    info!(%peer, conn, "authentication failed: {reason}");
    let mut rec = AuditRecord::new("auth").outcome(false, Some(reason));
    rec.source = Some(peer.to_string());
    rec.session = Some(shared.session_id(conn));
    rec.method = Some("publickey".into());
    if let Some((user, fp)) = state.last_attempt() {
        rec.user = Some(user);
        rec.fingerprint = fp;
    }
    if let Some(n) = state.negotiated.get() {
        rec.cipher = Some(n.cipher.clone());
        rec.kex = Some(n.kex.clone());
    }
    count_failure(shared, peer, rec);
}

/// Counts a failure (SSH or devices' MQTT) toward a ban and audits it,
/// summarised per source.
pub(crate) fn count_failure(shared: &Arc<Shared>, peer: SocketAddr, mut rec: AuditRecord) {
    shared.metrics.auth_failed();
    let source = source_of(peer.ip());
    // Already banned (its live connections finishing): nothing more to count.
    let ban = if shared.bans.banned(peer.ip()) { None } else { shared.bans.failure(peer.ip(), source) };
    if let Some(ban) = &ban {
        rec.ban = Some(format!("banned {} until {}", ban.net, burrow_core::time::format_unix(ban.until)));
    }
    shared.audit.failure(source, rec);
    if let Some(ban) = ban {
        crate::bans::record(shared, ban);
    }
}
