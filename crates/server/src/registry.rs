//! The registry: which keys belong to which devices and operators, and what
//! the pivots last knew about each device's tunnel.
//!
//! SQLite in WAL mode by default, so admin commands on the pivot host change
//! it while the server runs. Every change to an identity bumps `revision`,
//! which running pivots watch to drop connections whose key was removed.

use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use burrow_core::keys::{fingerprint, openssh_line, PublicKey};
use burrow_core::time::now_unix;
use burrow_core::Id;
use serde::Serialize;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
use sqlx::{Row, SqlitePool};

/// File name of the SQLite registry inside the data dir.
pub const DB_FILE: &str = "registry.db";

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("registry database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("device '{0}' already exists; remove it first or pick another id")]
    DeviceExists(Id),
    #[error("operator '{0}' already exists; remove it first or pick another name")]
    OperatorExists(Id),
    #[error("key {fingerprint} is already registered to {owner}; each key may belong to one identity only")]
    KeyInUse { fingerprint: String, owner: String },
    #[error("stored key of {0} is unreadable")]
    CorruptKey(String),
    #[error("enrollment token is not valid here (wrong pivot, or changed after it was issued)")]
    TokenInvalid,
    #[error("enrollment token was already used")]
    TokenUsed,
    #[error("enrollment token expired at {}", burrow_core::time::format_unix(*.0))]
    TokenExpired(i64),
    #[error("device '{0}' is already enrolled")]
    AlreadyEnrolled(String),
    #[error("device '{0}' does not exist")]
    NoSuchDevice(String),
    #[error("the device key changed meanwhile; retry")]
    KeyChanged,
    #[error("every port of {0} is leased; widen the range")]
    PortsExhausted(String),
    #[error("{0} is already leased")]
    ListenTaken(String),
    #[error("cannot create or protect the registry file")]
    Io(#[from] std::io::Error),
}

/// Who a key belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    Device(Id),
    Operator { name: Id, admin: bool },
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Identity::Device(id) => write!(f, "device '{id}'"),
            Identity::Operator { name, .. } => write!(f, "operator '{name}'"),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct DeviceRecord {
    pub id: String,
    /// `None` until the device enrolls.
    pub fingerprint: Option<String>,
    pub public_key: Option<String>,
    /// The device sshd's public host keys, as registered at enrollment.
    pub host_keys: Vec<String>,
    /// Different host keys the device's agent reported since, waiting for
    /// an admin (`device host-keys reset`).
    pub host_keys_changed: Option<Vec<String>>,
    /// The last probe of its tunnel: round trip, when, and each target's state.
    pub rtt_ms: Option<i64>,
    pub health_at: Option<i64>,
    pub targets: BTreeMap<String, String>,
    pub revoked_at: Option<i64>,
    pub labels: BTreeMap<String, String>,
    pub created_at: i64,
    /// Unix seconds; `None` if the device never connected.
    pub last_seen: Option<i64>,
    /// The pivot holding the device's tunnel, if one is open.
    pub tunnel_pivot: Option<String>,
    pub ports: Vec<u32>,
    /// "online" or "offline" as last heard over MQTT; `None` if never heard.
    pub presence: Option<String>,
}

impl DeviceRecord {
    /// A tunnel to some pivot is open.
    pub fn tunnel_open(&self) -> bool {
        self.tunnel_pivot.is_some()
    }

    /// Reachable now: its tunnel is open, or it waits on MQTT to be woken.
    pub fn online(&self) -> bool {
        self.tunnel_open() || self.presence.as_deref() == Some("online")
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct OperatorRecord {
    pub name: String,
    pub fingerprint: String,
    pub public_key: String,
    pub admin: bool,
    /// Label selectors (`k=v[,k=v]`); empty means every device.
    pub allow: Vec<String>,
    pub created_at: i64,
}

#[derive(Clone)]
pub struct Registry {
    pool: SqlitePool,
}

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS devices (
        id TEXT PRIMARY KEY,
        public_key TEXT,
        fingerprint TEXT UNIQUE,
        host_keys TEXT NOT NULL DEFAULT '[]',
        revoked_at INTEGER,
        labels TEXT NOT NULL DEFAULT '{}',
        created_at INTEGER NOT NULL,
        last_seen INTEGER,
        tunnel_pivot TEXT,
        ports TEXT NOT NULL DEFAULT '[]',
        presence TEXT,
        presence_at INTEGER
    )",
    "CREATE TABLE IF NOT EXISTS operators (
        name TEXT PRIMARY KEY,
        public_key TEXT NOT NULL,
        fingerprint TEXT NOT NULL UNIQUE,
        admin INTEGER NOT NULL DEFAULT 0,
        allow TEXT NOT NULL DEFAULT '[]',
        created_at INTEGER NOT NULL
    )",
    "CREATE TABLE IF NOT EXISTS enrollments (
        digest TEXT PRIMARY KEY,
        device TEXT NOT NULL,
        expires_at INTEGER NOT NULL,
        used_at INTEGER
    )",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    // Pivot-side ports: the pivot listens on `bind` and relays each
    // connection to the device's exposed `port`.
    "CREATE TABLE IF NOT EXISTS listens (
        device TEXT NOT NULL,
        port INTEGER NOT NULL,
        bind TEXT NOT NULL UNIQUE,
        created_at INTEGER NOT NULL,
        PRIMARY KEY (device, port)
    )",
    "CREATE TRIGGER IF NOT EXISTS listens_ins AFTER INSERT ON listens BEGIN UPDATE revision SET n = n + 1; END",
    "CREATE TRIGGER IF NOT EXISTS listens_del AFTER DELETE ON listens BEGIN UPDATE revision SET n = n + 1; END",
    // OpenSSH mode: the loopback port each device's `ssh -R` may listen on.
    "CREATE TABLE IF NOT EXISTS openssh_ports (device TEXT PRIMARY KEY, port INTEGER NOT NULL UNIQUE)",
    "CREATE TABLE IF NOT EXISTS bans (
        net TEXT PRIMARY KEY,
        until INTEGER NOT NULL,
        reason TEXT NOT NULL,
        actor TEXT NOT NULL,
        created_at INTEGER NOT NULL
    )",
    // Append-only: nothing but the retention prune deletes from it.
    "CREATE TABLE IF NOT EXISTS audit (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        at INTEGER NOT NULL,
        event TEXT NOT NULL,
        source_ip TEXT,
        device TEXT,
        operator TEXT,
        record TEXT NOT NULL
    )",
    "CREATE INDEX IF NOT EXISTS audit_at ON audit (at)",
    "CREATE TABLE IF NOT EXISTS revision (id INTEGER PRIMARY KEY CHECK (id = 1), n INTEGER NOT NULL)",
    "INSERT OR IGNORE INTO revision (id, n) VALUES (1, 0)",
    "CREATE TRIGGER IF NOT EXISTS devices_ins AFTER INSERT ON devices BEGIN UPDATE revision SET n = n + 1; END",
    "CREATE TRIGGER IF NOT EXISTS devices_del AFTER DELETE ON devices BEGIN UPDATE revision SET n = n + 1; END",
    "CREATE TRIGGER IF NOT EXISTS devices_key AFTER UPDATE OF fingerprint, revoked_at ON devices BEGIN UPDATE revision SET n = n + 1; END",
    "CREATE TRIGGER IF NOT EXISTS operators_ins AFTER INSERT ON operators BEGIN UPDATE revision SET n = n + 1; END",
    "CREATE TRIGGER IF NOT EXISTS operators_del AFTER DELETE ON operators BEGIN UPDATE revision SET n = n + 1; END",
    "CREATE TRIGGER IF NOT EXISTS operators_upd AFTER UPDATE OF fingerprint, admin, allow ON operators BEGIN UPDATE revision SET n = n + 1; END",
];

