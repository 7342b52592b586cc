//! `mqtt://HOST:PORT` and `mqtts://HOST:PORT`, plus the TLS files that go with them.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::host::split_host_port;
use crate::text::excerpt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttUrl {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MqttUrlError {
    #[error("'{}' is not mqtt://HOST[:PORT] or mqtts://HOST[:PORT] (IPv6 in brackets)", excerpt(.0, 80))]
    Shape(String),
    #[error("'{}' is not a certificate fingerprint (SHA256: and 43 base64 characters, as `burrow server` prints)", excerpt(.0, 80))]
    Fingerprint(String),
}

/// A pin on the embedded broker's TLS certificate: the SHA-256 of its DER
/// encoding, written `SHA256:` and unpadded base64 like an SSH fingerprint.
/// A device that holds a pin trusts that one certificate and nothing else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CertPin([u8; 32]);

impl CertPin {
    pub fn of_der(der: &[u8]) -> Self {
        use sha2::Digest;
        CertPin(sha2::Sha256::digest(der).into())
    }

    pub fn matches(&self, der: &[u8]) -> bool {
        *self == CertPin::of_der(der)
    }
}

impl FromStr for CertPin {
    type Err = MqttUrlError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        use base64ct::{Base64Unpadded, Encoding};
        let bad = || MqttUrlError::Fingerprint(s.to_string());
        let b64 = s.trim().strip_prefix("SHA256:").ok_or_else(bad)?;
        let mut out = [0u8; 32];
        match Base64Unpadded::decode(b64, &mut out) {
            Ok(d) if d.len() == 32 => Ok(CertPin(out)),
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for CertPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use base64ct::{Base64Unpadded, Encoding};
        write!(f, "SHA256:{}", Base64Unpadded::encode_string(&self.0))
    }
}

impl FromStr for MqttUrl {
    type Err = MqttUrlError;

    /// The host is kept without brackets; the port defaults to 1883 or 8883.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || MqttUrlError::Shape(s.to_string());
        let (tls, rest) = if let Some(r) = s.strip_prefix("mqtts://") {
            (true, r)
        } else if let Some(r) = s.strip_prefix("mqtt://") {
            (false, r)
        } else {
            return Err(bad());
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let (host, port) = split_host_port(rest).ok_or_else(bad)?;
        let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
        let port = port.unwrap_or(if tls { 8883 } else { 1883 });
        Ok(MqttUrl { host: host.to_string(), port, tls })
    }
}

impl fmt::Display for MqttUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

/// PEM files for an `mqtts://` broker: the CA to trust and, for brokers such
/// as AWS IoT Core that require it, a client certificate and key.
#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// Loaded PEM bytes: `(ca, Some((cert, key)))`.
pub type TlsPem = (Vec<u8>, Option<(Vec<u8>, Vec<u8>)>);

impl TlsFiles {
    pub fn load(&self) -> std::io::Result<TlsPem> {
        let read =
            |p: &PathBuf| std::fs::read(p).map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", p.display())));
        let ca = match &self.ca {
            Some(p) => read(p)?,
            None => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "mqtts:// needs --mqtt-fingerprint (a burrow pivot's own broker: the `mqtt certificate` it prints) or --mqtt-ca (any other broker)",
                ))
            }
        };
        let client = match (&self.cert, &self.key) {
            (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
            (None, None) => None,
            _ => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "--mqtt-cert and --mqtt-key go together",
                ))
            }
        };
        Ok((ca, client))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cert_pins_round_trip_and_refuse_garbage() {
        let pin = CertPin::of_der(b"certificate");
        assert_eq!(pin.to_string().parse(), Ok(pin));
        assert!(pin.matches(b"certificate") && !pin.matches(b"other"));
        for bad in ["", "SHA256:", "SHA256:abc", "sha256:x", "MD5:aa", "SHA256:!!!!"] {
            assert!(bad.parse::<CertPin>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn parses_urls() {
        assert_eq!("mqtt://b:1884".parse(), Ok(MqttUrl { host: "b".into(), port: 1884, tls: false }));
        assert_eq!(
            "mqtts://iot.example.com".parse(),
            Ok(MqttUrl { host: "iot.example.com".into(), port: 8883, tls: true })
        );
        assert_eq!("mqtt://127.0.0.1".parse::<MqttUrl>().unwrap().port, 1883);
        assert!("http://x".parse::<MqttUrl>().is_err());
        assert!("mqtt://:1883".parse::<MqttUrl>().is_err());
        assert!("mqtt://h:notaport".parse::<MqttUrl>().is_err());
        let v6: MqttUrl = "mqtts://[::1]".parse().unwrap();
        assert_eq!(v6, MqttUrl { host: "::1".into(), port: 8883, tls: true });
        assert_eq!(v6.to_string(), "mqtts://[::1]:8883");
        assert_eq!(v6.to_string().parse(), Ok(v6));
        assert_eq!("mqtt://[::1]:1884/".parse::<MqttUrl>().unwrap().port, 1884);
        for bad in ["mqtt://::1", "mqtt://h:0", "mqtt://h:+1", "mqtt://u@h", "mqtt://h/x", "mqtt://h h", "mqtt://h\n"] {
            assert!(bad.parse::<MqttUrl>().is_err(), "{bad:?}");
        }
    }
}
