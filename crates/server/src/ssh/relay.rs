//! Byte relay between an operator's channel and a device's channel.
//!
//! Each direction moves russh `Bytes` as they arrive and waits on the peer's
//! window before sending, so a slow reader stalls the writer instead of
//! growing the pivot's memory: at most one window plus the channel buffer is
//! ever parked per direction.

use russh::server::Msg;
use russh::{Channel, ChannelMsg, ChannelReadHalf, ChannelWriteHalf};

/// Relays until either side closes. A close ends the relay at once: the
/// closing side takes no more data, and each pump forwards everything that
/// arrived before the close it saw. (russh does not report the peer's answer
/// to our own close, so waiting for it would hang.)
pub(crate) async fn relay(a: Channel<Msg>, b: Channel<Msg>) {
    let (a_read, a_write) = a.split();
    let (b_read, b_write) = b.split();
    tokio::select! {
        _ = pump(a_read, &b_write) => {}
        _ = pump(b_read, &a_write) => {}
    }
    let _ = a_write.close().await;
    let _ = b_write.close().await;
}

async fn pump(mut from: ChannelReadHalf, to: &ChannelWriteHalf<Msg>) {
    while let Some(msg) = from.wait().await {
        let go_on = match msg {
            ChannelMsg::Data { data } => to.data_bytes(data).await.is_ok(),
            ChannelMsg::Eof => to.eof().await.is_ok(),
            ChannelMsg::Close => false,
            _ => true,
        };
        if !go_on {
            break;
        }
    }
    let _ = to.close().await;
}
