//! The registry: which keys belong to which devices and operators, and what
//! the pivots last knew about each device's tunnel.
//!
//! SQLite in WAL mode by default, so admin commands on the pivot host change
//! it while the server runs; PostgreSQL (`--database-url`) for several
//! pivots sharing one registry. Both run the same numbered migrations
//! (`schema`) and the same queries, through sqlx's `Any` driver: the SQL
//! here is the dialect both engines share, with `$N` parameters.
//!
//! Every change to an identity bumps `revision`, which a pivot on SQLite
//! polls every second to drop connections whose key was removed; on
//! PostgreSQL the same triggers also `NOTIFY` every pivot at once.
//!
//! By area: `devices`, `operators`, `tokens` (enrollment and key rotation),
//! `tunnels` (tunnel records and port leases), `bans` and `audit`; this
//! module holds the types, the schema and the connection.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use burrow_core::keys::{fingerprint, openssh_line, PublicKey};
use burrow_core::time::now_unix;
use burrow_core::Id;
use serde::Serialize;
use std::sync::Arc;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{AnyPool, ConnectOptions, Row};

mod audit;
mod bans;
mod cas;
mod devices;
mod operators;
mod pivots;
mod schema;
mod tokens;
mod tunnels;

pub use bans::BanRecord;
pub use cas::{signing_ca, trust_digest, CaRecord, CertRequest, IssuedCert};
pub use devices::HostKeyReport;
pub use pivots::{PivotRecord, PIVOT_DEAD_AFTER};

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
    #[error("operator '{0}' changed meanwhile; ask again")]
    OperatorChanged(String),
    #[error("operator '{0}' does not exist (or holds another key now)")]
    NoSuchOperator(String),
    #[error("operator '{0}' holds {max} certificates that have not expired; wait for some to expire", max = cas::MAX_LIVE_CERTIFICATES)]
    TooManyCertificates(String),
    #[error("the registry has no user CA key: start `burrow server` once")]
    NoUserCa,
    #[error(
        "a CA rotation is in progress: key {fingerprint} signs from {}; wait for it, or add --now to switch at once",
        burrow_core::time::format_unix(*.signs_from)
    )]
    RotationPending { fingerprint: String, signs_from: i64 },
    #[error("cannot sign the certificate: {0}")]
    Sign(String),
    #[error("cannot create or protect the registry file")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Url(String),
    #[error("cannot connect to the registry at {url}")]
    Connect {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("registry migration {version} ({name}) failed")]
    Migration {
        version: i64,
        name: &'static str,
        #[source]
        source: sqlx::Error,
    },
}

/// Who a key belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    Device(Id),
    Operator {
        name: Id,
        admin: bool,
    },
    /// Another pivot of the same registry, proven by its registered host key.
    Pivot(Id),
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Identity::Device(id) => write!(f, "device '{id}'"),
            Identity::Operator { name, .. } => write!(f, "operator '{name}'"),
            Identity::Pivot(name) => write!(f, "pivot '{name}'"),
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
    /// When its agent last fetched the CA keys (its sshd takes certificates).
    pub trust_at: Option<i64>,
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
    /// Users its certificates log in as on devices; empty: the default.
    pub device_users: Vec<String>,
    /// Its certificates' lifetime in seconds; `None`: the default.
    pub cert_ttl: Option<i64>,
    pub created_at: i64,
}

/// Which engine holds the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// A file in the pivot's data dir: one pivot, no setup.
    Sqlite,
    /// A PostgreSQL database shared by several pivots.
    Postgres,
}

impl Backend {
    /// The name in `/healthz` and `/metrics`.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }
}

#[derive(Clone)]
pub struct Registry {
    pool: AnyPool,
    backend: Backend,
    /// The PostgreSQL URL, for the `LISTEN` connection.
    url: Option<Arc<str>>,
}

/// Channel of the PostgreSQL notifications the registry's triggers send;
/// the payload names what changed (see [`Change`]).
pub const NOTIFY_CHANNEL: &str = "burrow_registry";

/// What a notification says changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// A device's or operator's key or role, or a lease: recheck sessions.
    Identities,
    /// The bans in force.
    Bans,
    /// Notifications may have been missed (the listening connection was
    /// lost): recheck everything.
    Unknown,
}

/// PostgreSQL serializes the registry's write transactions on this advisory
/// lock, as SQLite's `BEGIN IMMEDIATE` does: a check-then-write (a key used
/// by one identity only, across tables) cannot interleave with another.
const WRITE_LOCK: i64 = 0x6275_7272_6f77; // "burrow"

