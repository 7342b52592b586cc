//! `burrow device …` and `burrow operator …`.
//!
//! On the pivot host they run against the registry in `--data-dir`; with
//! `--pivot HOST:PORT` they go over SSH to the pivot, authenticated by the
//! operator's key. Either way the same [`Request`] reaches the same code
//! (`burrow_server::admin::execute`), so both paths behave alike.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use burrow_core::keys::read_public_key;
use burrow_core::rpc::{BanInfo, DeviceAdded, DeviceInfo, ListenInfo, OperatorInfo, Request, Selector};
use burrow_core::Id;
use burrow_server::admin::{self, Caller};
use burrow_server::Registry;
use clap::Subcommand;
use serde_json::Value;

use crate::remote::Remote;

#[derive(Subcommand)]
pub enum DeviceCommand {
    /// Register a device. With --key, its public key; without, print a
    /// one-time enrollment token for `burrow agent enroll`.
    Add {
        /// The device id (e.g. cam-42).
        id: Id,
        /// The device's public key file (.pub).
        #[arg(long)]
        key: Option<PathBuf>,
        /// The device sshd's public host key file, with --key; repeatable (agents also report their own).
        #[arg(long = "host-key", requires = "key", value_name = "FILE")]
        host_keys: Vec<PathBuf>,
        /// k=v, repeatable.
        #[arg(long = "label", value_parser = parse_label, value_name = "K=V")]
        labels: Vec<(String, String)>,
        /// How long the enrollment token stays valid.
        #[arg(long, default_value = "24h", value_parser = crate::parse_duration)]
        ttl: Duration,
        /// The pivot's HOST:PORT to put in the token [default: the address the pivot advertises].
        #[arg(long)]
        address: Option<String>,
        #[command(flatten)]
        data: Target,
    },
    /// List devices: id, status (connected, waiting, offline, not-enrolled, revoked; ! = host keys changed), last seen, ports, labels.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        data: Target,
    },
    /// Show one device.
    Show {
        /// The device id (e.g. cam-42).
        id: Id,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        data: Target,
    },
    /// Remove a device; its open tunnel closes within seconds.
    Remove {
        /// The device id (e.g. cam-42).
        id: Id,
        #[command(flatten)]
        data: Target,
    },
    /// Revoke a device: disconnect it now and refuse its key from then on.
    Revoke {
        /// The device id (e.g. cam-42).
        id: Id,
        #[command(flatten)]
        data: Target,
    },
    /// The device sshd's host keys that operators pin.
    #[command(subcommand)]
    HostKeys(HostKeysCommand),
    /// Make the pivot listen on a TCP port and relay each connection to the device's PORT, waking it if needed.
    Listen {
        /// The device id (e.g. cam-42).
        id: Id,
        /// The device's exposed port to relay to.
        port: u16,
        /// Where the pivot listens, ADDRESS:PORT [default: a free port of its lease range on 127.0.0.1].
        #[arg(long, value_name = "ADDRESS:PORT")]
        bind: Option<String>,
        #[command(flatten)]
        data: Target,
    },
    /// End a lease made by `device listen`.
    Unlisten {
        /// The device id (e.g. cam-42).
        id: Id,
        /// The device port of the lease.
        port: u16,
        #[command(flatten)]
        data: Target,
    },
    /// List the pivot-side port leases.
    Listens {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        data: Target,
    },
}

#[derive(Subcommand)]
pub enum HostKeysCommand {
    /// Accept the changed host keys the device's agent reported (or forget the keys, so its next report registers them).
    Reset {
        /// The device id (e.g. cam-42).
        id: Id,
        /// With no changed keys reported, drop the registered keys so that the agent's next report registers them.
        #[arg(long)]
        forget: bool,
        #[command(flatten)]
        data: Target,
    },
}

