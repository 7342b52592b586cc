//! Tunnel records, pivot-side port leases and OpenSSH-mode port leases.

use super::*;

impl Registry {
    /// The pivots that hold tunnels now, by their tunnel records.
    pub async fn pivots_with_tunnels(&self) -> Result<Vec<String>, RegistryError> {
        Ok(sqlx::query_scalar(
            "SELECT DISTINCT tunnel_pivot FROM devices WHERE tunnel_pivot IS NOT NULL ORDER BY tunnel_pivot",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// Records that `pivot` now holds the device's tunnel with these ports.
    pub async fn tunnel_up(&self, id: &Id, pivot: &str, ports: &[u32]) -> Result<(), RegistryError> {
        sqlx::query("UPDATE devices SET tunnel_pivot = $1, ports = $2, last_seen = $3 WHERE id = $4")
            .bind(pivot)
            .bind(serde_json::to_string(ports).unwrap_or_else(|_| "[]".into()))
            .bind(now_unix())
            .bind(id.as_str())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Records that the device's tunnel on `pivot` closed, unless another pivot took it over.
    pub async fn tunnel_down(&self, id: &Id, pivot: &str) -> Result<(), RegistryError> {
        sqlx::query(
            "UPDATE devices SET tunnel_pivot = NULL, ports = '[]', last_seen = $1 WHERE id = $2 AND tunnel_pivot = $3",
        )
        .bind(now_unix())
        .bind(id.as_str())
        .bind(pivot)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// At start, forgets tunnels a previous run of this pivot left marked open.
    pub async fn clear_tunnels(&self, pivot: &str) -> Result<(), RegistryError> {
        sqlx::query("UPDATE devices SET tunnel_pivot = NULL, ports = '[]' WHERE tunnel_pivot = $1")
            .bind(pivot)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Every pivot-side port lease: (device, port, bind, created_at).
    pub async fn listens(&self) -> Result<Vec<(String, u16, String, i64)>, RegistryError> {
        let rows: Vec<(String, i64, String, i64)> =
            sqlx::query_as("SELECT device, port, bind, created_at FROM listens ORDER BY device, port")
                .fetch_all(&self.pool)
                .await?;
        Ok(rows.into_iter().map(|(d, p, b, c)| (d, p as u16, b, c)).collect())
    }

    /// Leases `bind` for the device's `port`: the device must exist and the
    /// address be free among leases. With `bind` of port 0, the lowest free
    /// port of `range` on its address is taken. Returns the address leased.
    pub async fn add_listen(
        &self,
        id: &Id,
        port: u16,
        bind: std::net::SocketAddr,
        range: std::ops::RangeInclusive<u16>,
        bindable: impl Fn(u16) -> bool,
    ) -> Result<std::net::SocketAddr, RegistryError> {
        let mut tx = self.write_tx().await?;
        if sqlx::query("SELECT 1 FROM devices WHERE id = $1")
            .bind(id.as_str())
            .fetch_optional(&mut *tx)
            .await?
            .is_none()
        {
            return Err(RegistryError::NoSuchDevice(id.to_string()));
        }
        let taken: Vec<String> = sqlx::query_scalar("SELECT bind FROM listens").fetch_all(&mut *tx).await?;
        let taken_ports: std::collections::BTreeSet<u16> =
            taken.iter().filter_map(|b| b.parse::<std::net::SocketAddr>().ok()).map(|a| a.port()).collect();
        let bind = if bind.port() == 0 {
            let Some(p) = range.clone().find(|p| !taken_ports.contains(p) && bindable(*p)) else {
                return Err(RegistryError::PortsExhausted(format!("{}-{}", range.start(), range.end())));
            };
            std::net::SocketAddr::new(bind.ip(), p)
        } else {
            bind
        };
        if taken_ports.contains(&bind.port()) {
            return Err(RegistryError::ListenTaken(bind.to_string()));
        }
        sqlx::query("INSERT INTO listens (device, port, bind, created_at) VALUES ($1, $2, $3, $4)")
            .bind(id.as_str())
            .bind(i64::from(port))
            .bind(bind.to_string())
            .bind(now_unix())
            .execute(&mut *tx)
            .await
            .map_err(|e| match e {
                sqlx::Error::Database(d) if d.is_unique_violation() => {
                    RegistryError::ListenTaken(format!("port {port} of device '{id}'"))
                }
                e => e.into(),
            })?;
        tx.commit().await?;
        Ok(bind)
    }

    /// Ends the lease of the device's `port`; false if there was none.
    pub async fn remove_listen(&self, id: &Id, port: u16) -> Result<bool, RegistryError> {
        let r = sqlx::query("DELETE FROM listens WHERE device = $1 AND port = $2")
            .bind(id.as_str())
            .bind(i64::from(port))
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    /// OpenSSH mode: the ports leased to `devices` from `range`, leasing the
    /// lowest free port to each device without one and freeing the ports of
    /// devices not listed. A device keeps its port across renders.
    pub async fn lease_openssh_ports(
        &self,
        devices: &[String],
        range: std::ops::RangeInclusive<u16>,
    ) -> Result<BTreeMap<String, u16>, RegistryError> {
        let mut tx = self.write_tx().await?;
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT device, port FROM openssh_ports").fetch_all(&mut *tx).await?;
        let mut leased: BTreeMap<String, u16> = BTreeMap::new();
        for (device, port) in rows {
            let keep = devices.contains(&device) && u16::try_from(port).is_ok_and(|p| range.contains(&p));
            if keep {
                leased.insert(device, port as u16);
            } else {
                sqlx::query("DELETE FROM openssh_ports WHERE device = $1").bind(&device).execute(&mut *tx).await?;
            }
        }
        let mut used: std::collections::BTreeSet<u16> = leased.values().copied().collect();
        for device in devices {
            if leased.contains_key(device) {
                continue;
            }
            let Some(port) = range.clone().find(|p| !used.contains(p)) else {
                return Err(RegistryError::PortsExhausted(format!("{}-{}", range.start(), range.end())));
            };
            sqlx::query("INSERT INTO openssh_ports (device, port) VALUES ($1, $2)")
                .bind(device)
                .bind(i64::from(port))
                .execute(&mut *tx)
                .await?;
            used.insert(port);
            leased.insert(device.clone(), port);
        }
        tx.commit().await?;
        Ok(leased)
    }
}
