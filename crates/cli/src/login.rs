//! `burrow login`: OpenSSH config and known_hosts for `ssh root@cam-42.burrow`
//! with strict host-key checking, for the pivot and for every device.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use burrow_agent::pivot_client::{self, ClientError};
use burrow_core::rpc::{CertificateIssued, DeviceInfo, Request, WhoamiInfo};
use burrow_core::HostKeyPin;

use crate::remote::{credentials, home, LoginState, Remote, DEFAULT_LOGIN};

#[derive(clap::Args)]
pub struct LoginArgs {
    /// The pivot, HOST:PORT.
    #[arg(value_name = "HOST:PORT")]
    address: String,
    /// The pivot's host key as its admin published it: SHA256:... or a .pub file [default: the one saved by an earlier login].
    #[arg(long)]
    pivot_host_key: Option<String>,
    /// Trust the host key the pivot shows now (prints it), when no fingerprint is at hand.
    #[arg(long, conflicts_with = "pivot_host_key")]
    accept_new: bool,
    /// Name for this pivot; its devices are reached as ID.NAME. Log in to several pivots under different names.
    #[arg(long, alias = "suffix", default_value = DEFAULT_LOGIN, value_parser = parse_name)]
    name: String,
    /// Operator private key [default: ssh-agent, then ~/.ssh/id_ed25519].
    #[arg(long, value_name = "FILE")]
    identity: Option<PathBuf>,
    /// OpenSSH directory to write into [default: ~/.ssh].
    #[arg(long)]
    ssh_dir: Option<PathBuf>,
}

/// A login name is one DNS label: it ends device host names.
fn parse_name(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok {
        Ok(s.to_string())
    } else {
        Err("a name is lowercase letters, digits and inner '-' (at most 63), as in a host name".into())
    }
}

