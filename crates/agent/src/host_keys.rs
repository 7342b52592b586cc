//! The host keys of the device's own sshd, read over the network the way
//! `ssh-keyscan` does: one key exchange per key type, stopped once the
//! server has shown its key. The agent reports them to the pivot when its
//! tunnel comes up, so operators can pin them without anyone copying files.

use std::borrow::Cow;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::client;
use russh::keys::{Algorithm, EcdsaCurve, HashAlg, PublicKeyOrCertificate};

/// How long one key exchange with the local sshd may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

struct Keyscan(Arc<Mutex<Option<String>>>);

impl client::Handler for Keyscan {
    type Error = russh::Error;

    async fn check_server_key(&mut self, key: &PublicKeyOrCertificate) -> Result<bool, Self::Error> {
        if let PublicKeyOrCertificate::PublicKey { key, .. } = key {
            *self.0.lock().unwrap() = Some(burrow_core::keys::openssh_line(key));
        }
        // Seen what we came for: end the handshake here.
        Ok(false)
    }
}

/// The OpenSSH lines of the host keys `target` (HOST:PORT) shows, one per
/// key type it has; empty if it cannot be reached.
pub(crate) async fn scan(target: &str) -> Vec<String> {
    let kinds = [
        Algorithm::Ed25519,
        Algorithm::Ecdsa { curve: EcdsaCurve::NistP256 },
        Algorithm::Ecdsa { curve: EcdsaCurve::NistP384 },
        Algorithm::Ecdsa { curve: EcdsaCurve::NistP521 },
        Algorithm::Rsa { hash: Some(HashAlg::Sha512) },
    ];
    let mut keys = Vec::new();
    for kind in kinds {
        let seen = Arc::new(Mutex::new(None));
        let preferred = russh::Preferred { key: Cow::Owned(vec![kind]), ..Default::default() };
        let config = Arc::new(client::Config { preferred, ..Default::default() });
        let attempt = async {
            let tcp = tokio::net::TcpStream::connect(target).await.ok()?;
            let _ = client::connect_stream(config, tcp, Keyscan(seen.clone())).await;
            Some(())
        };
        if tokio::time::timeout(PROBE_TIMEOUT, attempt).await.ok().flatten().is_none() {
            break; // unreachable: no point trying the other types
        }
        let line = seen.lock().unwrap().take();
        if let Some(line) = line.filter(|l| !keys.contains(l)) {
            keys.push(line);
        }
    }
    keys
}
