//! Bans with fail2ban's semantics, kept in process: failures are counted per
//! source address, `maxretry` of them within `findtime` ban the source for
//! `bantime`, and a banned source is dropped at accept before a byte is sent.
//! Bans live in the registry, so they survive restarts and hold on every
//! pivot sharing it; each pivot reloads them every watch tick.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use burrow_core::time::now_unix;
pub use ipnet::IpNet;

/// Sources counted at once; past this, the oldest counts are forgotten
/// first, so a spread-out attack cannot grow this map without bound.
const MAX_TRACKED: usize = 65_536;

#[derive(Debug, Clone)]
pub struct BanConfig {
    pub maxretry: u32,
    pub findtime: Duration,
    pub bantime: Duration,
    /// Never banned.
    pub ignoreip: Vec<IpNet>,
}

impl Default for BanConfig {
    fn default() -> Self {
        BanConfig {
            maxretry: 5,
            findtime: Duration::from_secs(600),
            bantime: Duration::from_secs(3600),
            ignoreip: vec!["127.0.0.1/8".parse().unwrap(), "::1/128".parse().unwrap()],
        }
    }
}

impl BanConfig {
    /// The validation rules of a hardened fail2ban jail; the message names the rule broken.
    pub fn check(&self) -> Result<(), String> {
        if !(1..20).contains(&self.maxretry) {
            return Err(format!("--ban-maxretry {} breaks the rule 0 < maxretry < 20", self.maxretry));
        }
        if self.findtime < Duration::from_secs(60) {
            return Err(format!(
                "--ban-findtime {} breaks the rule findtime >= 60s",
                humantime::format_duration(self.findtime)
            ));
        }
        if self.bantime < self.findtime {
            return Err(format!(
                "--ban-bantime {} breaks the rule bantime >= findtime ({})",
                humantime::format_duration(self.bantime),
                humantime::format_duration(self.findtime)
            ));
        }
        let localhost: IpAddr = [127, 0, 0, 1].into();
        if !self.ignoreip.iter().any(|n| n.contains(&localhost)) {
            return Err("--ban-ignoreip breaks the rule that it must include localhost (127.0.0.1)".into());
        }
        Ok(())
    }
}

/// Parses `IP` or `IP/PREFIX`; a bare address is a single-host network.
/// An IPv4-mapped IPv6 net (`::ffff:a.b.c.d/n`) becomes the IPv4 net it
/// means, since peers' addresses are compared in that form.
pub fn parse_net(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    let net = match s.parse::<IpNet>() {
        Ok(net) => net.trunc(),
        Err(_) => s
            .parse::<IpAddr>()
            .map(IpNet::from)
            .map_err(|_| format!("'{s}' is not an IP address or CIDR (e.g. 203.0.113.7 or 203.0.113.0/24)"))?,
    };
    if let IpNet::V6(v6) = net {
        if let (Some(v4), true) = (v6.addr().to_ipv4_mapped(), v6.prefix_len() >= 96) {
            return IpNet::new(IpAddr::V4(v4), v6.prefix_len() - 96).map(|n| n.trunc()).map_err(|e| e.to_string());
        }
    }
    Ok(net)
}

/// Refuses bans that would lock out everyone or the pivot host itself.
pub fn check_manual(net: &IpNet) -> Result<(), String> {
    if net.prefix_len() == 0 {
        return Err(format!("{net} would ban every address"));
    }
    let loopback: [IpAddr; 2] = [[127, 0, 0, 1].into(), std::net::Ipv6Addr::LOCALHOST.into()];
    if loopback.iter().any(|l| net.contains(l)) {
        return Err(format!("{net} contains localhost, which is never banned"));
    }
    Ok(())
}

/// A ban just decided by counting.
#[derive(Debug, Clone)]
pub struct NewBan {
    pub net: IpNet,
    pub until: i64,
    pub failures: u32,
}

pub(crate) struct Bans {
    config: BanConfig,
    // A std Mutex: every critical section is a map or list update.
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Active bans and their end (Unix seconds), as last read from the registry.
    active: Vec<(IpNet, i64)>,
    /// Bans this pivot decided that the registry did not show yet: they
    /// hold here even if storing them is slow or fails.
    local: Vec<(IpNet, i64)>,
    failures: HashMap<IpAddr, VecDeque<Instant>>,
}

