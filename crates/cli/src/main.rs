//! `burrow`: one binary for the pivot, the device agent, and the admin and
//! operator commands.

mod admin;
mod config_file;
mod login;
mod malloc;
mod openssh;
mod remote;
mod server;
mod wrappers;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "burrow",
    version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("BURROW_COMMIT"), ")"),
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

pub use burrow_agent::cli::parse_duration;

/// Where the pivot keeps its host key and registry.
#[derive(clap::Args, Clone)]
pub struct DataDir {
    /// The pivot's data dir: host key and registry.
    #[arg(long, env = "BURROW_DATA_DIR", default_value = "/var/lib/burrow")]
    pub data_dir: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Run the pivot: the SSH server devices dial and operators jump through.
    Server(Box<server::ServerArgs>),
    /// Run the device agent, or enroll this device (`agent enroll`).
    Agent(Box<burrow_agent::cli::AgentCmd>),
    /// Manage devices (locally on the pivot host, or with --pivot).
    #[command(subcommand)]
    Device(admin::DeviceCommand),
    /// Manage operators (locally on the pivot host, or with --pivot).
    #[command(subcommand)]
    Operator(admin::OperatorCommand),
    /// Ban and unban source addresses (admin; locally or with --pivot).
    #[command(subcommand)]
    Ban(admin::BanCommand),
    /// Query the audit trail (admin; locally or with --pivot).
    Audit(admin::AuditArgs),
    /// The user CA that signs operators' certificates (rotate: admin; locally or with --pivot).
    #[command(subcommand)]
    Ca(admin::CaCommand),
    /// Write OpenSSH config and known_hosts for ID.burrow names, and fetch a certificate for devices that trust the CA.
    Login(login::LoginArgs),
    /// ssh to a device, after checking it can be reached.
    Ssh(wrappers::SshArgs),
    /// scp with DEVICE:PATH names.
    Scp(wrappers::ScpArgs),
    /// sftp to a device.
    Sftp(wrappers::SftpArgs),
    /// Forward a local port to DEVICE:PORT.
    Forward(wrappers::ForwardArgs),
    /// OpenSSH mode: render stock sshd, authorized_keys, fail2ban and ssh_config files from the registry.
    #[command(subcommand)]
    Openssh(openssh::OpensshCommand),
}

fn init_logging(verbose: u8, json: bool) {
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    // russh warns of every channel request it does not know, such as the
    // harmless `simple@putty.projects.tartarus.org` of each PuTTY session.
    let quiet = if verbose == 0 { ",russh::server::encrypted=error" } else { "" };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(format!("{default}{quiet}")));
    // Colours only on a terminal: a log file or journald gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Cancelled on Ctrl-C or SIGTERM.
fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    burrow_agent::cli::cancel_on_signal(token.clone());
    token
}

async fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Server(args) => server::run(*args, shutdown_on_signal()).await?,
        Command::Agent(cmd) => burrow_agent::cli::run(*cmd, shutdown_on_signal()).await?,
        Command::Device(cmd) => admin::device(cmd).await?,
        Command::Operator(cmd) => admin::operator(cmd).await?,
        Command::Ban(cmd) => admin::ban(cmd).await?,
        Command::Audit(args) => admin::audit(args).await?,
        Command::Ca(cmd) => admin::ca(cmd).await?,
        Command::Login(args) => login::run(args).await?,
        Command::Openssh(cmd) => openssh::run(cmd).await?,
        Command::Ssh(a) => return wrappers::ssh(a).await,
        Command::Scp(a) => return wrappers::scp(a).await,
        Command::Sftp(a) => return wrappers::sftp(a).await,
        Command::Forward(a) => return wrappers::forward(a).await,
    }
    Ok(ExitCode::SUCCESS)
}

/// The command line, with the shared MQTT flags described for the pivot in
/// `server --help` (their defaults there are the agent's).
fn command() -> clap::Command {
    Cli::command().mut_subcommand("server", |s| {
        s.mut_arg("mqtt_username", |a| a.help("MQTT username for the --mqtt-url broker"))
            .mut_arg("mqtt_password", |a| a.help("MQTT password for the --mqtt-url broker"))
    })
}

