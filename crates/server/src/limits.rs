//! What one peer may cost the pivot before and after it authenticates:
//! pre-authentication slots (OpenSSH's `MaxStartups`/`PerSourceMaxStartups`),
//! the login grace time, authentication attempts, channels per connection,
//! bytes buffered for admin requests, and the file descriptors kept in
//! reserve for registered peers.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// `start:rate:full`, as OpenSSH's `MaxStartups`: below `start`
/// unauthenticated connections every new one is served; from `start` on, a
/// new one is dropped with probability `rate`%, rising linearly to 100% at
/// `full`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxStartups {
    pub start: usize,
    pub rate: u32,
    pub full: usize,
}

impl std::str::FromStr for MaxStartups {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("'{s}' is not START:RATE:FULL (e.g. 10:30:100) or a single number");
        let parts: Vec<&str> = s.split(':').collect();
        let num = |p: &str| p.trim().parse::<usize>().map_err(|_| bad());
        let m = match parts.as_slice() {
            [full] => {
                let full = num(full)?;
                MaxStartups { start: full, rate: 100, full }
            }
            [start, rate, full] => {
                MaxStartups { start: num(start)?, rate: rate.trim().parse().map_err(|_| bad())?, full: num(full)? }
            }
            _ => return Err(bad()),
        };
        if m.full == 0 || m.start > m.full || m.rate > 100 {
            return Err(format!("'{s}': need 0 < START <= FULL and RATE <= 100"));
        }
        Ok(m)
    }
}

impl std::fmt::Display for MaxStartups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{}", self.start, self.rate, self.full)
    }
}

/// Every limit, each a `burrow server` flag.
#[derive(Debug, Clone)]
pub struct Limits {
    /// From accept to authentication, key exchange included (`LoginGraceTime`).
    pub login_grace: Duration,
    /// Authentication attempts per connection (`MaxAuthTries`).
    pub max_auth_tries: usize,
    /// Unauthenticated connections across all sources.
    pub max_startups: MaxStartups,
    /// Unauthenticated connections from one source address.
    pub per_source_startups: usize,
    /// Channels open at once on one operator connection.
    pub max_channels: usize,
    /// Ports one device connection may forward.
    pub max_forwards: usize,
    /// Connections one key may hold at once.
    pub max_sessions_per_key: usize,
    /// Bytes of `@burrow` requests buffered across the whole pivot.
    pub admin_buffer: usize,
    /// Descriptors held back from connections, for the registry, the
    /// broker and the listeners.
    pub fd_reserve: u64,
}

/// Channels an unregistered key (the enrollment user) may hold open.
pub const ENROLL_CHANNELS: usize = 2;
/// `@burrow` requests an enrollment key may make on one connection.
pub const ENROLL_REQUESTS: usize = 3;
/// Bytes of admin requests one connection may buffer at once (an
/// enrollment key: one request's worth).
pub const CONN_ADMIN_BUFFER: usize = 4 * MAX_ADMIN_REQUEST;
/// How long one `@burrow` request may take to arrive.
pub const ADMIN_REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// The largest single `@burrow` request.
pub const MAX_ADMIN_REQUEST: usize = 64 * 1024;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            login_grace: Duration::from_secs(30),
            max_auth_tries: 6,
            max_startups: MaxStartups { start: 10, rate: 30, full: 100 },
            per_source_startups: 10,
            max_channels: 64,
            max_forwards: 16,
            max_sessions_per_key: 32,
            admin_buffer: 4 * 1024 * 1024,
            fd_reserve: 128,
        }
    }
}