impl Bans {
    pub fn new(config: BanConfig) -> Self {
        Bans { config, state: Mutex::default() }
    }

    pub fn config(&self) -> &BanConfig {
        &self.config
    }

    pub fn ignored(&self, ip: IpAddr) -> bool {
        self.config.ignoreip.iter().any(|n| n.contains(&ip))
    }

    /// Whether `ip` is banned now. `ignoreip` wins over any ban, including
    /// one added by hand.
    pub fn banned(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        if self.ignored(ip) {
            return false;
        }
        let now = now_unix();
        let st = self.state.lock().unwrap();
        st.active.iter().chain(&st.local).any(|(net, until)| *until > now && net.contains(&ip))
    }

    /// Bans in force now.
    pub fn active(&self) -> usize {
        let now = now_unix();
        let st = self.state.lock().unwrap();
        st.active.iter().chain(&st.local).filter(|(_, until)| *until > now).count()
    }

    /// Takes the registry's list of bans in force (a ban lifted there is
    /// lifted here); bans decided here stay until the registry has them.
    pub fn reload(&self, active: Vec<(IpNet, i64)>) {
        let mut st = self.state.lock().unwrap();
        let now = now_unix();
        st.local.retain(|(net, until)| *until > now && !active.iter().any(|(n, _)| n == net));
        st.active = active;
    }

    /// Counts one failure from `ip`, whose counts are kept per `source`
    /// (see [`crate::limits::source_of`]); returns the ban it triggers, if any.
    pub fn failure(&self, ip: IpAddr, source: IpAddr) -> Option<NewBan> {
        if self.ignored(ip.to_canonical()) {
            return None;
        }
        let ip = source;
        let now = Instant::now();
        let mut st = self.state.lock().unwrap();
        if st.failures.len() >= MAX_TRACKED && !st.failures.contains_key(&ip) {
            // Forget counts that ran out, then (a spread-out attack) the
            // oldest half: new sources are always counted.
            let window = self.config.findtime;
            st.failures.retain(|_, times| times.back().is_some_and(|t| now.duration_since(*t) < window));
            if st.failures.len() >= MAX_TRACKED {
                let mut last: Vec<Instant> = st.failures.values().filter_map(|t| t.back().copied()).collect();
                last.sort_unstable();
                let cut = last[last.len() / 2];
                st.failures.retain(|_, times| times.back().is_some_and(|t| *t > cut));
            }
        }
        let times = st.failures.entry(ip).or_default();
        times.push_back(now);
        while times.front().is_some_and(|t| now.duration_since(*t) >= self.config.findtime) {
            times.pop_front();
        }
        let count = times.len() as u32;
        if count < self.config.maxretry {
            return None;
        }
        st.failures.remove(&ip);
        let until = now_unix().saturating_add(self.config.bantime.as_secs() as i64);
        // IPv6 sources are counted, and banned, as their /64.
        let net = match ip {
            IpAddr::V6(_) => IpNet::new(ip, 64).unwrap_or(IpNet::from(ip)),
            IpAddr::V4(_) => IpNet::from(ip),
        };
        st.local.push((net, until));
        Some(NewBan { net, until, failures: count })
    }
}