#[derive(Subcommand)]
pub enum OperatorCommand {
    /// Register an operator and their public key.
    Add {
        /// The operator name (e.g. alice).
        name: Id,
        /// The operator's public key file (.pub).
        #[arg(long)]
        key: PathBuf,
        /// May manage devices and operators.
        #[arg(long)]
        admin: bool,
        /// Reach only devices with these labels (k=v[,k=v]); repeat for alternatives [default: every device].
        #[arg(long)]
        allow: Vec<Selector>,
        /// A login user on devices for the operator's certificates (* for any); repeatable [default: root for an admin, else the operator's name].
        #[arg(long = "device-user", value_name = "USER", value_parser = parse_device_user)]
        device_users: Vec<String>,
        /// Lifetime of the operator's certificates (at most 7d).
        #[arg(long, default_value = "8h", value_parser = parse_cert_ttl)]
        cert_ttl: Duration,
        #[command(flatten)]
        data: Target,
    },
    /// List operators.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        data: Target,
    },
    /// Remove an operator; their open connections close within seconds.
    Remove {
        /// The operator name (e.g. alice).
        name: Id,
        #[command(flatten)]
        data: Target,
    },
}

fn parse_device_user(s: &str) -> Result<String, String> {
    burrow_core::cert::validate_device_user(s).map(|_| s.to_string())
}

fn parse_cert_ttl(s: &str) -> Result<Duration, String> {
    let d = crate::parse_duration(s)?;
    if d > burrow_core::cert::MAX_CERT_TTL {
        return Err("at most 7d: removing an operator relies on their certificates expiring".into());
    }
    Ok(d)
}

/// `burrow ca …`: the user CA that signs operators' certificates.
#[derive(Subcommand)]
pub enum CaCommand {
    /// Print the CA's public keys, for sshd's TrustedUserCAKeys.
    Show {
        /// Print JSON with each key's state and dates instead of key lines.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        data: Target,
    },
    /// Add a new CA key (admin): devices trust it at once, it signs after the overlap, and the old key retires when its last certificate expires.
    Rotate {
        /// How long devices have to pick up the new key before it signs.
        #[arg(long, default_value = "24h", value_parser = crate::parse_duration)]
        overlap: Duration,
        /// Sign with the new key at once and drop every other one (after a CA key was stolen).
        #[arg(long, conflicts_with = "overlap")]
        now: bool,
        #[command(flatten)]
        data: Target,
    },
}

pub async fn ca(cmd: CaCommand) -> Result<()> {
    match cmd {
        CaCommand::Show { json, data } => {
            let keys: Vec<burrow_core::rpc::CaKeyInfo> = typed(send(&data, Request::CaShow).await?)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&keys)?);
                return Ok(());
            }
            // Key lines only, so `burrow ca show > user_ca.pub` is a TrustedUserCAKeys file.
            for k in &keys {
                let key = burrow_core::keys::parse_public_key(&k.public_key, "a CA key")?;
                println!("{} burrow-user-ca-{}", burrow_core::keys::openssh_line(&key), safe(&k.state));
            }
        }
        CaCommand::Rotate { overlap, now, data } => {
            let overlap_secs = if now { 0 } else { overlap.as_secs() };
            let out = send(&data, Request::CaRotate { overlap_secs, now }).await?;
            let fp = str_of(&out["fingerprint"]);
            // On the pivot host, a dropped key leaves the data dir too.
            if now && data.pivot.is_none() {
                let registry = match &data.database_url {
                    Some(url) => Registry::open_url(url).await?,
                    None => Registry::open(&data.data_dir).await?,
                };
                let dir = &data.data_dir;
                if burrow_server::ca::forget_dropped(&registry, dir, burrow_core::time::now_unix()).await? {
                    println!("deleted the old CA key {}", dir.join(burrow_server::ca::USER_CA_FILE).display());
                }
                registry.close().await;
            }
            if now {
                println!("new CA key {fp} signs from now; the old keys are no longer trusted");
                println!("connected devices drop the old keys within seconds, the others as they connect; certificates the old keys signed stop working there, so operators run `burrow login` again");
            } else {
                println!(
                    "new CA key {fp}: connected devices trust it within seconds, the others as they connect; it signs from {}",
                    str_of(&out["signs_from"])
                );
                if let Some(until) = out["old_retires_at"].as_str() {
                    println!("the old key signs until then and is trusted until {}", safe(until));
                }
            }
        }
    }
    Ok(())
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    burrow_core::label::parse_label(s).map_err(|e| e.to_string())
}

