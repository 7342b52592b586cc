//! On-demand mode: hold one MQTT connection, no SSH, until a pivot asks.
//!
//! The agent publishes retained presence (with an "offline" last will),
//! subscribes to its own request topic, and for each wake request that
//! verifies against the pinned pivot key (unexpired, addressed to this
//! device, nonce not seen before) dials the pivot the request names. When
//! the pivot closes the idle tunnel, the agent simply goes back to waiting.
//! A failed dial is reported on the status topic so the operator sees why.

use std::sync::Arc;
use std::time::Duration;

use burrow_core::signal::{login_token, Presence, ReplayGuard, Status, WakeRequest};
use burrow_core::time::now_unix;
use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::backoff::Backoff;
use crate::status::{State, StatusFile};
use crate::trust::Keeper;
use crate::{error_chain, session, AgentError, Config, SignalConfig};

/// How one tunnel ended, reported back to the MQTT loop.
struct TunnelEnd {
    req: WakeRequest,
    error: Option<String>,
    lasting: bool,
}

pub(crate) async fn run(
    config: Arc<Config>,
    shutdown: CancellationToken,
    status: Arc<StatusFile>,
    trust: Option<Arc<Keeper>>,
) -> Result<(), AgentError> {
    let signal = config.signal.clone().expect("on-demand mode has signaling");
    let id = config.id.to_string();
    let topics = signal.topics.clone();
    let mut opts = mqtt_options(&config, &signal)?;
    let will = serde_json::to_vec(&Presence::offline()).expect("presence serializes");
    opts.set_last_will(LastWill::new(topics.presence(&id), will, QoS::AtLeastOnce, true));
    // Small queue: this client publishes a presence or a status now and then.
    let (client, mut eventloop) = AsyncClient::new(opts, 16);
    // One tunnel at a time, so one result in flight.
    let (done_tx, mut done_rx) = mpsc::channel::<TunnelEnd>(1);
    // Kept next to the key, so a request captured off the broker cannot be
    // replayed after the agent restarts either.
    let replay_file = config.key_path.as_ref().map(|k| k.with_extension("replay"));
    let mut replay = replay_file
        .as_ref()
        .and_then(|f| std::fs::read_to_string(f).ok())
        .map(|t| ReplayGuard::from_json(&t))
        .unwrap_or_default();
    let mut tunnel: Option<CancellationToken> = None;
    let mut refusals = Refusals::default();
    let mut backoff = Backoff::new(config.backoff_initial, config.backoff_max);
    info!(device = %id, broker = %signal.url, "waiting for wake-ups over MQTT");
    let loopback =
        signal.url.host.parse::<std::net::IpAddr>().is_ok_and(|a| a.is_loopback()) || signal.url.host == "localhost";
    if !signal.url.tls && signal.password.is_none() && !loopback {
        warn!(
            "{} is plain MQTT: every login token crosses the network in the clear. A burrow pivot serves mqtts:// (give --mqtt-fingerprint)",
            signal.url
        );
    }

    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(end) = done_rx.recv() => {
                tunnel = None;
                match end.error {
                    None => {
                        info!(pivot = %end.req.pivot, "tunnel closed; waiting for wake-ups");
                        status.set(State::Waiting, None, None);
                    }
                    Some(reason) => {
                        // Each attempt answers an operator's request, so each
                        // is logged; the status keeps the last reason.
                        warn!(pivot = %end.req.pivot, "could not connect to the pivot: {reason}");
                        let state = if end.lasting { State::Refused } else { State::Waiting };
                        status.set(state, Some(reason.clone()), Some(&end.req.pivot));
                        let status = Status { nonce: end.req.nonce, pivot: end.req.pivot, state: "error".into(), reason: Some(reason), at: now_unix() };
                        let payload = serde_json::to_vec(&status).expect("status serializes");
                        let _ = client.try_publish(topics.status(&id), QoS::AtLeastOnce, false, payload);
                    }
                }
            }
            event = eventloop.poll() => match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    backoff.reset();
                    info!("connected to the MQTT broker");
                    if tunnel.is_none() {
                        status.set(State::Waiting, None, None);
                    }
                    let _ = client.try_subscribe(topics.request(&id), QoS::AtLeastOnce);
                    let presence = serde_json::to_vec(&Presence::online("on-demand", now_unix())).expect("presence serializes");
                    let _ = client.try_publish(topics.presence(&id), QoS::AtLeastOnce, true, presence);
                }
                Ok(Event::Incoming(Packet::Publish(p))) if p.topic == topics.request(&id) => {
                    let now = now_unix();
                    let req = match WakeRequest::verify(&p.payload, &config.pivot_host_key, &config.id, now)
                        .and_then(|req| replay.check(&req, now).map(|()| req))
                    {
                        Ok(req) => {
                            if let Some(f) = &replay_file {
                                save_replay(f, &replay);
                            }
                            req
                        }
                        Err(e) => {
                            // Logged and answered in a small burst, then one
                            // every 2 s: whoever can publish here cannot flood
                            // the log or make this device publish at will.
                            if !refusals.allow() {
                                debug!("refused a wake request: {e}");
                                continue;
                            }
                            warn!("refused a wake request: {e}");
                            // Tell the waiting operator why (not for a replay:
                            // nobody waits on an old nonce).
                            let replay = matches!(e, burrow_core::signal::SignalError::Replayed);
                            if let (Some(nonce), false) = (WakeRequest::claimed_nonce(&p.payload), replay) {
                                let status = Status { nonce, pivot: String::new(), state: "refused".into(), reason: Some(e.to_string()), at: now };
                                let payload = serde_json::to_vec(&status).expect("status serializes");
                                let _ = client.try_publish(topics.status(&id), QoS::AtLeastOnce, false, payload);
                            }
                            continue;
                        }
                    };
                    if tunnel.is_some() {
                        debug!(pivot = %req.pivot, "wake request while a tunnel is up; ignored");
                        continue;
                    }
                    info!(pivot = %req.pivot, "wake request; dialing the pivot");
                    status.set(State::Connecting, None, Some(&req.pivot));
                    let cancel = shutdown.child_token();
                    tunnel = Some(cancel.clone());
                    let (config, done) = (config.clone(), done_tx.clone());
                    let (status, trust) = (status.clone(), trust.clone());
                    tokio::spawn(async move {
                        let result = session::hold(config, &req.pivot, &cancel, &status, trust.as_deref()).await;
                        let lasting = result.as_ref().err().is_some_and(|e| e.is_lasting());
                        let error = result.err().map(|e| error_chain(&e));
                        let _ = done.send(TunnelEnd { req, error, lasting }).await;
                    });
                }
                Ok(_) => {}
                Err(e) => {
                    let mut delay = backoff.next_delay();
                    // A refusal that retrying will not fix (a revoked or
                    // unknown device, a stale certificate pin) is retried
                    // slowly: fast retries would only get this address
                    // banned, with every device behind the same NAT.
                    let lasting = match &e {
                        rumqttc::ConnectionError::ConnectionRefused(code) => {
                            !matches!(code, rumqttc::ConnectReturnCode::ServiceUnavailable)
                        }
                        other => other.to_string().contains("is not the pinned"),
                    };
                    if lasting {
                        delay = delay.max(config.refused_retry);
                        status.set(State::Refused, Some(format!("the MQTT broker refused the login: {e}")), None);
                    } else {
                        status.set(State::Retrying, Some(format!("MQTT broker unreachable: {e}")), None);
                    }
                    match &e {
                        rumqttc::ConnectionError::ConnectionRefused(code) => warn!(
                            "the MQTT broker refused the login ({code:?}): is this device registered, enrolled and not revoked? The pivot's log says why; retrying in {:.0}s",
                            delay.as_secs_f64()
                        ),
                        _ => warn!("MQTT broker unreachable ({e}); retrying in {:.1}s", delay.as_secs_f64()),
                    }
                    // A fresh login token for the next attempt: tokens are short-lived.
                    if signal.password.is_none() {
                        if let Ok(token) = login_token(&config.current_key(), &id, &audience(&signal), now_unix()) {
                            let user = signal.username.clone().unwrap_or_else(|| id.clone());
                            eventloop.mqtt_options.set_credentials(user, token);
                        }
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            },
        }
    }

    // Say goodbye explicitly; the last will covers the ungraceful case.
    if let Some(t) = tunnel {
        t.cancel();
    }
    let offline = serde_json::to_vec(&Presence::offline()).expect("presence serializes");
    let _ = client.try_publish(topics.presence(&id), QoS::AtLeastOnce, true, offline);
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Ok(ev) = eventloop.poll().await {
            if matches!(ev, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                break;
            }
        }
    })
    .await;
    info!("stopped");
    Ok(())
}

