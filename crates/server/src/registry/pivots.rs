//! The pivots sharing this registry: each registers where its peers reach
//! it and the host key it proves, beats every couple of seconds, and clears
//! the tunnel records of any pivot that stopped beating.

use super::*;

/// A pivot that has not beaten for this long is dead: the others clear its
/// tunnel records and forget it.
pub const PIVOT_DEAD_AFTER: i64 = 10;

/// A pivot as registered.
#[derive(Debug, Clone, Serialize)]
pub struct PivotRecord {
    pub name: String,
    /// `HOST:PORT` other pivots relay through (its `--advertise`).
    pub address: String,
    /// Its SSH host key (OpenSSH line); pivots behind one name share one.
    pub host_key: String,
    #[serde(skip)]
    pub boot: String,
    pub started_at: i64,
    pub seen_at: i64,
}

impl PivotRecord {
    pub fn alive(&self, now: i64) -> bool {
        now - self.seen_at < PIVOT_DEAD_AFTER
    }
}

fn pivot_from_row(r: &sqlx::any::AnyRow) -> PivotRecord {
    PivotRecord {
        name: r.get("name"),
        address: r.get("address"),
        host_key: r.get("host_key"),
        boot: r.get("boot"),
        started_at: r.get("started_at"),
        seen_at: r.get("seen_at"),
    }
}

impl Registry {
    /// Registers this run of pivot `name` (a new `boot`), replacing its
    /// record. Returns the record replaced if that pivot still looked
    /// alive: two processes given the same `--pivot-name`, or a restart
    /// within [`PIVOT_DEAD_AFTER`]. `now` is [`Registry::db_now`].
    pub async fn register_pivot(
        &self,
        name: &str,
        address: &str,
        host_key: &str,
        boot: &str,
        now: i64,
    ) -> Result<Option<PivotRecord>, RegistryError> {
        let mut tx = self.write_tx().await?;
        let old = sqlx::query("SELECT * FROM pivots WHERE name = $1").bind(name).fetch_optional(&mut *tx).await?;
        let old = old.map(|r| pivot_from_row(&r)).filter(|p| p.alive(now));
        sqlx::query(
            "INSERT INTO pivots (name, address, host_key, boot, started_at, seen_at) VALUES ($1, $2, $3, $4, $5, $5)
             ON CONFLICT(name) DO UPDATE SET address = excluded.address, host_key = excluded.host_key,
             boot = excluded.boot, started_at = excluded.started_at, seen_at = excluded.seen_at",
        )
        .bind(name)
        .bind(address)
        .bind(host_key)
        .bind(boot)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(old)
    }

    /// This pivot is alive. False if its record is gone (the others took it
    /// for dead) or names another run: the caller registers again. `now`
    /// is [`Registry::db_now`].
    pub async fn pivot_beat(&self, name: &str, boot: &str, now: i64) -> Result<bool, RegistryError> {
        let r = sqlx::query("UPDATE pivots SET seen_at = $1 WHERE name = $2 AND boot = $3")
            .bind(now)
            .bind(name)
            .bind(boot)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() == 1)
    }

    /// This run of the pivot stops: its record goes, if still its own.
    pub async fn unregister_pivot(&self, name: &str, boot: &str) -> Result<(), RegistryError> {
        sqlx::query("DELETE FROM pivots WHERE name = $1 AND boot = $2")
            .bind(name)
            .bind(boot)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn pivots(&self) -> Result<Vec<PivotRecord>, RegistryError> {
        let rows = sqlx::query("SELECT * FROM pivots ORDER BY name").fetch_all(&self.pool).await?;
        Ok(rows.iter().map(pivot_from_row).collect())
    }

    pub async fn pivot(&self, name: &str) -> Result<Option<PivotRecord>, RegistryError> {
        let row = sqlx::query("SELECT * FROM pivots WHERE name = $1").bind(name).fetch_optional(&self.pool).await?;
        Ok(row.as_ref().map(pivot_from_row))
    }

    /// Forgets dead pivots and clears the tunnel records that name a pivot
    /// not alive (dead, or gone before pivots registered). Returns how many
    /// tunnel records were cleared. `now` is [`Registry::db_now`].
    pub async fn reap_pivots(&self, now: i64) -> Result<u64, RegistryError> {
        let cutoff = now - PIVOT_DEAD_AFTER;
        let mut tx = self.write_tx().await?;
        let cleared = sqlx::query(
            "UPDATE devices SET tunnel_pivot = NULL, ports = '[]'
             WHERE tunnel_pivot IS NOT NULL
             AND tunnel_pivot NOT IN (SELECT name FROM pivots WHERE seen_at > $1)",
        )
        .bind(cutoff)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        sqlx::query("DELETE FROM pivots WHERE seen_at <= $1").bind(cutoff).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(cleared)
    }
}