const ADDED_COLUMNS: &[&str] = &[
    "ALTER TABLE devices ADD COLUMN host_keys_changed TEXT",
    "ALTER TABLE devices ADD COLUMN rtt_ms INTEGER",
    "ALTER TABLE devices ADD COLUMN health_at INTEGER",
    "ALTER TABLE devices ADD COLUMN targets TEXT",
];

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
        let row: Option<String> = sqlx::query_scalar("SELECT host_keys FROM devices WHERE id = ?")
            .bind(id.as_str())
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else { return Err(RegistryError::NoSuchDevice(id.to_string())) };
        let registered: Vec<String> = serde_json::from_str(&row).unwrap_or_default();
        let json = serde_json::to_string(keys).unwrap_or_else(|_| "[]".into());
        let report = if registered.is_empty() {
            sqlx::query("UPDATE devices SET host_keys = ?, host_keys_changed = NULL WHERE id = ?")
                .bind(&json)
                .bind(id.as_str())
                .execute(&mut *tx)
                .await?;
            HostKeyReport::Registered
        } else if keys.iter().all(|k| registered.contains(k)) {
            sqlx::query("UPDATE devices SET host_keys_changed = NULL WHERE id = ?")
                .bind(id.as_str())
                .execute(&mut *tx)
                .await?;
            HostKeyReport::Known
        } else {
            sqlx::query("UPDATE devices SET host_keys_changed = ? WHERE id = ?")
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
        let changed: Option<Option<String>> = sqlx::query_scalar("SELECT host_keys_changed FROM devices WHERE id = ?")
            .bind(id.as_str())
            .fetch_optional(&mut *tx)
            .await?;
        let Some(changed) = changed else { return Err(RegistryError::NoSuchDevice(id.to_string())) };
        let now = match changed {
            Some(c) => c,
            None if forget => "[]".into(),
            None => return Ok(None),
        };
        sqlx::query("UPDATE devices SET host_keys = ?, host_keys_changed = NULL WHERE id = ?")
            .bind(&now)
            .bind(id.as_str())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Some(serde_json::from_str(&now).unwrap_or_default()))
    }

    /// Opens (creating if needed) the registry in `data_dir`.
    pub async fn open(data_dir: &Path) -> Result<Self, RegistryError> {
        private_files(data_dir)?;
        let opts = SqliteConnectOptions::from_str("sqlite://")?
            .filename(data_dir.join(DB_FILE))
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(10));
        // A handful of connections: the registry sees a query per connection
        // attempt and per refusal, not per byte relayed.
        // A new file is set up by whoever comes first, the server or an admin
        // command; the other may see it locked for a moment. SQLite does not
        // always run the busy handler for that (e.g. switching to WAL), so retry.
        let mut attempt = 0;
        loop {
            match Self::connect(opts.clone()).await {
                Ok(pool) => {
                    private_files(data_dir)?;
                    return Ok(Registry { pool });
                }
                Err(e) if attempt < 100 && is_busy(&e) => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// A write transaction that takes the write lock up front: a deferred one
    /// that reads first cannot wait for a concurrent writer and fails "locked".
    async fn write_tx(&self) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>, sqlx::Error> {
        self.pool.begin_with("BEGIN IMMEDIATE").await
    }

    async fn connect(opts: SqliteConnectOptions) -> Result<SqlitePool, sqlx::Error> {
        let pool = SqlitePoolOptions::new().max_connections(4).connect_with(opts).await?;
        for stmt in SCHEMA {
            sqlx::query(stmt).execute(&pool).await?;
        }
        // Columns added since the first release, for registries made before.
        for stmt in ADDED_COLUMNS {
            if let Err(e) = sqlx::query(stmt).execute(&pool).await {
                if !e.to_string().contains("duplicate column") {
                    return Err(e);
                }
            }
        }
        Ok(pool)
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
        if sqlx::query("SELECT 1 FROM devices WHERE id = ?").bind(id.as_str()).fetch_optional(&mut *tx).await?.is_some()
        {
            return Err(RegistryError::DeviceExists(id.clone()));
        }
        check_key_free(&mut tx, &fp).await?;
        sqlx::query(
            "INSERT INTO devices (id, public_key, fingerprint, labels, created_at, host_keys) VALUES (?, ?, ?, ?, ?, ?)",
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
        sqlx::query("DELETE FROM enrollments WHERE device = ?").bind(id.as_str()).execute(&mut *tx).await?;
        // Its pivot-side ports go with it: a later device of the same id
        // must not inherit them.
        sqlx::query("DELETE FROM listens WHERE device = ?").bind(id.as_str()).execute(&mut *tx).await?;
        let r = sqlx::query("DELETE FROM devices WHERE id = ?").bind(id.as_str()).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(r.rows_affected() > 0)
    }

    pub async fn device(&self, id: &Id) -> Result<Option<DeviceRecord>, RegistryError> {
        let row =
            sqlx::query("SELECT * FROM devices WHERE id = ?").bind(id.as_str()).fetch_optional(&self.pool).await?;
        Ok(row.map(|r| device_from_row(&r)))
    }

    pub async fn devices(&self) -> Result<Vec<DeviceRecord>, RegistryError> {
        let rows = sqlx::query("SELECT * FROM devices ORDER BY id").fetch_all(&self.pool).await?;
        Ok(rows.iter().map(device_from_row).collect())
    }

    pub async fn add_operator(
        &self,
        name: &Id,
        key: &PublicKey,
        admin: bool,
        allow: &[String],
    ) -> Result<(), RegistryError> {
        let fp = fingerprint(key);
        let mut tx = self.write_tx().await?;
        if sqlx::query("SELECT 1 FROM operators WHERE name = ?")
            .bind(name.as_str())
            .fetch_optional(&mut *tx)
            .await?
            .is_some()
        {
            return Err(RegistryError::OperatorExists(name.clone()));
        }
        check_key_free(&mut tx, &fp).await?;
        sqlx::query(
            "INSERT INTO operators (name, public_key, fingerprint, admin, allow, created_at) VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(name.as_str())
        .bind(openssh_line(key))
        .bind(&fp)
        .bind(admin)
        .bind(serde_json::to_string(allow).unwrap_or_else(|_| "[]".into()))
        .bind(now_unix())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn remove_operator(&self, name: &Id) -> Result<bool, RegistryError> {
        let r = sqlx::query("DELETE FROM operators WHERE name = ?").bind(name.as_str()).execute(&self.pool).await?;
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
            "SELECT 'device' AS kind, id AS name, 0 AS admin FROM devices WHERE fingerprint = ?1 AND revoked_at IS NULL
             UNION ALL SELECT 'operator', name, admin FROM operators WHERE fingerprint = ?1",
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

    /// A counter that grows with every change to devices' or operators' keys.
    pub async fn revision(&self) -> Result<i64, RegistryError> {
        Ok(sqlx::query_scalar("SELECT n FROM revision WHERE id = 1").fetch_one(&self.pool).await?)
    }

    /// Records that `pivot` now holds the device's tunnel with these ports.
    pub async fn tunnel_up(&self, id: &Id, pivot: &str, ports: &[u32]) -> Result<(), RegistryError> {
        sqlx::query("UPDATE devices SET tunnel_pivot = ?, ports = ?, last_seen = ? WHERE id = ?")
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
            "UPDATE devices SET tunnel_pivot = NULL, ports = '[]', last_seen = ? WHERE id = ? AND tunnel_pivot = ?",
        )
        .bind(now_unix())
        .bind(id.as_str())
        .bind(pivot)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Marks devices seen now, while their tunnels stay up.
    /// Records what tunnel probes found (see `health`).
    pub(crate) async fn record_health(&self, found: &[crate::health::Health]) -> Result<(), RegistryError> {
        let now = now_unix();
        for h in found {
            let targets = h.targets.as_ref().map(|t| serde_json::to_string(t).unwrap_or_default());
            sqlx::query("UPDATE devices SET rtt_ms = ?, health_at = ?, targets = COALESCE(?, targets) WHERE id = ?")
                .bind(h.rtt_ms.map(|v| v as i64))
                .bind(now)
                .bind(targets)
                .bind(h.id.as_str())
                .execute(&self.pool)
                .await?;
        }
        Ok(())
    }

    pub async fn touch(&self, ids: &[Id]) -> Result<(), RegistryError> {
        let now = now_unix();
        for id in ids {
            sqlx::query("UPDATE devices SET last_seen = ? WHERE id = ?")
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
            "UPDATE devices SET presence = ?, presence_at = COALESCE(?2, presence_at),
             last_seen = CASE WHEN ?2 IS NULL THEN last_seen ELSE MAX(COALESCE(last_seen, 0), ?2) END
             WHERE id = ?3",
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

    /// Registers a device that will enroll itself with `token_digest` before `expires_at`.
    pub async fn add_pending_device(
        &self,
        id: &Id,
        labels: &BTreeMap<String, String>,
        token_digest: &str,
        expires_at: i64,
    ) -> Result<(), RegistryError> {
        let mut tx = self.write_tx().await?;
        if sqlx::query("SELECT 1 FROM devices WHERE id = ?").bind(id.as_str()).fetch_optional(&mut *tx).await?.is_some()
        {
            return Err(RegistryError::DeviceExists(id.clone()));
        }
        sqlx::query("INSERT INTO devices (id, labels, created_at) VALUES (?, ?, ?)")
            .bind(id.as_str())
            .bind(serde_json::to_string(labels).unwrap_or_else(|_| "{}".into()))
            .bind(now_unix())
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO enrollments (digest, device, expires_at) VALUES (?, ?, ?)")
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
        let row = sqlx::query("SELECT device, expires_at, used_at FROM enrollments WHERE digest = ?")
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
        let has_key: Option<Option<String>> = sqlx::query_scalar("SELECT fingerprint FROM devices WHERE id = ?")
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
        sqlx::query("UPDATE devices SET public_key = ?, fingerprint = ?, host_keys = ? WHERE id = ?")
            .bind(openssh_line(key))
            .bind(&fp)
            .bind(serde_json::to_string(host_keys).unwrap_or_else(|_| "[]".into()))
            .bind(id.as_str())
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE enrollments SET used_at = ? WHERE digest = ?")
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
        let r = sqlx::query("UPDATE devices SET public_key = ?, fingerprint = ? WHERE id = ? AND fingerprint = ?")
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

    /// Marks the device revoked: its key no longer authenticates. True if it existed.
    pub async fn revoke_device(&self, id: &Id) -> Result<bool, RegistryError> {
        let r = sqlx::query("UPDATE devices SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ?")
            .bind(now_unix())
            .bind(id.as_str())
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    pub async fn set_meta(&self, key: &str, value: &str) -> Result<(), RegistryError> {
        sqlx::query(
            "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        )
        .bind(key)
        .bind(value)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn meta(&self, key: &str) -> Result<Option<String>, RegistryError> {
        Ok(sqlx::query_scalar("SELECT value FROM meta WHERE key = ?").bind(key).fetch_optional(&self.pool).await?)
    }

    /// A trivial query, for health checks.
    pub async fn ping(&self) -> Result<(), RegistryError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// At start, forgets tunnels a previous run of this pivot left marked open.
    pub async fn clear_tunnels(&self, pivot: &str) -> Result<(), RegistryError> {
        sqlx::query("UPDATE devices SET tunnel_pivot = NULL, ports = '[]' WHERE tunnel_pivot = ?")
            .bind(pivot)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// The registry holds every key and the audit trail: only its owner may
/// read it. Creates the database file 0600 (SQLite gives its WAL and shm
/// files the database's mode) and tightens files an older version left open.
fn private_files(data_dir: &Path) -> Result<(), RegistryError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let db = data_dir.join(DB_FILE);
    if !db.exists() {
        std::fs::OpenOptions::new().write(true).create(true).truncate(false).mode(0o600).open(&db)?;
    }
    for suffix in ["", "-wal", "-shm"] {
        let path = data_dir.join(format!("{DB_FILE}{suffix}"));
        if let Ok(meta) = std::fs::metadata(&path) {
            if meta.permissions().mode() & 0o077 != 0 {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
            }
        }
    }
    Ok(())
}

fn is_busy(e: &sqlx::Error) -> bool {
    let text = e.to_string();
    text.contains("locked") || text.contains("busy")
}

async fn check_key_free(tx: &mut sqlx::SqliteConnection, fp: &str) -> Result<(), RegistryError> {
    let owner: Option<String> = sqlx::query_scalar(
        "SELECT 'device ''' || id || '''' FROM devices WHERE fingerprint = ?1
         UNION ALL SELECT 'operator ''' || name || '''' FROM operators WHERE fingerprint = ?1",
    )
    .bind(fp)
    .fetch_optional(&mut *tx)
    .await?;
    match owner {
        Some(owner) => Err(RegistryError::KeyInUse { fingerprint: fp.to_string(), owner }),
        None => Ok(()),
    }
}

fn device_from_row(r: &sqlx::sqlite::SqliteRow) -> DeviceRecord {
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
    }
}

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
    /// Whether any device (revoked ones included) or operator has this key.
    pub async fn key_registered(&self, fp: &str) -> Result<bool, RegistryError> {
        let found: Option<i64> = sqlx::query_scalar(
            "SELECT 1 FROM devices WHERE fingerprint = ?1 UNION ALL SELECT 1 FROM operators WHERE fingerprint = ?1",
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
            "SELECT id FROM devices WHERE substr(id, 1, 2) = ? AND length(id) BETWEEN ? AND ? ORDER BY id LIMIT 500",
        )
        .bind(head)
        .bind(len - 2)
        .bind(len + 2)
        .fetch_all(&self.pool)
        .await?;
        Ok(crate::refusal::nearest(id, ids.iter().map(String::as_str)))
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
        if sqlx::query("SELECT 1 FROM devices WHERE id = ?").bind(id.as_str()).fetch_optional(&mut *tx).await?.is_none()
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
        sqlx::query("INSERT INTO listens (device, port, bind, created_at) VALUES (?, ?, ?, ?)")
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
        let r = sqlx::query("DELETE FROM listens WHERE device = ? AND port = ?")
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
                sqlx::query("DELETE FROM openssh_ports WHERE device = ?").bind(&device).execute(&mut *tx).await?;
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
            sqlx::query("INSERT INTO openssh_ports (device, port) VALUES (?, ?)")
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

    /// The device a revoked key belonged to, and when it was revoked.
    pub async fn revoked_device(&self, fp: &str) -> Result<Option<(String, i64)>, RegistryError> {
        let row = sqlx::query("SELECT id, revoked_at FROM devices WHERE fingerprint = ? AND revoked_at IS NOT NULL")
            .bind(fp)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| (r.get("id"), r.get("revoked_at"))))
    }

    /// Bans `net` until `until`; a ban of the same net already in force is
    /// only ever lengthened (lift it with `remove_ban` to shorten it).
    pub async fn add_ban(&self, net: &str, until: i64, reason: &str, actor: &str) -> Result<(), RegistryError> {
        sqlx::query(
            "INSERT INTO bans (net, until, reason, actor, created_at) VALUES (?, ?, ?, ?, ?)
             ON CONFLICT(net) DO UPDATE SET until = MAX(until, excluded.until), reason = excluded.reason,
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
        let r = sqlx::query("DELETE FROM bans WHERE net = ? AND until > ?")
            .bind(net)
            .bind(now_unix())
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    /// Deletes bans that ran out.
    pub async fn prune_bans(&self) -> Result<(), RegistryError> {
        sqlx::query("DELETE FROM bans WHERE until <= ?").bind(now_unix()).execute(&self.pool).await?;
        Ok(())
    }

    /// Bans still in force, newest first.
    pub async fn bans(&self) -> Result<Vec<BanRecord>, RegistryError> {
        let now = now_unix();
        let rows = sqlx::query("SELECT * FROM bans WHERE until > ? ORDER BY created_at DESC, net")
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

    /// Appends audit records in one transaction.
    pub async fn insert_audit(&self, records: &[crate::audit::AuditRecord]) -> Result<(), RegistryError> {
        let mut tx = self.write_tx().await?;
        for r in records {
            sqlx::query("INSERT INTO audit (at, event, source_ip, device, operator, record) VALUES (?, ?, ?, ?, ?, ?)")
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
            "SELECT seq, record FROM audit WHERE at >= ?1 AND at <= ?2
             AND (?3 IS NULL OR device = ?3) AND (?4 IS NULL OR operator = ?4)
             AND (?5 IS NULL OR source_ip = ?5) AND (?6 IS NULL OR event = ?6)
             ORDER BY seq DESC LIMIT ?7",
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
        let rows = sqlx::query("SELECT seq, record FROM audit WHERE seq > ? ORDER BY seq LIMIT ?")
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
        let r = sqlx::query("DELETE FROM audit WHERE at < ?").bind(before).execute(&self.pool).await?;
        Ok(r.rows_affected())
    }
}

fn audit_from_row(r: &sqlx::sqlite::SqliteRow) -> Option<crate::audit::AuditRecord> {
    let mut rec: crate::audit::AuditRecord = serde_json::from_str(r.get::<&str, _>("record")).ok()?;
    rec.seq = Some(r.get("seq"));
    Some(rec)
}
