//! The user CA: signs operators' keys into short-lived certificates that
//! devices' sshd trust (`TrustedUserCAKeys`). Its keys live in the registry,
//! so every pivot of a registry signs with the same one.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::Ordering;

use burrow_core::cert::CLOCK_SLACK;
use burrow_core::keys::{fingerprint, generate_ed25519, openssh_line, write_private_key, PublicKey};
use burrow_core::Id;
use russh::keys::ssh_key::certificate::{Builder, CertType};
use russh::keys::ssh_key::{LineEnding, PrivateKey};

use crate::registry::{CertRequest, IssuedCert, Registry, RegistryError};

/// The CA key's file in the data dir: where the first pivot of a registry
/// generates it (or finds one an admin put there), then the current
/// signing key as the registry has it.
pub const USER_CA_FILE: &str = "user_ca";

/// What an operator's certificate lets them do in a session, as OpenSSH's
/// own certificates do by default, less X11 and `~/.ssh/rc`.
const EXTENSIONS: &[&str] = &["permit-agent-forwarding", "permit-port-forwarding", "permit-pty"];

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot read or write {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} is not an OpenSSH private key")]
    Parse(String),
    #[error("{path} is readable by other users (mode {mode:o}); run chmod 600 {path}")]
    Permissions { path: String, mode: u32 },
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

/// A new CA key: (OpenSSH public line, fingerprint, OpenSSH private PEM).
pub fn new_key() -> (String, String, String, PrivateKey) {
    let key = generate_ed25519();
    let pem = key.to_openssh(LineEnding::LF).map(|p| p.to_string()).expect("ed25519 key encodes");
    (openssh_line(key.public_key()), fingerprint(key.public_key()), pem, key)
}

/// Makes sure the registry has a user CA. The first pivot of a registry
/// creates it: from `DATA/user_ca` if an admin put a key there, else a new
/// ed25519 key it writes there (0600, and `user_ca.pub`). Every pivot then
/// signs with the registry's keys, which `burrow ca rotate` adds to.
pub async fn ensure(registry: &Registry, data_dir: &Path, now: i64) -> Result<(), CaError> {
    if !registry.user_cas().await?.is_empty() {
        forget_dropped(registry, data_dir, now).await?;
        return Ok(());
    }
    let path = data_dir.join(USER_CA_FILE);
    let io = |source| CaError::Io { path: path.display().to_string(), source };
    let given = path.exists();
    let key = if given {
        let mode = std::fs::metadata(&path).map_err(io)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(CaError::Permissions { path: path.display().to_string(), mode });
        }
        let text = std::fs::read_to_string(&path).map_err(io)?;
        PrivateKey::from_openssh(text).map_err(|_| CaError::Parse(path.display().to_string()))?
    } else {
        generate_ed25519()
    };
    let pem = key.to_openssh(LineEnding::LF).map(|p| p.to_string()).expect("ed25519 key encodes");
    let fp = fingerprint(key.public_key());
    // Pivots starting together race here; the registry keeps one key, and
    // only the winner's lands in its data dir.
    if !registry.init_user_ca(&openssh_line(key.public_key()), &fp, &pem, now).await? {
        forget_dropped(registry, data_dir, now).await?;
        return Ok(());
    }
    if !given {
        write_private_key(&path, &key).map_err(io)?;
        std::fs::write(data_dir.join(format!("{USER_CA_FILE}.pub")), format!("{}\n", openssh_line(key.public_key())))
            .map_err(io)?;
    }
    tracing::info!(ca = %fp, "created the user CA that signs operators' certificates");
    Ok(())
}

/// Deletes `DATA/user_ca` (and `.pub`) if the registry no longer trusts
/// that key (`burrow ca rotate --now`, or an old key's retirement): a
/// stolen key must not stay on disk. Returns whether it did.
pub async fn forget_dropped(registry: &Registry, data_dir: &Path, now: i64) -> Result<bool, CaError> {
    let path = data_dir.join(USER_CA_FILE);
    let Ok(text) = std::fs::read_to_string(&path) else { return Ok(false) };
    let Ok(key) = PrivateKey::from_openssh(text) else { return Ok(false) };
    let fp = fingerprint(key.public_key());
    let cas = registry.user_cas().await?;
    if cas.iter().any(|c| c.fingerprint == fp && c.trusted(now)) {
        return Ok(false);
    }
    let io = |source| CaError::Io { path: path.display().to_string(), source };
    std::fs::remove_file(&path).map_err(io)?;
    let _ = std::fs::remove_file(data_dir.join(format!("{USER_CA_FILE}.pub")));
    tracing::warn!(ca = %fp, path = %path.display(), "deleted a CA key the registry no longer trusts");
    Ok(true)
}

/// The key id of a certificate: the operator and the serial, which the
/// device's sshd logs with every login it accepts.
pub fn key_id(operator: &Id, serial: u64) -> String {
    format!("burrow operator={operator} serial={serial}")
}

