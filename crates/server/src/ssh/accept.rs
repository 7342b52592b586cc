//! The accept loop: one task per connection, bounded in number, with a
//! deadline for the handshake and for authentication.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use russh::server::Config as SshConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use super::handler::{Authenticated, Connection};
use super::stream::PacketStream;
use crate::registry::Identity;
use crate::shards::Shards;
use crate::Shared;

pub(crate) async fn serve(
    shared: Arc<Shared>,
    listener: TcpListener,
    ssh: Arc<SshConfig>,
    shards: &Shards,
    shutdown: CancellationToken,
) {
    let limit = Arc::new(Semaphore::new(shared.config.max_connections));
    let mut backoff = Duration::from_millis(10);
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => return,
            p = limit.clone().acquire_owned() => p.expect("semaphore is never closed"),
        };
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
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
        shared.metrics.connections_accepted.fetch_add(1, Ordering::Relaxed);
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
        let task = handle(shared.clone(), ssh.clone(), stream, peer, conn, shutdown.child_token());
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

async fn handle(
    shared: Arc<Shared>,
    ssh: Arc<SshConfig>,
    stream: std::net::TcpStream,
    peer: SocketAddr,
    conn: u64,
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
    let authenticated: Authenticated = Default::default();
    let handler = Connection::new(shared.clone(), conn, peer, authenticated.clone());
    let deadline = shared.config.auth_timeout;
    // Boxed: the handshake future is large and would otherwise stay inside
    // this task for the whole life of an idle tunnel.
    let handshake = Box::pin(russh::server::run_stream(ssh, PacketStream::new(stream), handler));
    let running = match tokio::time::timeout(deadline, handshake).await {
        Ok(Ok(running)) => running,
        Ok(Err(e)) => {
            debug!(error = %e, "handshake failed");
            return;
        }
        Err(_) => {
            debug!("no SSH banner within {deadline:?}");
            return;
        }
    };
    let handle = running.handle();
    tokio::pin!(running);
    let auth_deadline = tokio::time::sleep(deadline);
    tokio::pin!(auth_deadline);
    let mut auth_checked = false;
    let result = loop {
        tokio::select! {
            r = &mut running => break r,
            _ = &mut auth_deadline, if !auth_checked => {
                auth_checked = true;
                if authenticated.get().is_none() {
                    info!("not authenticated within {deadline:?}; closing");
                    let _ = Box::pin(handle.disconnect(russh::Disconnect::ByApplication, "authentication timeout".into(), "en".into())).await;
                }
            }
            _ = cancel.cancelled() => {
                let _ = Box::pin(handle.disconnect(russh::Disconnect::ByApplication, "pivot shutting down".into(), "en".into())).await;
                break tokio::time::timeout(Duration::from_secs(5), &mut running).await.unwrap_or(Ok(()));
            }
        }
    };
    if let Err(e) = result {
        debug!(error = %e, "connection ended with error");
    }
    shared.router.remove_session(conn);
    if let Some(Identity::Device(id)) = authenticated.get() {
        if shared.router.drop_tunnel(id, conn) {
            info!(device = %id, "tunnel closed");
            // Boxed: a query's future is large, and this task's size is paid
            // by every idle tunnel for as long as it is up.
            if let Err(e) = Box::pin(shared.registry.tunnel_down(id, &shared.config.pivot_name)).await {
                warn!(device = %id, error = %e, "could not record tunnel close");
            }
        }
    }
    if let Some(identity) = authenticated.get() {
        info!("{identity} disconnected");
    }
}
