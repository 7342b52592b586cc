//! `burrow device …` and `burrow operator …`, run on the pivot host against
//! its registry. A running pivot picks the changes up within a second.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use burrow_core::keys::read_public_key;
use burrow_core::time::format_unix;
use burrow_core::Id;
use burrow_server::registry::DeviceRecord;
use burrow_server::Registry;
use clap::Subcommand;
use serde_json::json;

use crate::DataDir;

#[derive(Subcommand)]
pub enum DeviceCommand {
    /// Register a device and its public key.
    Add {
        id: Id,
        /// The device's public key file (.pub).
        #[arg(long)]
        key: PathBuf,
        /// k=v, repeatable.
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        #[command(flatten)]
        data: DataDir,
    },
    /// List devices: id, online, last seen, labels, exposed ports.
    List {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        data: DataDir,
    },
    /// Show one device.
    Show {
        id: Id,
        #[command(flatten)]
        data: DataDir,
    },
    /// Remove a device; its open tunnel closes within seconds.
    Remove {
        id: Id,
        #[command(flatten)]
        data: DataDir,
    },
}

#[derive(Subcommand)]
pub enum OperatorCommand {
    /// Register an operator and their public key.
    Add {
        name: Id,
        #[arg(long)]
        key: PathBuf,
        /// May manage devices and operators.
        #[arg(long)]
        admin: bool,
        #[command(flatten)]
        data: DataDir,
    },
    /// List operators.
    List {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        data: DataDir,
    },
    /// Remove an operator; their open connections close within seconds.
    Remove {
        name: Id,
        #[command(flatten)]
        data: DataDir,
    },
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("label '{s}' is not k=v"))?;
    if k.is_empty() {
        return Err(format!("label '{s}' has an empty key"));
    }
    Ok((k.to_string(), v.to_string()))
}

async fn open(data: &DataDir) -> Result<Registry> {
    let dir = &data.data_dir;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create data dir {}", dir.display()))?;
    Registry::open(dir).await.with_context(|| format!("cannot open the registry in {}", dir.display()))
}

pub async fn device(cmd: DeviceCommand) -> Result<()> {
    match cmd {
        DeviceCommand::Add { id, key, labels, data } => {
            let key = read_public_key(&key)?;
            let labels: BTreeMap<_, _> = labels.into_iter().collect();
            open(&data).await?.add_device(&id, &key, &labels).await?;
            println!("added device '{id}' ({})", burrow_core::fingerprint(&key));
        }
        DeviceCommand::List { json, data } => {
            let devices = open(&data).await?.devices().await?;
            if json {
                let list: Vec<_> = devices.iter().map(device_json).collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                print_device_table(&devices);
            }
        }
        DeviceCommand::Show { id, data } => {
            let Some(dev) = open(&data).await?.device(&id).await? else {
                bail!("unknown device '{id}'");
            };
            println!("id:          {}", dev.id);
            println!("presence:    {}", dev.presence.as_deref().unwrap_or("-"));
            println!("tunnel:      {}", if dev.tunnel_open() { "open" } else { "closed" });
            println!("last seen:   {}", last_seen(&dev));
            println!("labels:      {}", labels_text(&dev.labels));
            println!("ports:       {}", ports_text(&dev.ports));
            println!("key:         {}", dev.public_key);
            println!("fingerprint: {}", dev.fingerprint);
            println!("added:       {}", format_unix(dev.created_at));
        }
        DeviceCommand::Remove { id, data } => {
            if !open(&data).await?.remove_device(&id).await? {
                bail!("unknown device '{id}'");
            }
            println!("removed device '{id}'");
        }
    }
    Ok(())
}

pub async fn operator(cmd: OperatorCommand) -> Result<()> {
    match cmd {
        OperatorCommand::Add { name, key, admin, data } => {
            let key = read_public_key(&key)?;
            open(&data).await?.add_operator(&name, &key, admin).await?;
            let role = if admin { "admin" } else { "operator" };
            println!("added operator '{name}' as {role} ({})", burrow_core::fingerprint(&key));
        }
        OperatorCommand::List { json, data } => {
            let ops = open(&data).await?.operators().await?;
            if json {
                let list: Vec<_> = ops
                    .iter()
                    .map(|o| {
                        json!({
                            "name": o.name,
                            "role": if o.admin { "admin" } else { "operator" },
                            "fingerprint": o.fingerprint,
                            "added": format_unix(o.created_at),
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!("{:<24} {:<9} FINGERPRINT", "NAME", "ROLE");
                for o in &ops {
                    println!("{:<24} {:<9} {}", o.name, if o.admin { "admin" } else { "operator" }, o.fingerprint);
                }
            }
        }
        OperatorCommand::Remove { name, data } => {
            if !open(&data).await?.remove_operator(&name).await? {
                bail!("unknown operator '{name}'");
            }
            println!("removed operator '{name}'");
        }
    }
    Ok(())
}

fn device_json(d: &DeviceRecord) -> serde_json::Value {
    json!({
        "id": d.id,
        "online": d.online(),
        "presence": d.presence,
        "tunnel": d.tunnel_open(),
        "last_seen": d.last_seen.map(format_unix),
        "labels": d.labels,
        "ports": d.ports,
        "fingerprint": d.fingerprint,
        "pivot": d.tunnel_pivot,
    })
}

fn print_device_table(devices: &[DeviceRecord]) {
    println!("{:<24} {:<9} {:<7} {:<22} {:<10} LABELS", "ID", "PRESENCE", "TUNNEL", "LAST SEEN", "PORTS");
    for d in devices {
        println!(
            "{:<24} {:<9} {:<7} {:<22} {:<10} {}",
            d.id,
            d.presence.as_deref().unwrap_or("-"),
            if d.tunnel_open() { "open" } else { "-" },
            last_seen(d),
            ports_text(&d.ports),
            labels_text(&d.labels)
        );
    }
}

fn last_seen(d: &DeviceRecord) -> String {
    match d.last_seen {
        Some(t) => format_unix(t),
        None => "never".into(),
    }
}

fn ports_text(ports: &[u32]) -> String {
    if ports.is_empty() {
        return "-".into();
    }
    ports.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

fn labels_text(labels: &BTreeMap<String, String>) -> String {
    if labels.is_empty() {
        return "-".into();
    }
    labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}
