//! `burrow server`.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use burrow_server::host_key;
use tokio_util::sync::CancellationToken;

use crate::DataDir;

#[derive(clap::Args)]
pub struct ServerArgs {
    #[command(flatten)]
    data: DataDir,
    /// Address of the SSH listener (production deployments use 443).
    #[arg(long, env = "BURROW_LISTEN", default_value = "0.0.0.0:2222")]
    listen: SocketAddr,
    /// This pivot's name in the registry's tunnel records.
    #[arg(long, env = "BURROW_PIVOT_NAME", default_value = "local")]
    pivot_name: String,
    /// Devices answer to `ID` and `ID.<suffix>`.
    #[arg(long, default_value = "burrow")]
    host_suffix: String,
    /// Keepalive period on every connection; two missed keepalives drop it.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    keepalive: Duration,
}

pub async fn run(args: ServerArgs, shutdown: CancellationToken) -> Result<()> {
    let dir = &args.data.data_dir;
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create data dir {}", dir.display()))?;
    let key = host_key::load_or_create(dir).context("cannot load the host key")?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let local = listener.local_addr()?;
    println!("burrow pivot listening on {local}");
    println!(
        "host key {} ({})",
        burrow_core::fingerprint(key.public_key()),
        dir.join("host_key.pub").display()
    );
    let mut config = burrow_server::Config::new(dir.clone());
    config.pivot_name = args.pivot_name;
    config.host_suffix = args.host_suffix;
    config.keepalive_interval = args.keepalive;
    burrow_server::run(config, listener, shutdown).await?;
    Ok(())
}
