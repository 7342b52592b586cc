//! The user CA's keys and the certificates they signed.
//!
//! Every pivot of a registry signs with the same key, so the keys live here
//! (the SQLite file is 0600; on PostgreSQL whoever can write the registry
//! could add an admin anyway). At any moment one key signs: the trusted key
//! with the latest `signs_from` not in the future. A rotation adds a key
//! that devices trust at once and that signs later, and gives the old key a
//! `retires_at` after the last certificate it may sign has expired.

use super::*;

/// One CA key.
#[derive(Clone)]
pub struct CaRecord {
    pub fingerprint: String,
    /// OpenSSH public key line.
    pub public_key: String,
    /// OpenSSH private key (PEM).
    pub private_key: String,
    pub created_at: i64,
    pub signs_from: i64,
    /// After this, devices stop trusting it; `None`: no successor yet.
    pub retires_at: Option<i64>,
}

impl std::fmt::Debug for CaRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaRecord").field("fingerprint", &self.fingerprint).finish_non_exhaustive()
    }
}

impl CaRecord {
    pub fn trusted(&self, now: i64) -> bool {
        self.retires_at.is_none_or(|t| t > now)
    }
}

/// The key that signs at `now`, from `cas` as [`Registry::user_cas`] lists them.
pub fn signing_ca(cas: &[CaRecord], now: i64) -> Option<&CaRecord> {
    cas.iter().filter(|c| c.trusted(now) && c.signs_from <= now).max_by_key(|c| c.signs_from)
}

/// What a device is told to trust, for telling when it changed.
pub fn trust_digest(ca_fingerprints: &[String], revoked: &[String]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    ca_fingerprints.hash(&mut h);
    revoked.hash(&mut h);
    h.finish()
}

/// What a certificate recorded before signing says.
pub struct CertRequest<'a> {
    pub operator: &'a Id,
    pub key: &'a PublicKey,
    pub principals: &'a [String],
    pub ttl: Duration,
    pub now: i64,
    /// Start of validity this far before `now`, for slow device clocks.
    pub slack: Duration,
}

/// A certificate as recorded: what the audit and the operator are told.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    pub serial: u64,
    pub valid_after: i64,
    pub valid_before: i64,
    pub ca_fingerprint: String,
    /// The signed certificate, as `sign` returned it.
    pub certificate: String,
}

fn ca_from_row(r: &sqlx::any::AnyRow) -> CaRecord {
    CaRecord {
        fingerprint: r.get("fingerprint"),
        public_key: r.get("public_key"),
        private_key: r.get("private_key"),
        created_at: r.get("created_at"),
        signs_from: r.get("signs_from"),
        retires_at: r.get("retires_at"),
    }
}

/// Unexpired certificates one operator may hold: bounds what a stolen
/// operator key can add to the table every trust fetch reads.
pub const MAX_LIVE_CERTIFICATES: i64 = 100;

/// Meta key of the last certificate serial issued.
const SERIAL_KEY: &str = "cert_serial";

