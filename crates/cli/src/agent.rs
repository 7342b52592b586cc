//! `burrow agent`.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use burrow_core::mqtt_url::{MqttUrl, TlsFiles};
use burrow_core::signal::Topics;
use burrow_core::{Expose, HostKeyPin, Id};
use tokio_util::sync::CancellationToken;
use tracing::warn;

#[derive(clap::Args)]
pub struct AgentArgs {
    /// The pivot, HOST:PORT. Needed for --always-on; on demand, each wake
    /// request names the pivot to dial.
    #[arg(long, env = "BURROW_SERVER")]
    server: Option<String>,
    /// This device's id.
    #[arg(long, env = "BURROW_ID")]
    id: Id,
    /// The device's private key (OpenSSH format).
    #[arg(long, env = "BURROW_KEY")]
    key: PathBuf,
    /// The pivot's host key: a .pub file or a fingerprint (SHA256:...).
    #[arg(long, env = "BURROW_PIVOT_HOST_KEY")]
    pivot_host_key: String,
    /// PORT=HOST:PORT: operators asking for PORT reach HOST:PORT on the device. Repeatable.
    #[arg(long, required = true)]
    expose: Vec<Expose>,
    /// Wait on this MQTT broker (mqtt[s]://HOST:PORT) and dial only when asked.
    #[arg(long, env = "BURROW_MQTT_URL")]
    mqtt_url: Option<MqttUrl>,
    /// Keep a permanent tunnel even when a broker is given.
    #[arg(long)]
    always_on: bool,
    /// CA certificate (PEM) for mqtts://.
    #[arg(long)]
    mqtt_ca: Option<PathBuf>,
    /// Client certificate (PEM), e.g. for AWS IoT Core.
    #[arg(long)]
    mqtt_cert: Option<PathBuf>,
    /// Client private key (PEM) for --mqtt-cert.
    #[arg(long)]
    mqtt_key: Option<PathBuf>,
    /// MQTT username [default: the device id].
    #[arg(long, env = "BURROW_MQTT_USERNAME")]
    mqtt_username: Option<String>,
    /// MQTT password [default: a login token signed with the device key].
    #[arg(long, env = "BURROW_MQTT_PASSWORD")]
    mqtt_password: Option<String>,
    /// Prefix of every MQTT topic burrow uses.
    #[arg(long, default_value = "burrow")]
    topic_prefix: String,
    /// Keepalive period to the pivot and the broker; three missed mean reconnect.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    keepalive: std::time::Duration,
}

pub async fn run(args: AgentArgs, shutdown: CancellationToken) -> Result<()> {
    let pin = HostKeyPin::parse(&args.pivot_host_key).context("--pivot-host-key")?;
    let meta = std::fs::metadata(&args.key).with_context(|| format!("cannot read {}", args.key.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        warn!(key = %args.key.display(), "device key is readable by other users; chmod 600 it");
    }
    let key = russh::keys::load_secret_key(&args.key, None)
        .with_context(|| format!("cannot load the device key {}", args.key.display()))?;
    if args.mqtt_url.is_none() && args.server.is_none() {
        bail!("give --server HOST:PORT (always-on) or --mqtt-url URL (on demand)");
    }
    let mut config = burrow_agent::Config::new(args.server, args.id, key, pin, args.expose);
    config.keepalive_interval = args.keepalive;
    if let (Some(url), false) = (args.mqtt_url, args.always_on) {
        config.signal = Some(burrow_agent::SignalConfig {
            url,
            tls: TlsFiles { ca: args.mqtt_ca, cert: args.mqtt_cert, key: args.mqtt_key },
            topics: Topics::new(&args.topic_prefix),
            username: args.mqtt_username,
            password: args.mqtt_password,
        });
    }
    burrow_agent::run(config, shutdown).await?;
    Ok(())
}
