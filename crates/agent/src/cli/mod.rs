//! The agent's command line: `burrow agent …` in the full binary, and the
//! whole of the device-only `burrow-agent`.
//!
//! `run` (the default), `enroll`, `rotate-key`, `status`, and for operators'
//! certificates `trust-operators` and `principals` (in `operators`).

pub mod mqtt_args;
mod operators;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use burrow_core::agent_file::{AgentFile, DEFAULT_PATH};
use burrow_core::mqtt_url::{CertPin, MqttUrl};
use burrow_core::{Expose, HostKeyPin, Id};

use crate::status::{default_status_path, State, Status};
use crate::trust::{PivotFile, DEFAULT_TRUST_DIR};
use clap::Subcommand;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use mqtt_args::MqttClientArgs;

/// `30s`, `10m`, `24h`: positive and at most 100 years.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    burrow_core::time::parse_duration(s).map_err(|e| e.to_string())
}

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct AgentCmd {
    #[command(subcommand)]
    sub: Option<AgentSub>,
    #[command(flatten)]
    args: AgentArgs,
}

#[derive(Subcommand)]
enum AgentSub {
    /// Join a pivot with a one-time token from `burrow device add ID`.
    Enroll(EnrollArgs),
    /// Show what the running agent is doing, and why if it is not connected.
    Status {
        /// The status file the agent writes [default: /run/burrow-agent/status.json as root].
        #[arg(long, env = "BURROW_STATUS_FILE")]
        status_file: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Replace this device's key, atomically on the pivot and on disk.
    RotateKey {
        /// The agent config, as written by `burrow agent enroll`.
        #[arg(long, default_value = DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Let operators in with certificates from the pivot's CA on this enrolled device (or retry doing so).
    TrustOperators(operators::TrustOperatorsArgs),
    /// For sshd's AuthorizedPrincipalsCommand: print the principals that let a certificate log in as USER here.
    Principals(operators::PrincipalsArgs),
}

#[derive(clap::Args)]
struct EnrollArgs {
    /// The token `burrow device add ID` printed.
    #[arg(long)]
    token: String,
    /// Where to write the agent config.
    #[arg(long, default_value = DEFAULT_PATH)]
    config: PathBuf,
    /// Where to write the device key [default: device_key next to the config].
    #[arg(long)]
    key: Option<PathBuf>,
    /// An sshd public host key file to register; repeatable [default: /etc/ssh/ssh_host_*_key.pub].
    #[arg(long = "host-key", alias = "host-keys", num_args = 1.., value_name = "FILE")]
    host_keys: Vec<PathBuf>,
    /// PORT=HOST:PORT, recorded in the config. Repeatable.
    #[arg(long, default_value = "22=127.0.0.1:22")]
    expose: Vec<Expose>,
    /// Broker to wait on (recorded in the config).
    #[arg(long)]
    mqtt_url: Option<MqttUrl>,
    /// Record always-on mode in the config.
    #[arg(long)]
    always_on: bool,
    /// Let operators in with certificates from the pivot's CA (as root): write an sshd drop-in, with no authorized_keys to manage.
    #[arg(long)]
    trust_operators: bool,
    #[command(flatten)]
    sshd: operators::SshdArgs,
}

#[derive(clap::Args)]
pub struct AgentArgs {
    /// Agent config file, as written by `burrow agent enroll`; flags override it.
    #[arg(long, env = "BURROW_AGENT_CONFIG")]
    config: Option<PathBuf>,
    /// The pivot to hold a tunnel to, HOST:PORT (always on); repeat for others to fail over to, in order.
    #[arg(long = "pivot", alias = "server", env = "BURROW_SERVER", value_name = "HOST:PORT", value_delimiter = ',')]
    server: Vec<String>,
    /// This device's id.
    #[arg(long, env = "BURROW_ID")]
    id: Option<Id>,
    /// The device's private key (OpenSSH format).
    #[arg(long, env = "BURROW_KEY")]
    key: Option<PathBuf>,
    /// The pivot's host key: a .pub file or a fingerprint (SHA256:...).
    #[arg(long, env = "BURROW_PIVOT_HOST_KEY")]
    pivot_host_key: Option<String>,
    /// PORT=HOST:PORT: operators asking for PORT reach HOST:PORT on the device. Repeatable.
    #[arg(long)]
    expose: Vec<Expose>,
    /// Wait on this MQTT broker (mqtt[s]://HOST:PORT) and dial only when asked.
    #[arg(long, env = "BURROW_MQTT_URL")]
    mqtt_url: Option<MqttUrl>,
    /// Keep a permanent tunnel even when a broker is given.
    #[arg(long)]
    always_on: bool,
    /// Trust only this certificate (SHA256:..., as `burrow server` prints) for an mqtts:// pivot.
    #[arg(long, env = "BURROW_MQTT_FINGERPRINT")]
    mqtt_fingerprint: Option<CertPin>,
    #[command(flatten)]
    mqtt: MqttClientArgs,
    /// Keepalive period to the pivot and the broker; three missed mean reconnect.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    keepalive: std::time::Duration,
    /// Longest wait between reconnect attempts (jittered, doubling from 1s).
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    reconnect_max: std::time::Duration,
    /// Wait after a refusal that needs a person (revoked, unknown key, wrong pin).
    #[arg(long, default_value = "3m", value_parser = parse_duration)]
    refused_retry: std::time::Duration,
    /// Serve GET /healthz over HTTP on this address (200 when connected or waiting, 503 otherwise).
    #[arg(long, value_name = "ADDRESS:PORT")]
    health_listen: Option<std::net::SocketAddr>,
    /// Where to keep the agent's state for `agent status` [default: /run/burrow-agent/status.json as root].
    #[arg(long, env = "BURROW_STATUS_FILE")]
    status_file: Option<PathBuf>,
    /// The CA keys, revoked keys and labels sshd reads are here: refreshed by this agent as root, else by root's burrow-trust units when it asks [default: trust_dir in the config file; as root, /etc/ssh/burrow if the config names any].
    #[arg(long, env = "BURROW_TRUST_DIR", value_name = "DIR")]
    trust_dir: Option<PathBuf>,
    /// How often a connected agent refetches the CA keys and labels, or asks root to (also on connecting, unless root refreshed them within half of this).
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    trust_refresh: std::time::Duration,
}

/// `agent status`: exits 0 when the agent runs and is connected (or waits
/// for wake-ups), 1 otherwise.
fn status(path: &std::path::Path, json: bool) -> Result<()> {
    let s = Status::read(path).with_context(|| {
        format!("no agent status at {}: is the agent running (with this --status-file)?", path.display())
    })?;
    // SAFETY: kill with signal 0 only checks that the process exists.
    let alive = s.state != State::Stopped && unsafe { libc::kill(s.pid as libc::pid_t, 0) } == 0;
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        // The agent (its user, when run as burrow-agent) wrote these strings.
        use burrow_core::text::printable;
        let since = burrow_core::time::format_unix(s.since);
        let state = if alive { s.state.to_string() } else { format!("not running (last: {})", s.state) };
        println!("device:  {}", printable(&s.id));
        println!("mode:    {}", printable(&s.mode));
        println!("state:   {state} since {since}");
        if let Some(p) = &s.pivot {
            println!("pivot:   {}", printable(p));
        }
        if let Some(r) = &s.reason {
            println!("reason:  {}", printable(r));
        }
    }
    if alive && s.state.healthy() {
        Ok(())
    } else {
        std::process::exit(1)
    }
}

/// How this agent is started: `burrow-agent`, or `burrow agent` in the full binary.
fn program() -> &'static str {
    let exe = std::env::args_os().next().map(std::path::PathBuf::from);
    let name = exe.as_deref().and_then(std::path::Path::file_name).and_then(|n| n.to_str()).unwrap_or("");
    if name.starts_with("burrow-agent") {
        "burrow-agent"
    } else {
        "burrow agent"
    }
}