impl Limits {
    /// Checks the limits against each other and the descriptors available.
    /// Returns the number of connections the pivot may hold at once.
    pub fn check(&self, nofile: u64, max_connections: usize) -> Result<usize, String> {
        if self.login_grace.is_zero() {
            return Err("--login-grace-time must be more than 0s".into());
        }
        if !(1..=100).contains(&self.max_auth_tries) {
            return Err("--max-auth-tries must be between 1 and 100".into());
        }
        if self.per_source_startups == 0 {
            return Err("--per-source-max-startups must be at least 1".into());
        }
        if self.max_channels == 0 || self.max_forwards == 0 || self.max_sessions_per_key == 0 {
            return Err("--max-channels, --max-forwards and --max-sessions-per-key must be at least 1".into());
        }
        if self.admin_buffer < MAX_ADMIN_REQUEST {
            return Err(format!("--admin-buffer must be at least {MAX_ADMIN_REQUEST} bytes (one request)"));
        }
        // Each connection costs one descriptor (two while unauthenticated:
        // the grace-time timer keeps a duplicate to close it with).
        let usable = nofile.saturating_sub(self.fd_reserve) as usize;
        let preauth = self.max_startups.full * 2;
        if usable <= preauth {
            return Err(format!(
                "only {nofile} file descriptors: --fd-reserve {} plus two per unauthenticated slot (--max-startups full {}) leave none for registered peers; lower --max-startups or raise the limit",
                self.fd_reserve, self.max_startups.full
            ));
        }
        Ok(max_connections.min(usable - self.max_startups.full))
    }
}

/// The address limits and bans count by: IPv4 (an IPv4-mapped IPv6 address
/// counts as its IPv4 address), or an IPv6 /64, which one host usually owns whole.
pub fn source_of(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(bits.into())
        }
        v4 => v4,
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns the limit now in force.
pub fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit write and read a valid rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    lim.rlim_cur
}

/// Why a new connection was not served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dropped {
    /// This source already holds its share of unauthenticated slots.
    PerSource,
    /// Random early drop between `start` and `full`.
    Early,
    /// Every unauthenticated slot is taken.
    Full,
}

impl Dropped {
    pub fn kind(self) -> &'static str {
        match self {
            Dropped::PerSource => "per_source",
            Dropped::Early => "early_drop",
            Dropped::Full => "full",
        }
    }
}

/// Counts unauthenticated connections, in total and per source.
pub(crate) struct PreAuth {
    limits: MaxStartups,
    per_source: usize,
    // A std Mutex: each critical section is a map update, never across .await.
    state: Mutex<PreAuthState>,
}

#[derive(Default)]
struct PreAuthState {
    total: usize,
    by_source: HashMap<IpAddr, usize>,
}

impl PreAuth {
    pub fn new(limits: &Limits) -> Arc<Self> {
        Arc::new(PreAuth {
            limits: limits.max_startups,
            per_source: limits.per_source_startups,
            state: Mutex::default(),
        })
    }

    /// Takes a slot for a new connection from `ip`, or says why not.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<PreAuthSlot, Dropped> {
        let mut st = self.state.lock().unwrap();
        let mine = st.by_source.get(&ip).copied().unwrap_or(0);
        if mine >= self.per_source {
            return Err(Dropped::PerSource);
        }
        let MaxStartups { start, rate, full } = self.limits;
        if st.total >= full {
            return Err(Dropped::Full);
        }
        if st.total >= start {
            // rate% at start, rising linearly to 100% at full.
            let span = (full - start).max(1) as u64;
            let p = rate as u64 + (100 - rate as u64) * (st.total - start) as u64 / span;
            if rand::random_range(0..100u64) < p {
                return Err(Dropped::Early);
            }
        }
        st.total += 1;
        *st.by_source.entry(ip).or_default() += 1;
        Ok(PreAuthSlot { gate: self.clone(), ip })
    }

    pub fn in_use(&self) -> usize {
        self.state.lock().unwrap().total
    }
}

/// An unauthenticated slot, given back when authentication succeeds or the
/// connection ends.
pub(crate) struct PreAuthSlot {
    gate: Arc<PreAuth>,
    ip: IpAddr,
}

impl Drop for PreAuthSlot {
    fn drop(&mut self) {
        let mut st = self.gate.state.lock().unwrap();
        st.total -= 1;
        if let Some(n) = st.by_source.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                st.by_source.remove(&self.ip);
            }
        }
    }
}

/// A count shared by whoever holds a [`Counted`] guard.
#[derive(Debug, Default)]
pub(crate) struct Counter(AtomicUsize);

