//! The TCP stream under each SSH session, woken once per packet.
//!
//! russh reads a packet as two exact reads: its length, then the rest. When
//! a relay is faster than the hosts at either end (the normal case), the
//! rest has usually only partly arrived, so a plain socket wakes the session
//! for every piece: measured at two wake-ups and four `recv` calls per 32 KiB
//! packet, a fifth of the pivot's CPU per relayed GiB. Here, before waiting,
//! the socket's receive low-water mark (`SO_RCVLOWAT`) is set to the bytes
//! the pending exact read still needs, so the kernel wakes us when they are
//! all there. Setting it also wakes us at once if they already are.
//!
//! Only exact reads may do this: a read that would accept fewer bytes than
//! it asks for could wait forever. russh's only other read is of the peer's
//! version line (into a larger buffer), so the low-water mark is used only
//! once that line's newline has gone by.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Largest low-water mark we ask for; a packet longer than this is read in
/// more than one wake-up, which is correct, only slower. Kept near one
/// OpenSSH packet (32 KiB plus framing) so the mark never has to grow the
/// socket's receive buffer much (Linux >= 4.18 grows it to fit the mark).
const MAX_LOWAT: usize = 64 * 1024;

pub(crate) struct PacketStream {
    inner: TcpStream,
    /// Watches the client's first KEXINIT, then is dropped.
    sniffer: Option<Box<super::kexinit::Sniffer>>,
    /// The version line has been read; every read from now on is exact.
    exact: bool,
    /// Bytes read so far, until `exact`; `usize::MAX` once marks are given up.
    seen: usize,
    /// The low-water mark currently set on the socket.
    lowat: usize,
}

impl PacketStream {
    pub fn new(inner: TcpStream) -> Self {
        PacketStream { inner, sniffer: None, exact: false, seen: 0, lowat: 1 }
    }

    /// Also reports the algorithms the client's first KEXINIT leads to.
    pub fn sniffing(mut self, sniffer: super::kexinit::Sniffer) -> Self {
        self.sniffer = Some(Box::new(sniffer));
        self
    }

    #[cfg(target_os = "linux")]
    fn set_lowat(&mut self, want: usize) {
        let want = want.clamp(1, MAX_LOWAT);
        if want == self.lowat {
            return;
        }
        if self.setsockopt_lowat(want) {
            self.lowat = want;
        } else {
            // The mark left from an earlier, longer read could exceed what
            // this one needs: stop using marks rather than risk waiting on it.
            self.exact = false;
            self.seen = usize::MAX; // never again on this connection
            if self.setsockopt_lowat(1) {
                self.lowat = 1;
            }
        }
    }

    #[cfg(target_os = "linux")]
    fn setsockopt_lowat(&self, value: usize) -> bool {
        use std::os::fd::AsRawFd;
        let value = value as libc::c_int;
        // SAFETY: a valid socket descriptor and a c_int option of the right size.
        let rc = unsafe {
            libc::setsockopt(
                self.inner.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVLOWAT,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        rc == 0
    }

    #[cfg(not(target_os = "linux"))]
    fn set_lowat(&mut self, _want: usize) {}
}

impl AsyncRead for PacketStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let want = buf.remaining();
        loop {
            ready!(this.inner.poll_read_ready(cx))?;
            let filled = buf.filled().len();
            // russh's buffers are already initialised, so this costs nothing.
            match this.inner.try_read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    if let Some(s) = &mut this.sniffer {
                        if s.feed(&buf.filled()[filled..]) {
                            this.sniffer = None;
                        }
                    }
                    if !this.exact && this.seen != usize::MAX {
                        // A newline ends the version line, except as the very
                        // first byte (russh does not count that as a line).
                        let new = &buf.filled()[filled..];
                        let skip = usize::from(this.seen == 0);
                        if new.iter().skip(skip).any(|&b| b == b'\n') {
                            this.exact = true;
                        }
                        this.seen = this.seen.saturating_add(new.len());
                    }
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if this.exact {
                        this.set_lowat(want);
                    }
                    // Readiness was cleared; the next poll registers the waker.
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for PacketStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn lowat(s: &TcpStream) -> i32 {
        lowat_fd(s.as_raw_fd())
    }

    fn lowat_fd(fd: std::os::fd::RawFd) -> i32 {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: valid socket, buffer of the right size.
        let rc =
            unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVLOWAT, (&mut v as *mut i32).cast(), &mut len) };
        assert_eq!(rc, 0);
        v
    }

    async fn pair() -> (PacketStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (PacketStream::new(s), c)
    }

    #[tokio::test]
    async fn waits_for_the_whole_exact_read_after_the_version_line() {
        let (mut s, mut c) = pair().await;
        c.write_all(b"SSH-2.0-test\r\n").await.unwrap();
        let mut line = [0u8; 256];
        let n = s.read(&mut line).await.unwrap();
        assert_eq!(&line[..n], b"SSH-2.0-test\r\n");
        assert_eq!(lowat(&s.inner), 1, "the version line is read without a low-water mark");

        // A 10-byte exact read whose bytes arrive in two pieces.
        c.write_all(b"12345").await.unwrap();
        let fd = s.inner.as_raw_fd();
        let reader = tokio::spawn(async move {
            let mut packet = [0u8; 10];
            s.read_exact(&mut packet).await.unwrap();
            (s, packet)
        });
        // The reader got the first half, found the socket empty and set the
        // mark to what it still misses before waiting.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while lowat_fd(fd) != 5 {
            assert!(tokio::time::Instant::now() < deadline, "the mark was never set");
            tokio::task::yield_now().await;
        }
        c.write_all(b"67890").await.unwrap();
        let (s, packet) = reader.await.unwrap();
        assert_eq!(&packet, b"1234567890");
        assert_eq!(lowat(&s.inner), 5, "waited for exactly the 5 bytes still missing");
    }

    #[tokio::test]
    async fn a_leading_newline_does_not_end_the_version_line() {
        let (mut s, mut c) = pair().await;
        c.write_all(b"\n").await.unwrap();
        let mut line = [0u8; 256];
        assert_eq!(s.read(&mut line).await.unwrap(), 1);
        assert!(!s.exact, "russh is still reading its version line");
        c.write_all(b"SSH-2.0-x\r\n").await.unwrap();
        let n = s.read(&mut line).await.unwrap();
        assert_eq!(&line[..n], b"SSH-2.0-x\r\n");
        assert!(s.exact);
    }

    #[tokio::test]
    async fn a_short_version_line_is_not_held_back() {
        let (mut s, mut c) = pair().await;
        let reader = tokio::spawn(async move {
            let mut line = [0u8; 256];
            let n = s.read(&mut line).await.unwrap();
            line[..n].to_vec()
        });
        c.write_all(b"SSH-2.0-x\r\n").await.unwrap();
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), reader).await.unwrap().unwrap();
        assert_eq!(got, b"SSH-2.0-x\r\n");
    }
}