/// The arguments, with everything after `burrow ssh|scp|sftp` kept for the
/// OpenSSH tool (its own `-v` included) unless only help is asked for.
fn arguments() -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let wrapper = args.get(1).is_some_and(|a| a == "ssh" || a == "scp" || a == "sftp");
    let help = args.len() == 3 && (args[2] == "--help" || args[2] == "-h");
    if wrapper && !help && args.len() > 2 && args[2] != "--" {
        args.insert(2, "--".into());
    }
    args
}

/// With `server --config FILE`, the arguments with the file's settings added.
fn with_config_file(args: Vec<std::ffi::OsString>) -> Result<Vec<std::ffi::OsString>, String> {
    if args.get(1).is_none_or(|a| a != "server") {
        return Ok(args);
    }
    let Ok(matches) = command().try_get_matches_from(&args) else { return Ok(args) };
    let server = matches.subcommand_matches("server").expect("the server subcommand");
    match server.get_one::<PathBuf>("config") {
        Some(path) => config_file::apply(&command(), &args, 2, path),
        None => Ok(args),
    }
}

fn main() -> ExitCode {
    let args = match with_config_file(arguments()) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("burrow: {e}");
            return ExitCode::FAILURE;
        }
    };
    let cli = Cli::from_arg_matches(&command().get_matches_from(args)).unwrap_or_else(|e| e.exit());
    if !matches!(cli.command, Command::Server(_) | Command::Agent(_)) {
        // A command whose output goes to `| head` ends quietly when the pipe
        // closes, as other Unix tools do. (Long-running ones keep Rust's
        // default of ignoring SIGPIPE: their sockets must never kill them.)
        // SAFETY: restoring a signal's default disposition before any thread exists.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    if matches!(cli.command, Command::Server(_)) {
        // Only the pivot relays at rates where this matters; an agent on a
        // small device keeps glibc's frugal defaults. No thread exists yet.
        malloc::tune();
    }
    init_logging(cli.verbose, cli.log_json);
    // One thread does: the pivot runs its SSH connections on threads of its
    // own (see `burrow_server::Config::ssh_threads`), and everything else
    // here waits on the network.
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("burrow: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("burrow: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every flag and argument of every command says in one line what it is.
    #[test]
    fn every_argument_is_described() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if id == "help" || id == "version" || arg.is_hide_set() {
                    continue;
                }
                if arg.get_help().is_none_or(|h| h.to_string().trim().is_empty()) {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&command(), "burrow", &mut missing);
        assert!(missing.is_empty(), "arguments without a description: {missing:?}");
    }

    /// docs/configuration.md lists every setting as the command line defines it.
    #[test]
    fn the_configuration_doc_lists_every_setting() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/configuration.md");
        let doc = std::fs::read_to_string(path).unwrap_or_default();
        let table = config_file::settings_table(&command());
        if std::env::var_os("BURROW_WRITE_DOCS").is_some() {
            let start = doc.find("<!-- settings -->").expect("marker") + "<!-- settings -->\n".len();
            let end = doc.find("<!-- /settings -->").expect("end marker");
            std::fs::write(path, format!("{}{table}{}", &doc[..start], &doc[end..])).unwrap();
            return;
        }
        for row in table.lines() {
            assert!(doc.contains(row), "docs/configuration.md lacks (run with BURROW_WRITE_DOCS=1 to rewrite):\n{row}");
        }
    }

    /// Remote-admin flags belong to the admin commands only.
    #[test]
    fn remote_flags_only_where_used() {
        let cmd = command();
        let has = |path: &[&str], id: &str| {
            let mut c = &cmd;
            for p in path {
                c = c.find_subcommand(p).unwrap();
            }
            c.get_arguments().any(|a| a.get_id().as_str() == id)
        };
        for path in [&["server"][..], &["agent"], &["ssh"], &["scp"], &["sftp"], &["forward"], &["login"]] {
            assert!(!has(path, "pivot"), "{path:?} has --pivot");
        }
        assert!(has(&["device", "list"], "pivot") && has(&["device", "list"], "pivot_host_key"));
        assert!(has(&["audit"], "identity") && has(&["ban", "add"], "pivot"));
    }
}