#[derive(Subcommand)]
pub enum BanCommand {
    /// List bans in force.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        data: Target,
    },
    /// Ban an address or CIDR; its connections are dropped at accept.
    Add {
        /// IP address or CIDR, e.g. 203.0.113.7 or 203.0.113.0/24.
        net: String,
        /// How long the ban lasts.
        #[arg(long = "for", default_value = "1h", value_parser = crate::parse_duration)]
        duration: Duration,
        #[command(flatten)]
        data: Target,
    },
    /// Lift a ban.
    Remove {
        /// The address or CIDR as banned.
        net: String,
        #[command(flatten)]
        data: Target,
    },
}

#[derive(clap::Args)]
pub struct AuditArgs {
    /// From this time on: a duration ago (1h, 7d) or RFC 3339 (2026-12-01T10:00:00Z) [default: 24h].
    #[arg(long, value_parser = parse_when)]
    since: Option<i64>,
    /// Up to this time: a duration ago (10m) or RFC 3339.
    #[arg(long, value_parser = parse_when)]
    until: Option<i64>,
    /// Only records about this device.
    #[arg(long)]
    device: Option<String>,
    /// Only records about this operator.
    #[arg(long)]
    operator: Option<String>,
    /// Only records from this source address (IP, or IP:PORT as shown).
    #[arg(long)]
    source: Option<String>,
    /// Only this event: auth, auth_failures, connection_dropped, tunnel_up, tunnel_down, wake,
    /// channel_open, channel_refused, channel_close, ban, ban_add, ban_remove, device_add,
    /// device_remove, device_revoke, operator_add, operator_remove, enroll, rotate_key, host_keys,
    /// host_keys_reset, lease_add, lease_remove, certificate, ca_rotate, admin_denied.
    #[arg(long)]
    event: Option<String>,
    /// At most this many records (the newest).
    #[arg(long, default_value_t = 1000)]
    limit: u32,
    /// One JSON object per line instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    data: Target,
}

/// `1h` (that long ago) or an RFC 3339 time, as Unix seconds.
fn parse_when(s: &str) -> Result<i64, String> {
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        return Ok(t.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0));
    }
    let d =
        crate::parse_duration(s).map_err(|e| format!("{e}; or give an RFC 3339 time such as 2026-12-01T10:00:00Z"))?;
    Ok(burrow_core::time::now_unix().saturating_sub(d.as_secs() as i64))
}

/// "1 day", "36 hours", "90 minutes", "45 seconds": the largest unit that
/// divides the duration, in words.
fn spoken_duration(d: std::time::Duration) -> String {
    let secs = d.as_secs();
    let (n, unit) = match secs {
        s if s >= 86_400 && s % 86_400 == 0 => (s / 86_400, "day"),
        s if s >= 3_600 && s % 3_600 == 0 => (s / 3_600, "hour"),
        s if s >= 60 && s % 60 == 0 => (s / 60, "minute"),
        s => (s, "second"),
    };
    format!("{n} {unit}{}", if n == 1 { "" } else { "s" })
}