impl Registry {
    /// Every CA key, the latest to sign first.
    pub async fn user_cas(&self) -> Result<Vec<CaRecord>, RegistryError> {
        let rows = sqlx::query("SELECT * FROM user_cas ORDER BY signs_from DESC, created_at DESC")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(ca_from_row).collect())
    }

    /// Stores this key as the CA if the registry has none yet; returns
    /// whether it did (another pivot may have got there first).
    pub async fn init_user_ca(
        &self,
        public_key: &str,
        fp: &str,
        private_key: &str,
        now: i64,
    ) -> Result<bool, RegistryError> {
        let mut tx = self.write_tx().await?;
        let any: Option<String> =
            sqlx::query_scalar("SELECT fingerprint FROM user_cas LIMIT 1").fetch_optional(&mut *tx).await?;
        if any.is_some() {
            return Ok(false);
        }
        insert_ca(&mut tx, public_key, fp, private_key, now, now).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Adds a CA key. Without `at_once`, devices trust it from now and it
    /// signs from `now + overlap`, and each key in force retires once the
    /// certificates it may still sign have expired. With `at_once` it signs
    /// now and every other key is dropped (after a CA key was stolen).
    #[allow(clippy::too_many_arguments)]
    pub async fn rotate_user_ca(
        &self,
        public_key: &str,
        fp: &str,
        private_key: &str,
        now: i64,
        overlap: Duration,
        at_once: bool,
    ) -> Result<(i64, Option<i64>), RegistryError> {
        let mut tx = self.write_tx().await?;
        let rows = sqlx::query("SELECT * FROM user_cas").fetch_all(&mut *tx).await?;
        let cas: Vec<CaRecord> = rows.iter().map(ca_from_row).collect();
        if let Some(next) = cas.iter().find(|c| c.trusted(now) && c.signs_from > now) {
            if !at_once {
                return Err(RegistryError::RotationPending {
                    fingerprint: next.fingerprint.clone(),
                    signs_from: next.signs_from,
                });
            }
        }
        let (signs_from, retire) = if at_once {
            (now, now)
        } else {
            // Certificates the old key signs until the switch run this long after it.
            let longest: Option<i64> =
                sqlx::query_scalar("SELECT MAX(cert_ttl) FROM operators").fetch_one(&mut *tx).await?;
            let longest = longest.unwrap_or(0).max(burrow_core::cert::DEFAULT_CERT_TTL.as_secs() as i64);
            let signs_from = now.saturating_add(overlap.as_secs().min(i64::MAX as u64 / 4) as i64);
            (signs_from, signs_from.saturating_add(longest))
        };
        // A rotation only ever shortens a key's life: a key already retiring
        // keeps its earlier end.
        for c in cas.iter().filter(|c| c.trusted(now) && c.retires_at.is_none_or(|t| t > retire)) {
            sqlx::query("UPDATE user_cas SET retires_at = $1 WHERE fingerprint = $2")
                .bind(retire)
                .bind(&c.fingerprint)
                .execute(&mut *tx)
                .await?;
        }
        insert_ca(&mut tx, public_key, fp, private_key, now, signs_from).await?;
        // A key no longer trusted signs nothing again: its private half goes.
        sqlx::query("UPDATE user_cas SET private_key = '' WHERE retires_at IS NOT NULL AND retires_at <= $1")
            .bind(now)
            .execute(&mut *tx)
            .await?;
        self.bump_revision(&mut tx).await?;
        tx.commit().await?;
        let old_retires = (!cas.is_empty()).then_some(retire);
        Ok((signs_from, old_retires))
    }

    /// Records a certificate and signs it in one transaction: takes the
    /// next serial, picks the key that signs now, keeps validity within
    /// that key's life, and calls `sign(serial, ca, valid_after, valid_before)`.
    pub async fn issue_certificate<F>(&self, req: CertRequest<'_>, sign: F) -> Result<IssuedCert, RegistryError>
    where
        F: FnOnce(u64, &CaRecord, i64, i64) -> Result<String, String>,
    {
        let mut tx = self.write_tx().await?;
        // The operator as of this transaction: one removed since the caller
        // looked gets nothing.
        let fp = fingerprint(req.key);
        let row = sqlx::query("SELECT admin, allow, device_users FROM operators WHERE name = $1 AND fingerprint = $2")
            .bind(req.operator.as_str())
            .bind(&fp)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else { return Err(RegistryError::NoSuchOperator(req.operator.to_string())) };
        // What the operator may do as of this transaction: one removed and
        // re-added with less since the caller looked gets no more than now.
        let allow: Vec<String> = serde_json::from_str(row.get::<&str, _>("allow")).unwrap_or_default();
        let selectors: Vec<burrow_core::rpc::Selector> = allow.iter().filter_map(|a| a.parse().ok()).collect();
        let users: Vec<String> =
            row.get::<Option<&str>, _>("device_users").and_then(|t| serde_json::from_str(t).ok()).unwrap_or_default();
        let admin = row.get::<i64, _>("admin") != 0;
        let users = burrow_core::cert::device_users_or_default(&users, admin, req.operator.as_str());
        if burrow_core::cert::principals(&selectors, &users).ok().as_deref() != Some(req.principals) {
            return Err(RegistryError::OperatorChanged(req.operator.to_string()));
        }
        let live: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM certificates WHERE operator = $1 AND valid_before > $2")
                .bind(req.operator.as_str())
                .bind(req.now)
                .fetch_one(&mut *tx)
                .await?;
        if live >= MAX_LIVE_CERTIFICATES {
            return Err(RegistryError::TooManyCertificates(req.operator.to_string()));
        }
        let rows = sqlx::query("SELECT * FROM user_cas").fetch_all(&mut *tx).await?;
        let cas: Vec<CaRecord> = rows.iter().map(ca_from_row).collect();
        let ca = signing_ca(&cas, req.now).ok_or(RegistryError::NoUserCa)?;
        let last: Option<String> = sqlx::query_scalar("SELECT value FROM meta WHERE key = $1")
            .bind(SERIAL_KEY)
            .fetch_optional(&mut *tx)
            .await?;
        let serial = last.and_then(|s| s.parse::<u64>().ok()).unwrap_or(0) + 1;
        let valid_after = req.now - req.slack.as_secs() as i64;
        let mut valid_before = req.now.saturating_add(req.ttl.as_secs().min(i64::MAX as u64 / 4) as i64);
        if let Some(end) = ca.retires_at {
            valid_before = valid_before.min(end);
        }
        let certificate = sign(serial, ca, valid_after, valid_before).map_err(RegistryError::Sign)?;
        sqlx::query(
            "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        )
        .bind(SERIAL_KEY)
        .bind(serial.to_string())
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO certificates (serial, operator, fingerprint, public_key, principals, ca_fingerprint, valid_after, valid_before, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(serial as i64)
        .bind(req.operator.as_str())
        .bind(&fp)
        .bind(openssh_line(req.key))
        .bind(serde_json::to_string(req.principals).unwrap_or_else(|_| "[]".into()))
        .bind(&ca.fingerprint)
        .bind(valid_after)
        .bind(valid_before)
        .bind(req.now)
        .execute(&mut *tx)
        .await?;
        // Certificates long expired are history; the audit keeps each one.
        sqlx::query("DELETE FROM certificates WHERE valid_before < $1")
            .bind(req.now - 30 * 86400)
            .execute(&mut *tx)
            .await?;
        let ca_fingerprint = ca.fingerprint.clone();
        tx.commit().await?;
        Ok(IssuedCert { serial, valid_after, valid_before, ca_fingerprint, certificate })
    }

    /// Keys of unexpired certificates whose operator is gone (or holds
    /// another key now): devices list them in sshd's `RevokedKeys`.
    pub async fn revoked_operator_keys(&self, now: i64, limit: usize) -> Result<Vec<String>, RegistryError> {
        let rows: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT c.public_key FROM certificates c
             WHERE c.valid_before > $1
               AND NOT EXISTS (SELECT 1 FROM operators o WHERE o.name = c.operator AND o.fingerprint = c.fingerprint)
             ORDER BY c.public_key LIMIT $2",
        )
        .bind(now)
        .bind(limit as i64 + 1)
        .fetch_all(&self.pool)
        .await?;
        if rows.len() > limit {
            // Devices take no more; the rest stay valid there until they expire.
            tracing::error!(
                limit,
                "more removed operators' keys have live certificates than devices take; some are not revoked on devices"
            );
            return Ok(rows.into_iter().take(limit).collect());
        }
        Ok(rows)
    }

    /// The principals of certificates for the key `fp` that have not expired.
    pub async fn live_certificates_of_key(&self, fp: &str, now: i64) -> Result<Vec<(Vec<String>, i64)>, RegistryError> {
        let rows = sqlx::query(
            "SELECT principals, valid_before FROM certificates WHERE fingerprint = $1 AND valid_before > $2",
        )
        .bind(fp)
        .bind(now)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| (serde_json::from_str(r.get::<&str, _>("principals")).unwrap_or_default(), r.get("valid_before")))
            .collect())
    }

    /// Drops the private half of every key that retired: it signs nothing
    /// again. Returns how many it dropped.
    pub async fn forget_retired_ca_keys(&self, now: i64) -> Result<u64, RegistryError> {
        let r = sqlx::query(
            "UPDATE user_cas SET private_key = '' WHERE retires_at IS NOT NULL AND retires_at <= $1 AND private_key <> ''",
        )
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected())
    }

    /// Notes that a device fetched what it trusts: its sshd takes
    /// certificates. At most one write a minute per device.
    pub async fn set_trust_at(&self, id: &Id, now: i64) -> Result<(), RegistryError> {
        sqlx::query("UPDATE devices SET trust_at = $1 WHERE id = $2 AND (trust_at IS NULL OR trust_at < $1 - 60)")
            .bind(now)
            .bind(id.as_str())
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

async fn insert_ca(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    public_key: &str,
    fp: &str,
    private_key: &str,
    now: i64,
    signs_from: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO user_cas (fingerprint, public_key, private_key, created_at, signs_from) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(fp)
    .bind(public_key)
    .bind(private_key)
    .bind(now)
    .bind(signs_from)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
