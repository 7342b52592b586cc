//! `--expose PORT=HOST:PORT`: which tunnel port reaches which service on the device.

use std::fmt;
use std::str::FromStr;

use crate::host::{is_host, parse_port, split_host_port};
use crate::text::excerpt;

/// One exposed service: operators ask for `device:port`, the agent connects to `target`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expose {
    pub port: u16,
    pub target: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ExposeError {
    #[error("expose '{}' is not PORT=HOST:PORT, e.g. 22=127.0.0.1:22 or 8080=[::1]:8080", excerpt(.0, 80))]
    Shape(String),
    #[error("expose '{}': '{}' is not a port number between 1 and 65535", excerpt(.0, 80), excerpt(.1, 8))]
    Port(String, String),
}

impl FromStr for Expose {
    type Err = ExposeError;

    /// The target is kept as `HOST:PORT` with the port in canonical form.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let shape = || ExposeError::Shape(s.into());
        let (port, target) = s.split_once('=').ok_or_else(shape)?;
        let port = parse_port(port).ok_or_else(|| ExposeError::Port(s.into(), port.into()))?;
        // Name a bad port as such; any other flaw is the shape.
        if let Some((_, p)) = target.rsplit_once(':').filter(|(h, _)| is_host(h)) {
            parse_port(p).ok_or_else(|| ExposeError::Port(s.into(), p.into()))?;
        }
        match split_host_port(target) {
            Some((host, Some(target_port))) => Ok(Expose { port, target: format!("{host}:{target_port}") }),
            _ => Err(shape()),
        }
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
        assert!(matches!("+22=h:22".parse::<Expose>(), Err(ExposeError::Port(..))));
        assert!(matches!("22=h:+22".parse::<Expose>(), Err(ExposeError::Port(..))));
        assert!(matches!("22=::1:22".parse::<Expose>(), Err(ExposeError::Shape(_))));
        assert!(matches!("22=h h:22".parse::<Expose>(), Err(ExposeError::Shape(_))));
        assert!(matches!("22=a=b:22".parse::<Expose>(), Err(ExposeError::Shape(_))));
        assert!(matches!("22=h\n:22".parse::<Expose>(), Err(ExposeError::Shape(_))));
        assert!(matches!("22=:22".parse::<Expose>(), Err(ExposeError::Shape(_))));
    }

    #[test]
    fn canonicalises_the_target_port() {
        let e: Expose = "22=localhost:022".parse().unwrap();
        assert_eq!(e.target, "localhost:22");
        assert_eq!(e.to_string().parse::<Expose>().unwrap(), e);
    }
}
