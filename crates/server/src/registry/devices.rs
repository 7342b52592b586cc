//! Devices: registration, removal, revocation, host keys, presence and health.

use super::*;

pub(super) fn device_from_row(r: &sqlx::any::AnyRow) -> DeviceRecord {
    DeviceRecord {
        id: r.get("id"),
        fingerprint: r.get("fingerprint"),
        public_key: r.get("public_key"),
        host_keys: serde_json::from_str(r.get::<&str, _>("host_keys")).unwrap_or_default(),
        host_keys_changed: r.get::<Option<&str>, _>("host_keys_changed").and_then(|t| serde_json::from_str(t).ok()),
        rtt_ms: r.get("rtt_ms"),
        health_at: r.get("health_at"),
        targets: r.get::<Option<&str>, _>("targets").and_then(|t| serde_json::from_str(t).ok()).unwrap_or_default(),
        revoked_at: r.get("revoked_at"),
        labels: serde_json::from_str(r.get::<&str, _>("labels")).unwrap_or_default(),
        created_at: r.get("created_at"),
        last_seen: r.get("last_seen"),
        tunnel_pivot: r.get("tunnel_pivot"),
        ports: serde_json::from_str(r.get::<&str, _>("ports")).unwrap_or_default(),
        presence: r.get("presence"),
        trust_at: r.get("trust_at"),
    }
}

/// What a device's report of its host keys did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostKeyReport {
    /// It had none; these are now registered.
    Registered,
    /// They match what is registered (or are some of those keys).
    Known,
    /// They differ; flagged for an admin, nothing replaced.
    Changed,
}

impl Registry {
    /// Takes the host keys a device's agent reported (see [`HostKeyReport`]).
    pub async fn report_host_keys(&self, id: &Id, keys: &[String]) -> Result<HostKeyReport, RegistryError> {
        let mut tx = self.write_tx().await?;
        let row: Option<String> = sqlx::query_scalar("SELECT host_keys FROM devices WHERE id = $1")
            .bind(id.as_str())
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else { return Err(RegistryError::NoSuchDevice(id.to_string())) };
        let registered: Vec<String> = serde_json::from_str(&row).unwrap_or_default();
        let json = serde_json::to_string(keys).unwrap_or_else(|_| "[]".into());
        let report = if registered.is_empty() {
            sqlx::query("UPDATE devices SET host_keys = $1, host_keys_changed = NULL WHERE id = $2")
                .bind(&json)
                .bind(id.as_str())
                .execute(&mut *tx)
                .await?;
            HostKeyReport::Registered
        } else if keys.iter().all(|k| registered.contains(k)) {
            sqlx::query("UPDATE devices SET host_keys_changed = NULL WHERE id = $1")
                .bind(id.as_str())
                .execute(&mut *tx)
                .await?;
            HostKeyReport::Known
        } else {
            sqlx::query("UPDATE devices SET host_keys_changed = $1 WHERE id = $2")
                .bind(&json)
                .bind(id.as_str())
                .execute(&mut *tx)
                .await?;
            HostKeyReport::Changed
        };
        tx.commit().await?;
        Ok(report)
    }