/// Cancels `token` on Ctrl-C or SIGTERM.
pub fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler can be installed");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        token.cancel();
    });
}

pub async fn run(cmd: AgentCmd, shutdown: CancellationToken) -> Result<()> {
    match cmd.sub {
        Some(AgentSub::Enroll(e)) => enroll(e).await,
        Some(AgentSub::Status { status_file, json }) => status(&status_file.unwrap_or_else(default_status_path), json),
        Some(AgentSub::RotateKey { config }) => {
            let fp = crate::enroll::rotate_key(&config).await?;
            println!("device key replaced; new fingerprint {fp}");
            Ok(())
        }
        Some(AgentSub::TrustOperators(a)) => operators::trust_operators(a).await,
        Some(AgentSub::Principals(a)) => operators::principals(a),
        None => agent(cmd.args, shutdown).await,
    }
}

async fn enroll(e: EnrollArgs) -> Result<()> {
    // Absolute paths in agent.toml: the agent may start from any directory.
    let config = std::path::absolute(&e.config).with_context(|| format!("bad path {}", e.config.display()))?;
    let key_path = e.key.clone().unwrap_or_else(|| config.with_file_name("device_key"));
    let key_path = std::path::absolute(&key_path).with_context(|| format!("bad path {}", key_path.display()))?;
    let e = EnrollArgs { config, ..e };
    let trust_dir = e.sshd.trust_dir()?;
    let trust_dir_given = e.sshd.trust_dir_given();
    let (plan, created) = if e.trust_operators {
        // The device id is in the token; sshd must take the drop-in before
        // the token is spent.
        let id = burrow_core::enroll::EnrollToken::decode(&e.token)?.device;
        let not_enrolled = "not enrolled, and the token is still good";
        let plan = e.sshd.plan().context(not_enrolled)?;
        let created = plan.dry_run(&id).context(not_enrolled)?;
        (Some(plan), Some(created))
    } else if e.sshd.sshd_given() {
        bail!("--sshd-config, --sshd-config-dir, --sshd-check and --sshd-reload go with --trust-operators");
    } else {
        (None, None)
    };
    let host_keys = if e.host_keys.is_empty() { crate::enroll::default_host_keys() } else { e.host_keys };
    let enrolled = crate::enroll::enroll(crate::enroll::Enrollment {
        token: e.token,
        config_path: e.config.clone(),
        key_path,
        host_keys,
        expose: e.expose,
        mqtt_url: e.mqtt_url.map(|u| u.to_string()),
        always_on: e.always_on,
    })
    .await;
    let mut file = match enrolled {
        Ok(file) => file,
        Err(err) => {
            // Leave no trust dir behind for a device that is not enrolled.
            if let Some(created) = created {
                created.undo();
            }
            return Err(err.into());
        }
    };
    println!("enrolled device '{}' with pivot {}", file.id, file.server);
    println!("config written to {}; start the agent with:", e.config.display());
    println!("  {} --config {}", program(), e.config.display());
    let fix_later = |file: &AgentFile| {
        format!(
            "device '{}' is enrolled, but sshd does not trust the pivot's CA yet; once fixed, run `{} trust-operators --config {}{}`",
            file.id,
            program(),
            e.config.display(),
            if trust_dir_given { format!(" --trust-dir {}", trust_dir.display()) } else { String::new() }
        )
    };
    // Root's own record of the pivot, from the token: what `trust-operators`
    // connects with later, whoever may write the agent config by then.
    let pivot = PivotFile::from_agent_file(&file, &e.config)?;
    if is_root() {
        match operators::record_pivot(&trust_dir, &pivot) {
            Ok(path) => println!("root's record of the pivot written to {}", path.display()),
            Err(err) if plan.is_some() => return Err(err).with_context(|| fix_later(&file)),
            Err(err) => println!(
                "note: no pivot record for root in {} ({err:#}); `trust-operators` will need {} to be root's alone",
                trust_dir.display(),
                e.config.display()
            ),
        }
    } else if trust_dir_given {
        println!("note: not root, so no pivot record for root in {}", trust_dir.display());
    }
    if let Some(plan) = plan {
        plan.apply(&pivot).await.with_context(|| fix_later(&file))?;
        operators::record_trust_dir(&mut file, &e.config, plan.trust_dir())?;
    }
    Ok(())
}