/// Where an admin command runs: on the registry in the pivot's data dir, or
/// on a remote pivot over SSH. Only these commands read `--pivot` (and
/// `BURROW_PIVOT`), so an exported address never gets in the way of
/// `server`, `agent` or `login`.
#[derive(clap::Args, Clone)]
pub struct Target {
    /// The pivot's data dir, when run on the pivot host.
    #[arg(long, env = "BURROW_DATA_DIR", default_value = "/var/lib/burrow")]
    pub data_dir: PathBuf,
    /// Run on this PostgreSQL registry (the pivots' --database-url) instead of the data dir's SQLite one.
    #[arg(long, env = "BURROW_DATABASE_URL", value_name = "URL", hide_env_values = true, conflicts_with = "pivot")]
    pub database_url: Option<String>,
    /// Run on this pivot (HOST:PORT) over SSH instead of on a local data dir.
    #[arg(long, env = "BURROW_PIVOT", value_name = "HOST:PORT")]
    pub pivot: Option<String>,
    /// Operator private key for --pivot [default: from `burrow login`, ssh-agent, ~/.ssh/id_ed25519].
    #[arg(long, value_name = "FILE")]
    pub identity: Option<PathBuf>,
    /// The pivot's host key for --pivot: SHA256:... or a .pub file [default: from `burrow login`].
    #[arg(long, alias = "pivot-fingerprint", value_name = "KEY")]
    pub pivot_host_key: Option<String>,
}

/// Runs a request on the local registry, or on the pivot given by `--pivot`.
pub async fn send(data: &Target, req: Request) -> Result<Value> {
    if let Some(addr) = &data.pivot {
        let remote = Remote::new(addr, data.pivot_host_key.as_deref(), data.identity.as_deref())?;
        return remote.call(&req).await;
    }
    let dir = &data.data_dir;
    // Only `burrow server` creates a registry: a mistyped or missing
    // --data-dir must not quietly get an empty one the pivot never reads.
    if data.database_url.is_none() && !dir.join(burrow_server::registry::DB_FILE).exists() {
        bail!(
            "no registry in {}: on the pivot host give its --data-dir (or set BURROW_DATA_DIR); from elsewhere give --pivot HOST:PORT; or start `burrow server --data-dir {}` once to create one",
            dir.display(),
            dir.display()
        );
    }
    let registry = match &data.database_url {
        Some(url) => Registry::open_url(url).await.context("cannot open the PostgreSQL registry")?,
        None => Registry::open(dir).await.with_context(|| format!("cannot open the registry in {}", dir.display()))?,
    };
    let mut host_key =
        read_public_key(&dir.join("host_key.pub")).map(|k| burrow_core::keys::openssh_line(&k)).unwrap_or_default();
    // Off the pivot hosts, the pivots' shared key is in the registry.
    if host_key.is_empty() && data.database_url.is_some() {
        host_key =
            registry.pivots().await.ok().and_then(|p| p.into_iter().next()).map(|p| p.host_key).unwrap_or_default();
    }
    let origin = admin::Origin { actor: Caller::Local.actor(), ..Default::default() };
    let ctx = admin::Context { registry: &registry, host_key, origin };
    let resp = admin::execute(&ctx, &Caller::Local, req).await;
    registry.close().await;
    if resp.ok {
        Ok(resp.data)
    } else {
        bail!("{}", resp.error.unwrap_or_default())
    }
}

