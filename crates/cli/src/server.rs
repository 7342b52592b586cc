//! `burrow server`.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use burrow_core::mqtt_url::MqttUrl;
use burrow_server::host_key;
use burrow_server::signal::{BrokerConfig, SignalConfig};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::mqtt_args::MqttClientArgs;
use crate::DataDir;

#[derive(clap::Args)]
pub struct ServerArgs {
    #[command(flatten)]
    data: DataDir,
    /// Address of the SSH listener (production deployments use 443).
    #[arg(long, env = "BURROW_LISTEN", default_value = "0.0.0.0:2222")]
    listen: SocketAddr,
    /// HOST:PORT that wake requests tell devices to dial [default: the listen address].
    #[arg(long, env = "BURROW_ADVERTISE")]
    advertise: Option<String>,
    /// This pivot's name in the registry's tunnel records.
    #[arg(long, env = "BURROW_PIVOT_NAME", default_value = "local")]
    pivot_name: String,
    /// Devices answer to `ID` and `ID.<suffix>`.
    #[arg(long, default_value = "burrow")]
    host_suffix: String,
    /// Keepalive period on every connection; two missed keepalives drop it.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    keepalive: Duration,
    /// Serve `/healthz` and `/metrics` (Prometheus text) over HTTP on this address.
    #[arg(long, env = "BURROW_HTTP_LISTEN")]
    http_listen: Option<SocketAddr>,
    /// Threads that run SSH connections [default: 1]; more raise the handshake
    /// rate during reconnect storms, at some CPU cost per relayed byte.
    #[arg(long, env = "BURROW_SSH_THREADS")]
    ssh_threads: Option<usize>,
    #[command(flatten)]
    mqtt: MqttArgs,
}

#[derive(clap::Args)]
struct MqttArgs {
    /// Where the embedded MQTT broker listens for devices.
    #[arg(long, env = "BURROW_MQTT_LISTEN", default_value = "0.0.0.0:1883")]
    mqtt_listen: SocketAddr,
    /// Use an external broker (mqtt[s]://HOST:PORT) instead of the embedded one.
    #[arg(long, env = "BURROW_MQTT_URL")]
    mqtt_url: Option<MqttUrl>,
    #[command(flatten)]
    client: MqttClientArgs,
    /// How long an operator's request waits for a sleeping device to dial in.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    wake_timeout: Duration,
    /// An on-demand tunnel closes after this long without channels.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    idle_timeout: Duration,
    /// Serve always-on tunnels only: no broker, no wake-ups.
    #[arg(long)]
    no_mqtt: bool,
}

pub async fn run(args: ServerArgs, shutdown: CancellationToken) -> Result<()> {
    let dir = &args.data.data_dir;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create data dir {}", dir.display()))?;
    let key = host_key::load_or_create(dir).context("cannot load the host key")?;
    let ssh = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let local = ssh.local_addr()?;
    let m = &args.mqtt;
    let mut mqtt = None;
    let broker = match (&m.mqtt_url, m.no_mqtt) {
        (_, true) => None,
        (Some(url), false) => Some(BrokerConfig::External {
            url: url.clone(),
            tls: m.client.tls(),
            username: m.client.mqtt_username.clone(),
            password: m.client.mqtt_password.clone(),
        }),
        (None, false) => {
            let l = tokio::net::TcpListener::bind(m.mqtt_listen)
                .await
                .with_context(|| format!("cannot listen for MQTT on {}", m.mqtt_listen))?;
            mqtt = Some(l);
            Some(BrokerConfig::Embedded)
        }
    };
    let advertise = args.advertise.clone().unwrap_or_else(|| {
        if local.ip().is_unspecified() {
            warn!(
                "listening on {local}: wake requests will name 127.0.0.1:{}; set --advertise HOST:PORT",
                local.port()
            );
            format!("127.0.0.1:{}", local.port())
        } else {
            local.to_string()
        }
    });

    let http = match args.http_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen for HTTP on {addr}"))?,
        ),
        None => None,
    };

    println!("burrow pivot listening on {local}");
    if let Some(h) = &http {
        println!("http (/healthz, /metrics) listening on {}", h.local_addr()?);
    }
    println!("host key {} ({})", burrow_core::fingerprint(key.public_key()), dir.join("host_key.pub").display());
    match (&mqtt, &broker) {
        (Some(l), _) => println!("mqtt (embedded broker) listening on {}", l.local_addr()?),
        (None, Some(BrokerConfig::External { url, .. })) => println!("mqtt broker {url}"),
        _ => println!("mqtt disabled: always-on tunnels only"),
    }

    let mut config = burrow_server::Config::new(dir.clone());
    config.pivot_name = args.pivot_name;
    config.host_suffix = args.host_suffix;
    config.keepalive_interval = args.keepalive;
    if let Some(n) = args.ssh_threads {
        config.ssh_threads = n;
    }
    config.advertise = Some(advertise.clone());
    config.signal = broker.map(|broker| SignalConfig {
        broker,
        topics: m.client.topics(),
        advertise,
        wake_timeout: m.wake_timeout,
        idle_timeout: m.idle_timeout,
    });
    let listeners = burrow_server::Listeners { ssh, mqtt, http };
    burrow_server::run(config, listeners, shutdown).await?;
    Ok(())
}