impl Counter {
    /// Adds `n` unless that would pass `max`.
    pub fn try_add(self: &Arc<Self>, n: usize, max: usize) -> Option<Counted> {
        let mut cur = self.0.load(Ordering::Relaxed);
        loop {
            let next = cur.checked_add(n).filter(|v| *v <= max)?;
            match self.0.compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return Some(Counted { counter: self.clone(), n }),
                Err(now) => cur = now,
            }
        }
    }

    pub fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

/// Part of a [`Counter`], given back on drop.
#[derive(Debug)]
pub(crate) struct Counted {
    counter: Arc<Counter>,
    n: usize,
}

impl Counted {
    /// Takes `n` more under the same `max`; false (and nothing taken) if over.
    pub fn grow(&mut self, n: usize, max: usize) -> bool {
        match self.counter.try_add(n, max) {
            Some(more) => {
                self.n += more.n;
                std::mem::forget(more);
                true
            }
            None => false,
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.counter.0.fetch_sub(self.n, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// Any text: no panic; whatever parses prints back the same.
        #[test]
        fn max_startups_never_panics_and_round_trips(s in "\\PC{0,20}|[0-9]{1,5}(:[0-9]{1,3}:[0-9]{1,5})?") {
            if let Ok(m) = s.parse::<MaxStartups>() {
                proptest::prop_assert_eq!(m.to_string().parse::<MaxStartups>().unwrap(), m);
                proptest::prop_assert!(m.start <= m.full && m.rate <= 100);
            }
        }
    }

    #[test]
    fn max_startups_parses_like_openssh() {
        assert_eq!("10:30:100".parse::<MaxStartups>().unwrap(), MaxStartups { start: 10, rate: 30, full: 100 });
        assert_eq!("50".parse::<MaxStartups>().unwrap(), MaxStartups { start: 50, rate: 100, full: 50 });
        for bad in ["", "0", "10:30", "100:30:10", "10:101:100", "a:b:c"] {
            assert!(bad.parse::<MaxStartups>().is_err(), "{bad}");
        }
    }

    #[test]
    fn slots_are_capped_per_source_and_in_total() {
        let limits = Limits {
            max_startups: MaxStartups { start: 4, rate: 100, full: 4 },
            per_source_startups: 2,
            ..Default::default()
        };
        let gate = PreAuth::new(&limits);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let c: IpAddr = "192.0.2.3".parse().unwrap();
        let s1 = gate.admit(a).unwrap();
        let _s2 = gate.admit(a).unwrap();
        assert_eq!(gate.admit(a).err(), Some(Dropped::PerSource));
        let _s3 = gate.admit(b).unwrap();
        let _s4 = gate.admit(b).unwrap();
        assert!(gate.admit(c).is_err());
        drop(s1);
        assert_eq!(gate.in_use(), 3);
        assert!(gate.admit(c).is_ok());
    }

    #[test]
    fn sources_are_ipv4_or_an_ipv6_64() {
        let s = |a: &str| source_of(a.parse().unwrap()).to_string();
        assert_eq!(s("::ffff:203.0.113.7"), "203.0.113.7");
        assert_eq!(s("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::");
        assert_eq!(s("2001:db8:1:2:bbbb::9"), "2001:db8:1:2::");
        assert_eq!(s("198.51.100.1"), "198.51.100.1");
    }

    #[test]
    fn counter_never_passes_its_max() {
        let c = Arc::new(Counter::default());
        let mut g = c.try_add(10, 15).unwrap();
        assert!(c.try_add(6, 15).is_none());
        assert!(!g.grow(6, 15));
        assert!(g.grow(5, 15));
        assert_eq!(c.get(), 15);
        drop(g);
        assert_eq!(c.get(), 0);
    }

    #[test]
    fn reserve_leaves_room_for_registered_peers() {
        let l = Limits::default();
        assert!(l.check(256, 50_000).is_err());
        assert_eq!(l.check(20_000, 50_000).unwrap(), 20_000 - 128 - 100);
    }
}
