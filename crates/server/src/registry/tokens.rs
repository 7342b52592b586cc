//! Enrollment tokens and key rotation.

use super::*;

impl Registry {
    /// Registers a device that will enroll itself with `token_digest` before `expires_at`.
    pub async fn add_pending_device(
        &self,
        id: &Id,
        labels: &BTreeMap<String, String>,
        token_digest: &str,
        expires_at: i64,
    ) -> Result<(), RegistryError> {
        let mut tx = self.write_tx().await?;
        if sqlx::query("SELECT 1 FROM devices WHERE id = $1")
            .bind(id.as_str())
            .fetch_optional(&mut *tx)
            .await?
            .is_some()
        {
            return Err(RegistryError::DeviceExists(id.clone()));
        }
        sqlx::query("INSERT INTO devices (id, labels, created_at) VALUES ($1, $2, $3)")
            .bind(id.as_str())
            .bind(serde_json::to_string(labels).unwrap_or_else(|_| "{}".into()))
            .bind(now_unix())
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO enrollments (digest, device, expires_at) VALUES ($1, $2, $3)")
            .bind(token_digest)
            .bind(id.as_str())
            .bind(expires_at)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Consumes an enrollment token: the device gets `key` and its sshd's
    /// `host_keys`. All or nothing; a token works once.
    pub async fn enroll(
        &self,
        token_digest: &str,
        id: &Id,
        key: &PublicKey,
        host_keys: &[String],
    ) -> Result<(), RegistryError> {
        let now = now_unix();
        let mut tx = self.write_tx().await?;
        let row = sqlx::query("SELECT device, expires_at, used_at FROM enrollments WHERE digest = $1")
            .bind(token_digest)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or(RegistryError::TokenInvalid)?;
        if row.get::<String, _>("device") != id.as_str() {
            return Err(RegistryError::TokenInvalid);
        }
        if row.get::<Option<i64>, _>("used_at").is_some() {
            return Err(RegistryError::TokenUsed);
        }
        let expires_at: i64 = row.get("expires_at");
        if now >= expires_at {
            return Err(RegistryError::TokenExpired(expires_at));
        }
        let has_key: Option<Option<String>> = sqlx::query_scalar("SELECT fingerprint FROM devices WHERE id = $1")
            .bind(id.as_str())
            .fetch_optional(&mut *tx)
            .await?;
        match has_key {
            None => return Err(RegistryError::NoSuchDevice(id.to_string())),
            Some(Some(_)) => return Err(RegistryError::AlreadyEnrolled(id.to_string())),
            Some(None) => {}
        }
        let fp = fingerprint(key);
        check_key_free(&mut tx, &fp).await?;
        sqlx::query("UPDATE devices SET public_key = $1, fingerprint = $2, host_keys = $3 WHERE id = $4")
            .bind(openssh_line(key))
            .bind(&fp)
            .bind(serde_json::to_string(host_keys).unwrap_or_else(|_| "[]".into()))
            .bind(id.as_str())
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE enrollments SET used_at = $1 WHERE digest = $2")
            .bind(now)
            .bind(token_digest)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Replaces a device's key, if it still is `old_fingerprint`.
    pub async fn rotate_key(&self, id: &Id, old_fingerprint: &str, key: &PublicKey) -> Result<(), RegistryError> {
        let fp = fingerprint(key);
        let mut tx = self.write_tx().await?;
        check_key_free(&mut tx, &fp).await?;
        let r = sqlx::query("UPDATE devices SET public_key = $1, fingerprint = $2 WHERE id = $3 AND fingerprint = $4")
            .bind(openssh_line(key))
            .bind(&fp)
            .bind(id.as_str())
            .bind(old_fingerprint)
            .execute(&mut *tx)
            .await?;
        if r.rows_affected() != 1 {
            return Err(RegistryError::KeyChanged);
        }
        tx.commit().await?;
        Ok(())
    }
}