fn mqtt_options(config: &Config, signal: &SignalConfig) -> Result<MqttOptions, AgentError> {
    let id = config.id.to_string();
    let mut opts = MqttOptions::new(id.clone(), signal.url.host.clone(), signal.url.port);
    opts.set_keep_alive(config.keepalive_interval);
    opts.set_max_packet_size(burrow_core::signal::MAX_MQTT_PACKET, burrow_core::signal::MAX_MQTT_PACKET);
    opts.set_clean_session(true);
    let user = signal.username.clone().unwrap_or_else(|| id.clone());
    let password = match &signal.password {
        Some(p) => p.clone(),
        None => login_token(&config.key, &id, &audience(signal), now_unix()).unwrap_or_default(),
    };
    opts.set_credentials(user, password);
    match (signal.url.tls, signal.pin) {
        (true, Some(pin)) => {
            opts.set_transport(Transport::Tls(TlsConfiguration::Rustls(crate::tls::pinned_client_config(pin))))
        }
        (true, None) => {
            let (ca, client_auth) = signal.tls.load().map_err(AgentError::Tls)?;
            opts.set_transport(Transport::Tls(TlsConfiguration::Simple { ca, alpn: None, client_auth }))
        }
        (false, _) => &mut opts,
    };
    Ok(opts)
}

/// Lets a burst of 5 events through, then one every 2 seconds.
struct Refusals {
    tokens: f64,
    last: std::time::Instant,
}

impl Default for Refusals {
    fn default() -> Self {
        Refusals { tokens: 5.0, last: std::time::Instant::now() }
    }
}

impl Refusals {
    fn allow(&mut self) -> bool {
        let now = std::time::Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() / 2.0).min(5.0);
        self.last = now;
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }
}

/// Whom a login token is for: the pinned certificate of a pivot's own
/// broker, so no other pivot (or broker) can use it.
fn audience(signal: &SignalConfig) -> String {
    signal.pin.map(|p| p.to_string()).unwrap_or_default()
}

/// Writes the replay guard (0600, replaced atomically); a failure is logged
/// and the guard still holds in memory.
fn save_replay(path: &std::path::Path, guard: &ReplayGuard) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("replay.tmp");
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| f.write_all(guard.to_json().as_bytes()))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        warn!(path = %path.display(), error = %e, "cannot save the replay guard; it holds until restart only");
    }
}
