//! Letting operators in with the pivot's certificates: `enroll
//! --trust-operators`, `trust-operators` (and its `--refresh`) and
//! `principals`.
//!
//! sshd says nothing when a drop-in cannot work; it only refuses logins
//! later. So everything it would trip on is checked first ([`SshdArgs::plan`]),
//! and the drop-in stays only once sshd's own check passes and `sshd -T`
//! shows that the config the running sshd reads takes it. The trust dir
//! must be root's alone, and only root writes it.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use burrow_core::agent_file::{AgentFile, DEFAULT_PATH};
use burrow_core::cert::DeviceTrust;

use crate::trust::{
    self, DeviceSshd, DirError, PivotFile, TrustDir, DEFAULT_SSHD_CONFIG, DEFAULT_SSHD_CONFIG_DIR, DEFAULT_SSHD_RELOAD,
    DEFAULT_TRUST_DIR,
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
    /// Where to keep the CA keys, revoked keys and labels sshd reads, root's alone [default: the agent config's trust_dir (not with --refresh), else /etc/ssh/burrow].
    #[arg(long, value_name = "DIR")]
    trust_dir: Option<PathBuf>,
}

#[derive(clap::Args)]
pub(super) struct TrustOperatorsArgs {
    /// The agent config, as written by `burrow agent enroll`.
    #[arg(long, default_value = DEFAULT_PATH)]
    config: PathBuf,
    /// Only refetch the files in --trust-dir as the device its pivot.toml names (as root; sshd's config untouched).
    #[arg(long, conflicts_with_all = ["config", "sshd_config", "sshd_config_dir", "sshd_check", "sshd_reload"])]
    refresh: bool,
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
    /// The directory of the trust files sshd reads.
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
    /// files `nobody` can reach, and an sshd and config to check them with;
    /// and that the trust dir is root's alone (or can be made so).
    /// `recorded` is the trust dir in the agent config, if any.
    pub(super) fn plan(self, recorded: Option<&Path>) -> Result<Plan> {
        require_root("`trust-operators` writes sshd's config and the files it trusts")?;
        let trust_dir =
            self.trust_dir.or_else(|| recorded.map(Path::to_path_buf)).unwrap_or_else(|| DEFAULT_TRUST_DIR.into());
        let trust_dir = absolute(&trust_dir)?;
        let config_dir = absolute(&self.sshd_config_dir.unwrap_or_else(|| DEFAULT_SSHD_CONFIG_DIR.into()))?;
        let sshd_config = absolute(&self.sshd_config.unwrap_or_else(|| DEFAULT_SSHD_CONFIG.into()))?;
        trust::sshd_path(&trust_dir).context("--trust-dir")?;
        TrustDir::check(&trust_dir)?;
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
        let (dir, made) = TrustDir::create(&self.trust_dir)?;
        let created = trust::ensure_revoked_keys(&dir, made)?;
        if let Err(e) = self.sshd.dry_run(&self.drop_in(id)) {
            created.undo();
            return Err(e.into());
        }
        Ok(created)
    }

    /// Fetches the trust as the device, writes the trust files and the
    /// pivot file (what a root refresh connects with, copied from the agent
    /// config now), installs the drop-in (check, then reload) and records
    /// the trust dir in the agent config at `config_path`.
    pub(super) async fn apply(&self, file: &mut AgentFile, config_path: &Path) -> Result<()> {
        let pivot = PivotFile::from_agent_file(file, config_path)?;
        let (dir, _) = TrustDir::create(&self.trust_dir)?;
        // The agent config may be the agent user's to write; root's own
        // record of the pivot is not replaced by a different one from it.
        if let Ok(known) = PivotFile::load(&dir) {
            if known.id != pivot.id || known.pivot_host_key != pivot.pivot_host_key {
                bail!(
                    "{} names device '{}' and pivot key {}, but {} (root's) has '{}' and {}: if that really changed, delete {} first",
                    config_path.display(),
                    pivot.id,
                    pivot.pivot_host_key,
                    dir.path().join(trust::PIVOT_FILE).display(),
                    known.id,
                    known.pivot_host_key,
                    dir.path().join(trust::PIVOT_FILE).display()
                );
            }
        }
        let trust = trust::fetch_as_device(&pivot).await?;
        trust::write_in(&dir, &trust)?;
        pivot.save(&dir)?;
        // A directory created just now is 0755, but those above may not be.
        trust::check_trust_dir_reachable(dir.path())?;
        let path = self.sshd.install(&self.drop_in(&file.id))?;
        file.trust_dir = Some(self.trust_dir.clone());
        file.save(config_path)?;
        println!("sshd trusts the pivot's CA ({}) via {}", fingerprints(&trust), path.display());
        println!(
            "root refreshes {} with `{} trust-operators --refresh --trust-dir {}` (burrow-trust.timer and .path), or the agent itself if it runs as root",
            self.trust_dir.display(),
            super::program(),
            self.trust_dir.display()
        );
        Ok(())
    }
}

/// Fails unless this process is root, saying why it must be.
fn require_root(why: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("{why}: run it as root");
    }
    Ok(())
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

/// `trust-operators`: switch an enrolled device to certificates, or retry;
/// with `--refresh`, only refetch the trust files.
pub(super) async fn trust_operators(args: TrustOperatorsArgs) -> Result<()> {
    if args.refresh {
        return refresh(args.sshd.trust_dir.as_deref().unwrap_or(Path::new(DEFAULT_TRUST_DIR))).await;
    }
    let config = absolute(&args.config)?;
    let mut file = AgentFile::load(&config)?;
    let recorded = file.trust_dir.clone();
    let plan = args.sshd.plan(recorded.as_deref())?;
    plan.apply(&mut file, &config).await?;
    if recorded.as_deref() != Some(plan.trust_dir.as_path()) {
        println!("restart a running agent so that it keeps them fresh (it reads {} at start)", config.display());
    }
    Ok(())
}

/// `trust-operators --refresh`: fetches the trust as the device named in
/// `dir`/pivot.toml and writes the files, reading nothing the agent's user
/// can change but the device key. sshd reads them at each login: no reload.
async fn refresh(dir: &Path) -> Result<()> {
    require_root("`trust-operators --refresh` writes the files sshd trusts")?;
    let dir = match TrustDir::open(dir) {
        Err(DirError::Missing(_)) => bail!(
            "there is no {}: run `{} trust-operators` once as root (after enrolling) to set it up",
            dir.display(),
            super::program()
        ),
        opened => opened?,
    };
    let pivot = PivotFile::load(&dir)?;
    let trust = trust::fetch_as_device(&pivot).await?;
    let changed = trust::write_in(&dir, &trust)?;
    let what = if changed { "updated" } else { "unchanged" };
    println!(
        "operator trust in {} {what}: {} CA keys ({}), {} revoked keys",
        dir.path().display(),
        trust.ca_keys.len(),
        fingerprints(&trust),
        trust.revoked_keys.len()
    );
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