/// The trust dir a running agent keeps fresh: --trust-dir, else the one
/// its config records. The config may be its user's to write, so an agent
/// that is root (and writes the trust files itself) takes only the default
/// from it, as `trust-operators` does.
fn running_trust_dir(flag: Option<PathBuf>, recorded: Option<PathBuf>, root: bool) -> Option<PathBuf> {
    if flag.is_some() {
        return flag;
    }
    let recorded = recorded?;
    if root && recorded != std::path::Path::new(DEFAULT_TRUST_DIR) {
        warn!(
            recorded = %burrow_core::text::printable(&recorded.to_string_lossy()),
            "as root, this agent keeps {DEFAULT_TRUST_DIR} fresh, not the trust_dir its config names; give --trust-dir to choose another"
        );
        return Some(DEFAULT_TRUST_DIR.into());
    }
    Some(recorded)
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

async fn agent(args: AgentArgs, shutdown: CancellationToken) -> Result<()> {
    let file = args.config.as_ref().map(|p| AgentFile::load(p)).transpose()?;
    let id = match (args.id, &file) {
        (Some(id), _) => id,
        (None, Some(f)) => Id::parse(&f.id).context("id in the config file")?,
        (None, None) => bail!("give --id ID (or --config FILE)"),
    };
    let key_path =
        args.key.or_else(|| file.as_ref().map(|f| f.key.clone())).context("give --key FILE (or --config FILE)")?;
    let pin = args
        .pivot_host_key
        .or_else(|| file.as_ref().map(|f| f.pivot_host_key.clone()))
        .context("give --pivot-host-key (or --config FILE)")?;
    let pin = HostKeyPin::parse(&pin).context("--pivot-host-key")?;
    let mut pivots = args.server;
    if pivots.is_empty() {
        pivots.extend(file.as_ref().map(|f| f.server.clone()));
    }
    let server = pivots.first().cloned();
    let expose = if !args.expose.is_empty() {
        args.expose
    } else {
        let listed = file.as_ref().map(|f| f.expose.clone()).unwrap_or_default();
        listed.iter().map(|e| e.parse()).collect::<Result<Vec<Expose>, _>>().context("expose in the config file")?
    };
    if expose.is_empty() {
        bail!("nothing to expose: give --expose PORT=HOST:PORT");
    }
    let mqtt_url = match args.mqtt_url {
        Some(u) => Some(u),
        None => file.as_ref().and_then(|f| f.mqtt_url.as_deref()).map(str::parse).transpose()?,
    };
    let always_on = args.always_on || file.as_ref().is_some_and(|f| f.always_on);
    let mqtt_pin = match args.mqtt_fingerprint {
        Some(p) => Some(p),
        None => file
            .as_ref()
            .and_then(|f| f.mqtt_fingerprint.as_deref())
            .map(str::parse::<CertPin>)
            .transpose()
            .context("mqtt_fingerprint in the config file")?,
    };
    if let (Some(url), Some(_)) = (&mqtt_url, mqtt_pin) {
        if !url.tls {
            bail!("--mqtt-fingerprint pins a TLS certificate, but {url} is plain MQTT; use mqtts://");
        }
    }

    let meta = std::fs::metadata(&key_path).with_context(|| format!("cannot read {}", key_path.display()))?;
    let key = match russh::keys::load_secret_key(&key_path, None) {
        Ok(key) => key,
        Err(_) if burrow_core::keys::read_public_key(&key_path).is_ok() => bail!(
            "{} is a public key; --key takes the device's private key (the same path without .pub)",
            key_path.display()
        ),
        Err(e) => return Err(e).with_context(|| format!("cannot load the device key {}", key_path.display())),
    };
    if meta.permissions().mode() & 0o077 != 0 {
        warn!(key = %key_path.display(), "device key is readable by other users; chmod 600 it");
    }
    if mqtt_url.is_none() && server.is_none() {
        bail!("give --pivot HOST:PORT (always on) or --mqtt-url URL (on demand)");
    }
    let mut config = crate::Config::new(server, id, key, pin, expose);
    config.fallbacks = pivots.into_iter().skip(1).collect();
    config.key_path = Some(key_path);
    config.keepalive_interval = args.keepalive;
    if args.reconnect_max < config.backoff_initial {
        bail!("--reconnect-max must be at least {:?}", config.backoff_initial);
    }
    config.backoff_max = args.reconnect_max;
    config.refused_retry = args.refused_retry;
    config.status_path = Some(args.status_file.unwrap_or_else(default_status_path));
    config.health_listen = args.health_listen;
    let recorded = file.as_ref().and_then(|f| f.trust_dir.clone());
    config.trust_dir = running_trust_dir(args.trust_dir, recorded, is_root());
    config.trust_refresh = args.trust_refresh;
    if let (Some(url), false) = (mqtt_url, always_on) {
        config.signal = Some(crate::SignalConfig {
            url,
            tls: args.mqtt.tls(),
            topics: args.mqtt.topics(),
            username: args.mqtt.mqtt_username,
            password: args.mqtt.mqtt_password,
            pin: mqtt_pin,
        });
    }
    crate::run(config, shutdown).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Root took the trust dir from an agent config the agent's user can write.
    #[test]
    fn a_root_agent_takes_no_trust_dir_from_its_config() {
        let flag = Some(PathBuf::from("/srv/trust"));
        let evil = Some(PathBuf::from("/etc/ld.so.conf.d"));
        let default = Some(PathBuf::from(DEFAULT_TRUST_DIR));
        for root in [false, true] {
            assert_eq!(running_trust_dir(flag.clone(), evil.clone(), root), flag, "the flag wins");
            assert_eq!(running_trust_dir(None, None, root), None, "no trust dir: no operator trust");
            assert_eq!(running_trust_dir(None, default.clone(), root), default);
        }
        assert_eq!(running_trust_dir(None, evil.clone(), false), evil, "an unprivileged agent only reads there");
        assert_eq!(running_trust_dir(None, evil, true), default);
    }
}
