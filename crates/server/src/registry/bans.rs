//! Bans shared by every pivot on this registry.

use super::*;

/// A ban as stored.
#[derive(Debug, Clone, Serialize)]
pub struct BanRecord {
    pub net: String,
    pub until: i64,
    pub reason: String,
    pub actor: String,
    pub created_at: i64,
}

impl Registry {
    /// Bans `net` until `until`; a ban of the same net already in force is
    /// only ever lengthened (lift it with `remove_ban` to shorten it).
    pub async fn add_ban(&self, net: &str, until: i64, reason: &str, actor: &str) -> Result<(), RegistryError> {
        sqlx::query(
            "INSERT INTO bans (net, until, reason, actor, created_at) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT(net) DO UPDATE SET until = CASE WHEN excluded.until > bans.until THEN excluded.until ELSE bans.until END, reason = excluded.reason,
             actor = excluded.actor, created_at = excluded.created_at",
        )
        .bind(net)
        .bind(until)
        .bind(reason)
        .bind(actor)
        .bind(now_unix())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// True if the ban existed (and was still active).
    pub async fn remove_ban(&self, net: &str) -> Result<bool, RegistryError> {
        let r = sqlx::query("DELETE FROM bans WHERE net = $1 AND until > $2")
            .bind(net)
            .bind(now_unix())
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    /// Deletes bans that ran out.
    pub async fn prune_bans(&self) -> Result<(), RegistryError> {
        sqlx::query("DELETE FROM bans WHERE until <= $1").bind(now_unix()).execute(&self.pool).await?;
        Ok(())
    }

    /// Bans still in force, newest first.
    pub async fn bans(&self) -> Result<Vec<BanRecord>, RegistryError> {
        let now = now_unix();
        let rows = sqlx::query("SELECT * FROM bans WHERE until > $1 ORDER BY created_at DESC, net")
            .bind(now)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .iter()
            .map(|r| BanRecord {
                net: r.get("net"),
                until: r.get("until"),
                reason: r.get("reason"),
                actor: r.get("actor"),
                created_at: r.get("created_at"),
            })
            .collect())
    }
}
