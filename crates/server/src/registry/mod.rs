//! The registry: which keys belong to which devices and operators, and what
//! the pivots last knew about each device's tunnel.
//!
//! SQLite in WAL mode by default, so admin commands on the pivot host change
//! it while the server runs. Every change to an identity bumps `revision`,
//! which running pivots watch to drop connections whose key was removed.
//!
//! By area: `devices`, `operators`, `tokens` (enrollment and key rotation),
//! `tunnels` (tunnel records and port leases), `bans` and `audit`; this
//! module holds the types, the schema and the connection.

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

mod audit;
mod bans;
mod devices;
mod operators;
mod tokens;
mod tunnels;

pub use bans::BanRecord;
pub use devices::HostKeyReport;

/// The registry's database engine, for `/healthz` and `/metrics`.
pub const BACKEND: &str = "sqlite";

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

impl Registry {
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

    /// A counter that grows with every change to devices' or operators' keys.
    pub async fn revision(&self) -> Result<i64, RegistryError> {
        Ok(sqlx::query_scalar("SELECT n FROM revision WHERE id = 1").fetch_one(&self.pool).await?)
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