pub async fn run(args: LoginArgs) -> Result<()> {
    // Run again (to pick up new devices), a login keeps its pin and key.
    let saved = LoginState::all().into_iter().find(|s| s.name == args.name && s.pivot == args.address);
    let identity = args.identity.clone().or_else(|| saved.as_ref().and_then(|s| s.identity.clone()));
    let (host, port) = args.address.rsplit_once(':').context("the pivot is HOST:PORT")?;
    let creds = credentials(identity.as_deref())?;
    let user = std::env::var("USER").unwrap_or_else(|_| "operator".into());
    let pin = match (&args.pivot_host_key, args.accept_new) {
        (Some(p), _) => HostKeyPin::parse(p).context("--pivot-host-key")?,
        (None, false) if saved.is_some() => HostKeyPin::parse(&saved.as_ref().expect("checked").fingerprint)?,
        (None, true) => {
            // Learn the key by asking with a pin nothing matches.
            let probe = HostKeyPin::Fingerprint("SHA256:unknown".into());
            match pivot_client::connect(&args.address, probe, &user, &creds).await {
                Err(ClientError::HostKeyMismatch { got, .. }) => {
                    eprintln!("trusting the pivot's host key {got} (first use)");
                    HostKeyPin::Fingerprint(got)
                }
                Err(e) => return Err(e.into()),
                Ok(_) => bail!("the pivot accepted an impossible pin"),
            }
        }
        (None, false) => {
            bail!("pass --pivot-host-key SHA256:... (ask your admin), or --accept-new to trust on first use")
        }
    };
    let remote = Remote { addr: args.address.clone(), pin: pin.clone(), creds, user };
    let shape = "the pivot's answer has an unexpected shape (a different burrow version?)";
    let me: WhoamiInfo = serde_json::from_value(remote.call(&Request::Whoami).await?).context(shape)?;
    let devices: Vec<DeviceInfo> = serde_json::from_value(remote.call(&Request::DeviceList).await?).context(shape)?;
    // Keys are parsed and written back, never copied as sent: a pivot's
    // text cannot add lines (`@cert-authority`, say) to known_hosts.
    let pivot_key = burrow_core::keys::parse_public_key(&me.pivot_host_key, "the pivot's host key")
        .map(|k| burrow_core::keys::openssh_line(&k))?;

    let ssh_dir = args.ssh_dir.clone().unwrap_or_else(|| home().join(".ssh"));
    let dir = ssh_dir.join("burrow").join(&args.name);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let known_hosts = dir.join("known_hosts");
    let config = dir.join("config");
    let pivot_name = if port == "22" { host.to_string() } else { format!("[{host}]:{port}") };
    let mut kh = format!("# Written by `burrow login {}`; run it again to refresh.\n", args.address);
    writeln!(kh, "{pivot_name} {pivot_key}")?;
    let mut count = 0;
    let mut unpinned = Vec::new();
    let mut ids = Vec::new();
    for d in &devices {
        let id = d.id.as_str();
        if burrow_core::Id::parse(id).is_err() {
            continue; // never write what the pivot sent unchecked into ssh_config
        }
        ids.push(id.to_string());
        let keys: Vec<String> = d
            .host_keys
            .iter()
            .filter_map(|l| burrow_core::keys::parse_public_key(l, "a host key").ok())
            .map(|k| burrow_core::keys::openssh_line(&k))
            .collect();
        if keys.is_empty() {
            unpinned.push(burrow_core::text::printable(id));
        }
        for key in keys {
            writeln!(kh, "{id}.{},{id} {key}", args.name)?;
            count += 1;
        }
    }
    std::fs::write(&known_hosts, kh)?;
    // Operators get a certificate that devices trusting the pivot's CA
    // accept, with no key of theirs on the device.
    let cert_path = certificate_path(&ssh_dir, &args.name);
    let cert = if me.kind == "operator" {
        match fetch_certificate(&remote, &cert_path).await {
            Ok(c) => Some(Ok(c)),
            // The one from an earlier login still works: keep using it.
            Err(e) if certificate_fresh(&cert_path, std::time::Duration::from_secs(60)) => {
                eprintln!("burrow: no new certificate ({e:#}); keeping {}", cert_path.display());
                Some(Err(()))
            }
            Err(e) => {
                eprintln!("burrow: no certificate ({e:#}); devices that trust the pivot's CA will refuse this login");
                None
            }
        }
    } else {
        None
    };
    let cert_file = cert.as_ref().map(|_| cert_path.as_path());
    std::fs::write(&config, ssh_config(host, port, &args.name, &ids, &known_hosts, identity.as_deref(), cert_file))?;
    include_in_user_config(&ssh_dir, &config)?;
    LoginState {
        name: args.name.clone(),
        pivot: args.address.clone(),
        fingerprint: pin.fingerprint(),
        identity: identity.clone(),
        ssh_config: config.clone(),
        certificate: cert.as_ref().map(|_| cert_path.clone()),
    }
    .save()?;
    println!(
        "logged in to {} as {} '{}' ({} device host keys pinned)",
        args.address,
        burrow_core::text::printable(me.role.as_deref().unwrap_or("operator")),
        burrow_core::text::printable(me.name.as_deref().unwrap_or("")),
        count
    );
    if !unpinned.is_empty() {
        // Strict host-key checking will refuse these until their keys are known.
        println!(
            "no host keys registered for: {} (their agents register them when their tunnels come up; run `burrow login` again then)",
            unpinned.join(", ")
        );
    }
    if let Some(Ok(c)) = &cert {
        println!(
            "certificate {}, valid until {}, in {}",
            burrow_core::text::printable(&c.key_id),
            burrow_core::text::printable(&c.valid_before),
            cert_path.display()
        );
    }
    let users = cert.as_ref().and_then(|_| certificate_users(&cert_path)).unwrap_or_default();
    let user = users.iter().find(|u| *u != burrow_core::cert::ANY).map_or("root", String::as_str);
    println!("try: ssh {user}@DEVICE.{}", args.name);
    Ok(())
}

/// Where a login keeps its certificate: `~/.ssh/burrow/id-cert.pub` for the
/// default login, in the login's own directory for others.
pub fn certificate_path(ssh_dir: &Path, name: &str) -> PathBuf {
    if name == DEFAULT_LOGIN {
        ssh_dir.join("burrow").join("id-cert.pub")
    } else {
        ssh_dir.join("burrow").join(name).join("id-cert.pub")
    }
}

/// The device user of a principal `burrow:USER:SCOPE`.
fn principal_user(p: &str) -> Option<&str> {
    p.strip_prefix(burrow_core::cert::PRINCIPAL_PREFIX)?.split_once(':').map(|(u, _)| u)
}

