//! `mqtt://HOST:PORT` and `mqtts://HOST:PORT`, plus the TLS files that go with them.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttUrl {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MqttUrlError {
    #[error("'{0}' is not mqtt://HOST[:PORT] or mqtts://HOST[:PORT]")]
    Shape(String),
}

impl FromStr for MqttUrl {
    type Err = MqttUrlError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || MqttUrlError::Shape(s.to_string());
        let (tls, rest) = if let Some(r) = s.strip_prefix("mqtts://") {
            (true, r)
        } else if let Some(r) = s.strip_prefix("mqtt://") {
            (false, r)
        } else {
            return Err(bad());
        };
        let rest = rest.trim_end_matches('/');
        let default_port = if tls { 8883 } else { 1883 };
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (h, p.parse::<u16>().map_err(|_| bad())?),
            _ => (rest, default_port),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || host.contains('/') {
            return Err(bad());
        }
        Ok(MqttUrl { host: host.to_string(), port, tls })
    }
}

impl fmt::Display for MqttUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        write!(f, "{scheme}://{}:{}", self.host, self.port)
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
            None => return Err(std::io::Error::new(std::io::ErrorKind::NotFound, "mqtts:// needs --mqtt-ca")),
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
    }
}
