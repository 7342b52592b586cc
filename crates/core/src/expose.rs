//! `--expose PORT=HOST:PORT`: which tunnel port reaches which service on the device.

use std::fmt;
use std::str::FromStr;

/// One exposed service: operators ask for `device:port`, the agent connects to `target`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expose {
    pub port: u16,
    pub target: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ExposeError {
    #[error("expose '{0}' is not PORT=HOST:PORT, e.g. 22=127.0.0.1:22")]
    Shape(String),
    #[error("expose '{0}': '{1}' is not a port number between 1 and 65535")]
    Port(String, String),
}

impl FromStr for Expose {
    type Err = ExposeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (port, target) = s.split_once('=').ok_or_else(|| ExposeError::Shape(s.into()))?;
        let port = parse_port(s, port)?;
        let (host, target_port) = target.rsplit_once(':').ok_or_else(|| ExposeError::Shape(s.into()))?;
        if host.is_empty() {
            return Err(ExposeError::Shape(s.into()));
        }
        parse_port(s, target_port)?;
        Ok(Expose { port, target: target.to_string() })
    }
}

fn parse_port(whole: &str, p: &str) -> Result<u16, ExposeError> {
    match p.parse::<u16>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(ExposeError::Port(whole.into(), p.into())),
    }
}

impl fmt::Display for Expose {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.port, self.target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_port_and_target() {
        let e: Expose = "22=127.0.0.1:22".parse().unwrap();
        assert_eq!(e, Expose { port: 22, target: "127.0.0.1:22".into() });
        let e: Expose = "8081=[::1]:8081".parse().unwrap();
        assert_eq!(e.target, "[::1]:8081");
    }

    #[test]
    fn rejects_bad_specs() {
        assert!(matches!("22".parse::<Expose>(), Err(ExposeError::Shape(_))));
        assert!(matches!("22=host".parse::<Expose>(), Err(ExposeError::Shape(_))));
        assert!(matches!("0=h:22".parse::<Expose>(), Err(ExposeError::Port(..))));
        assert!(matches!("22=h:99999".parse::<Expose>(), Err(ExposeError::Port(..))));
    }
}