/// Asks the pivot for a certificate of the operator's key and writes it to
/// `path`, after checking that it is one: a user certificate for that key.
pub async fn fetch_certificate(remote: &Remote, path: &Path) -> Result<CertificateIssued> {
    write_certificate(path, remote.call(&Request::Certificate).await?)
}

/// Checks the pivot's answer to `Certificate` and writes the certificate to `path`.
pub fn write_certificate(path: &Path, answer: serde_json::Value) -> Result<CertificateIssued> {
    let issued: CertificateIssued = serde_json::from_value(answer)
        .context("the pivot's answer has an unexpected shape (a burrow version without certificates?)")?;
    let cert = russh::keys::ssh_key::Certificate::from_openssh(&issued.certificate)
        .context("the pivot sent something that is not an OpenSSH certificate")?;
    if cert.cert_type() != russh::keys::ssh_key::certificate::CertType::User {
        bail!("the pivot sent a host certificate, not a user certificate");
    }
    // Written back from its parts, never as sent.
    let text = cert.to_openssh().context("cannot encode the certificate")?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{text}\n")).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(issued)
}

fn read_certificate(path: &Path) -> Option<russh::keys::ssh_key::Certificate> {
    let text = std::fs::read_to_string(path).ok()?;
    russh::keys::ssh_key::Certificate::from_openssh(text.trim()).ok()
}

/// The fingerprint of the CA key that signed the certificate at `path`.
pub fn certificate_signer(path: &Path) -> Option<String> {
    let cert = read_certificate(path)?;
    Some(burrow_core::fingerprint(&russh::keys::ssh_key::PublicKey::from(cert.signature_key().clone())))
}

/// The device users the certificate at `path` logs in as.
pub fn certificate_users(path: &Path) -> Option<Vec<String>> {
    let cert = read_certificate(path)?;
    let mut users: Vec<String> = Vec::new();
    for u in cert.valid_principals().iter().filter_map(|p| principal_user(p)) {
        if !users.iter().any(|x| x == u) {
            users.push(u.to_string());
        }
    }
    Some(users)
}

/// Whether the certificate at `path` is valid for at least `margin` more.
pub fn certificate_fresh(path: &Path, margin: std::time::Duration) -> bool {
    let Some(cert) = read_certificate(path) else { return false };
    let now = burrow_core::time::now_unix().max(0) as u64;
    cert.valid_before() > now.saturating_add(margin.as_secs()) && cert.valid_after() <= now
}

fn ssh_config(
    host: &str,
    port: &str,
    name: &str,
    ids: &[String],
    known_hosts: &Path,
    identity: Option<&Path>,
    certificate: Option<&Path>,
) -> String {
    let mut c = String::from("# Written by `burrow login`; run it again to refresh.\n");
    // The pivot knows each device by its bare id whatever this login is
    // called; a device added since needs the login run again (for its host
    // key too).
    for id in ids {
        let _ = write!(c, "Host {id}.{name}\n    HostName {id}\n");
    }
    let _ = write!(c, "Host {name}-pivot\n    HostName {host}\n    Port {port}\n\n");
    let _ = write!(c, "Host *.{name}\n    ProxyJump {name}-pivot\n");
    // For devices only: the pivot knows the plain key.
    if let Some(cert) = certificate {
        let abs = std::path::absolute(cert).unwrap_or_else(|_| cert.to_path_buf());
        let _ = writeln!(c, "    CertificateFile {}", abs.display());
    }
    c.push('\n');
    let _ = write!(
        c,
        "Host {name}-pivot *.{name}\n    UserKnownHostsFile {}\n    StrictHostKeyChecking yes\n",
        known_hosts.display()
    );
    if let Some(id) = identity {
        let abs = std::fs::canonicalize(id).unwrap_or_else(|_| id.to_path_buf());
        let _ = write!(c, "    IdentityFile {}\n    IdentitiesOnly yes\n", abs.display());
    }
    c
}

/// Puts `Include CONFIG` at the top of `~/.ssh/config`, once.
fn include_in_user_config(ssh_dir: &Path, config: &Path) -> Result<()> {
    let user_config = ssh_dir.join("config");
    let line = format!("Include {}", config.display());
    let existing = std::fs::read_to_string(&user_config).unwrap_or_default();
    if existing.lines().any(|l| l.trim() == line) {
        return Ok(());
    }
    std::fs::write(&user_config, format!("{line}\n{existing}"))
        .with_context(|| format!("cannot update {}", user_config.display()))
}
