//! `HOST[:PORT]` as it appears in expose specs, broker URLs and tokens: a
//! host name or IPv4 address, or an IPv6 address in brackets.

use std::net::Ipv6Addr;

/// The longest host name DNS allows.
const MAX_HOST_LEN: usize = 253;

/// Splits `HOST[:PORT]`, checking both. The host keeps its brackets.
/// `None` if either part is malformed, including an IPv6 address without brackets.
pub(crate) fn split_host_port(s: &str) -> Option<(&str, Option<u16>)> {
    let (host, port) = if s.starts_with('[') {
        let end = s.find(']')?;
        let (host, rest) = s.split_at(end + 1);
        match rest {
            "" => (host, None),
            _ => (host, Some(rest.strip_prefix(':')?)),
        }
    } else {
        match s.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (s, None),
        }
    };
    if !is_host(host) {
        return None;
    }
    let port = match port {
        Some(p) => Some(parse_port(p)?),
        None => None,
    };
    Some((host, port))
}

/// A host name or IPv4 address (`[A-Za-z0-9._-]`, at most 253 characters),
/// or `[IPv6]`.
pub(crate) fn is_host(host: &str) -> bool {
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return inner.parse::<Ipv6Addr>().is_ok();
    }
    !host.is_empty()
        && host.len() <= MAX_HOST_LEN
        && host.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// 1 to 65535, digits only (no sign, no spaces).
pub(crate) fn parse_port(p: &str) -> Option<u16> {
    if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    p.parse::<u16>().ok().filter(|n| *n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_hosts_and_ports() {
        assert_eq!(split_host_port("pivot.example.com:2222"), Some(("pivot.example.com", Some(2222))));
        assert_eq!(split_host_port("127.0.0.1"), Some(("127.0.0.1", None)));
        assert_eq!(split_host_port("[::1]:22"), Some(("[::1]", Some(22))));
        assert_eq!(split_host_port("[::1]"), Some(("[::1]", None)));
        for bad in ["", ":22", "::1:22", "[::1]22", "[nope]:22", "h:0", "h:+22", "h:65536", "h :22", "h\n:22", "a/b:1"]
        {
            assert_eq!(split_host_port(bad), None, "{bad:?}");
        }
    }
}
