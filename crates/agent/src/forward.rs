//! Serving one `forwarded-tcpip` channel: connect to the exposed local
//! service, then copy bytes both ways.

use std::time::Duration;

use russh::client::{ChannelOpenHandle, Msg};
use russh::{Channel, ChannelOpenFailure};
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) async fn serve(channel: Channel<Msg>, port: u32, target: Option<String>, reply: ChannelOpenHandle) {
    let Some(target) = target else {
        warn!(port, "pivot asked for a port this agent does not expose");
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
    let mut tcp = tcp;
    let mut stream = channel.into_stream();
    match tokio::io::copy_bidirectional(&mut stream, &mut tcp).await {
        Ok((up, down)) => info!(port, %target, up, down, "channel closed"),
        Err(e) => debug!(port, %target, error = %e, "channel ended"),
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
