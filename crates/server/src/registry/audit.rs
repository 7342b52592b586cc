//! The append-only audit trail.

use super::*;

pub(super) fn audit_from_row(r: &sqlx::any::AnyRow) -> Option<crate::audit::AuditRecord> {
    let mut rec: crate::audit::AuditRecord = serde_json::from_str(r.get::<&str, _>("record")).ok()?;
    rec.seq = Some(r.get("seq"));
    Some(rec)
}

impl Registry {
    /// Appends audit records in one transaction.
    pub async fn insert_audit(&self, records: &[crate::audit::AuditRecord]) -> Result<(), RegistryError> {
        let mut tx = self.write_tx().await?;
        for r in records {
            sqlx::query(
                "INSERT INTO audit (at, event, source_ip, device, operator, record) VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(r.at)
            .bind(&r.event)
            .bind(r.source_ip())
            .bind(&r.device)
            .bind(&r.operator)
            .bind(serde_json::to_string(r).unwrap_or_default())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Records matching `q`, oldest first (the newest `limit` of them).
    pub async fn audit(&self, q: &crate::audit::AuditQuery) -> Result<Vec<crate::audit::AuditRecord>, RegistryError> {
        let limit = q.limit.unwrap_or(1000).min(100_000) as i64;
        let rows = sqlx::query(
            "SELECT seq, record FROM audit WHERE at >= $1 AND at <= $2
             AND ($3 IS NULL OR device = $3) AND ($4 IS NULL OR operator = $4)
             AND ($5 IS NULL OR source_ip = $5) AND ($6 IS NULL OR event = $6)
             ORDER BY seq DESC LIMIT $7",
        )
        .bind(q.since.unwrap_or(i64::MIN))
        .bind(q.until.unwrap_or(i64::MAX))
        .bind(&q.device)
        .bind(&q.operator)
        .bind(&q.source)
        .bind(&q.event)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let mut out: Vec<_> = rows.iter().filter_map(audit_from_row).collect();
        out.reverse();
        Ok(out)
    }

    /// Up to `limit` records after row `seq`, for the JSON-lines export.
    pub async fn audit_after(&self, seq: i64, limit: i64) -> Result<Vec<crate::audit::AuditRecord>, RegistryError> {
        let rows = sqlx::query("SELECT seq, record FROM audit WHERE seq > $1 ORDER BY seq LIMIT $2")
            .bind(seq)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().filter_map(audit_from_row).collect())
    }

    pub async fn audit_last_seq(&self) -> Result<i64, RegistryError> {
        Ok(sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) FROM audit").fetch_one(&self.pool).await?)
    }

    /// Deletes records older than `before` (retention); returns how many.
    pub async fn prune_audit(&self, before: i64) -> Result<u64, RegistryError> {
        let r = sqlx::query("DELETE FROM audit WHERE at < $1").bind(before).execute(&self.pool).await?;
        Ok(r.rows_affected())
    }
}
