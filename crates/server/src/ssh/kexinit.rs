//! Which algorithms a connection negotiated, for the audit trail.
//!
//! russh does not report them, but they follow from the client's first
//! KEXINIT (sent in the clear right after its version line) and our own
//! preference lists: RFC 4253 §7.1 picks, for each kind, the first name on
//! the client's list that the server also supports. [`Sniffer`] copies the
//! bytes up to the end of that packet, then frees itself.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

/// The longest first packet we look at; OpenSSH's KEXINIT is about 1.5 KiB.
const MAX_CAPTURE: usize = 16 * 1024;
const MSG_KEXINIT: u8 = 20;

/// What a connection negotiated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Negotiated {
    pub kex: String,
    pub cipher: String,
    pub mac: String,
}

impl Negotiated {
    /// Some kind of algorithm had nothing in common: the handshake failed.
    pub fn disagrees(&self) -> bool {
        [&self.kex, &self.cipher, &self.mac].iter().any(|n| n.as_str() == NONE_IN_COMMON)
    }
}

const NONE_IN_COMMON: &str = "none in common";

/// The server's side of the negotiation.
#[derive(Debug, Clone, Default)]
pub(crate) struct ServerLists {
    pub kex: Vec<String>,
    pub cipher: Vec<String>,
    pub mac: Vec<String>,
}

pub(crate) type NegotiatedSlot = Arc<OnceLock<Negotiated>>;

pub(crate) struct Sniffer {
    buf: Vec<u8>,
    lists: Arc<ServerLists>,
    out: NegotiatedSlot,
    /// Set once the client sent anything at all.
    spoke: Arc<AtomicBool>,
}

impl Sniffer {
    pub fn new(lists: Arc<ServerLists>, out: NegotiatedSlot, spoke: Arc<AtomicBool>) -> Self {
        Sniffer { buf: Vec::new(), lists, out, spoke }
    }

    /// Takes bytes read from the client; true once done (found, or given up).
    pub fn feed(&mut self, bytes: &[u8]) -> bool {
        if !bytes.is_empty() {
            self.spoke.store(true, Ordering::Relaxed);
        }
        let room = MAX_CAPTURE.saturating_sub(self.buf.len());
        self.buf.extend_from_slice(&bytes[..bytes.len().min(room)]);
        match first_packet(&self.buf) {
            Some(Some(payload)) => {
                if let Some(n) = negotiate(payload, &self.lists) {
                    let _ = self.out.set(n);
                }
                true
            }
            Some(None) => true,
            None => self.buf.len() >= MAX_CAPTURE,
        }
    }
}

/// `None` while more bytes are needed; `Some(None)` if the stream is not
/// an SSH version line followed by a packet.
fn first_packet(buf: &[u8]) -> Option<Option<&[u8]>> {
    // Lines before the version line are allowed (RFC 4253 §4.2).
    let mut rest = buf;
    loop {
        let nl = rest.iter().position(|b| *b == b'\n')?;
        let line = &rest[..nl];
        rest = &rest[nl + 1..];
        if line.starts_with(b"SSH-") {
            break;
        }
    }
    let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
    if len > MAX_CAPTURE {
        return Some(None);
    }
    let packet = rest.get(4..4 + len)?;
    let pad = *packet.first()? as usize;
    Some(packet.get(1..packet.len().checked_sub(pad)?))
}

