//! Pivot-to-pivot relay. An operator on this pivot asks for a device whose
//! tunnel another pivot holds (its tunnel record names that pivot): this
//! pivot opens a `direct-tcpip` channel to the device on that pivot, over
//! one SSH connection per peer, and relays the operator's channel into it.
//! The operator's end-to-end SSH to the device runs inside, untouched.
//!
//! Pivots prove themselves to each other with their host keys: a peer
//! logs in as `@pivot:NAME` with the host key NAME registered in the
//! registry's `pivots` table, and checks the other side's host key against
//! the same table. The operator's rights were checked here, on the pivot
//! the operator reached; the holding pivot only routes to a tunnel it holds
//! (never wakes a device nor relays further, so relays cannot loop).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use burrow_core::keys::{fingerprint, parse_public_key};
use burrow_core::Id;
use russh::client;
use russh::keys::ssh_key::{PrivateKey, PublicKey};
use russh::keys::PrivateKeyWithHashAlg;
use russh::Channel;
use tracing::{info, warn};

use crate::refusal::Refusal;
use crate::registry::PivotRecord;

/// The user name prefix a pivot logs in to a peer with: `@pivot:NAME`.
/// `@` never starts a device or operator id.
pub(crate) const PEER_USER_PREFIX: &str = "@pivot:";

/// Relayed channels one peer connection may carry at once: every operator
/// of one pivot reaching devices of another shares it.
pub(crate) const PEER_MAX_CHANNELS: usize = 4096;

/// How long connecting and logging in to a peer may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a relayed channel may take to open (the device's answer included).
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);

struct PeerClient {
    /// The host key the peer registered.
    expected: PublicKey,
}

impl client::Handler for PeerClient {
    type Error = russh::Error;

    async fn check_server_key(&mut self, key: &russh::keys::PublicKeyOrCertificate) -> Result<bool, Self::Error> {
        Ok(
            matches!(key, russh::keys::PublicKeyOrCertificate::PublicKey { key, .. } if key.key_data() == self.expected.key_data()),
        )
    }
}

/// One peer's connection, once made.
type Slot = Arc<tokio::sync::Mutex<Option<Arc<client::Handle<PeerClient>>>>>;

/// This pivot's connections to its peers, made on first use and kept.
pub(crate) struct Peers {
    me: String,
    key: Arc<PrivateKey>,
    config: Arc<client::Config>,
    /// One lock per peer, so a slow or dead peer holds up only its own callers.
    /// The lock is held only while connecting, never while a channel opens.
    conns: std::sync::Mutex<HashMap<String, Slot>>,
}

impl Peers {
    pub(crate) fn new(me: &str, key: PrivateKey, keepalive: Duration) -> Self {
        let config = client::Config {
            window_size: super::WINDOW_SIZE,
            maximum_packet_size: super::MAX_PACKET,
            channel_buffer_size: super::CHANNEL_BUFFER,
            inactivity_timeout: None,
            keepalive_interval: Some(keepalive),
            keepalive_max: 2,
            nodelay: true,
            ..Default::default()
        };
        Peers { me: me.to_string(), key: Arc::new(key), config: Arc::new(config), conns: Default::default() }
    }

    /// Opens `id:port` on `peer`, connecting to it first if needed.
    pub(crate) async fn open(
        &self,
        peer: &PivotRecord,
        id: &Id,
        port: u32,
        originator: (String, u32),
    ) -> Result<Channel<client::Msg>, Refusal> {
        let slot = self.conns.lock().unwrap().entry(peer.name.clone()).or_default().clone();
        let handle = {
            let mut conn = slot.lock().await;
            match conn.as_ref() {
                Some(h) if !h.is_closed() => h.clone(),
                _ => {
                    *conn = None;
                    let handle = tokio::time::timeout(CONNECT_TIMEOUT, self.connect(peer))
                        .await
                        .unwrap_or_else(|_| Err(format!("no answer within {}s", CONNECT_TIMEOUT.as_secs())))
                        .map_err(|reason| {
                            warn!(peer = %peer.name, address = %peer.address, "cannot reach peer pivot: {reason}");
                            Refusal::Peer { id: id.clone(), pivot: peer.name.clone(), reason }
                        })?;
                    info!(peer = %peer.name, address = %peer.address, "connected to peer pivot");
                    let handle = Arc::new(handle);
                    *conn = Some(handle.clone());
                    handle
                }
            }
        };
        // A device that never answers holds up only its own operator.
        let opened = tokio::time::timeout(
            OPEN_TIMEOUT,
            handle.channel_open_direct_tcpip(id.as_str(), port, originator.0, originator.1),
        )
        .await;
        match opened {
            Ok(Ok(ch)) => Ok(ch),
            // The peer's refusal is already the operator's message.
            Ok(Err(russh::Error::ChannelOpenFailure(f))) => Err(Refusal::Relayed(f.description().to_string())),
            Ok(Err(e)) => Err(Refusal::Peer { id: id.clone(), pivot: peer.name.clone(), reason: e.to_string() }),
            Err(_) => Err(Refusal::NoAnswer { id: id.clone(), secs: OPEN_TIMEOUT.as_secs() }),
        }
    }

    async fn connect(&self, peer: &PivotRecord) -> Result<client::Handle<PeerClient>, String> {
        let expected = parse_public_key(&peer.host_key, "peer host key").map_err(|e| e.to_string())?;
        let addr = peer.address.clone();
        let handler = PeerClient { expected };
        let mut handle = client::connect(self.config.clone(), addr.as_str(), handler).await.map_err(|e| match e {
            russh::Error::UnknownKey => "its host key is not the one it registered".to_string(),
            e => e.to_string(),
        })?;
        let user = format!("{PEER_USER_PREFIX}{}", self.me);
        let auth = handle
            .authenticate_publickey(user, PrivateKeyWithHashAlg::new(self.key.clone(), None))
            .await
            .map_err(|e| e.to_string())?;
        if !auth.success() {
            return Err(format!(
                "it refused this pivot's host key {}; pivots sharing a registry need each other registered (same registry, running)",
                fingerprint(self.key.public_key())
            ));
        }
        Ok(handle)
    }

    /// Peer connections held now, for `/metrics`.
    pub(crate) fn connected(&self) -> usize {
        let slots: Vec<_> = self.conns.lock().unwrap().values().cloned().collect();
        slots.iter().filter(|s| s.try_lock().is_ok_and(|c| c.as_ref().is_some_and(|h| !h.is_closed()))).count()
    }
}
