//! The embedded broker's TLS certificate: self-signed, made once in the
//! data dir, and pinned by devices by its fingerprint (which goes into
//! enrollment tokens and `agent.toml`), so no CA is involved.

use std::path::Path;
use std::sync::Arc;

use burrow_core::mqtt_url::CertPin;
use rumqttc::tokio_rustls::rustls;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

pub const CERT_FILE: &str = "mqtt_cert.pem";
pub const KEY_FILE: &str = "mqtt_key.pem";

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("cannot read or write {0}")]
    Io(String, #[source] std::io::Error),
    #[error("cannot generate the MQTT certificate: {0}")]
    Generate(String),
    #[error("{0} is not a PEM certificate and key pair; move it away to make a new one (devices must then be given the new fingerprint)")]
    Parse(String),
}

/// The TLS settings of the devices' listener and the certificate's pin.
pub fn load_or_create(dir: &Path) -> Result<(Arc<rustls::ServerConfig>, CertPin), TlsSetupError> {
    let (cert_path, key_path) = (dir.join(CERT_FILE), dir.join(KEY_FILE));
    if !cert_path.exists() {
        create(&cert_path, &key_path)?;
        // A pivot that ran before had another certificate its devices pin.
        if dir.join(crate::host_key::HOST_KEY_FILE).exists() && dir.join(crate::registry::DB_FILE).exists() {
            tracing::warn!(
                "made a new MQTT certificate ({}): devices enrolled before must be given its fingerprint (--mqtt-fingerprint or mqtt_fingerprint in agent.toml)",
                cert_path.display()
            );
        }
    }
    if !key_path.exists() {
        return Err(TlsSetupError::Parse(format!(
            "{} (its key {} is missing)",
            cert_path.display(),
            key_path.display()
        )));
    }
    let shown = cert_path.display().to_string();
    let cert = CertificateDer::from_pem_file(&cert_path).map_err(|_| TlsSetupError::Parse(shown.clone()))?;
    let key =
        PrivateKeyDer::from_pem_file(&key_path).map_err(|_| TlsSetupError::Parse(key_path.display().to_string()))?;
    let pin = CertPin::of_der(&cert);
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsSetupError::Generate(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .map_err(|_| TlsSetupError::Parse(shown))?;
    // Devices hold one long connection each: resumption buys nothing.
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok((Arc::new(config), pin))
}

fn create(cert_path: &Path, key_path: &Path) -> Result<(), TlsSetupError> {
    let made = rcgen::generate_simple_self_signed(vec!["burrow-pivot".to_string()])
        .map_err(|e| TlsSetupError::Generate(e.to_string()))?;
    // Key first: a certificate on disk always has its key next to it.
    write_private(key_path, made.signing_key.serialize_pem().as_bytes())?;
    write_private(cert_path, made.cert.pem().as_bytes())
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), TlsSetupError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| f.write_all(bytes))
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| TlsSetupError::Io(path.display().to_string(), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_once_then_loaded_with_the_same_pin() {
        let dir = tempfile::tempdir().unwrap();
        let (_, first) = load_or_create(dir.path()).unwrap();
        let (_, again) = load_or_create(dir.path()).unwrap();
        assert_eq!(first, again);
        let mode = std::fs::metadata(dir.path().join(KEY_FILE)).unwrap().permissions();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o600);
        std::fs::write(dir.path().join(CERT_FILE), "junk").unwrap();
        assert!(matches!(load_or_create(dir.path()), Err(TlsSetupError::Parse(_))));
    }
}
