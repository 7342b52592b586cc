//! `burrow openssh`: for sites that keep stock sshd as the pivot. The
//! registry stays the inventory (`burrow device add --key`, `burrow
//! operator add`), and `render` turns it into sshd, authorized_keys,
//! fail2ban and ssh_config files, leasing each device a loopback port for
//! its `ssh -R` as seed 001 allocates them.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use burrow_core::keys::{openssh_line, parse_public_key};
use burrow_core::rpc::{allowed, Selector};
use burrow_server::Registry;
use clap::Subcommand;

use crate::DataDir;

#[derive(Subcommand)]
pub enum OpensshCommand {
    /// Create an empty registry in --data-dir for OpenSSH mode (no `burrow server` runs there).
    Init {
        #[command(flatten)]
        data: DataDir,
    },
    /// Write sshd, authorized_keys, fail2ban and ssh_config files for stock sshd as the pivot.
    Render(Box<RenderArgs>),
}

#[derive(clap::Args)]
pub struct RenderArgs {
    /// Where to write the files (created if needed; rendered files are replaced).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    #[command(flatten)]
    data: DataDir,
    /// The sshd that operators and devices dial, HOST:PORT (for ssh_config and the fail2ban jail).
    #[arg(long, value_name = "HOST:PORT")]
    pivot: String,
    /// Loopback ports leased to devices' `ssh -R`, FIRST-LAST.
    #[arg(long, default_value = "20000-29999", value_parser = parse_range)]
    port_range: std::ops::RangeInclusive<u16>,
    /// The system user every device logs in as on the pivot.
    #[arg(long, default_value = "burrow-dev")]
    device_user: String,
    /// The system user every operator jumps through on the pivot.
    #[arg(long, default_value = "burrow-op")]
    operator_user: String,
    /// The user operators log in as on devices, in the rendered ssh_config.
    #[arg(long, default_value = "root")]
    device_login: String,
    /// Where the files will be installed on the pivot, as the sshd config names them [default: --out].
    #[arg(long, value_name = "DIR")]
    install_dir: Option<PathBuf>,
    /// sshd's ClientAliveInterval for devices: a dead tunnel frees its port after three missed.
    #[arg(long, default_value = "30s", value_parser = crate::parse_duration)]
    keepalive: Duration,
    /// Where fail2ban reads sshd's failed logins: "systemd" (the journal, as on Debian 12) or a log file.
    #[arg(long, default_value = "systemd", value_name = "systemd|FILE")]
    sshd_log: String,
    /// Where operators keep the rendered ssh_config and known_hosts, as ssh_config names it.
    #[arg(long, default_value = "~/.ssh/burrow-openssh", value_name = "DIR")]
    operator_dir: String,
    /// The pivot sshd's public host key file, pinned in the operators' known_hosts.
    #[arg(long, value_name = "FILE")]
    pivot_host_key: Option<PathBuf>,
    #[command(flatten)]
    bans: crate::server::BanArgs,
}

fn parse_range(s: &str) -> Result<std::ops::RangeInclusive<u16>, String> {
    let (a, b) = s.split_once('-').ok_or("give FIRST-LAST, e.g. 20000-29999")?;
    let (a, b): (u16, u16) = (a.parse().map_err(|_| "FIRST is a port")?, b.parse().map_err(|_| "LAST is a port")?);
    if a < 1024 || a > b {
        return Err("the range must be unprivileged (from 1024) and FIRST <= LAST".into());
    }
    Ok(a..=b)
}

/// A system user name as sshd's Match takes it.
fn check_user(what: &str, u: &str) -> Result<()> {
    let ok = !u.is_empty()
        && u.len() <= 32
        && u.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if !ok {
        bail!("{what} '{u}' is not a plain user name");
    }
    Ok(())
}

pub async fn run(cmd: OpensshCommand) -> Result<()> {
    match cmd {
        OpensshCommand::Init { data } => {
            let dir = &data.data_dir;
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
            let reg =
                Registry::open(dir).await.with_context(|| format!("cannot create a registry in {}", dir.display()))?;
            reg.close().await;
            println!(
                "registry ready in {}; add devices with `burrow device add ID --key … --host-key …`",
                dir.display()
            );
            Ok(())
        }
        OpensshCommand::Render(args) => render(*args).await,
    }
}

