//! Operators, and who a key belongs to.

use super::*;

impl Registry {
    pub async fn add_operator(
        &self,
        name: &Id,
        key: &PublicKey,
        admin: bool,
        allow: &[String],
        device_users: &[String],
        cert_ttl: Option<i64>,
    ) -> Result<(), RegistryError> {
        let fp = fingerprint(key);
        let mut tx = self.write_tx().await?;
        if sqlx::query("SELECT 1 FROM operators WHERE name = $1")
            .bind(name.as_str())
            .fetch_optional(&mut *tx)
            .await?
            .is_some()
        {
            return Err(RegistryError::OperatorExists(name.clone()));
        }
        check_key_free(&mut tx, &fp).await?;
        sqlx::query(
            "INSERT INTO operators (name, public_key, fingerprint, admin, allow, created_at, device_users, cert_ttl)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(name.as_str())
        .bind(openssh_line(key))
        .bind(&fp)
        .bind(i64::from(admin))
        .bind(serde_json::to_string(allow).unwrap_or_else(|_| "[]".into()))
        .bind(now_unix())
        .bind(serde_json::to_string(device_users).unwrap_or_else(|_| "[]".into()))
        .bind(cert_ttl)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn remove_operator(&self, name: &Id) -> Result<bool, RegistryError> {
        let r = sqlx::query("DELETE FROM operators WHERE name = $1").bind(name.as_str()).execute(&self.pool).await?;
        Ok(r.rows_affected() > 0)
    }

    pub async fn operators(&self) -> Result<Vec<OperatorRecord>, RegistryError> {
        let rows = sqlx::query("SELECT * FROM operators ORDER BY name").fetch_all(&self.pool).await?;
        Ok(rows
            .iter()
            .map(|r| OperatorRecord {
                name: r.get("name"),
                fingerprint: r.get("fingerprint"),
                public_key: r.get("public_key"),
                admin: r.get::<i64, _>("admin") != 0,
                allow: serde_json::from_str(r.get::<&str, _>("allow")).unwrap_or_default(),
                device_users: r
                    .get::<Option<&str>, _>("device_users")
                    .and_then(|t| serde_json::from_str(t).ok())
                    .unwrap_or_default(),
                cert_ttl: r.get("cert_ttl"),
                created_at: r.get("created_at"),
            })
            .collect())
    }

    pub async fn operator(&self, name: &Id) -> Result<Option<OperatorRecord>, RegistryError> {
        Ok(self.operators().await?.into_iter().find(|o| o.name == name.as_str()))
    }

    /// Who owns the key with this fingerprint, if anyone.
    pub async fn identify(&self, fp: &str) -> Result<Option<Identity>, RegistryError> {
        let row = sqlx::query(
            "SELECT 'device' AS kind, id AS name, 0 AS admin FROM devices WHERE fingerprint = $1 AND revoked_at IS NULL
             UNION ALL SELECT 'operator', name, admin FROM operators WHERE fingerprint = $1",
        )
        .bind(fp)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let name: String = row.get("name");
        let name = Id::parse(&name).map_err(|_| RegistryError::CorruptKey(name.clone()))?;
        Ok(Some(match row.get::<String, _>("kind").as_str() {
            "device" => Identity::Device(name),
            _ => Identity::Operator { name, admin: row.get::<i64, _>("admin") != 0 },
        }))
    }
}
