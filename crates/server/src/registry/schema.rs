//! The registry's schema as numbered migrations, one list of statements per
//! engine. The numbers and the tables are the same on both; the statements
//! differ only where the engines do (`INTEGER` against `BIGINT`,
//! `AUTOINCREMENT` against `BIGSERIAL`, trigger bodies).
//!
//! A registry records what it applied in `schema_migrations`. SQLite
//! registries made before numbering ran migration 1's statements already
//! (all `IF NOT EXISTS`) and maybe some of migration 2's columns, so both
//! are safe to run on them.
//!
//! Add a migration by appending one, for both engines; never edit one that shipped.

pub(super) struct Migration {
    pub version: i64,
    pub name: &'static str,
    pub sqlite: &'static [&'static str],
    pub postgres: &'static [&'static str],
}

pub(super) const MIGRATIONS: &[Migration] = &[
    Migration { version: 1, name: "initial", sqlite: SQLITE_1, postgres: POSTGRES_1 },
    Migration { version: 2, name: "host keys and health", sqlite: SQLITE_2, postgres: POSTGRES_2 },
    Migration { version: 3, name: "pivots", sqlite: PIVOTS, postgres: PIVOTS },
    Migration { version: 4, name: "user CA", sqlite: USER_CA, postgres: USER_CA },
];

const SQLITE_1: &[&str] = &[
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
/// Columns added after the first release.
const SQLITE_2: &[&str] = &[
    "ALTER TABLE devices ADD COLUMN host_keys_changed TEXT",
    "ALTER TABLE devices ADD COLUMN rtt_ms INTEGER",
    "ALTER TABLE devices ADD COLUMN health_at INTEGER",
    "ALTER TABLE devices ADD COLUMN targets TEXT",
];

const POSTGRES_1: &[&str] = &[
    "CREATE TABLE devices (
        id TEXT PRIMARY KEY,
        public_key TEXT,
        fingerprint TEXT UNIQUE,
        host_keys TEXT NOT NULL DEFAULT '[]',
        revoked_at BIGINT,
        labels TEXT NOT NULL DEFAULT '{}',
        created_at BIGINT NOT NULL,
        last_seen BIGINT,
        tunnel_pivot TEXT,
        ports TEXT NOT NULL DEFAULT '[]',
        presence TEXT,
        presence_at BIGINT
    )",
    "CREATE TABLE operators (
        name TEXT PRIMARY KEY,
        public_key TEXT NOT NULL,
        fingerprint TEXT NOT NULL UNIQUE,
        admin BIGINT NOT NULL DEFAULT 0,
        allow TEXT NOT NULL DEFAULT '[]',
        created_at BIGINT NOT NULL
    )",
    "CREATE TABLE enrollments (
        digest TEXT PRIMARY KEY,
        device TEXT NOT NULL,
        expires_at BIGINT NOT NULL,
        used_at BIGINT
    )",
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE listens (
        device TEXT NOT NULL,
        port BIGINT NOT NULL,
        bind TEXT NOT NULL UNIQUE,
        created_at BIGINT NOT NULL,
        PRIMARY KEY (device, port)
    )",
    "CREATE TABLE openssh_ports (device TEXT PRIMARY KEY, port BIGINT NOT NULL UNIQUE)",
    "CREATE TABLE bans (
        net TEXT PRIMARY KEY,
        until BIGINT NOT NULL,
        reason TEXT NOT NULL,
        actor TEXT NOT NULL,
        created_at BIGINT NOT NULL
    )",
    "CREATE TABLE audit (
        seq BIGSERIAL PRIMARY KEY,
        at BIGINT NOT NULL,
        event TEXT NOT NULL,
        source_ip TEXT,
        device TEXT,
        operator TEXT,
        record TEXT NOT NULL
    )",
    "CREATE INDEX audit_at ON audit (at)",
    "CREATE TABLE revision (id BIGINT PRIMARY KEY CHECK (id = 1), n BIGINT NOT NULL)",
    "INSERT INTO revision (id, n) VALUES (1, 0) ON CONFLICT DO NOTHING",
    // As SQLite's triggers, once per statement, and a notification every
    // pivot's LISTEN gets when the transaction commits.
    "CREATE OR REPLACE FUNCTION burrow_changed() RETURNS trigger LANGUAGE plpgsql AS $body$
     BEGIN
         IF TG_ARGV[0] = 'identities' THEN
             UPDATE revision SET n = n + 1 WHERE id = 1;
         END IF;
         PERFORM pg_notify('burrow_registry', TG_ARGV[0]);
         RETURN NULL;
     END
     $body$",
    "CREATE TRIGGER devices_changed AFTER INSERT OR DELETE OR UPDATE OF fingerprint, revoked_at ON devices
     FOR EACH STATEMENT EXECUTE FUNCTION burrow_changed('identities')",
    "CREATE TRIGGER operators_changed AFTER INSERT OR DELETE OR UPDATE OF fingerprint, admin, allow ON operators
     FOR EACH STATEMENT EXECUTE FUNCTION burrow_changed('identities')",
    "CREATE TRIGGER listens_changed AFTER INSERT OR DELETE ON listens
     FOR EACH STATEMENT EXECUTE FUNCTION burrow_changed('identities')",
    "CREATE TRIGGER bans_changed AFTER INSERT OR DELETE OR UPDATE ON bans
     FOR EACH STATEMENT EXECUTE FUNCTION burrow_changed('bans')",
];

const POSTGRES_2: &[&str] = &[
    "ALTER TABLE devices ADD COLUMN host_keys_changed TEXT",
    "ALTER TABLE devices ADD COLUMN rtt_ms BIGINT",
    "ALTER TABLE devices ADD COLUMN health_at BIGINT",
    "ALTER TABLE devices ADD COLUMN targets TEXT",
];

/// The pivots sharing this registry: where peers reach each one, the host
/// key it proves, and its heartbeat. The same statements on both engines.
const PIVOTS: &[&str] = &[
    "CREATE TABLE pivots (
        name TEXT PRIMARY KEY,
        address TEXT NOT NULL,
        host_key TEXT NOT NULL,
        boot TEXT NOT NULL,
        started_at BIGINT NOT NULL,
        seen_at BIGINT NOT NULL
    )",
    "CREATE INDEX devices_tunnel_pivot ON devices (tunnel_pivot)",
];

/// The user CA that signs operators' certificates (shared by every pivot of
/// the registry), the certificates it issued, what each operator's
/// certificates carry, and when each device last fetched what it trusts.
const USER_CA: &[&str] = &[
    "CREATE TABLE user_cas (
        fingerprint TEXT PRIMARY KEY,
        public_key TEXT NOT NULL,
        private_key TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        signs_from BIGINT NOT NULL,
        retires_at BIGINT
    )",
    "CREATE TABLE certificates (
        serial BIGINT PRIMARY KEY,
        operator TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        public_key TEXT NOT NULL,
        principals TEXT NOT NULL,
        ca_fingerprint TEXT NOT NULL,
        valid_after BIGINT NOT NULL,
        valid_before BIGINT NOT NULL,
        created_at BIGINT NOT NULL
    )",
    "CREATE INDEX certificates_valid_before ON certificates (valid_before)",
    "ALTER TABLE operators ADD COLUMN device_users TEXT",
    "ALTER TABLE operators ADD COLUMN cert_ttl BIGINT",
    "ALTER TABLE devices ADD COLUMN trust_at BIGINT",
];
