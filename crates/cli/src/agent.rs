//! `burrow agent`.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use anyhow::{Context, Result};
use burrow_core::{Expose, HostKeyPin, Id};
use tokio_util::sync::CancellationToken;
use tracing::warn;

#[derive(clap::Args)]
pub struct AgentArgs {
    /// The pivot, HOST:PORT.
    #[arg(long, env = "BURROW_SERVER")]
    server: String,
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
}

pub async fn run(args: AgentArgs, shutdown: CancellationToken) -> Result<()> {
    let pin = HostKeyPin::parse(&args.pivot_host_key).context("--pivot-host-key")?;
    let meta = std::fs::metadata(&args.key)
        .with_context(|| format!("cannot read {}", args.key.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        warn!(key = %args.key.display(), "device key is readable by other users; chmod 600 it");
    }
    let key = russh::keys::load_secret_key(&args.key, None)
        .with_context(|| format!("cannot load the device key {}", args.key.display()))?;
    let config = burrow_agent::Config::new(args.server, args.id, key, pin, args.expose);
    burrow_agent::run(config, shutdown).await;
    Ok(())
}