impl Registry {
    /// Opens (creating if needed) the SQLite registry in `data_dir`.
    pub async fn open(data_dir: &Path) -> Result<Self, RegistryError> {
        sqlx::any::install_default_drivers();
        private_files(data_dir)?;
        let url = SqliteConnectOptions::new().filename(data_dir.join(DB_FILE)).create_if_missing(true).to_url_lossy();
        let opts = AnyConnectOptions::from_url(&url)?;
        // A new file is set up by whoever comes first, the server or an admin
        // command; the other may see it locked for a moment. SQLite does not
        // always run the busy handler for that (e.g. switching to WAL), so retry.
        let mut attempt = 0;
        loop {
            let opened = match Self::connect_sqlite(opts.clone()).await {
                Ok(pool) => {
                    let registry = Registry { pool, backend: Backend::Sqlite, url: None };
                    match registry.migrate().await {
                        Ok(()) => Ok(registry),
                        Err(e) => {
                            registry.close().await;
                            Err(e)
                        }
                    }
                }
                Err(e) => Err(e.into()),
            };
            match opened {
                Ok(registry) => {
                    private_files(data_dir)?;
                    return Ok(registry);
                }
                Err(e) if attempt < 100 && is_busy(&e) => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Opens the PostgreSQL registry at `url` (`postgres://…`), creating its
    /// tables if needed.
    pub async fn open_url(url: &str) -> Result<Self, RegistryError> {
        sqlx::any::install_default_drivers();
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(RegistryError::Url(format!(
                "'{}' is not a PostgreSQL URL (postgres://USER@HOST/DB); leave --database-url out for SQLite in the data dir",
                redact_url(url)
            )));
        }
        let parsed = url.parse().map_err(|e| RegistryError::Url(format!("bad --database-url: {e}")))?;
        let opts = AnyConnectOptions::from_url(&parsed)?;
        // One connection first: the pool would only say it timed out, and
        // this says why (refused, unknown host, wrong password).
        let probe = tokio::time::timeout(
            Duration::from_secs(10),
            <sqlx::AnyConnection as sqlx::Connection>::connect_with(&opts),
        )
        .await
        .map_err(|_| RegistryError::Url(format!("{}: no answer within 10 s", redact_url(url))))?
        .map_err(|e| RegistryError::Connect { url: redact_url(url), source: e })?;
        let _ = sqlx::Connection::close(probe).await;
        // Queries are short: a pivot makes one per connection attempt, not per byte.
        let pool = AnyPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(opts)
            .await
            .map_err(|e| RegistryError::Connect { url: redact_url(url), source: e })?;
        let registry = Registry { pool, backend: Backend::Postgres, url: Some(url.into()) };
        registry.migrate().await?;
        Ok(registry)
    }

    /// PostgreSQL at `database_url` if given, else SQLite in `data_dir`.
    pub async fn open_for(database_url: Option<&str>, data_dir: &Path) -> Result<Self, RegistryError> {
        match database_url {
            Some(url) => Self::open_url(url).await,
            None => Self::open(data_dir).await,
        }
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// A write transaction that holds the registry's write lock from the
    /// start: on SQLite a deferred one that reads first cannot wait for a
    /// concurrent writer and fails "locked"; on PostgreSQL see [`WRITE_LOCK`].
    async fn write_tx(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>, sqlx::Error> {
        match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await,
            Backend::Postgres => {
                let mut tx = self.pool.begin().await?;
                sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(WRITE_LOCK).execute(&mut *tx).await?;
                Ok(tx)
            }
        }
    }

    /// Bumps the revision by hand, for a change no trigger sees (the CA
    /// keys): every pivot rechecks, at once on PostgreSQL (notified).
    async fn bump_revision(&self, tx: &mut sqlx::Transaction<'static, sqlx::Any>) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE revision SET n = n + 1 WHERE id = 1").execute(&mut **tx).await?;
        if self.backend == Backend::Postgres {
            sqlx::query("SELECT pg_notify($1, 'identities')").bind(NOTIFY_CHANNEL).execute(&mut **tx).await?;
        }
        Ok(())
    }

    async fn connect_sqlite(opts: AnyConnectOptions) -> Result<AnyPool, sqlx::Error> {
        // A handful of connections: the registry sees a query per connection
        // attempt and per refusal, not per byte relayed.
        let pool = AnyPoolOptions::new()
            .max_connections(4)
            .after_connect(|conn, _| {
                Box::pin(async move {
                    sqlx::query("PRAGMA busy_timeout = 10000").execute(&mut *conn).await?;
                    Ok(())
                })
            })
            .connect_with(opts)
            .await?;
        // Readers never wait for the writer (admin commands change the
        // registry while the pivot runs). The file keeps the mode.
        sqlx::query("PRAGMA journal_mode = WAL").execute(&pool).await?;
        Ok(pool)
    }

    /// Runs the numbered migrations not applied yet, in one write
    /// transaction: pivots starting together apply each exactly once.
    async fn migrate(&self) -> Result<(), RegistryError> {
        let mut tx = self.write_tx().await?;
        if self.backend == Backend::Postgres {
            // No "already exists, skipping" notice at every start.
            sqlx::query("SET LOCAL client_min_messages = warning").execute(&mut *tx).await?;
        }
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL)",
        )
        .execute(&mut *tx)
        .await?;
        let applied: Vec<i64> = sqlx::query_scalar("SELECT version FROM schema_migrations").fetch_all(&mut *tx).await?;
        for m in schema::MIGRATIONS {
            if applied.contains(&m.version) {
                continue;
            }
            let statements = match self.backend {
                Backend::Sqlite => m.sqlite,
                Backend::Postgres => m.postgres,
            };
            for stmt in statements {
                if let Err(e) = sqlx::query(stmt).execute(&mut *tx).await {
                    // Registries made before numbered migrations may have
                    // some of migration 2's columns already.
                    if !(self.backend == Backend::Sqlite && e.to_string().contains("duplicate column")) {
                        return Err(RegistryError::Migration { version: m.version, name: m.name, source: e });
                    }
                }
            }
            sqlx::query("INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)")
                .bind(m.version)
                .bind(m.name)
                .bind(now_unix())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// The highest migration applied.
    pub async fn schema_version(&self) -> Result<i64, RegistryError> {
        Ok(sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetch_one(&self.pool).await?)
    }

    /// A counter that grows with every change to devices' or operators' keys.
    pub async fn revision(&self) -> Result<i64, RegistryError> {
        Ok(sqlx::query_scalar("SELECT n FROM revision WHERE id = 1").fetch_one(&self.pool).await?)
    }

    /// On PostgreSQL, what changed, as the registry's triggers announce it on
    /// every pivot's writes (`LISTEN`); `None` on SQLite, whose
    /// [`revision`](Self::revision) is polled instead. A lost connection is
    /// made again and reported as [`Change::Unknown`]. The task ends when the
    /// receiver is dropped.
    pub async fn listen(&self) -> Result<Option<tokio::sync::mpsc::Receiver<Change>>, RegistryError> {
        let Some(url) = self.url.clone() else { return Ok(None) };
        let mut listener = sqlx::postgres::PgListener::connect(&url)
            .await
            .map_err(|e| RegistryError::Connect { url: redact_url(&url), source: e })?;
        listener.listen(NOTIFY_CHANNEL).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let change = tokio::select! {
                    _ = tx.closed() => return,
                    got = listener.try_recv() => match got {
                        Ok(Some(n)) if n.payload() == "bans" => Change::Bans,
                        Ok(Some(_)) => Change::Identities,
                        // The connection was lost; the next call makes it again.
                        Ok(None) => Change::Unknown,
                        Err(e) => {
                            tracing::warn!(error = %e, "registry notifications lost; reconnecting");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            Change::Unknown
                        }
                    },
                };
                // A full queue already holds a recheck; one more adds nothing.
                if let Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) = tx.try_send(change) {
                    return;
                }
            }
        });
        Ok(Some(rx))
    }

    pub async fn set_meta(&self, key: &str, value: &str) -> Result<(), RegistryError> {
        sqlx::query(
            "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        )
        .bind(key)
        .bind(value)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn meta(&self, key: &str) -> Result<Option<String>, RegistryError> {
        Ok(sqlx::query_scalar("SELECT value FROM meta WHERE key = $1").bind(key).fetch_optional(&self.pool).await?)
    }

    /// The database's clock, in Unix seconds: the one clock every pivot's
    /// heartbeat is judged by, however far the pivots' own clocks drift.
    pub async fn db_now(&self) -> Result<i64, RegistryError> {
        let sql = match self.backend {
            Backend::Sqlite => "SELECT CAST(strftime('%s', 'now') AS INTEGER)",
            Backend::Postgres => "SELECT CAST(EXTRACT(EPOCH FROM now()) AS BIGINT)",
        };
        Ok(sqlx::query_scalar(sql).fetch_one(&self.pool).await?)
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

/// `url` without its password (in the user part or a `password=`
/// parameter), for messages and logs.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            if u.query().is_some() {
                let pairs: Vec<(String, String)> = u
                    .query_pairs()
                    .map(|(k, v)| {
                        let secret = k.eq_ignore_ascii_case("password") || k.starts_with("ssl") && k.contains("key");
                        (k.into_owned(), if secret { "***".to_string() } else { v.into_owned() })
                    })
                    .collect();
                u.query_pairs_mut().clear().extend_pairs(pairs);
            }
            u.to_string()
        }
        Err(_) => "(unparsable URL)".to_string(),
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

fn is_busy(e: &RegistryError) -> bool {
    let text = match e {
        RegistryError::Db(e) | RegistryError::Migration { source: e, .. } => e.to_string(),
        _ => return false,
    };
    text.contains("locked") || text.contains("busy")
}

async fn check_key_free(tx: &mut sqlx::AnyConnection, fp: &str) -> Result<(), RegistryError> {
    let owner: Option<String> = sqlx::query_scalar(
        "SELECT 'device ''' || id || '''' FROM devices WHERE fingerprint = $1
         UNION ALL SELECT 'operator ''' || name || '''' FROM operators WHERE fingerprint = $1",
    )
    .bind(fp)
    .fetch_optional(&mut *tx)
    .await?;
    match owner {
        Some(owner) => Err(RegistryError::KeyInUse { fingerprint: fp.to_string(), owner }),
        None => Ok(()),
    }
}