    /// Accepts the changed host keys a device reported, or, with `forget`
    /// and none reported, forgets its keys so that its next report registers
    /// them. Returns the keys registered now; `None` if there was nothing to
    /// accept and no `forget`.
    pub async fn reset_host_keys(&self, id: &Id, forget: bool) -> Result<Option<Vec<String>>, RegistryError> {
        let mut tx = self.write_tx().await?;
        let changed: Option<Option<String>> = sqlx::query_scalar("SELECT host_keys_changed FROM devices WHERE id = $1")
            .bind(id.as_str())
            .fetch_optional(&mut *tx)
            .await?;
        let Some(changed) = changed else { return Err(RegistryError::NoSuchDevice(id.to_string())) };
        let now = match changed {
            Some(c) => c,
            None if forget => "[]".into(),
            None => return Ok(None),
        };
        sqlx::query("UPDATE devices SET host_keys = $1, host_keys_changed = NULL WHERE id = $2")
            .bind(&now)
            .bind(id.as_str())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Some(serde_json::from_str(&now).unwrap_or_default()))
    }

    /// `host_keys`: the device sshd's keys (OpenSSH lines), if known now.
    pub async fn add_device(
        &self,
        id: &Id,
        key: &PublicKey,
        labels: &BTreeMap<String, String>,
        host_keys: &[String],
    ) -> Result<(), RegistryError> {
        let fp = fingerprint(key);
        let mut tx = self.write_tx().await?;
        if sqlx::query("SELECT 1 FROM devices WHERE id = $1")
            .bind(id.as_str())
            .fetch_optional(&mut *tx)
            .await?
            .is_some()
        {
            return Err(RegistryError::DeviceExists(id.clone()));
        }
        check_key_free(&mut tx, &fp).await?;
        sqlx::query(
            "INSERT INTO devices (id, public_key, fingerprint, labels, created_at, host_keys) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(id.as_str())
        .bind(openssh_line(key))
        .bind(&fp)
        .bind(serde_json::to_string(labels).unwrap_or_else(|_| "{}".into()))
        .bind(now_unix())
        .bind(serde_json::to_string(host_keys).unwrap_or_else(|_| "[]".into()))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Returns whether the device existed.
    pub async fn remove_device(&self, id: &Id) -> Result<bool, RegistryError> {
        let mut tx = self.write_tx().await?;
        sqlx::query("DELETE FROM enrollments WHERE device = $1").bind(id.as_str()).execute(&mut *tx).await?;
        // Its pivot-side ports go with it: a later device of the same id
        // must not inherit them.
        sqlx::query("DELETE FROM listens WHERE device = $1").bind(id.as_str()).execute(&mut *tx).await?;
        let r = sqlx::query("DELETE FROM devices WHERE id = $1").bind(id.as_str()).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(r.rows_affected() > 0)
    }

    pub async fn device(&self, id: &Id) -> Result<Option<DeviceRecord>, RegistryError> {
        let row =
            sqlx::query("SELECT * FROM devices WHERE id = $1").bind(id.as_str()).fetch_optional(&self.pool).await?;
        Ok(row.map(|r| device_from_row(&r)))
    }

    pub async fn devices(&self) -> Result<Vec<DeviceRecord>, RegistryError> {
        let rows = sqlx::query("SELECT * FROM devices ORDER BY id").fetch_all(&self.pool).await?;
        Ok(rows.iter().map(device_from_row).collect())
    }

    /// Marks devices seen now, while their tunnels stay up.
    /// Records what tunnel probes found (see `health`).
    pub(crate) async fn record_health(&self, found: &[crate::health::Health]) -> Result<(), RegistryError> {
        let now = now_unix();
        // One transaction for the round: one commit, not one per tunnel.
        let mut tx = self.write_tx().await?;
        for h in found {
            let targets = h.targets.as_ref().map(|t| serde_json::to_string(t).unwrap_or_default());
            sqlx::query(
                "UPDATE devices SET rtt_ms = $1, health_at = $2, targets = COALESCE($3, targets) WHERE id = $4",
            )
            .bind(h.rtt_ms.map(|v| v as i64))
            .bind(now)
            .bind(targets)
            .bind(h.id.as_str())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn touch(&self, ids: &[Id]) -> Result<(), RegistryError> {
        let now = now_unix();
        for id in ids {
            sqlx::query("UPDATE devices SET last_seen = $1 WHERE id = $2")
                .bind(now)
                .bind(id.as_str())
                .execute(&self.pool)
                .await?;
        }
        Ok(())
    }

    /// Records presence heard over MQTT; `at` (when known) also counts as seen.
    pub async fn set_presence(&self, id: &Id, online: bool, at: Option<i64>) -> Result<(), RegistryError> {
        sqlx::query(
            "UPDATE devices SET presence = $1, presence_at = COALESCE($2, presence_at),
             last_seen = CASE WHEN $2 IS NULL OR last_seen > $2 THEN last_seen ELSE $2 END
             WHERE id = $3",
        )
        .bind(if online { "online" } else { "offline" })
        .bind(at)
        .bind(id.as_str())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Marks every device offline: what a pivot that serves devices' MQTT
    /// itself knows at start, before any device has logged in again.
    pub async fn clear_presence(&self) -> Result<(), RegistryError> {
        sqlx::query("UPDATE devices SET presence = 'offline' WHERE presence = 'online'").execute(&self.pool).await?;
        Ok(())
    }

    /// Marks the device revoked: its key no longer authenticates. True if it existed.
    pub async fn revoke_device(&self, id: &Id) -> Result<bool, RegistryError> {
        let r = sqlx::query("UPDATE devices SET revoked_at = COALESCE(revoked_at, $1) WHERE id = $2")
            .bind(now_unix())
            .bind(id.as_str())
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    /// Whether any device (revoked ones included) or operator has this key.
    pub async fn key_registered(&self, fp: &str) -> Result<bool, RegistryError> {
        let found: Option<i64> = sqlx::query_scalar(
            "SELECT 1 FROM devices WHERE fingerprint = $1 UNION ALL SELECT 1 FROM operators WHERE fingerprint = $1",
        )
        .bind(fp)
        .fetch_optional(&self.pool)
        .await?;
        Ok(found.is_some())
    }

    /// A registered id that `id` is likely a typo of (see [`crate::refusal::nearest`]).
    /// Looks at ids of about the same length that start alike, at most 500.
    pub async fn near_miss(&self, id: &str) -> Result<Option<String>, RegistryError> {
        let head: String = id.chars().take(2).collect();
        let len = id.len() as i64;
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM devices WHERE substr(id, 1, 2) = $1 AND length(id) BETWEEN $2 AND $3 ORDER BY id LIMIT 500",
        )
        .bind(head)
        .bind(len - 2)
        .bind(len + 2)
        .fetch_all(&self.pool)
        .await?;
        Ok(crate::refusal::nearest(id, ids.iter().map(String::as_str)))
    }

    /// The device a revoked key belonged to, and when it was revoked.
    pub async fn revoked_device(&self, fp: &str) -> Result<Option<(String, i64)>, RegistryError> {
        let row = sqlx::query("SELECT id, revoked_at FROM devices WHERE fingerprint = $1 AND revoked_at IS NOT NULL")
            .bind(fp)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| (r.get("id"), r.get("revoked_at"))))
    }
}
