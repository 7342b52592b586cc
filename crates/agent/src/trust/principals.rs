//! sshd's `AuthorizedPrincipalsCommand` (run as `nobody`): which
//! principals let a certificate log in as a user on this device, decided
//! from the device's labels in [`OPERATORS_FILE`] alone.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::Path;

use burrow_core::cert::{grants, validate_device_user, ANY, PRINCIPAL_PREFIX};
use burrow_core::label::validate_label;
use burrow_core::rpc::Selector;
use burrow_core::text::excerpt;
use burrow_core::time::format_unix;
use russh::keys::ssh_encoding::base64::{Base64, Encoding};
use russh::keys::Certificate;

use super::files::Operators;
use super::OPERATORS_FILE;

/// Selectors of up to this many labels are answered without a certificate.
const MAX_SELECTOR_PAIRS: usize = 3;

/// For sshd's `AuthorizedPrincipalsCommand`: the principals that let a
/// certificate log in as `user` on this device, whose labels are in
/// `dir`/[`OPERATORS_FILE`].
///
/// sshd runs the command once it has parsed the certificate (which checks
/// the CA's signature on it) and found its CA in `TrustedUserCAKeys`, but
/// before it checks the certificate's type and validity window (OpenSSH's
/// auth2-pubkey.c, `user_cert_trusted_ca`), and also when a client only
/// asks whether a key would do, with no signature of the user's at all. So
/// nothing here assumes more than "signed by a trusted CA".
///
/// With the certificate (`%k`: the base64 of its blob), exactly its valid
/// principals that [`grants`] the login; none when it expired before the
/// pivot's clock at the last trust refresh (a device whose clock is behind
/// must not take what the pivot knows has run out). Without one, every
/// principal that would be accepted for selectors of up to 3 of the
/// device's labels, for `user` and for any user. On any problem: nothing,
/// and one line on stderr saying why.
pub fn principals(user: &str, cert_b64: Option<&str>, dir: &Path) -> Vec<String> {
    match try_principals(user, cert_b64, dir) {
        Ok(p) => p,
        Err(why) => {
            let _ = writeln!(io::stderr(), "burrow principals: {why}");
            Vec::new()
        }
    }
}

fn try_principals(user: &str, cert_b64: Option<&str>, dir: &Path) -> Result<Vec<String>, String> {
    if user == ANY || validate_device_user(user).is_err() {
        return Err(format!("'{}' is not a user a certificate can name", excerpt(user, 40)));
    }
    let path = dir.join(OPERATORS_FILE);
    let text = std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let ops: Operators =
        serde_json::from_slice(&text).map_err(|e| format!("{} is not burrow's operators file: {e}", path.display()))?;
    match cert_b64 {
        Some(cert) => {
            let cert = decode_certificate(cert)?;
            if ops.pivot_time > 0 && cert.valid_before() < ops.pivot_time as u64 {
                return Err(format!(
                    "the certificate expired at {}, before the pivot's clock at the last trust refresh ({}): this device's clock is behind",
                    format_unix(i64::try_from(cert.valid_before()).unwrap_or(i64::MAX)),
                    format_unix(ops.pivot_time)
                ));
            }
            Ok(cert.valid_principals().iter().filter(|p| grants(p, user, &ops.labels)).cloned().collect())
        }
        None => Ok(every_accepted(user, &ops.labels)),
    }
}

/// `%k` is the base64 of the blob; a whole OpenSSH line is taken too.
fn decode_certificate(text: &str) -> Result<Certificate, String> {
    let text = text.trim();
    let cert = if text.contains(char::is_whitespace) {
        Certificate::from_openssh(text).map_err(|e| e.to_string())
    } else {
        Base64::decode_vec(text)
            .map_err(|e| e.to_string())
            .and_then(|b| Certificate::from_bytes(&b).map_err(|e| e.to_string()))
    };
    cert.map_err(|e| format!("the key given is not an OpenSSH certificate: {e}"))
}