/// Stores a ban decided by counting, and audits it.
pub(crate) fn record(shared: &std::sync::Arc<crate::Shared>, ban: NewBan) {
    let until = burrow_core::time::format_unix(ban.until);
    tracing::warn!(net = %ban.net, failures = ban.failures, "banned until {until}");
    shared.metrics.banned();
    let mut rec = crate::audit::AuditRecord::new("ban");
    rec.source = Some(ban.net.addr().to_string());
    rec.reason =
        Some(format!("{} failures within {}", ban.failures, humantime::format_duration(shared.bans.config().findtime)));
    rec.ban = Some(format!("banned {} until {until}", ban.net));
    rec.actor = Some(format!("pivot:{}", shared.config.pivot_name));
    shared.audit.record(rec);
    let shared = shared.clone();
    shared.tracker.clone().spawn(async move {
        let reason = format!("{} authentication failures", ban.failures);
        let actor = format!("pivot:{}", shared.config.pivot_name);
        if let Err(e) = shared.registry.add_ban(&ban.net.to_string(), ban.until, &reason, &actor).await {
            tracing::warn!(net = %ban.net, error = %e, "cannot store the ban; it holds on this pivot until restart");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_rules_are_enforced() {
        assert!(BanConfig::default().check().is_ok());
        let bad = [
            BanConfig { maxretry: 0, ..Default::default() },
            BanConfig { maxretry: 20, ..Default::default() },
            BanConfig { findtime: Duration::from_secs(59), ..Default::default() },
            BanConfig { bantime: Duration::from_secs(300), ..Default::default() },
            BanConfig { ignoreip: vec!["10.0.0.0/8".parse().unwrap()], ..Default::default() },
        ];
        for b in bad {
            assert!(b.check().is_err(), "{b:?}");
        }
    }

    #[test]
    fn maxretry_failures_ban_a_source_but_never_an_ignored_one() {
        let bans =
            Bans::new(BanConfig { maxretry: 3, ignoreip: vec!["127.0.0.1/32".parse().unwrap()], ..Default::default() });
        let bad: IpAddr = "198.51.100.9".parse().unwrap();
        assert!(bans.failure(bad, bad).is_none());
        assert!(bans.failure(bad, bad).is_none());
        let ban = bans.failure(bad, bad).expect("third failure bans");
        assert_eq!(ban.net.to_string(), "198.51.100.9/32");
        assert!(bans.banned(bad));
        assert!(!bans.banned("198.51.100.10".parse().unwrap()));
        let me: IpAddr = "127.0.0.1".parse().unwrap();
        for _ in 0..10 {
            assert!(bans.failure(me, me).is_none());
        }
        assert!(!bans.banned(me));
    }

    #[test]
    fn ipv6_sources_are_banned_by_their_64_and_reloads_keep_local_bans() {
        let bans = Bans::new(BanConfig { maxretry: 1, ..Default::default() });
        let a: IpAddr = "2001:db8:1:2::5".parse().unwrap();
        let source = crate::limits::source_of(a);
        let ban = bans.failure(a, source).unwrap();
        assert_eq!(ban.net.to_string(), "2001:db8:1:2::/64");
        assert!(bans.banned("2001:db8:1:2:ffff::1".parse().unwrap()));
        assert!(!bans.banned("2001:db8:1:3::1".parse().unwrap()));
        // The registry has not stored it yet: a reload keeps it.
        bans.reload(Vec::new());
        assert!(bans.banned(a));
        // Mapped IPv4 addresses match IPv4 bans.
        bans.reload(vec![("203.0.113.7/32".parse().unwrap(), now_unix() + 60)]);
        assert!(bans.banned("::ffff:203.0.113.7".parse().unwrap()));
        // localhost is never banned, whatever the list says.
        bans.reload(vec![("127.0.0.0/8".parse().unwrap(), now_unix() + 60)]);
        assert!(!bans.banned("127.0.0.1".parse().unwrap()));
    }

    proptest::proptest! {
        /// Any text: no panic; a parsed net contains its own address.
        #[test]
        fn nets_never_panic(s in "\\PC{0,45}") {
            if let Ok(net) = parse_net(&s) {
                proptest::prop_assert!(net.contains(&net.addr()));
            }
        }
    }

    #[test]
    fn nets_parse_from_addresses_and_cidrs() {
        assert_eq!(parse_net("203.0.113.7").unwrap().to_string(), "203.0.113.7/32");
        assert_eq!(parse_net("203.0.113.7/24").unwrap().to_string(), "203.0.113.0/24");
        assert_eq!(parse_net("2001:db8::1").unwrap().to_string(), "2001:db8::1/128");
        assert!(parse_net("cam-42").is_err());
        assert_eq!(parse_net("::ffff:203.0.113.7").unwrap().to_string(), "203.0.113.7/32");
        assert_eq!(parse_net("::ffff:203.0.113.0/120").unwrap().to_string(), "203.0.113.0/24");
    }
}
