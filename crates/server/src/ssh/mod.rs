//! The pivot's SSH side, split by phase of a connection.
//!
//! - [`accept`]: the accept loop, connection limits and deadlines.
//! - [`handler`]: the russh `Handler`, a thin adapter that checks who may do what.
//! - [`route`]: turning an operator's `direct-tcpip` into a device channel, or a refusal.
//! - [`relay`]: copying bytes between two channels under SSH flow control.
//! - [`rpc`]: the `@burrow` admin channel.

pub(crate) mod accept;
pub(crate) mod handler;
pub(crate) mod relay;
pub(crate) mod route;
pub(crate) mod rpc;
mod stream;

use std::sync::Arc;
use std::time::Duration;

use russh::keys::ssh_key::PrivateKey;
use russh::server::Config as SshConfig;
use std::borrow::Cow;

use russh::{cipher, compression, MethodKind, MethodSet, Preferred, SshId};

use crate::Config;

/// Per-channel receive window. 2 MiB keeps a single scp near line rate on
/// loopback while bounding what one slow reader can park in the pivot.
const WINDOW_SIZE: u32 = 2 * 1024 * 1024;
/// Largest packet we accept; 32 KiB is what OpenSSH uses for forwarded channels.
const MAX_PACKET: u32 = 32 * 1024;
/// Messages queued per channel before russh stops reading the socket.
const CHANNEL_BUFFER: usize = 64;

/// AES-GCM first: with AES-NI it moves bytes at a fraction of
/// chacha20-poly1305's CPU cost, and the pivot decrypts and re-encrypts every
/// byte it relays. Clients choose; these are what we offer, in order.
const CIPHERS: &[cipher::Name] = &[
    cipher::AES_128_GCM,
    cipher::AES_256_GCM,
    cipher::CHACHA20_POLY1305,
    cipher::AES_256_CTR,
    cipher::AES_192_CTR,
    cipher::AES_128_CTR,
];

/// Relayed bytes are an encrypted inner session: compressing them again is
/// pure cost, so the pivot offers none.
const COMPRESSION: &[compression::Name] = &[compression::NONE];

pub(crate) fn ssh_config(config: &Config, host_key: PrivateKey) -> Arc<SshConfig> {
    Arc::new(SshConfig {
        server_id: SshId::Standard(format!("SSH-2.0-burrow_{}", env!("CARGO_PKG_VERSION")).into()),
        // Keys only: password, keyboard-interactive and none are never offered.
        methods: MethodSet::from(&[MethodKind::PublicKey][..]),
        auth_rejection_time: Duration::from_millis(300),
        auth_rejection_time_initial: Some(Duration::ZERO),
        keys: vec![host_key],
        window_size: WINDOW_SIZE,
        maximum_packet_size: MAX_PACKET,
        channel_buffer_size: CHANNEL_BUFFER,
        max_auth_attempts: 6,
        // Idle tunnels are the normal state of a device; liveness comes from
        // keepalives, not from traffic.
        inactivity_timeout: None,
        keepalive_interval: Some(config.keepalive_interval),
        keepalive_max: config.keepalive_max,
        nodelay: true,
        preferred: Preferred {
            cipher: Cow::Borrowed(CIPHERS),
            compression: Cow::Borrowed(COMPRESSION),
            ..Preferred::DEFAULT
        },
        ..Default::default()
    })
}