fn negotiate(payload: &[u8], server: &ServerLists) -> Option<Negotiated> {
    let (&msg, rest) = payload.split_first()?;
    if msg != MSG_KEXINIT {
        return None;
    }
    let mut rest = rest.get(16..)?; // cookie
    let mut lists = Vec::new();
    for _ in 0..6 {
        let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
        let names = std::str::from_utf8(rest.get(4..4 + len)?).ok()?;
        lists.push(names.split(',').map(str::to_string).collect::<Vec<_>>());
        rest = &rest[4 + len..];
    }
    let pick = |client: &[String], ours: &[String]| client.iter().find(|c| ours.contains(c)).cloned();
    let kex = pick(&lists[0], &server.kex).unwrap_or_else(|| NONE_IN_COMMON.into());
    let cipher = pick(&lists[2], &server.cipher).unwrap_or_else(|| NONE_IN_COMMON.into());
    let mac = if cipher.contains("gcm") || cipher.contains("poly1305") {
        "implicit".to_string()
    } else {
        pick(&lists[4], &server.mac).unwrap_or_else(|| NONE_IN_COMMON.into())
    };
    Some(Negotiated { kex, cipher, mac })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kexinit(lists: [&str; 10]) -> Vec<u8> {
        let mut payload = vec![MSG_KEXINIT];
        payload.extend_from_slice(&[7; 16]);
        for l in lists {
            payload.extend_from_slice(&(l.len() as u32).to_be_bytes());
            payload.extend_from_slice(l.as_bytes());
        }
        payload.extend_from_slice(&[0, 0, 0, 0, 0]);
        let pad = 8 - (payload.len() + 5) % 8 + 4;
        let mut packet = ((payload.len() + 1 + pad) as u32).to_be_bytes().to_vec();
        packet.push(pad as u8);
        packet.extend_from_slice(&payload);
        packet.extend(std::iter::repeat_n(0, pad));
        packet
    }

    fn lists() -> Arc<ServerLists> {
        Arc::new(ServerLists {
            kex: vec!["curve25519-sha256".into(), "diffie-hellman-group14-sha256".into()],
            cipher: vec!["aes128-gcm@openssh.com".into(), "aes128-ctr".into()],
            mac: vec!["hmac-sha2-256".into()],
        })
    }

    #[test]
    fn first_common_name_on_the_clients_list_wins() {
        let mut bytes = b"SSH-2.0-OpenSSH_9.2\r\n".to_vec();
        bytes.extend(kexinit([
            "sntrup761x25519-sha512,diffie-hellman-group14-sha256,curve25519-sha256,ext-info-c",
            "ssh-ed25519",
            "aes128-ctr,aes128-gcm@openssh.com",
            "aes128-ctr",
            "hmac-sha1,hmac-sha2-256",
            "hmac-sha2-256",
            "none",
            "none",
            "",
            "",
        ]));
        let out: NegotiatedSlot = Default::default();
        let mut s = Sniffer::new(lists(), out.clone(), Default::default());
        // Byte by byte: a packet split across reads.
        let mut done = false;
        for b in &bytes {
            done = s.feed(std::slice::from_ref(b));
            if done {
                break;
            }
        }
        assert!(done);
        let n = out.get().unwrap();
        assert_eq!(n.kex, "diffie-hellman-group14-sha256");
        assert_eq!(n.cipher, "aes128-ctr");
        assert_eq!(n.mac, "hmac-sha2-256");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        /// Any bytes, split anywhere: no panic, and the same answer as whole.
        #[test]
        fn any_bytes_split_anywhere_give_the_same_answer(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2000),
            cut in 0usize..2000,
        ) {
            let whole: NegotiatedSlot = Default::default();
            Sniffer::new(lists(), whole.clone(), Default::default()).feed(&bytes);
            let split: NegotiatedSlot = Default::default();
            let mut s = Sniffer::new(lists(), split.clone(), Default::default());
            let cut = cut.min(bytes.len());
            if !s.feed(&bytes[..cut]) {
                s.feed(&bytes[cut..]);
            }
            proptest::prop_assert_eq!(whole.get(), split.get());
        }

        /// A real KEXINIT with random name lists always yields an answer
        /// drawn from the lists.
        #[test]
        fn kexinit_with_any_names_negotiates_within_the_lists(
            names in proptest::collection::vec("[a-z0-9@.-]{1,20}(,[a-z0-9@.-]{1,20}){0,4}", 10),
        ) {
            let mut bytes = b"SSH-2.0-x\r\n".to_vec();
            let lists10: [&str; 10] = std::array::from_fn(|i| names[i].as_str());
            bytes.extend(kexinit(lists10));
            let out: NegotiatedSlot = Default::default();
            proptest::prop_assert!(Sniffer::new(lists(), out.clone(), Default::default()).feed(&bytes));
            let n = out.get().expect("parsed");
            proptest::prop_assert!(n.kex == NONE_IN_COMMON || lists().kex.contains(&n.kex));
            proptest::prop_assert!(n.cipher == NONE_IN_COMMON || lists().cipher.contains(&n.cipher));
        }
    }

    #[test]
    fn garbage_gives_up_without_a_result() {
        let out: NegotiatedSlot = Default::default();
        let mut s = Sniffer::new(lists(), out.clone(), Default::default());
        assert!(s.feed(b"SSH-2.0-x\r\n\xff\xff\xff\xff"));
        assert!(out.get().is_none());
        let mut s = Sniffer::new(lists(), out.clone(), Default::default());
        assert!(!s.feed(b"GET / HTTP/1.1\r\n"));
        assert!(s.feed(&vec![b'a'; MAX_CAPTURE]));
    }
}
