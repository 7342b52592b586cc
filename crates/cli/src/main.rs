//! `burrow`: one binary for the pivot, the device agent and the admin commands.

mod admin;
mod agent;
mod server;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "burrow",
    version,
    about = "SSH, SCP and SFTP to devices behind NAT, through a pivot, with stock OpenSSH"
)]
struct Cli {
    /// Log more (-v debug, -vv trace); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Log as JSON lines instead of text.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

/// Where the pivot keeps its host key and registry.
#[derive(clap::Args, Clone)]
pub struct DataDir {
    #[arg(long, env = "BURROW_DATA_DIR", default_value = "/var/lib/burrow")]
    pub data_dir: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Run the pivot: the SSH server devices dial and operators jump through.
    Server(server::ServerArgs),
    /// Run the device agent: hold a reverse tunnel to this device's services.
    Agent(agent::AgentArgs),
    /// Manage registered devices (on the pivot host).
    #[command(subcommand)]
    Device(admin::DeviceCommand),
    /// Manage registered operators (on the pivot host).
    #[command(subcommand)]
    Operator(admin::OperatorCommand),
}

fn init_logging(verbose: u8, json: bool) {
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Cancelled on Ctrl-C or SIGTERM.
fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler can be installed");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        t.cancel();
    });
    token
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose, cli.log_json);
    let result: Result<()> = match cli.command {
        Command::Server(args) => server::run(args, shutdown_on_signal()).await,
        Command::Agent(args) => agent::run(args, shutdown_on_signal()).await,
        Command::Device(cmd) => admin::device(cmd).await,
        Command::Operator(cmd) => admin::operator(cmd).await,
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("burrow: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