/// `burrow:U:*` and `burrow:U:SEL` for every selector SEL of 1 to 3 of
/// `labels` in canonical form, for U = `user` and `*`.
fn every_accepted(user: &str, labels: &BTreeMap<String, String>) -> Vec<String> {
    // A label the pivot would not accept could not appear in a selector.
    let pairs: Vec<(&String, &String)> = labels.iter().filter(|(k, v)| validate_label(k, v).is_ok()).collect();
    let mut scopes = vec![ANY.to_string()];
    each_subset(pairs.len(), 0, &mut Vec::with_capacity(MAX_SELECTOR_PAIRS), &mut |idx| {
        let sel = Selector(idx.iter().map(|&i| (pairs[i].0.clone(), pairs[i].1.clone())).collect());
        scopes.push(sel.to_string());
    });
    let mut out = Vec::with_capacity(scopes.len() * 2);
    for u in [user, ANY] {
        out.extend(scopes.iter().map(|s| format!("{PRINCIPAL_PREFIX}{u}:{s}")));
    }
    out
}

/// Calls `f` with each set of 1 to [`MAX_SELECTOR_PAIRS`] indices below
/// `n`, in increasing order, from `start` on.
fn each_subset(n: usize, start: usize, idx: &mut Vec<usize>, f: &mut impl FnMut(&[usize])) {
    for i in start..n {
        idx.push(i);
        f(idx);
        if idx.len() < MAX_SELECTOR_PAIRS {
            each_subset(n, i + 1, idx, f);
        }
        idx.pop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trust::tests::{key, labels, trust, TempDir};
    use crate::trust::{write_in, TrustDir};
    use burrow_core::cert::DeviceTrust;
    use burrow_core::label::MAX_LABELS;
    use burrow_core::time::now_unix;
    use russh::keys::ssh_key::certificate::{Builder, CertType};
    use russh::keys::PrivateKey;

    /// A certificate by `ca` for `principals`, valid from a minute ago for
    /// `ttl` seconds, base64 as sshd's `%k`.
    fn certificate_for(ca: &PrivateKey, principals: &[&str], ttl: u64) -> String {
        let now = now_unix() as u64;
        let user = key();
        let mut b = Builder::new(vec![7u8; 32], user.public_key().key_data().clone(), now - 60, now + ttl).unwrap();
        b.cert_type(CertType::User).unwrap().key_id("alice").unwrap();
        for p in principals {
            b.valid_principal(*p).unwrap();
        }
        let cert = b.sign(ca).unwrap();
        Base64::encode_string(&cert.to_bytes().unwrap())
    }

    fn certificate(ca: &PrivateKey, principals: &[&str]) -> String {
        certificate_for(ca, principals, 3600)
    }

    fn trust_dir(tmp: &TempDir, t: &DeviceTrust) -> TrustDir {
        let (dir, _) = TrustDir::under(&tmp.0, &tmp.0.join("trust"));
        write_in(&dir, t).unwrap();
        dir
    }

    #[test]
    fn principals_from_a_certificate_are_those_that_grant() {
        let tmp = TempDir::new("principals");
        let dir = trust_dir(&tmp, &trust("cam-42", &[("site", "berlin"), ("rack", "3")], 1, 0));
        let dir = dir.path();
        let cert = certificate(
            &key(),
            &[
                "burrow:root:site=berlin",
                "burrow:root:site=paris",
                "burrow:*:rack=3,site=berlin",
                "burrow:pi:*",
                "burrow:root:site=berlin,rack=3",
                "root",
            ],
        );
        assert_eq!(principals("root", Some(&cert), dir), ["burrow:root:site=berlin", "burrow:*:rack=3,site=berlin"]);
        assert_eq!(principals("pi", Some(&cert), dir), ["burrow:*:rack=3,site=berlin", "burrow:pi:*"]);
        assert_eq!(principals("admin", Some(&cert), dir), ["burrow:*:rack=3,site=berlin"]);
        let paris = certificate(&key(), &["burrow:root:site=paris", "burrow:*:site=paris"]);
        assert!(principals("root", Some(&paris), dir).is_empty(), "another site's certificate");
        // sshd's %k is base64 alone; a whole line is taken too.
        let whole = format!("ssh-ed25519-cert-v01@openssh.com {cert} alice");
        assert_eq!(principals("root", Some(&whole), dir).len(), 2);
        // Garbage in, nothing out, and no panic.
        for bad in ["", "AAAA", "!!!", "AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"] {
            assert!(principals("root", Some(bad), dir).is_empty(), "{bad}");
        }
        for user in ["*", "bad user", "a:b", ""] {
            assert!(principals(user, Some(&cert), dir).is_empty(), "{user}");
        }
        let other = TempDir::new("principals-none");
        assert!(principals("root", Some(&cert), &other.0).is_empty(), "no operators.json, no principal");
        std::fs::write(other.0.join(OPERATORS_FILE), "{not json").unwrap();
        assert!(principals("root", Some(&cert), &other.0).is_empty());
    }

    /// A device whose clock was behind took certificates the pivot knew had expired.
    #[test]
    fn a_certificate_expired_by_the_pivots_clock_is_refused_whatever_the_device_clock() {
        let tmp = TempDir::new("principals-clock");
        let now = now_unix();
        let t = trust("cam-42", &[("site", "berlin")], 1, 0);
        // The pivot's clock is two hours ahead of this device's.
        let dir = trust_dir(&tmp, &DeviceTrust { pivot_time: now + 7200, ..t.clone() });
        let hour = certificate_for(&key(), &["burrow:root:*"], 3600);
        let day = certificate_for(&key(), &["burrow:root:*"], 86400);
        assert!(principals("root", Some(&hour), dir.path()).is_empty(), "expired by the pivot's clock");
        let err = try_principals("root", Some(&hour), dir.path()).unwrap_err();
        assert!(
            err.starts_with("the certificate expired at ") && err.ends_with("this device's clock is behind"),
            "{err}"
        );
        assert_eq!(principals("root", Some(&day), dir.path()), ["burrow:root:*"], "still valid by the pivot's clock");
        // Without a certificate there is nothing to date; an unknown clock (0) checks nothing.
        assert!(!principals("root", None, dir.path()).is_empty());
        write_in(&dir, &DeviceTrust { pivot_time: 0, ..t.clone() }).unwrap();
        assert_eq!(principals("root", Some(&hour), dir.path()), ["burrow:root:*"]);
        write_in(&dir, &DeviceTrust { pivot_time: now, ..t }).unwrap();
        assert_eq!(principals("root", Some(&hour), dir.path()), ["burrow:root:*"]);
    }

    #[test]
    fn principals_without_a_certificate_cover_small_selectors() {
        let tmp = TempDir::new("principals-all");
        let device = [("site", "berlin"), ("rack", "3"), ("room", "b2"), ("os", "deb")];
        let dir = trust_dir(&tmp, &trust("cam-42", &device, 1, 0));
        let p = principals("root", None, dir.path());
        // Per user: *, 4 singles, 6 pairs and 4 triples.
        assert_eq!(p.len(), 2 * (1 + 4 + 6 + 4));
        let l = labels(&device);
        for user in ["root", "*"] {
            assert!(p.contains(&format!("burrow:{user}:*")));
            assert!(p.contains(&format!("burrow:{user}:rack=3,site=berlin")));
            assert!(p.contains(&format!("burrow:{user}:os=deb,rack=3,room=b2")));
        }
        assert!(p.iter().all(|p| grants(p, "root", &l)), "{p:?}");
        assert!(!p.iter().any(|p| p.matches('=').count() > 3));
        let mut unique = p.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), p.len());
        // 32 labels: every selector of up to 3, quickly and without panicking.
        let many: BTreeMap<String, String> = (0..MAX_LABELS).map(|i| (format!("k{i:02}"), format!("v{i}"))).collect();
        let t = DeviceTrust { labels: many, ..trust("cam-42", &[], 1, 0) };
        write_in(&dir, &t).unwrap();
        assert_eq!(principals("root", None, dir.path()).len(), 2 * (1 + 32 + 496 + 4960));
    }
}