/// Signs `key` for `operator` with the CA key that signs now, recording it
/// in the registry.
pub async fn issue(
    registry: &Registry,
    operator: &Id,
    key: &PublicKey,
    principals: &[String],
    ttl: std::time::Duration,
    now: i64,
) -> Result<IssuedCert, RegistryError> {
    let req = CertRequest { operator, key, principals, ttl, now, slack: CLOCK_SLACK };
    registry
        .issue_certificate(req, |serial, ca, valid_after, valid_before| {
            let ca_key =
                PrivateKey::from_openssh(&ca.private_key).map_err(|_| "the CA key is unreadable".to_string())?;
            let mut b = Builder::new_with_random_nonce(
                &mut rand::rng(),
                key.key_data().clone(),
                valid_after.max(0) as u64,
                valid_before.max(0) as u64,
            )
            .map_err(|e| e.to_string())?;
            b.serial(serial).map_err(|e| e.to_string())?;
            b.cert_type(CertType::User).map_err(|e| e.to_string())?;
            b.key_id(key_id(operator, serial)).map_err(|e| e.to_string())?;
            for p in principals {
                b.valid_principal(p.clone()).map_err(|e| e.to_string())?;
            }
            for ext in EXTENSIONS {
                b.extension(*ext, "").map_err(|e| e.to_string())?;
            }
            b.comment(format!("burrow:{operator}")).map_err(|e| e.to_string())?;
            let cert = b.sign(&ca_key).map_err(|e| e.to_string())?;
            cert.to_openssh().map_err(|e| e.to_string())
        })
        .await
}

/// Tells every agent whose tunnel this pivot holds to fetch its trust again
/// if the CA keys in force or the revoked keys changed since `last`: a
/// rotation or an operator's removal reaches connected devices in seconds,
/// not at their next hourly refresh. Each agent waits a random moment
/// before fetching, so a fleet does not ask at once.
pub(crate) async fn nudge_if_changed(shared: &std::sync::Arc<crate::Shared>, last: &mut Option<u64>) {
    let now = burrow_core::time::now_unix();
    let digest = async {
        let cas: Vec<String> =
            shared.registry.user_cas().await?.into_iter().filter(|c| c.trusted(now)).map(|c| c.fingerprint).collect();
        let revoked = shared.registry.revoked_operator_keys(now, burrow_core::cert::MAX_REVOKED_KEYS).await?;
        Ok::<_, RegistryError>(crate::registry::trust_digest(&cas, &revoked))
    };
    let digest = match digest.await {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the CA keys and revoked keys");
            return;
        }
    };
    let changed = last.is_some_and(|l| l != digest);
    *last = Some(digest);
    if !changed {
        return;
    }
    tidy(shared).await;
    // One round at a time; changes meanwhile make one more round after it.
    shared.nudge_again.store(true, Ordering::Release);
    if shared.nudging.swap(true, Ordering::AcqRel) {
        return;
    }
    let s = shared.clone();
    shared.tracker.spawn(async move {
        loop {
            while s.nudge_again.swap(false, Ordering::AcqRel) {
                nudge_round(&s).await;
            }
            s.nudging.store(false, Ordering::Release);
            // A change that came after the last check but before the store.
            if !s.nudge_again.load(Ordering::Acquire) || s.nudging.swap(true, Ordering::AcqRel) {
                break;
            }
        }
    });
}

/// Nudges every agent whose tunnel this pivot holds, [`NUDGE_PARALLEL`] at once.
async fn nudge_round(shared: &std::sync::Arc<crate::Shared>) {
    let tunnels = shared.router.tunnels();
    tracing::info!(tunnels = tunnels.len(), "CA keys or revoked keys changed; telling connected agents");
    let limit = std::sync::Arc::new(tokio::sync::Semaphore::new(NUDGE_PARALLEL));
    let mut set = tokio::task::JoinSet::new();
    for (id, tunnel) in tunnels {
        let limit = limit.clone();
        set.spawn(async move {
            let _permit = limit.acquire_owned().await.expect("never closed");
            let open =
                tunnel.handle.channel_open_forwarded_tcpip(burrow_core::rpc::TRUST_NUDGE_HOST, 0, "127.0.0.1", 0);
            // Refused, as it should be; an agent that took it gets it closed.
            if let Ok(Ok(ch)) = tokio::time::timeout(NUDGE_TIMEOUT, open).await {
                let _ = tokio::time::timeout(NUDGE_TIMEOUT, ch.close()).await;
            }
            tracing::debug!(device = %id, "told to fetch its trust again");
        });
    }
    while set.join_next().await.is_some() {}
}

/// Once a minute, and when the CA keys change: retired keys lose their
/// private half in the registry, and `DATA/user_ca` goes if the registry no
/// longer trusts it (after a `ca rotate --now` run anywhere).
pub(crate) async fn tidy(shared: &crate::Shared) {
    let now = burrow_core::time::now_unix();
    match shared.registry.forget_retired_ca_keys(now).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(keys = n, "dropped the private half of retired CA keys"),
        Err(e) => tracing::warn!(error = %e, "cannot drop retired CA keys"),
    }
    if let Err(e) = forget_dropped(&shared.registry, &shared.config.data_dir, now).await {
        tracing::warn!(error = %e, "cannot check the CA key in the data dir");
    }
}

/// Nudges in flight at once.
const NUDGE_PARALLEL: usize = 64;
/// How long a nudge waits for an agent.
const NUDGE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
