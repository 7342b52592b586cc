//! Operator certificates: the pivot signs each operator's key as an SSH user
//! CA, and a device's sshd decides from the certificate alone.
//!
//! A principal is `burrow:USER:SCOPE`. USER is a login name on the device
//! (or `*`, any); SCOPE is one of the operator's label selectors in
//! canonical form (`rack=3,site=berlin`), or `*` for an operator allowed
//! every device. The device's `principals` command is handed the
//! certificate (`%k`) and answers with the principals that hold for the
//! login user and its own labels, so sshd accepts exactly what the pivot
//! would allow, with no list of operators on the device.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::rpc::Selector;

/// What every burrow principal starts with.
pub const PRINCIPAL_PREFIX: &str = "burrow:";
/// Any user, or any device.
pub const ANY: &str = "*";
/// Certificate lifetime unless the operator has one of their own.
pub const DEFAULT_CERT_TTL: Duration = Duration::from_secs(8 * 3600);
/// The longest lifetime `operator add --cert-ttl` takes: removal relies on expiry.
pub const MAX_CERT_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// How far back a certificate's validity starts, for clocks behind the pivot's.
pub const CLOCK_SLACK: Duration = Duration::from_secs(300);
/// sshd reads at most 256 principals from a certificate.
pub const MAX_PRINCIPALS: usize = 256;
/// The most device users one operator may have.
pub const MAX_DEVICE_USERS: usize = 16;
/// Device user of an admin added without `--device-user`: the user
/// `burrow login` suggests (`ssh root@cam-42.burrow`). Other operators log
/// in as their own name unless given more.
pub const DEFAULT_ADMIN_DEVICE_USER: &str = "root";

/// The device users an operator's certificates carry: those given with
/// `--device-user`, else `root` for an admin and the operator's own name
/// for anyone else (least privilege by default).
pub fn device_users_or_default(users: &[String], admin: bool, name: &str) -> Vec<String> {
    if !users.is_empty() {
        users.to_vec()
    } else if admin {
        vec![DEFAULT_ADMIN_DEVICE_USER.to_string()]
    } else {
        vec![name.to_string()]
    }
}

/// A login name on a device: 1-32 of `[A-Za-z0-9._-]`, not starting with
/// '-' (so it is never an option), or `*` for any user.
pub fn validate_device_user(u: &str) -> Result<(), String> {
    let ok = u == ANY
        || (!u.is_empty()
            && u.len() <= 32
            && !u.starts_with('-')
            && u.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "device user '{}' is not a login name (1-32 of A-Z a-z 0-9 . _ -, or * for any)",
            crate::text::excerpt(u, 40)
        ))
    }
}

/// The principals of an operator's certificate: each device user with each
/// selector (`*` when the operator may reach every device).
pub fn principals(allow: &[Selector], users: &[String]) -> Result<Vec<String>, String> {
    let scopes: Vec<String> =
        if allow.is_empty() { vec![ANY.to_string()] } else { allow.iter().map(Selector::to_string).collect() };
    let mut out = Vec::new();
    for u in users {
        validate_device_user(u)?;
        for s in &scopes {
            let p = format!("{PRINCIPAL_PREFIX}{u}:{s}");
            if !out.contains(&p) {
                out.push(p);
            }
        }
    }
    if out.is_empty() {
        return Err("the operator has no device user to log in as".into());
    }
    if out.len() > MAX_PRINCIPALS {
        return Err(format!(
            "{} device users times {} selectors make {} principals; sshd takes at most {MAX_PRINCIPALS}",
            users.len(),
            scopes.len(),
            out.len()
        ));
    }
    Ok(out)
}

/// Whether principal `p` lets its holder log in as `user` on a device
/// carrying `labels`. Anything that is not a burrow principal grants nothing.
pub fn grants(p: &str, user: &str, labels: &BTreeMap<String, String>) -> bool {
    let Some(rest) = p.strip_prefix(PRINCIPAL_PREFIX) else { return false };
    let Some((u, scope)) = rest.split_once(':') else { return false };
    if u != ANY && u != user {
        return false;
    }
    if scope == ANY {
        return true;
    }
    match scope.parse::<Selector>() {
        // Only the canonical form: one selector, one spelling.
        Ok(s) if s.to_string() == scope => s.matches(labels),
        _ => false,
    }
}

/// What a device keeps from the pivot to decide logins on its own: the CA
/// keys to trust, the keys to refuse, its id and labels. Written by the
/// agent, read by `principals` (as sshd's `AuthorizedPrincipalsCommandUser`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct DeviceTrust {
    pub id: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The user CA's public keys (OpenSSH lines), current first.
    pub ca_keys: Vec<String>,
    /// Operator keys whose certificates still run but must be refused:
    /// their operators were removed.
    #[serde(default)]
    pub revoked_keys: Vec<String>,
    /// The pivot's clock when it answered (Unix seconds): a device whose own
    /// clock is behind still refuses certificates that expired before it.
    #[serde(default)]
    pub pivot_time: i64,
}

/// The most CA keys a device takes (a rotation has two in force).
pub const MAX_CA_KEYS: usize = 8;
/// The most revoked keys a device takes.
pub const MAX_REVOKED_KEYS: usize = 10_000;

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn principals_cross_users_and_selectors() {
        let allow: Vec<Selector> = vec!["site=berlin".parse().unwrap(), "site=paris,rack=3".parse().unwrap()];
        let p = principals(&allow, &["root".into(), "pi".into()]).unwrap();
        assert_eq!(
            p,
            [
                "burrow:root:site=berlin",
                "burrow:root:rack=3,site=paris",
                "burrow:pi:site=berlin",
                "burrow:pi:rack=3,site=paris"
            ]
        );
        assert_eq!(principals(&[], &["root".into()]).unwrap(), ["burrow:root:*"]);
        assert!(principals(&[], &[]).is_err());
        assert!(principals(&[], &["bad user".into()]).is_err());
        let many: Vec<String> = (0..17).map(|i| format!("u{i}")).collect();
        let sels: Vec<Selector> = (0..16).map(|i| format!("k={i}").parse().unwrap()).collect();
        assert!(principals(&sels, &many).is_err(), "272 principals are more than sshd reads");
    }

    #[test]
    fn grants_only_matching_user_and_labels() {
        let berlin = labels(&[("site", "berlin"), ("rack", "3")]);
        let paris = labels(&[("site", "paris")]);
        assert!(grants("burrow:root:site=berlin", "root", &berlin));
        assert!(!grants("burrow:root:site=berlin", "root", &paris));
        assert!(!grants("burrow:root:site=berlin", "pi", &berlin));
        assert!(grants("burrow:*:site=berlin", "pi", &berlin));
        assert!(grants("burrow:root:*", "root", &paris));
        assert!(grants("burrow:root:rack=3,site=berlin", "root", &berlin));
        // Not canonical, not burrow's, or malformed: nothing.
        assert!(!grants("burrow:root:site=berlin,rack=3", "root", &berlin));
        assert!(!grants("root", "root", &berlin));
        assert!(!grants("burrow:root", "root", &berlin));
        assert!(!grants("burrow:root:site", "root", &berlin));
        assert!(!grants("burrow:root:", "root", &berlin));
    }

    #[test]
    fn device_users() {
        for ok in ["root", "pi", "svc_backup", "a.b-c", "*", "ROOT"] {
            validate_device_user(ok).unwrap();
        }
        for bad in ["", "-oProxyCommand", "a:b", "a b", "ü", &"x".repeat(33), "**"] {
            assert!(validate_device_user(bad).is_err(), "{bad}");
        }
    }
}
