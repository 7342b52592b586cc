//! Letting operators in with the pivot's certificates: `enroll
//! --trust-operators`, `trust-operators` and `principals`.
//!
//! sshd says nothing when a drop-in cannot work; it only refuses logins
//! later. So everything it would trip on is checked first ([`SshdArgs::plan`]),
//! and the drop-in stays only once sshd's own check passes and `sshd -T`
//! shows that the config the running sshd reads takes it.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use burrow_core::agent_file::{AgentFile, DEFAULT_PATH};
use burrow_core::cert::DeviceTrust;

use crate::trust::{
    self, DeviceSshd, DEFAULT_SSHD_CONFIG, DEFAULT_SSHD_CONFIG_DIR, DEFAULT_SSHD_RELOAD, DEFAULT_TRUST_DIR,
};

/// Where sshd's drop-in and the trust files go, and how to check and reload sshd.
#[derive(clap::Args)]
pub(super) struct SshdArgs {
    /// The sshd_config the running sshd reads; it must Include --sshd-config-dir [default: /etc/ssh/sshd_config].
    #[arg(long, value_name = "FILE")]
    sshd_config: Option<PathBuf>,
    /// Where to write the sshd drop-in burrow.conf [default: /etc/ssh/sshd_config.d].
    #[arg(long, value_name = "DIR")]
    sshd_config_dir: Option<PathBuf>,
    /// Command that validates sshd's whole config; a failure leaves it untouched [default: sshd -t -f <--sshd-config>].
    #[arg(long, value_name = "CMD")]
    sshd_check: Option<String>,
    /// Command that makes sshd reload its config [default: systemctl reload ssh].
    #[arg(long, value_name = "CMD")]
    sshd_reload: Option<String>,
    /// Where to keep the CA keys, revoked keys and labels sshd reads [default: the agent config's trust_dir, else trust next to it].
    #[arg(long, value_name = "DIR")]
    trust_dir: Option<PathBuf>,
}

#[derive(clap::Args)]
pub(super) struct TrustOperatorsArgs {
    /// The agent config, as written by `burrow agent enroll`.
    #[arg(long, default_value = DEFAULT_PATH)]
    config: PathBuf,
    #[command(flatten)]
    sshd: SshdArgs,
}

#[derive(clap::Args)]
pub(super) struct PrincipalsArgs {
    /// The user logging in (sshd's %u).
    user: String,
    /// The certificate in base64 (sshd's %k); without it, every principal a certificate could use here.
    #[arg(allow_hyphen_values = true)]
    cert: Option<String>,
    /// The directory of the trust files the agent keeps.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_TRUST_DIR)]
    trust_dir: PathBuf,
}

/// What was checked and will be written.
pub(super) struct Plan {
    /// How sshd starts the principals command (`/usr/bin/burrow agent`).
    invocation: String,
    trust_dir: PathBuf,
    sshd: DeviceSshd,
}

impl SshdArgs {
    /// Whether any of these flags was given.
    pub(super) fn given(&self) -> bool {
        self.sshd_config.is_some()
            || self.sshd_config_dir.is_some()
            || self.sshd_check.is_some()
            || self.sshd_reload.is_some()
            || self.trust_dir.is_some()
    }

