//! Letting operators in with the pivot's certificates: `enroll
//! --trust-operators`, `trust-operators` (and its `--refresh`) and
//! `principals`.
//!
//! sshd says nothing when a drop-in cannot work; it only refuses logins
//! later. So everything it would trip on is checked first ([`SshdArgs::plan`]),
//! and the drop-in stays only once sshd's own check passes and `sshd -T`
//! shows that the config the running sshd reads takes it. The trust dir
//! must be root's alone, and only root writes it.
//!
//! Root never takes a trust decision from the agent config, which the
//! agent's user may write: the trust dir is `--trust-dir` or the default,
//! and the pivot, its pin and the device come from the trust dir's
//! pivot.toml, which `enroll` writes from the token. Only a device
//! enrolled before that has none; its agent config then stands in only if
//! it is root's alone.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use burrow_core::agent_file::{AgentFile, DEFAULT_PATH};
use burrow_core::cert::DeviceTrust;
use burrow_core::text::printable;
use burrow_core::HostKeyPin;

use crate::trust::{
    self, DeviceSshd, DirError, FileError, PivotFile, TrustDir, TrustError, DEFAULT_SSHD_CONFIG,
    DEFAULT_SSHD_CONFIG_DIR, DEFAULT_SSHD_RELOAD, DEFAULT_TRUST_DIR, PIVOT_FILE,
};

/// An agent config is a few hundred bytes.
const MAX_AGENT_FILE: u64 = 64 * 1024;

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
    /// Where to keep the CA keys, revoked keys and labels sshd reads, and pivot.toml (the pivot root connects to), root's alone; never taken from the agent config [default: /etc/ssh/burrow].
    #[arg(long, value_name = "DIR")]
    trust_dir: Option<PathBuf>,
}

#[derive(clap::Args)]
pub(super) struct TrustOperatorsArgs {
    /// The agent config, as written by `burrow agent enroll`.
    #[arg(long, default_value = DEFAULT_PATH)]
    config: PathBuf,
    /// Only refetch the files in --trust-dir as the device its pivot.toml names (as root; sshd's config and the agent config untouched).
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
    /// Whether any flag about sshd itself (all but --trust-dir) was given.
    pub(super) fn sshd_given(&self) -> bool {
        self.sshd_config.is_some()
            || self.sshd_config_dir.is_some()
            || self.sshd_check.is_some()
            || self.sshd_reload.is_some()
    }

    /// The trust dir: --trust-dir, else the default; never the agent
    /// config's, which the agent's user may have changed.
    pub(super) fn trust_dir(&self) -> Result<PathBuf> {
        absolute(self.trust_dir.as_deref().unwrap_or(Path::new(DEFAULT_TRUST_DIR)))
    }

    /// Whether --trust-dir was given.
    pub(super) fn trust_dir_given(&self) -> bool {
        self.trust_dir.is_some()
    }

