//! Byte relay between an operator's channel and a device's channel.
//!
//! Each direction moves russh `Bytes` as they arrive and waits on the peer's
//! window before sending, so a slow reader stalls the writer instead of
//! growing the pivot's memory: at most one window plus the channel buffer is
//! ever parked per direction.

use std::sync::atomic::{AtomicU64, Ordering};

use russh::{Channel, ChannelId, ChannelMsg, ChannelReadHalf, ChannelWriteHalf};

/// Relays until either side closes. A close ends the relay at once: the
/// closing side takes no more data, and each pump forwards everything that
/// arrived before the close it saw. (russh does not report the peer's answer
/// to our own close, so waiting for it would hang.)
/// Bytes moved from `a` to `b` are added to `a_to_b`, the others to
/// `b_to_a`; returns this relay's own totals, `(a to b, b to a)`.
/// Either side may be a server's channel or a client's (a relay through a
/// peer pivot).
pub(crate) async fn relay<A, B>(a: Channel<A>, b: Channel<B>, a_to_b: &AtomicU64, b_to_a: &AtomicU64) -> (u64, u64)
where
    A: From<(ChannelId, ChannelMsg)> + Send + Sync + 'static,
    B: From<(ChannelId, ChannelMsg)> + Send + Sync + 'static,
{
    let (a_read, a_write) = a.split();
    let (b_read, b_write) = b.split();
    let (mut ab, mut ba) = (0, 0);
    tokio::select! {
        _ = pump(a_read, &b_write, a_to_b, &mut ab) => {}
        _ = pump(b_read, &a_write, b_to_a, &mut ba) => {}
    }
    let _ = a_write.close().await;
    let _ = b_write.close().await;
    (ab, ba)
}

async fn pump<S>(mut from: ChannelReadHalf, to: &ChannelWriteHalf<S>, moved: &AtomicU64, mine: &mut u64)
where
    S: From<(ChannelId, ChannelMsg)> + Send + Sync + 'static,
{
    while let Some(msg) = from.wait().await {
        let go_on = match msg {
            ChannelMsg::Data { data } => {
                moved.fetch_add(data.len() as u64, Ordering::Relaxed);
                *mine += data.len() as u64;
                to.data_bytes(data).await.is_ok()
            }
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