pub async fn device(cmd: DeviceCommand) -> Result<()> {
    match cmd {
        DeviceCommand::Add { id, key, host_keys, labels, ttl, address, data } => {
            let key = key.map(|k| read_public_key(&k).map(|k| burrow_core::keys::openssh_line(&k))).transpose()?;
            let host_keys = host_keys
                .iter()
                .map(|p| read_public_key(p).map(|k| burrow_core::keys::openssh_line(&k)))
                .collect::<Result<Vec<_>, _>>()?;
            let mut map = BTreeMap::new();
            for (k, v) in labels {
                if map.insert(k.clone(), v).is_some() {
                    bail!("label '{k}' is given twice");
                }
            }
            let labels = map;
            let with_key = key.is_some();
            let req =
                Request::DeviceAdd { id: id.clone(), key, labels, ttl_secs: Some(ttl.as_secs()), address, host_keys };
            let out: DeviceAdded = typed(send(&data, req).await?)?;
            if with_key {
                println!("added device '{id}' ({})", safe(out.fingerprint.as_deref().unwrap_or("")));
            } else {
                eprintln!(
                    "added device '{id}'; enroll it within {} (until {}) with:\n  burrow agent enroll --token TOKEN",
                    spoken_duration(ttl),
                    safe(out.expires_at.as_deref().unwrap_or(""))
                );
                println!("{}", safe(out.token.as_deref().unwrap_or("")));
            }
        }
        DeviceCommand::List { json, data } => {
            let devices: Vec<DeviceInfo> = typed(send(&data, Request::DeviceList).await?)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&devices)?);
            } else {
                print_device_table(&devices);
            }
        }
        DeviceCommand::Show { id, json, data } => {
            let d: DeviceInfo = typed(send(&data, Request::DeviceShow { id: id.clone() }).await?)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&d)?);
                return Ok(());
            }
            let yes = |b: bool| if b { "yes" } else { "no" };
            println!("id:          {}", safe(&d.id));
            println!("status:      {}", safe(&d.status));
            println!("presence:    {} (MQTT)", safe(d.presence.as_deref().unwrap_or("-")));
            let via = d.pivot.as_deref().map(|p| format!(" on pivot '{}'", safe(p))).unwrap_or_default();
            println!("tunnel:      {}{via}", if d.tunnel { "open" } else { "closed" });
            println!("last seen:   {}", safe(d.last_seen.as_deref().unwrap_or("never")));
            if let (Some(at), true) = (&d.health_at, d.tunnel) {
                let rtt = d.rtt_ms.map_or("no answer".to_string(), |ms| format!("{ms} ms"));
                println!("round trip:  {rtt} (probed {})", safe(at));
                for (port, state) in &d.targets {
                    println!("target {port:<5} {}", safe(state));
                }
            }
            println!("labels:      {}", labels_text(&d.labels));
            println!("ports:       {}", ports_text(&d.ports));
            println!("enrolled:    {}", if d.enrolled { "yes" } else { "no (token pending)" });
            println!("revoked:     {}", yes(d.revoked));
            println!("fingerprint: {}", safe(d.fingerprint.as_deref().unwrap_or("-")));
            match (d.access.as_str(), &d.trust_at) {
                ("certificates", Some(at)) => {
                    println!("access:      certificates (its sshd trusts the pivot's CA; trust fetched {})", safe(at))
                }
                _ => println!("access:      authorized_keys (operators' keys must be on the device)"),
            }
            for k in &d.host_keys {
                println!("host key:    {}", safe(k));
            }
            if let Some(changed) = &d.host_keys_changed {
                println!("host keys:   CHANGED: the device now shows other keys; operators' pins keep the old ones");
                for k in changed {
                    println!("  reported:  {}", safe(k));
                }
                println!("             if the change is expected: burrow device host-keys reset {id}");
            }
            println!("added:       {}", safe(&d.added));
        }
        DeviceCommand::Remove { id, data } => {
            send(&data, Request::DeviceRemove { id: id.clone() }).await?;
            println!("removed device '{id}'");
        }
        DeviceCommand::Revoke { id, data } => {
            send(&data, Request::DeviceRevoke { id: id.clone() }).await?;
            println!("revoked device '{id}'");
        }
        DeviceCommand::Listen { id, port, bind, data } => {
            let out = send(&data, Request::DeviceListen { id: id.clone(), port, bind }).await?;
            println!(
                "the pivot listens on {} for device '{id}' port {port} (within a second if it runs)",
                str_of(&out["bind"])
            );
        }
        DeviceCommand::Unlisten { id, port, data } => {
            send(&data, Request::DeviceUnlisten { id: id.clone(), port }).await?;
            println!("ended the lease of device '{id}' port {port}");
        }
        DeviceCommand::Listens { json, data } => {
            let leases: Vec<ListenInfo> = typed(send(&data, Request::DeviceListens).await?)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&leases)?);
            } else {
                println!("{:<24} {:<6} {:<40} ADDED", "ID", "PORT", "PIVOT LISTENS ON");
                for l in &leases {
                    println!("{:<24} {:<6} {:<40} {}", safe(&l.id), l.port, safe(&l.bind), safe(&l.added));
                }
            }
        }
        DeviceCommand::HostKeys(HostKeysCommand::Reset { id, forget, data }) => {
            let out = send(&data, Request::DeviceHostKeysReset { id: id.clone(), forget }).await?;
            let fps: Vec<String> = out["fingerprints"].as_array().into_iter().flatten().map(str_of).collect();
            if fps.is_empty() {
                println!(
                    "forgot the host keys of device '{id}'; its agent registers them when its tunnel next comes up"
                );
            } else {
                println!(
                    "device '{id}' now has the {} host keys its agent reported ({}); run `burrow login` again to pin them",
                    fps.len(),
                    fps.join(", ")
                );
            }
        }
    }
    Ok(())
}