    /// Checks what sshd would otherwise trip on only at login time: paths it
    /// can read in its config, a principals command it agrees to run, trust
    /// files `nobody` can reach, and an sshd and config to check them with.
    /// `recorded` is the trust dir in the agent config, if any.
    pub(super) fn plan(self, agent_config: &Path, recorded: Option<&Path>) -> Result<Plan> {
        let trust_dir = self
            .trust_dir
            .or_else(|| recorded.map(Path::to_path_buf))
            .unwrap_or_else(|| trust::default_dir(agent_config));
        let trust_dir = absolute(&trust_dir)?;
        let config_dir = absolute(&self.sshd_config_dir.unwrap_or_else(|| DEFAULT_SSHD_CONFIG_DIR.into()))?;
        let sshd_config = absolute(&self.sshd_config.unwrap_or_else(|| DEFAULT_SSHD_CONFIG.into()))?;
        trust::sshd_path(&trust_dir).context("--trust-dir")?;
        let (exe, invocation) = trust::current_invocation()?;
        trust::check_exe(&exe)?;
        trust::check_trust_dir_reachable(&trust_dir)?;
        let reload = self.sshd_reload.unwrap_or_else(|| DEFAULT_SSHD_RELOAD.into());
        let sshd = DeviceSshd::new(sshd_config, config_dir, self.sshd_check, reload)?;
        Ok(Plan { invocation, trust_dir, sshd })
    }
}

impl Plan {
    fn drop_in(&self, id: &str) -> trust::DropIn {
        trust::drop_in(&self.invocation, &self.trust_dir, id)
    }

    /// Puts the drop-in for device `id` in place, has sshd check it and
    /// confirm it takes it, and puts back what was there: before a token is
    /// spent. The empty revoked keys file it names is created first, so sshd
    /// never sees it missing. On failure, what this created is removed; on
    /// success, it is returned, for a failed enrollment to remove.
    pub(super) fn dry_run(&self, id: &str) -> Result<trust::Created> {
        let created = trust::ensure_revoked_keys(&self.trust_dir)
            .with_context(|| format!("cannot create {}", self.trust_dir.display()))?;
        if let Err(e) = self.sshd.dry_run(&self.drop_in(id)) {
            created.undo();
            return Err(e.into());
        }
        Ok(created)
    }

    /// Fetches the trust as the device, writes the trust files, installs the
    /// drop-in (check, then reload) and records the trust dir in the agent
    /// config at `config_path`.
    pub(super) async fn apply(&self, file: &mut AgentFile, config_path: &Path) -> Result<()> {
        let trust = trust::fetch_as_device(file).await?;
        let dir = &self.trust_dir;
        trust::write(dir, &trust).with_context(|| format!("cannot write the trust files in {}", dir.display()))?;
        // Directories created just now are 0755, but those above may not be.
        trust::check_trust_dir_reachable(dir)?;
        let path = self.sshd.install(&self.drop_in(&file.id))?;
        file.trust_dir = Some(dir.clone());
        file.save(config_path)?;
        println!("sshd trusts the pivot's CA ({}) via {}", fingerprints(&trust), path.display());
        println!("the agent refreshes {} whenever it connects to the pivot", dir.display());
        Ok(())
    }
}

fn fingerprints(trust: &DeviceTrust) -> String {
    let fps: Vec<String> = trust
        .ca_keys
        .iter()
        .filter_map(|k| burrow_core::keys::parse_public_key(k, "CA key").ok())
        .map(|k| burrow_core::fingerprint(&k))
        .collect();
    fps.join(", ")
}

fn absolute(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("bad path {}", p.display()))
}

/// `trust-operators`: switch an enrolled device to certificates, or retry.
pub(super) async fn trust_operators(args: TrustOperatorsArgs) -> Result<()> {
    let config = absolute(&args.config)?;
    let mut file = AgentFile::load(&config)?;
    let recorded = file.trust_dir.clone();
    let plan = args.sshd.plan(&config, recorded.as_deref())?;
    plan.apply(&mut file, &config).await?;
    if recorded.is_none() {
        println!("restart a running agent so that it keeps them fresh (it reads {} at start)", config.display());
    }
    Ok(())
}

/// `principals`: one principal a line on stdout, and exit 0 whatever
/// happens (no principal means no login).
pub(super) fn principals(args: PrincipalsArgs) -> Result<()> {
    let list = trust::principals(&args.user, args.cert.as_deref(), &args.trust_dir);
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for p in &list {
        if writeln!(out, "{p}").is_err() {
            break;
        }
    }
    let _ = out.flush();
    Ok(())
}
