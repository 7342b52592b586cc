//! `burrow-bench certificates`: what operator certificates cost.
//!
//! 1. Issuing: a pivot (SQLite) with `--operators` operators; each asks for
//!    one certificate over its own connection (the pivot allows an operator
//!    ten a minute), timed from the request to the answer: a registry
//!    transaction (serial, CA, record) and an ed25519 signature.
//! 2. Deciding on the device: the `principals` command sshd runs for each
//!    login, as a whole process (what a login waits for), for a certificate
//!    with one principal and one with 64, with the full `burrow` binary and,
//!    if given, the device-only `burrow-agent`.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use burrow_agent::pivot_client::{self, Credentials};
use burrow_core::cert::DeviceTrust;
use burrow_core::keys::generate_ed25519;
use burrow_core::rpc::{CertificateIssued, Request};
use burrow_core::HostKeyPin;
use burrow_testkit::{KeyPair, TestPivot};
use russh::keys::ssh_encoding::base64::{Base64, Encoding};

use crate::{ms, percentile};

pub struct Options {
    pub operators: usize,
    pub runs: usize,
    /// The device-only agent binary, if built.
    pub agent: Option<String>,
}

pub async fn run(bin: &str, o: Options) -> Result<()> {
    let pivot = TestPivot::start(bin);
    let dir = tempfile::tempdir()?;
    let pin = HostKeyPin::parse(pivot.host_key_pub().to_str().context("path")?)?;
    let mut keys = Vec::with_capacity(o.operators);
    for i in 0..o.operators {
        let kp = KeyPair::generate(dir.path(), &format!("op{i}"));
        pivot.admin_ok(&["operator", "add", &format!("op{i}"), "--key", kp.public.to_str().context("path")?]);
        keys.push(Arc::new(russh::keys::load_secret_key(&kp.private, None)?));
    }
    let addr = pivot.addr.to_string();
    let mut issue = Vec::with_capacity(o.operators);
    for (i, key) in keys.into_iter().enumerate() {
        let handle = pivot_client::connect(&addr, pin.clone(), &format!("op{i}"), &Credentials::Key(key)).await?;
        let t0 = Instant::now();
        let answer = pivot_client::call(&handle, &Request::Certificate).await?;
        issue.push(t0.elapsed());
        let _ = handle.disconnect(russh::Disconnect::ByApplication, "", "en").await;
        let _: CertificateIssued = serde_json::from_value(answer).context("not a certificate")?;
    }
    issue.sort();
    println!(
        "issue a certificate ({} operators): p50 {:.2} ms, p95 {:.2} ms",
        o.operators,
        ms(percentile(&issue, 0.5)),
        ms(percentile(&issue, 0.95))
    );

    // The device side: a trust dir as the agent writes it, and certificates
    // signed by a CA key of our own (the command checks no signature: sshd has).
    // The trust dir must be root's all the way up, as on a device.
    let safe =
        tempfile::Builder::new().prefix("burrow-bench-trust").tempdir_in("/run").context("a dir under /run (root)")?;
    std::fs::set_permissions(safe.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let trust = safe.path().join("trust");
    let labels: BTreeMap<String, String> =
        (0..8).map(|i| (format!("k{i}"), format!("v{i}"))).chain([("site".into(), "berlin".into())]).collect();
    let ca = generate_ed25519();
    let state = DeviceTrust {
        id: "cam-1".into(),
        labels,
        ca_keys: vec![burrow_core::keys::openssh_line(ca.public_key())],
        revoked_keys: vec![],
        pivot_time: burrow_core::time::now_unix(),
    };
    burrow_agent::trust::write(&trust, &state)?;
    let one = certificate(&ca, &["burrow:root:site=berlin".to_string()])?;
    let many: Vec<String> =
        (0..63).map(|i| format!("burrow:root:site=s{i}")).chain(["burrow:root:site=berlin".into()]).collect();
    let many = certificate(&ca, &many)?;
    let mut programs = vec![(bin.to_string(), vec!["agent".to_string()])];
    if let Some(agent) = &o.agent {
        programs.push((agent.clone(), vec![]));
    }
    for (program, prefix) in &programs {
        for (what, cert) in [("1 principal", &one), ("64 principals", &many)] {
            let mut times = Vec::with_capacity(o.runs);
            for _ in 0..o.runs {
                let t0 = Instant::now();
                let out = Command::new(program)
                    .args(prefix)
                    .args(["principals", "root", cert, "--trust-dir"])
                    .arg(&trust)
                    .output()?;
                times.push(t0.elapsed());
                let said = String::from_utf8_lossy(&out.stdout);
                if said.trim() != "burrow:root:site=berlin" {
                    bail!("{program} principals answered {said:?}");
                }
            }
            times.sort();
            let name = Path::new(program).file_name().and_then(|n| n.to_str()).unwrap_or(program);
            println!(
                "{name} {}principals, {what}: p50 {:.2} ms, p95 {:.2} ms ({} runs)",
                if prefix.is_empty() { "" } else { "agent " },
                ms(percentile(&times, 0.5)),
                ms(percentile(&times, 0.95)),
                o.runs
            );
        }
    }
    Ok(())
}

/// A user certificate for a fresh key with `principals`, base64 as sshd's `%k`.
fn certificate(ca: &russh::keys::PrivateKey, principals: &[String]) -> Result<String> {
    use russh::keys::ssh_key::certificate::{Builder, CertType};
    let subject = generate_ed25519();
    let now = burrow_core::time::now_unix() as u64;
    let mut b =
        Builder::new_with_random_nonce(&mut rand::rng(), subject.public_key().key_data().clone(), now, now + 3600)?;
    b.cert_type(CertType::User)?;
    for p in principals {
        b.valid_principal(p.clone())?;
    }
    let cert = b.sign(ca)?;
    Ok(Base64::encode_string(&cert.to_bytes()?))
}

pub const DEFAULT_OPERATORS: usize = 200;
pub const DEFAULT_RUNS: usize = 200;

pub fn parse(args: &[String]) -> Result<Options> {
    let mut o = Options { operators: DEFAULT_OPERATORS, runs: DEFAULT_RUNS, agent: None };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut val = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--operators" => o.operators = val()?.parse()?,
            "--runs" => o.runs = val()?.parse()?,
            "--agent" => o.agent = Some(val()?.clone()),
            other => bail!("unknown flag {other}"),
        }
    }
    Ok(o)
}
