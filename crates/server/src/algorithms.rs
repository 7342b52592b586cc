//! The SSH algorithms the pivot offers: configurable, but only from a
//! known-good set. SHA-1 (`ssh-rsa` signatures, `hmac-sha1`,
//! `diffie-hellman-group1-sha1`, `…-group14-sha1`), CBC ciphers and the
//! like can never be turned on.

use russh::{cipher, kex, mac};

/// Key exchanges that may be offered, best first.
const KEX: &[kex::Name] = &[
    kex::MLKEM768X25519_SHA256,
    kex::CURVE25519,
    kex::CURVE25519_PRE_RFC_8731,
    kex::ECDH_SHA2_NISTP256,
    kex::ECDH_SHA2_NISTP384,
    kex::ECDH_SHA2_NISTP521,
    kex::DH_GEX_SHA256,
    kex::DH_G16_SHA512,
    kex::DH_G18_SHA512,
    kex::DH_G14_SHA256,
];

/// Ciphers that may be offered. AES-GCM first: with AES-NI it moves bytes
/// at a fraction of chacha20-poly1305's CPU cost, and the pivot decrypts
/// and re-encrypts every byte it relays.
const CIPHERS: &[cipher::Name] = &[
    cipher::AES_128_GCM,
    cipher::AES_256_GCM,
    cipher::CHACHA20_POLY1305,
    cipher::AES_256_CTR,
    cipher::AES_192_CTR,
    cipher::AES_128_CTR,
];

/// MACs for the CTR ciphers (AEAD ciphers carry their own).
const MACS: &[mac::Name] = &[mac::HMAC_SHA256_ETM, mac::HMAC_SHA512_ETM, mac::HMAC_SHA256, mac::HMAC_SHA512];

/// russh's markers that ride on the kex list (extension negotiation and
/// the strict-kex countermeasure to Terrapin); always sent.
const KEX_MARKERS: &[kex::Name] = &[kex::EXTENSION_SUPPORT_AS_SERVER, kex::EXTENSION_OPENSSH_STRICT_KEX_AS_SERVER];

/// The russh names of checked lists: key exchanges, ciphers, MACs.
pub(crate) type Resolved = (Vec<kex::Name>, Vec<cipher::Name>, Vec<mac::Name>);

/// The lists offered, in order of preference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Algorithms {
    pub kex: Vec<String>,
    pub ciphers: Vec<String>,
    pub macs: Vec<String>,
}

impl Default for Algorithms {
    fn default() -> Self {
        // Every known-good kex but the classic DH groups, which cost far more
        // CPU per handshake for no gain with modern clients.
        let kex = KEX.iter().filter(|k| !k.as_ref().starts_with("diffie-hellman")).map(|k| k.as_ref().to_string());
        Algorithms {
            kex: kex.collect(),
            ciphers: CIPHERS.iter().map(|c| c.as_ref().to_string()).collect(),
            macs: MACS.iter().map(|m| m.as_ref().to_string()).collect(),
        }
    }
}

fn pick<N: AsRef<str> + Copy>(what: &str, flag: &str, names: &[String], known: &[N]) -> Result<Vec<N>, String> {
    if names.is_empty() {
        return Err(format!("{flag} is empty; give at least one {what}"));
    }
    names
        .iter()
        .map(|n| {
            known.iter().find(|k| k.as_ref() == n).copied().ok_or_else(|| {
                let allowed: Vec<&str> = known.iter().map(AsRef::as_ref).collect();
                format!("{what} '{n}' is not in the known-good set; {flag} takes: {}", allowed.join(","))
            })
        })
        .collect()
}

impl Algorithms {
    /// Checks every name against the known-good set.
    pub fn check(&self) -> Result<(), String> {
        self.resolve().map(|_| ())
    }

    pub(crate) fn resolve(&self) -> Result<Resolved, String> {
        let mut kex = pick("key exchange", "--kex-algorithms", &self.kex, KEX)?;
        kex.extend_from_slice(KEX_MARKERS);
        Ok((kex, pick("cipher", "--ciphers", &self.ciphers, CIPHERS)?, pick("MAC", "--macs", &self.macs, MACS)?))
    }

    /// Parses a comma-separated list.
    pub fn list(s: &str) -> Vec<String> {
        s.split(',').map(str::trim).filter(|n| !n.is_empty()).map(str::to_string).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_known_good() {
        Algorithms::default().check().unwrap();
    }

    /// `burrow server --help` spells the defaults out; they must stay equal.
    #[test]
    fn defaults_match_the_cli_text() {
        let d = Algorithms::default();
        assert_eq!(d.kex.join(","), "mlkem768x25519-sha256,curve25519-sha256,curve25519-sha256@libssh.org,ecdh-sha2-nistp256,ecdh-sha2-nistp384,ecdh-sha2-nistp521");
        assert_eq!(d.ciphers.join(","), "aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com,aes256-ctr,aes192-ctr,aes128-ctr");
        assert_eq!(
            d.macs.join(","),
            "hmac-sha2-256-etm@openssh.com,hmac-sha2-512-etm@openssh.com,hmac-sha2-256,hmac-sha2-512"
        );
    }

    #[test]
    fn weak_algorithms_are_refused_by_name() {
        for (kex, cipher, mac) in [
            ("diffie-hellman-group1-sha1", "aes128-gcm@openssh.com", "hmac-sha2-256"),
            ("diffie-hellman-group14-sha1", "aes128-gcm@openssh.com", "hmac-sha2-256"),
            ("curve25519-sha256", "aes128-cbc", "hmac-sha2-256"),
            ("curve25519-sha256", "3des-cbc", "hmac-sha2-256"),
            ("curve25519-sha256", "aes128-ctr", "hmac-sha1"),
            ("curve25519-sha256", "aes128-ctr", "none"),
        ] {
            let a = Algorithms { kex: vec![kex.into()], ciphers: vec![cipher.into()], macs: vec![mac.into()] };
            let e = a.check().unwrap_err();
            assert!(e.contains("not in the known-good set"), "{e}");
        }
    }
}
