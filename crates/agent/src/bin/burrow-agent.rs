//! `burrow-agent`: the device side of burrow alone, for routers, cameras and
//! gateways. The same agent as `burrow agent`, without the pivot, its
//! registry, broker and HTTP server.

use std::process::ExitCode;

use burrow_agent::cli::{self, AgentCmd};
use clap::Parser;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "burrow-agent",
    version,
    about = "The burrow device agent: waits for wake-ups and holds a reverse SSH tunnel to the pivot"
)]
struct Args {
    /// Log more (-v debug, -vv trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(flatten)]
    agent: AgentCmd,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let level = match args.verbose {
        0 => tracing::Level::INFO,
        1 => tracing::Level::DEBUG,
        _ => tracing::Level::TRACE,
    };
    // Colours only on a terminal: a log file or journald gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_max_level(level).with_writer(std::io::stderr).with_ansi(ansi).init();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("burrow-agent: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let shutdown = CancellationToken::new();
        cli::cancel_on_signal(shutdown.clone());
        cli::run(args.agent, shutdown).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("burrow-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}