pub async fn operator(cmd: OperatorCommand) -> Result<()> {
    match cmd {
        OperatorCommand::Add { name, key, admin, allow, device_users, cert_ttl, data } => {
            let key = burrow_core::keys::openssh_line(&read_public_key(&key)?);
            let allow = allow.iter().map(Selector::to_string).collect();
            let cert_ttl_secs = Some(cert_ttl.as_secs().max(1));
            let req = Request::OperatorAdd { name: name.clone(), key, admin, allow, device_users, cert_ttl_secs };
            let out = send(&data, req).await?;
            let role = if str_of(&out["role"]) == "admin" { " with admin rights" } else { "" };
            println!("added operator '{name}'{role} ({})", str_of(&out["fingerprint"]));
            let users: Vec<String> = out["device_users"].as_array().into_iter().flatten().map(str_of).collect();
            println!(
                "certificates from `burrow login` log in to devices as {} for {}",
                users.join(", "),
                spoken_duration(cert_ttl)
            );
        }
        OperatorCommand::List { json, data } => {
            let operators: Vec<OperatorInfo> = typed(send(&data, Request::OperatorList).await?)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&operators)?);
            } else {
                println!(
                    "{:<24} {:<9} {:<52} {:<16} {:<9} ALLOW",
                    "NAME", "ROLE", "FINGERPRINT", "DEVICE USERS", "CERT TTL"
                );
                for o in &operators {
                    let allow = if o.allow.is_empty() { "*".to_string() } else { safe(&o.allow.join(" | ")) };
                    let ttl = humantime::format_duration(Duration::from_secs(o.cert_ttl_secs)).to_string();
                    println!(
                        "{:<24} {:<9} {:<52} {:<16} {:<9} {allow}",
                        safe(&o.name),
                        safe(&o.role),
                        safe(&o.fingerprint),
                        safe(&o.device_users.join(",")),
                        ttl
                    );
                }
            }
        }
        OperatorCommand::Remove { name, data } => {
            send(&data, Request::OperatorRemove { name: name.clone() }).await?;
            println!("removed operator '{name}'");
        }
    }
    Ok(())
}

pub async fn ban(cmd: BanCommand) -> Result<()> {
    match cmd {
        BanCommand::List { json, data } => {
            let bans: Vec<BanInfo> = typed(send(&data, Request::BanList).await?)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&bans)?);
                return Ok(());
            }
            println!("{:<40} {:<21} {:<24} REASON", "NET", "UNTIL", "BY");
            for b in &bans {
                println!("{:<40} {:<21} {:<24} {}", safe(&b.net), safe(&b.until), safe(&b.by), safe(&b.reason));
            }
        }
        BanCommand::Add { net, duration, data } => {
            let out = send(&data, Request::BanAdd { net, secs: duration.as_secs().max(1) }).await?;
            println!("banned {} until {}", str_of(&out["net"]), str_of(&out["until"]));
        }
        BanCommand::Remove { net, data } => {
            let out = send(&data, Request::BanRemove { net }).await?;
            println!("unbanned {}", str_of(&out["net"]));
        }
    }
    Ok(())
}