    /// Checks what sshd would otherwise trip on only at login time: paths it
    /// can read in its config, a principals command it agrees to run, trust
    /// files `nobody` can reach, and an sshd and config to check them with;
    /// and that the trust dir is root's alone (or can be made so).
    pub(super) fn plan(self) -> Result<Plan> {
        require_root("`trust-operators` writes sshd's config and the files it trusts")?;
        let trust_dir = self.trust_dir()?;
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
    pub(super) fn trust_dir(&self) -> &Path {
        &self.trust_dir
    }

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

    /// Fetches the trust as the device `pivot` names, writes the trust
    /// files and `pivot` as the pivot file, and installs the drop-in
    /// (check, then reload).
    pub(super) async fn apply(&self, pivot: &PivotFile) -> Result<()> {
        let (dir, _) = TrustDir::create(&self.trust_dir)?;
        let trust = trust::fetch_as_device(pivot).await?;
        trust::write_in(&dir, &trust)?;
        pivot.save(&dir)?;
        // A directory created just now is 0755, but those above may not be.
        trust::check_trust_dir_reachable(dir.path())?;
        let path = self.sshd.install(&self.drop_in(&pivot.id))?;
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

/// Records `pivot` (from the token root just enrolled with) as the pivot
/// file in the trust dir `dir`, created 0755 if missing and its parent is
/// root's alone.
pub(super) fn record_pivot(dir: &Path, pivot: &PivotFile) -> Result<PathBuf> {
    let (dir, _) = TrustDir::create(dir)?;
    pivot.save(&dir)?;
    Ok(dir.file(PIVOT_FILE))
}

/// Tells the agent, through its config, which trust dir to keep fresh
/// (for an agent that is not root: where to find operators.json).
pub(super) fn record_trust_dir(file: &mut AgentFile, config: &Path, dir: &Path) -> Result<()> {
    if file.trust_dir.as_deref() != Some(dir) {
        file.trust_dir = Some(dir.to_path_buf());
        file.save(config)?;
    }
    Ok(())
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
    let plan = args.sshd.plan()?;
    let (pivot, file) = match recorded_pivot(plan.trust_dir())? {
        Some(pivot) => {
            // The agent config is only told where the trust dir is.
            let file = match AgentFile::load(&config) {
                Ok(file) => {
                    warn_if_different(&file, &config, &pivot, plan.trust_dir());
                    Some(file)
                }
                Err(e) => {
                    let why = format!("{:#}", anyhow::Error::from(e));
                    println!(
                        "note: {}; the agent learns of {} only from its --trust-dir",
                        printable(&why),
                        plan.trust_dir().display()
                    );
                    None
                }
            };
            (pivot, file)
        }
        None => {
            let file = roots_agent_file(&config, plan.trust_dir())?;
            (PivotFile::from_agent_file(&file, &config)?, Some(file))
        }
    };
    plan.apply(&pivot).await?;
    if let Some(mut file) = file {
        let before = file.trust_dir.clone();
        record_trust_dir(&mut file, &config, plan.trust_dir())?;
        if before.as_deref() != Some(plan.trust_dir()) {
            println!("restart a running agent so that it keeps them fresh (it reads {} at start)", config.display());
        }
    }
    Ok(())
}

/// The pivot file in the trust dir `dir`, if there is one: root's own
/// record of the pivot, its pin and the device.
fn recorded_pivot(dir: &Path) -> Result<Option<PivotFile>> {
    let dir = match TrustDir::open(dir) {
        Err(DirError::Missing(_)) => return Ok(None),
        opened => opened?,
    };
    match PivotFile::load(&dir) {
        Ok(pivot) => Ok(Some(pivot)),
        Err(TrustError::NoPivotFile(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Says where the agent config disagrees with the pivot file root uses:
/// a config edited by the agent's user, or left over from an earlier
/// enrollment. Nothing in it is used but to say so.
fn warn_if_different(file: &AgentFile, config: &Path, pivot: &PivotFile, trust_dir: &Path) {
    let mut differs = Vec::new();
    if file.id != pivot.id {
        differs.push(format!("id '{}', not '{}'", printable(&file.id), pivot.id));
    }
    if !pivot.pivots.contains(&file.server) {
        differs.push(format!("server '{}', not '{}'", printable(&file.server), pivot.pivots.join(", ")));
    }
    // Only a fingerprint: a path there is not for root to open.
    let pin =
        file.pivot_host_key.starts_with("SHA256:").then(|| HostKeyPin::parse(&file.pivot_host_key).ok()).flatten();
    let pin = pin.map(|p| p.fingerprint());
    if pin.as_deref() != Some(pivot.pivot_host_key.as_str()) {
        differs.push(format!("pivot_host_key '{}', not {}", printable(&file.pivot_host_key), pivot.pivot_host_key));
    }
    if file.key != pivot.key {
        differs.push(format!("key '{}', not '{}'", printable(&file.key.to_string_lossy()), pivot.key.display()));
    }
    if !differs.is_empty() {
        eprintln!(
            "warning: {} has {}; this run uses root's {} and nothing of that",
            config.display(),
            differs.join(", "),
            trust_dir.join(PIVOT_FILE).display()
        );
    }
}

/// A device enrolled before `enroll` wrote pivot.toml: its agent config
/// stands in for it only if no other user can have changed it.
fn roots_agent_file(config: &Path, trust_dir: &Path) -> Result<AgentFile> {
    let pivot_file = trust_dir.join(PIVOT_FILE);
    let bytes = match trust::read_roots_alone(config, MAX_AGENT_FILE) {
        Ok(bytes) => bytes,
        Err(FileError::Unsafe { path, why }) => {
            let dir = config.parent().unwrap_or(Path::new("/"));
            return Err(anyhow!(
                "there is no {pf}, and {config} cannot stand in for it: {path} {why}, so another user may have \
                 changed the pivot, pin or device in it. Check id, server, pivot_host_key and key in {config}, then \
                 either make it root's for this one run (`chown root:root {dir} {config} && chmod go-w {dir} {config}`, \
                 run this again, and give them back with `chown -R burrow-agent: {dir}`) or re-enroll the device as \
                 root, which writes {pf}",
                pf = pivot_file.display(),
                config = config.display(),
                dir = dir.display(),
            ));
        }
        Err(e) => {
            return Err(e)
                .context(format!("there is no {}, and the agent config cannot stand in", pivot_file.display()))
        }
    };
    let text = String::from_utf8(bytes).map_err(|_| anyhow!("{} is not UTF-8", config.display()))?;
    toml::from_str(&text).with_context(|| format!("{} is not a valid agent config", config.display()))
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
