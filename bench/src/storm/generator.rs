//! A generator process: many devices, each the agent's own code
//! (`burrow_agent::run`), reporting their events on stdout.

use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use burrow_agent::{Event, EventHook, SessionError};
use burrow_core::{Expose, HostKeyPin, Id};
use tokio_util::sync::CancellationToken;

use super::now_ns;
use crate::mqtt_hold::{device_id, device_key};

/// `storm-devices PIVOT PIN FIRST COUNT RAMP`: runs devices FIRST.. as
/// agents of the pivot at PIVOT (host key file PIN), starting at most RAMP
/// at a time until each has had its first outcome, and reports their events
/// on stdout until stdin closes.
pub async fn generator(args: &[String]) -> Result<()> {
    let [pivot, pin, first, count, ramp] = args else {
        bail!("usage: burrow-bench storm-devices PIVOT PIN FIRST COUNT RAMP")
    };
    let (first, count, ramp): (usize, usize, usize) = (first.parse()?, count.parse()?, ramp.parse()?);
    // Each device holds a descriptor, and one more while a probe is relayed.
    let nofile = burrow_server::limits::raise_nofile();
    println!("nofile {nofile}");
    let pin = HostKeyPin::parse(pin).context("the pivot's host key")?;

    // Stands in for every device's sshd: takes each connection and closes it.
    let target = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let expose = vec![Expose { port: 22, target: target.local_addr()?.to_string() }];
    tokio::spawn(async move {
        loop {
            if target.accept().await.is_err() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    });

    let shutdown = CancellationToken::new();
    let stdin_closed = tokio::task::spawn_blocking(|| {
        let mut buf = [0u8; 64];
        while std::io::stdin().read(&mut buf).is_ok_and(|n| n > 0) {}
    });
    let gate = Arc::new(tokio::sync::Semaphore::new(ramp.max(1)));
    for i in first..first + count {
        let permit = gate.clone().acquire_owned().await.expect("never closed");
        let mut config = burrow_agent::Config::new(
            Some(pivot.clone()),
            Id::parse(&device_id(i))?,
            device_key(i),
            pin.clone(),
            expose.clone(),
        );
        config.scan_host_keys = false;
        // The ramp's slot goes back at the device's first outcome.
        let slot = Mutex::new(Some(permit));
        config.on_event = Some(EventHook(Arc::new(move |e| {
            slot.lock().unwrap().take();
            report(i, &e);
        })));
        tokio::spawn(burrow_agent::run(config, shutdown.clone()));
    }
    stdin_closed.await?;
    shutdown.cancel();
    Ok(())
}

fn report(i: usize, e: &Event<'_>) {
    let ns = now_ns();
    match e {
        Event::TunnelUp => println!("up {i} {ns}"),
        Event::Ended { up: true, error } => {
            let (cause, detail) = match error {
                Some(e) => {
                    let (_, cause, detail) = classify(e);
                    (cause, detail)
                }
                None => ("closed by the pivot".into(), String::new()),
            };
            println!("down {i} {ns} {cause}\t{detail}");
        }
        Event::Ended { up: false, error } => {
            let (not_up, cause, detail) = match error {
                Some(e) => classify(e),
                None => (false, "closed before the tunnel came up".into(), String::new()),
            };
            let class = if not_up { "notup" } else { "other" };
            println!("fail {i} {ns} {class} {cause}\t{detail}");
        }
    }
}

/// (nothing listens yet?, a short cause, the error's whole text).
fn classify(e: &SessionError) -> (bool, String, String) {
    use std::io::ErrorKind::{ConnectionRefused, ConnectionReset};
    let mut detail = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        detail.push_str(": ");
        detail.push_str(&s.to_string());
        src = s.source();
    }
    let detail = detail.replace(['\t', '\n'], " ");
    let (not_up, cause) = match e {
        SessionError::Connect { source, .. } => {
            (matches!(source.kind(), ConnectionRefused | ConnectionReset), format!("TCP connect: {:?}", source.kind()))
        }
        SessionError::ConnectTimeout(_) => (false, "no connection or key exchange within the agent's timeout".into()),
        SessionError::HostKeyMismatch { .. } => (false, "host key mismatch".into()),
        SessionError::AuthRejected { .. } => (false, "device key refused".into()),
        SessionError::ForwardRefused { .. } => (false, "forward refused".into()),
        SessionError::Refused { .. } => (false, "refused by the pivot".into()),
        SessionError::Ssh(russh::Error::IO(io)) => (false, format!("SSH handshake: I/O {:?}", io.kind())),
        SessionError::Ssh(other) => (false, format!("SSH handshake: {other}")),
    };
    (not_up, cause, detail)
}