pub async fn audit(a: AuditArgs) -> Result<()> {
    let req = Request::Audit {
        since: Some(a.since.unwrap_or_else(|| burrow_core::time::now_unix() - 24 * 3600)),
        until: a.until,
        device: a.device,
        operator: a.operator,
        source: a.source,
        event: a.event,
        limit: Some(a.limit),
    };
    let out = send(&a.data, req).await?;
    let records = out.as_array().map(Vec::as_slice).unwrap_or_default();
    if a.json {
        for r in records {
            println!("{}", serde_json::to_string(r)?);
        }
        return Ok(());
    }
    println!("{:<20} {:<18} {:<8} {:<22} {:<24} DETAIL", "TIME", "EVENT", "OUTCOME", "SOURCE", "WHO");
    for r in records {
        // Who acted: the admin for changes, else the peer's identity.
        let who = match (r["actor"].as_str(), r["operator"].as_str(), r["device"].as_str()) {
            (Some(actor), _, _) => actor.to_string(),
            (None, Some(op), _) => format!("operator:{op}"),
            (None, None, Some(dev)) => format!("device:{dev}"),
            _ => "-".into(),
        };
        // key=value pairs; a value with spaces is quoted, so the line splits cleanly.
        let mut detail = Vec::new();
        for key in [
            "device",
            "target",
            "reason",
            "ban",
            "user",
            "fingerprint",
            "cipher",
            "kex",
            "bytes_to_device",
            "bytes_to_operator",
            "count",
            "session",
        ] {
            let text = match &r[key] {
                Value::Null => continue,
                Value::String(s) => s.clone(),
                v => v.to_string(),
            };
            if key == "device" && who == format!("device:{text}") {
                continue;
            }
            let text = safe(&text);
            if text.contains(char::is_whitespace) || text.is_empty() {
                detail.push(format!("{key}={}", Value::String(text)));
            } else {
                detail.push(format!("{key}={text}"));
            }
        }
        if let Some(args) = r.get("args").filter(|v| !v.is_null()) {
            detail.push(format!("args={}", safe(&args.to_string())));
        }
        let time = r["at"].as_i64().map(burrow_core::time::format_unix).unwrap_or_default();
        println!(
            "{:<20} {:<18} {:<8} {:<22} {:<24} {}",
            time,
            str_of(&r["event"]),
            opt(&r["outcome"]),
            opt(&r["source"]),
            safe(&who),
            detail.join(" ")
        );
    }
    Ok(())
}

/// Text from the registry, escaped so that it cannot forge table rows or
/// reach the terminal as control sequences.
fn safe(s: &str) -> String {
    burrow_core::text::printable(s).into_owned()
}

fn str_of(v: &Value) -> String {
    safe(v.as_str().unwrap_or(""))
}

fn opt(v: &Value) -> String {
    safe(v.as_str().unwrap_or("-"))
}

/// An answer in its typed shape; a pivot that answers otherwise is an error.
fn typed<T: serde::de::DeserializeOwned>(v: Value) -> Result<T> {
    serde_json::from_value(v).context("the pivot's answer has an unexpected shape (a different burrow version?)")
}

/// One status column (connected, waiting, offline, not-enrolled, revoked;
/// `!` when its host keys changed); `device show` has the details.
fn print_device_table(devices: &[DeviceInfo]) {
    println!("{:<24} {:<13} {:<21} {:<9} LABELS", "ID", "STATUS", "LAST SEEN", "PORTS");
    for d in devices {
        let mut status = safe(&d.status);
        if d.host_keys_changed.is_some() {
            status.push('!');
        }
        println!(
            "{:<24} {:<13} {:<21} {:<9} {}",
            safe(&d.id),
            status,
            safe(d.last_seen.as_deref().unwrap_or("never")),
            ports_text(&d.ports),
            labels_text(&d.labels)
        );
    }
}

fn ports_text(ports: &[u32]) -> String {
    if ports.is_empty() {
        return "-".into();
    }
    ports.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

fn labels_text(labels: &BTreeMap<String, String>) -> String {
    if labels.is_empty() {
        return "-".into();
    }
    labels.iter().map(|(k, v)| format!("{}={}", safe(k), safe(v))).collect::<Vec<_>>().join(",")
}