async fn render(a: RenderArgs) -> Result<()> {
    check_user("--device-user", &a.device_user)?;
    check_user("--operator-user", &a.operator_user)?;
    check_user("--device-login", &a.device_login)?;
    let bans = a.bans.config()?;
    let (host, port) = a.pivot.rsplit_once(':').context("--pivot is HOST:PORT")?;
    let port: u16 = port.parse().context("--pivot HOST:PORT")?;
    if host.is_empty() || host.contains(char::is_whitespace) {
        bail!("--pivot HOST:PORT: bad host");
    }

    let dir = &a.data.data_dir;
    if !dir.join(burrow_server::registry::DB_FILE).exists() {
        bail!("no registry in {}: create one with `burrow openssh init --data-dir {}`", dir.display(), dir.display());
    }
    let reg = Registry::open(dir).await?;
    // Enrolled, unrevoked devices, by id.
    let devices: Vec<_> =
        reg.devices().await?.into_iter().filter(|d| d.revoked_at.is_none() && d.public_key.is_some()).collect();
    let ids: Vec<String> = devices.iter().map(|d| d.id.clone()).collect();
    let ports = reg.lease_openssh_ports(&ids, a.port_range.clone()).await?;
    let operators = reg.operators().await?;
    reg.close().await;

    let out = &a.out;
    std::fs::create_dir_all(out.join("fail2ban/jail.d"))?;
    std::fs::create_dir_all(out.join("fail2ban/filter.d"))?;
    let installed = a.install_dir.clone().unwrap_or_else(|| std::path::absolute(out).unwrap_or(out.clone()));
    let header = "# Rendered by `burrow openssh render` from the burrow registry; do not edit, render again.\n";

    // authorized_keys for devices: each may listen on its own port only.
    let mut dev_keys = String::from(header);
    for d in &devices {
        let key = parse_public_key(d.public_key.as_deref().unwrap_or_default(), "a device key")?;
        let p = ports[&d.id];
        writeln!(
            dev_keys,
            "restrict,port-forwarding,permitlisten=\"127.0.0.1:{p}\",command=\"/bin/false\" {} burrow-device:{}",
            openssh_line(&key),
            d.id
        )?;
    }
    // authorized_keys for operators: each may open the ports of the devices
    // their label selectors allow, and nothing else.
    let mut op_keys = String::from(header);
    for o in &operators {
        let selectors: Vec<Selector> = o.allow.iter().filter_map(|s| s.parse().ok()).collect();
        if selectors.len() != o.allow.len() {
            // An unreadable selector must not widen to "every device".
            writeln!(op_keys, "# {}: an --allow selector is unreadable; no device", o.name)?;
            continue;
        }
        let reach: Vec<u16> = devices.iter().filter(|d| allowed(&selectors, &d.labels)).map(|d| ports[&d.id]).collect();
        let key = parse_public_key(&o.public_key, "an operator key")?;
        if reach.is_empty() {
            // Without a permitopen, port-forwarding would allow any port.
            writeln!(op_keys, "# {}: no device to reach", o.name)?;
            continue;
        }
        let opens: Vec<String> = reach.iter().map(|p| format!("permitopen=\"127.0.0.1:{p}\"")).collect();
        writeln!(
            op_keys,
            "restrict,port-forwarding,{},command=\"/bin/false\" {} burrow-operator:{}",
            opens.join(","),
            openssh_line(&key),
            o.name
        )?;
    }
    let listens: Vec<String> = devices.iter().map(|d| format!("127.0.0.1:{}", ports[&d.id])).collect();
    let listens = if listens.is_empty() { "none".to_string() } else { listens.join(" ") };
    let opens = listens.clone();
    let alive = a.keepalive.as_secs().max(1);

    // The sshd Match blocks (seed 000's restrictions), for sshd_config.d.
    let mut sshd = String::from(header);
    // What both kinds of user get: keys only, nothing but the forwarding
    // each is allowed.
    let common = "    AuthenticationMethods publickey\n    PubkeyAuthentication yes\n    PasswordAuthentication no\n\
                  \x20   KbdInteractiveAuthentication no\n    PermitTTY no\n    X11Forwarding no\n\
                  \x20   AllowAgentForwarding no\n    AllowStreamLocalForwarding no\n    PermitTunnel no\n\
                  \x20   PermitUserRC no\n    MaxSessions 0\n    ForceCommand /bin/false\n";
    let dir = installed.display();
    write!(
        sshd,
        "# Include it from sshd_config (Include {dir}/sshd_burrow.conf), then `sshd -t` and reload.\n\n\
         Match User {dev}\n{common}\
         \x20   AuthorizedKeysFile {dir}/authorized_keys.devices\n\
         \x20   AllowTcpForwarding remote\n\
         \x20   GatewayPorts no\n\
         \x20   PermitOpen none\n\
         \x20   PermitListen {listens}\n\
         \x20   ClientAliveInterval {alive}\n\
         \x20   ClientAliveCountMax 3\n\n\
         Match User {op}\n{common}\
         \x20   AuthorizedKeysFile {dir}/authorized_keys.operators\n\
         \x20   AllowTcpForwarding local\n\
         \x20   PermitOpen {opens}\n\
         \x20   PermitListen none\n",
        dev = a.device_user,
        op = a.operator_user,
    )?;

    // fail2ban (seed 004's defaults and rules, checked above).
    let ignore: Vec<String> = bans.ignoreip.iter().map(ToString::to_string).collect();
    let source = if a.sshd_log == "systemd" {
        "backend = systemd\njournalmatch = _SYSTEMD_UNIT=ssh.service + _COMM=sshd\n".to_string()
    } else {
        if a.sshd_log.contains(char::is_whitespace) {
            bail!("--sshd-log: a path without spaces");
        }
        format!("backend = auto\nlogpath = {}\n", a.sshd_log)
    };
    let jail = format!(
        "{header}[burrow-sshd]\nenabled = true\nport = {port}\nfilter = burrow-sshd\n{source}\
         maxretry = {}\nfindtime = {}\nbantime = {}\nignoreip = {}\n",
        bans.maxretry,
        bans.findtime.as_secs(),
        bans.bantime.as_secs(),
        ignore.join(" ")
    );
    // Failed logins as sshd (LogLevel VERBOSE or INFO) writes them.
    let filter = format!(
        "{header}[INCLUDES]\nbefore = common.conf\n\n[Definition]\n_daemon = sshd\n\
         failregex = ^%(__prefix_line)s(?:error: )?Connection closed by (?:invalid |authenticating )?user \\S* <HOST> port \\d+ \\[preauth\\]\\s*$\n\
         \x20           ^%(__prefix_line)sInvalid user \\S* from <HOST> port \\d+\\s*$\n\
         \x20           ^%(__prefix_line)sFailed (?:publickey|password|none) for (?:invalid user )?\\S* from <HOST> port \\d+\n\
         \x20           ^%(__prefix_line)s(?:error: )?maximum authentication attempts exceeded for (?:invalid user )?\\S* from <HOST> port \\d+\n\
         ignoreregex =\n"
    );

    // ssh_config and known_hosts for operators.
    let mut ssh_config = String::from(header);
    write!(
        ssh_config,
        "# Copy this file and known_hosts to {dir} on an operator's machine, then: ssh -F {dir}/ssh_config cam-42\n\
         Host burrow-pivot\n    HostName {host}\n    Port {port}\n    User {op}\n\n",
        op = a.operator_user,
        dir = a.operator_dir
    )?;
    let mut known = String::from(header);
    if let Some(path) = &a.pivot_host_key {
        let key = burrow_core::keys::read_public_key(path)?;
        let name = if port == 22 { host.to_string() } else { format!("[{host}]:{port}") };
        writeln!(known, "{name} {}", openssh_line(&key))?;
    }
    for d in &devices {
        let p = ports[&d.id];
        write!(
            ssh_config,
            "Host {id}\n    HostName 127.0.0.1\n    Port {p}\n    User {login}\n    HostKeyAlias {id}\n    ProxyJump burrow-pivot\n\n",
            id = d.id,
            login = a.device_login
        )?;
        for k in &d.host_keys {
            if let Ok(k) = parse_public_key(k, "a host key") {
                writeln!(known, "{} {}", d.id, openssh_line(&k))?;
            }
        }
    }
    write!(
        ssh_config,
        "Host burrow-pivot {}\n    UserKnownHostsFile {}/known_hosts\n    StrictHostKeyChecking yes\n",
        ids.join(" "),
        installed.display()
    )?;

    let files: [(&str, &str); 7] = [
        ("sshd_burrow.conf", &sshd),
        ("authorized_keys.devices", &dev_keys),
        ("authorized_keys.operators", &op_keys),
        ("fail2ban/jail.d/burrow-sshd.conf", &jail),
        ("fail2ban/filter.d/burrow-sshd.conf", &filter),
        ("ssh_config", &ssh_config),
        ("known_hosts", &known),
    ];
    for (name, text) in files {
        write_file(&out.join(name), text)?;
    }
    println!("rendered {} devices and {} operators into {}", devices.len(), operators.len(), out.display());
    for d in &devices {
        println!(
            "  {}: ssh -N -o ExitOnForwardFailure=yes -o ServerAliveInterval=30 -R 127.0.0.1:{}:127.0.0.1:22 {}@{host} -p {port}",
            d.id, ports[&d.id], a.device_user
        );
    }
    Ok(())
}

/// Replaces `path` atomically (a fresh file renamed over it), 0644.
fn write_file(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("burrow-tmp");
    std::fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}
