//! The pivot's SSH side, split by phase of a connection.
//!
//! - [`accept`]: the accept loop, connection limits and deadlines.
//! - [`handler`]: the russh `Handler`, a thin adapter that checks who may do what.
//! - [`route`]: turning an operator's `direct-tcpip` into a device channel, or a refusal.
//! - [`relay`]: copying bytes between two channels under SSH flow control.
//! - [`rpc`]: the `@burrow` admin channel.
//! - [`kexinit`]: the algorithms a connection negotiated, for the audit.

pub(crate) mod accept;
pub(crate) mod handler;
pub(crate) mod kexinit;
pub(crate) mod peers;
pub(crate) mod relay;
pub(crate) mod route;
pub(crate) mod rpc;
mod stream;

use std::sync::Arc;
use std::time::Duration;

use russh::keys::ssh_key::PrivateKey;
use russh::server::Config as SshConfig;
use std::borrow::Cow;

use russh::keys::ssh_key::{Algorithm, EcdsaCurve, HashAlg};
use russh::{compression, MethodKind, MethodSet, Preferred, SshId};

use kexinit::ServerLists;

use crate::Config;

/// Per-channel receive window. 2 MiB keeps a single scp near line rate on
/// loopback while bounding what one slow reader can park in the pivot.
const WINDOW_SIZE: u32 = 2 * 1024 * 1024;
/// Largest packet we accept; 32 KiB is what OpenSSH uses for forwarded channels.
const MAX_PACKET: u32 = 32 * 1024;
/// Messages queued per channel before russh stops reading the socket.
const CHANNEL_BUFFER: usize = 64;

/// Relayed bytes are an encrypted inner session: compressing them again is
/// pure cost, so the pivot offers none.
const COMPRESSION: &[compression::Name] = &[compression::NONE];

/// Host-key and user-key signature algorithms. `ssh-rsa` (RSA with SHA-1)
/// is left out: an RSA key must sign with SHA-2.
const KEY_ALGORITHMS: &[Algorithm] = &[
    Algorithm::Ed25519,
    Algorithm::Ecdsa { curve: EcdsaCurve::NistP256 },
    Algorithm::Ecdsa { curve: EcdsaCurve::NistP384 },
    Algorithm::Ecdsa { curve: EcdsaCurve::NistP521 },
    Algorithm::Rsa { hash: Some(HashAlg::Sha512) },
    Algorithm::Rsa { hash: Some(HashAlg::Sha256) },
];

/// The russh config and the lists the audit's algorithm report needs.
/// `config.algorithms` was checked at start-up.
pub(crate) fn ssh_config(config: &Config, host_key: PrivateKey) -> Result<(Arc<SshConfig>, Arc<ServerLists>), String> {
    let (kex, ciphers, macs) = config.algorithms.resolve()?;
    let lists = ServerLists {
        kex: kex.iter().map(|k| k.as_ref().to_string()).collect(),
        cipher: ciphers.iter().map(|c| c.as_ref().to_string()).collect(),
        mac: macs.iter().map(|m| m.as_ref().to_string()).collect(),
    };
    let ssh = SshConfig {
        server_id: SshId::Standard(format!("SSH-2.0-burrow_{}", env!("CARGO_PKG_VERSION")).into()),
        // Keys only: password, keyboard-interactive and none are never offered.
        methods: MethodSet::from(&[MethodKind::PublicKey][..]),
        auth_rejection_time: Duration::from_millis(300),
        auth_rejection_time_initial: Some(Duration::ZERO),
        keys: vec![host_key],
        window_size: WINDOW_SIZE,
        maximum_packet_size: MAX_PACKET,
        channel_buffer_size: CHANNEL_BUFFER,
        max_auth_attempts: config.limits.max_auth_tries,
        // Idle tunnels are the normal state of a device; liveness comes from
        // keepalives, not from traffic.
        inactivity_timeout: None,
        keepalive_interval: Some(config.keepalive_interval),
        keepalive_max: config.keepalive_max,
        nodelay: true,
        preferred: Preferred {
            kex: Cow::Owned(kex),
            key: Cow::Borrowed(KEY_ALGORITHMS),
            cipher: Cow::Owned(ciphers),
            mac: Cow::Owned(macs),
            compression: Cow::Borrowed(COMPRESSION),
            ..Preferred::DEFAULT
        },
        ..Default::default()
    };
    Ok((Arc::new(ssh), Arc::new(lists)))
}
