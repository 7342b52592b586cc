//! Serving one `forwarded-tcpip` channel: connect to the exposed local
//! service, then copy bytes both ways.

use std::time::Duration;

use russh::client::{ChannelOpenHandle, Msg};
use russh::{Channel, ChannelOpenFailure};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) async fn serve(channel: Channel<Msg>, port: u32, target: Option<String>, reply: ChannelOpenHandle) {
    let Some(target) = target else {
        if port == 0 {
            // The pivot's health probe: a refusal shows the tunnel is alive.
            debug!("refused the pivot's probe of port 0");
        } else {
            warn!(port, "pivot asked for a port this agent does not expose");
        }
        reply
            .reject(ChannelOpenFailure::Other {
                code: ChannelOpenFailure::AdministrativelyProhibited.code(),
                reason: format!("port {port} is not exposed"),
            })
            .await;
        return;
    };
    let tcp = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&target)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => return refuse(reply, &target, e.to_string()).await,
        Err(_) => return refuse(reply, &target, format!("no answer within {CONNECT_TIMEOUT:?}")).await,
    };
    let _ = tcp.set_nodelay(true);
    reply.accept().await;
    info!(port, %target, "channel open");
    let (mut read, write) = channel.split();
    let (mut tcp_read, mut tcp_write) = tcp.into_split();
    let up = async {
        let n = tokio::io::copy(&mut tcp_read, &mut write.make_writer()).await;
        let _ = write.eof().await;
        n
    };
    let down = async {
        let n = tokio::io::copy(&mut read.make_reader(), &mut tcp_write).await;
        let _ = tcp_write.shutdown().await;
        n
    };
    let (up, down) = tokio::join!(up, down);
    // Dropping a channel does not close it; say so, or the pivot waits forever.
    let _ = write.close().await;
    match (up, down) {
        (Ok(up), Ok(down)) => info!(port, %target, up, down, "channel closed"),
        (Err(e), _) | (_, Err(e)) => debug!(port, %target, error = %e, "channel ended"),
    }
}

async fn refuse(reply: ChannelOpenHandle, target: &str, why: String) {
    warn!(%target, "cannot reach local service: {why}");
    reply
        .reject(ChannelOpenFailure::Other {
            code: ChannelOpenFailure::ConnectFailed.code(),
            reason: format!("{target}: {why}"),
        })
        .await;
}
