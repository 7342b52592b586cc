//! Signaling: the pivot's side of on-demand tunnels.
//!
//! - `embedded`: the devices' MQTT listener the pivot serves itself
//!   (the default), with `tls` making and loading its certificate.
//! - this module: the link to devices (that listener, or the pivot's MQTT
//!   client of an external broker), presence and status handling, wake-up
//!   coordination, and closing idle on-demand tunnels.

mod embedded;
mod tls;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use burrow_core::mqtt_url::{CertPin, MqttUrl, TlsFiles};
use burrow_core::signal::{Presence, Status, Topics, WakeRequest};
use burrow_core::time::now_unix;
use burrow_core::Id;
use rumqttc::tokio_rustls::rustls;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use russh::keys::ssh_key::PrivateKey;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub(crate) use embedded::Hub;
pub use tls::{CERT_FILE, KEY_FILE};

use crate::router::Tunnel;
use crate::ssh::route::Refusal;
use crate::Shared;

/// Which broker the pivot signals through.
#[derive(Debug, Clone)]
pub enum BrokerConfig {
    /// The pivot serves devices' MQTT on the listener passed to `run`:
    /// over TLS with a certificate it keeps in its data dir, unless
    /// `plaintext` (for tests on loopback).
    Embedded { plaintext: bool },
    /// Mosquitto, EMQX, AWS IoT Core…
    External { url: MqttUrl, tls: TlsFiles, username: Option<String>, password: Option<String> },
}

#[derive(Debug, Clone)]
pub struct SignalConfig {
    pub broker: BrokerConfig,
    pub topics: Topics,
    /// `HOST:PORT` devices are told to dial.
    pub advertise: String,
    pub wake_timeout: Duration,
    pub idle_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum SignalSetupError {
    #[error("cannot set up the embedded broker's TLS")]
    Certificate(#[from] tls::TlsSetupError),
    #[error("cannot read the MQTT TLS files")]
    Tls(#[source] std::io::Error),
    #[error("the embedded broker needs an MQTT listener")]
    NoListener,
}

/// The embedded broker's certificate fingerprint in `dir`, made if missing:
/// what `burrow server` prints and enrollment tokens carry.
pub fn certificate_pin(dir: &Path) -> Result<CertPin, SignalSetupError> {
    Ok(tls::load_or_create(dir)?.1)
}

/// What the pivot last heard about a device's presence.
#[derive(Debug, Clone)]
pub(crate) struct Seen {
    pub online: bool,
    pub on_demand: bool,
    pub at: Option<i64>,
}

#[derive(Debug, Clone)]
enum WakeEvent {
    Waiting,
    Bound,
    /// Empty reason: the broker failed. `refused`: the agent said no.
    Failed {
        refused: bool,
        reason: String,
    },
}

struct PendingWake {
    nonce: String,
    tx: watch::Sender<WakeEvent>,
    /// When the current request went out.
    published: Instant,
}

/// How long a wake request may go unanswered before it is published again
/// (with a fresh nonce) for the operators still waiting: a device that
/// missed one (its MQTT session was being replaced, say) gets another.
const WAKE_ATTEMPT: Duration = Duration::from_secs(4);

/// How the pivot reaches devices.
enum Link {
    /// Devices connect to this pivot's own listener.
    Embedded { hub: Hub, pin: Option<CertPin> },
    /// The pivot is a client of a shared broker.
    External { client: AsyncClient, connected: AtomicBool, last_error: Mutex<String> },
}

pub(crate) struct Signal {
    config: SignalConfig,
    key: PrivateKey,
    link: Link,
    /// Only devices that published presence; bounded by the fleet size.
    presence: Mutex<HashMap<String, Seen>>,
    wakes: Mutex<HashMap<Id, PendingWake>>,
}

/// What `spawn` needs to start the link.
pub(crate) enum Driver {
    Embedded(Option<Arc<rustls::ServerConfig>>),
    External(Box<EventLoop>),
}

/// Builds the link; `spawn` starts it.
pub(crate) fn setup(
    config: SignalConfig,
    key: PrivateKey,
    pivot_name: &str,
    data_dir: &Path,
) -> Result<(Signal, Driver), SignalSetupError> {
    let (link, driver) = match &config.broker {
        BrokerConfig::Embedded { plaintext } => {
            let (tls, pin) = match plaintext {
                true => (None, None),
                false => {
                    let (tls, pin) = tls::load_or_create(data_dir)?;
                    (Some(tls), Some(pin))
                }
            };
            let audience = pin.map(|p| p.to_string()).unwrap_or_default();
            (Link::Embedded { hub: Hub::new(audience), pin }, Driver::Embedded(tls))
        }
        BrokerConfig::External { url, tls, username, password } => {
            let client_id = format!("burrow-pivot-{pivot_name}-{}", std::process::id());
            let mut opts = MqttOptions::new(client_id, url.host.clone(), url.port);
            if url.tls {
                let (ca, client_auth) = tls.load().map_err(SignalSetupError::Tls)?;
                opts.set_transport(Transport::Tls(TlsConfiguration::Simple { ca, alpn: None, client_auth }));
            }
            if let Some(u) = username {
                opts.set_credentials(u.clone(), password.clone().unwrap_or_default());
            }
            opts.set_keep_alive(Duration::from_secs(15));
            // The same limit as the devices' listener: rumqttc's 10 KiB default made
            // one larger publish cost the whole fleet a reconnect.
            opts.set_max_packet_size(burrow_core::signal::MAX_MQTT_PACKET, burrow_core::signal::MAX_MQTT_PACKET);
            opts.set_clean_session(true);
            // Bounded request queue between the pivot and the MQTT event loop.
            let (client, eventloop) = AsyncClient::new(opts, 256);
            let link = Link::External {
                client,
                connected: AtomicBool::new(false),
                last_error: Mutex::new("not connected to the broker yet".into()),
            };
            (link, Driver::External(Box::new(eventloop)))
        }
    };
    let signal = Signal { config, key, link, presence: Mutex::new(HashMap::new()), wakes: Mutex::new(HashMap::new()) };
    Ok((signal, driver))
}

/// Starts the background tasks: the devices' listener or the MQTT client,
/// and the idle-tunnel reaper.
pub(crate) fn spawn(
    shared: &Arc<Shared>,
    driver: Driver,
    mqtt_listener: Option<TcpListener>,
    shutdown: &CancellationToken,
) -> Result<(), SignalSetupError> {
    if shared.signal.is_none() {
        return Ok(());
    }
    match driver {
        Driver::Embedded(tls) => {
            let listener = mqtt_listener.ok_or(SignalSetupError::NoListener)?;
            shared.tracker.spawn(embedded::serve(shared.clone(), listener, tls, shutdown.clone()));
        }
        Driver::External(eventloop) => {
            shared.tracker.spawn(drive(shared.clone(), *eventloop, shutdown.clone()));
        }
    }
    shared.tracker.spawn(reap_idle(shared.clone(), shutdown.clone()));
    Ok(())
}

/// The pivot's client of an external broker.
async fn drive(shared: Arc<Shared>, mut eventloop: EventLoop, shutdown: CancellationToken) {
    let signal = shared.signal.clone().expect("drive runs only with signaling");
    let Link::External { client, connected, last_error } = &signal.link else { return };
    let topics = signal.config.topics.clone();
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => {
                let _ = client.try_disconnect();
                return;
            }
            ev = eventloop.poll() => ev,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                info!("connected to the MQTT broker");
                connected.store(true, Ordering::Relaxed);
                // try_*: the event loop is this task, so never await the request queue here.
                let _ = client.try_subscribe(topics.all_presence(), QoS::AtLeastOnce);
                let _ = client.try_subscribe(topics.all_status(), QoS::AtLeastOnce);
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let Some((id, kind)) = topics.parse(&p.topic) else { continue };
                let Ok(id) = Id::parse(id) else { continue };
                // A retained message tells an old state at a time only the
                // device claims: it moves no "last seen".
                signal.on_device_message(&shared, &id, kind, &p.payload, !p.retain).await;
            }
            Ok(_) => {}
            Err(e) => {
                if connected.swap(false, Ordering::Relaxed) {
                    warn!(error = %e, "lost the MQTT broker");
                } else {
                    debug!(error = %e, "MQTT broker unreachable");
                }
                *last_error.lock().unwrap() = e.to_string();
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
}

impl Signal {
    /// Why the broker cannot be used right now, if it cannot.
    pub(crate) fn unavailable(&self) -> Option<String> {
        match &self.link {
            Link::Embedded { .. } => None,
            Link::External { connected, .. } if connected.load(Ordering::Relaxed) => None,
            Link::External { last_error, .. } => Some(last_error.lock().unwrap().clone()),
        }
    }

    pub(crate) fn hub(&self) -> Option<&Hub> {
        match &self.link {
            Link::Embedded { hub, .. } => Some(hub),
            Link::External { .. } => None,
        }
    }

    /// The embedded broker's certificate pin, when it serves TLS.
    pub(crate) fn certificate_pin(&self) -> Option<CertPin> {
        match &self.link {
            Link::Embedded { pin, .. } => *pin,
            Link::External { .. } => None,
        }
    }

    pub(crate) fn topics(&self) -> &Topics {
        &self.config.topics
    }

    /// A device's presence or status message. `live`: it happened now, by
    /// the pivot's clock; otherwise (retained) it moves no "last seen".
    /// Everything in it is the device's word: parsed strictly, and its
    /// text escaped and clipped before it reaches a log or an operator.
    pub(crate) async fn on_device_message(&self, shared: &Shared, id: &Id, kind: &str, payload: &[u8], live: bool) {
        match kind {
            "presence" => {
                let Ok(presence) = serde_json::from_slice::<Presence>(payload) else {
                    debug!(device = %id, "unreadable presence");
                    return;
                };
                let at = live.then(now_unix);
                let seen =
                    Seen { online: presence.is_online(), on_demand: presence.mode.as_deref() == Some("on-demand"), at };
                debug!(device = %id, online = seen.online, "presence");
                let before = self.presence.lock().unwrap().insert(id.to_string(), seen.clone());
                // The registry hears of a change at once and of the same
                // state at most once a minute: a chatty device costs no writes.
                let same = before.as_ref().is_some_and(|b| {
                    b.online == seen.online
                        && b.on_demand == seen.on_demand
                        && b.at.zip(at).is_some_and(|(b, a)| a.saturating_sub(b) < 60)
                });
                if same {
                    // Keep the older time, so the minute runs from the last write.
                    if let Some(p) = self.presence.lock().unwrap().get_mut(id.as_str()) {
                        p.at = before.as_ref().and_then(|b| b.at);
                    }
                    return;
                }
                if let Err(e) = shared.registry.set_presence(id, seen.online, at).await {
                    warn!(device = %id, error = %e, "cannot record presence");
                }
            }
            "status" => {
                let Ok(status) = serde_json::from_slice::<Status>(payload) else { return };
                let refused = match status.state.as_str() {
                    "error" => false,
                    "refused" => true,
                    _ => return,
                };
                let reason = status.reason.filter(|r| !r.trim().is_empty()).unwrap_or_else(|| "no reason given".into());
                let reason = burrow_core::text::excerpt(&reason, 200);
                // Logged only when it answers a wake-up under way: anything
                // else is noise a device could make at will.
                if self.fail(id, &status.nonce, refused, reason.clone()) {
                    match refused {
                        true => info!(device = %id, "device refused the wake request: {reason}"),
                        false => info!(device = %id, "device could not connect: {reason}"),
                    }
                }
            }
            _ => {}
        }
    }

    /// Sends a fresh request at once if operators wait on `id`: called when
    /// the device (re)subscribes, so a wake-up it missed while away is not
    /// left to the next attempt.
    pub(crate) async fn resend_pending(&self, id: &Id) {
        let req = {
            let mut wakes = self.wakes.lock().unwrap();
            let Some(p) = wakes.get_mut(id) else { return };
            if !matches!(*p.tx.borrow(), WakeEvent::Waiting) {
                return;
            }
            let req = self.new_request(id);
            p.nonce = req.nonce.clone();
            p.published = Instant::now();
            req
        };
        info!(device = %id, "device is back; sending the pending wake request");
        if let Err(why) = self.publish_request(&req).await {
            debug!(device = %id, "cannot send the pending wake request: {why}");
        }
    }

    fn new_request(&self, id: &Id) -> WakeRequest {
        let ttl = self.config.wake_timeout.as_secs() as i64 + 5;
        WakeRequest::new(id, &self.config.advertise, now_unix(), ttl)
    }

    pub(crate) fn presence(&self, id: &Id) -> Option<Seen> {
        self.presence.lock().unwrap().get(id.as_str()).cloned()
    }

    /// Called when a device binds a port: wakes every operator waiting on it.
    pub(crate) fn tunnel_bound(&self, id: &Id) {
        if let Some(p) = self.wakes.lock().unwrap().remove(id) {
            let _ = p.tx.send(WakeEvent::Bound);
        }
    }

    /// Ends the wake-up of `id` if `nonce` is its current request's.
    fn fail(&self, id: &Id, nonce: &str, refused: bool, reason: String) -> bool {
        let mut wakes = self.wakes.lock().unwrap();
        if wakes.get(id).is_some_and(|p| p.nonce == nonce) {
            let p = wakes.remove(id).expect("checked above");
            let _ = p.tx.send(WakeEvent::Failed { refused, reason });
            return true;
        }
        false
    }

    /// Wakes the device (or joins a wake-up already under way) and waits
    /// until its tunnel serves `port`.
    pub(crate) async fn wake(&self, shared: &Shared, id: &Id, port: u32) -> Result<Tunnel, Refusal> {
        let timeout = self.config.wake_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let (mut rx, request) = {
            let mut wakes = self.wakes.lock().unwrap();
            match wakes.get(id) {
                Some(p) => (p.tx.subscribe(), None),
                None => {
                    let req = self.new_request(id);
                    let (tx, rx) = watch::channel(WakeEvent::Waiting);
                    wakes.insert(id.clone(), PendingWake { nonce: req.nonce.clone(), tx, published: Instant::now() });
                    (rx, Some(req))
                }
            }
        };
        if let Some(req) = request {
            info!(device = %id, pivot = %req.pivot, "waking device");
            if let Err(why) = self.publish_request(&req).await {
                self.fail(id, &req.nonce, false, String::new());
                return Err(Refusal::Signaling(why));
            }
        }
        loop {
            if let Some(t) = shared.router.tunnel(id) {
                if t.ports.contains(&port) {
                    return Ok(t);
                }
            }
            if let Some(req) = self.due_again(id) {
                info!(device = %id, "no answer to the wake request yet; publishing it again");
                if let Err(why) = self.publish_request(&req).await {
                    debug!(device = %id, "cannot publish the wake request again: {why}");
                }
            }
            let event = rx.borrow_and_update().clone();
            match event {
                WakeEvent::Failed { reason, .. } if reason.is_empty() => {
                    return Err(Refusal::Signaling(self.unavailable().unwrap_or_default()))
                }
                WakeEvent::Failed { refused: true, reason } => {
                    return Err(Refusal::WakeRefused { id: id.clone(), reason })
                }
                WakeEvent::Failed { refused: false, reason } => {
                    return Err(Refusal::CouldNotConnect { id: id.clone(), reason })
                }
                WakeEvent::Waiting => {}
                // Bound, but maybe not this port yet: the agent binds its ports one by one.
                WakeEvent::Bound => {
                    if tokio::time::timeout_at(deadline, tokio::time::sleep(Duration::from_millis(20))).await.is_err() {
                        break;
                    }
                    continue;
                }
            }
            // Wake up for the next attempt too, not only for news.
            let until = deadline.min(tokio::time::Instant::now() + WAKE_ATTEMPT);
            match tokio::time::timeout_at(until, rx.changed()).await {
                Err(_) if until < deadline => continue,
                Ok(Ok(())) => {}
                // The wake-up ended (bound or failed) and its sender is gone: poll the router.
                Ok(Err(_)) => {
                    if tokio::time::timeout_at(deadline, tokio::time::sleep(Duration::from_millis(20))).await.is_err() {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        let mut wakes = self.wakes.lock().unwrap();
        if wakes.get(id).is_some_and(|p| p.tx.receiver_count() <= 1) {
            wakes.remove(id);
        }
        Err(Refusal::NoAnswer { id: id.clone(), secs: timeout.as_secs() })
    }

    /// A fresh request for `id` if its current one went unanswered for
    /// [`WAKE_ATTEMPT`]; at most one per attempt, whoever is waiting.
    fn due_again(&self, id: &Id) -> Option<WakeRequest> {
        let mut wakes = self.wakes.lock().unwrap();
        let p = wakes.get_mut(id)?;
        if p.published.elapsed() < WAKE_ATTEMPT || !matches!(*p.tx.borrow(), WakeEvent::Waiting) {
            return None;
        }
        let req = self.new_request(id);
        p.nonce = req.nonce.clone();
        p.published = Instant::now();
        Some(req)
    }

    async fn publish_request(&self, req: &WakeRequest) -> Result<(), String> {
        if let Some(why) = self.unavailable() {
            return Err(why);
        }
        let payload = req.sign(&self.key).map_err(|e| e.to_string())?;
        let topic = self.config.topics.request(&req.device);
        match &self.link {
            Link::Embedded { hub, .. } => {
                // Not connected now: the next attempt, or the device's
                // return (`resend_pending`), delivers a fresh one.
                if let Ok(id) = Id::parse(&req.device) {
                    if !hub.deliver(&id, &topic, payload) {
                        debug!(device = %id, "device not on MQTT right now; will retry");
                    }
                }
                Ok(())
            }
            Link::External { client, .. } => {
                client.publish(topic, QoS::AtLeastOnce, false, payload).await.map_err(|e| e.to_string())
            }
        }
    }
}

/// Closes on-demand tunnels that carried no channel for `idle_timeout`. The
/// route goes first, so a new operator triggers a fresh wake-up instead of
/// racing the disconnect.
async fn reap_idle(shared: Arc<Shared>, shutdown: CancellationToken) {
    let signal = shared.signal.clone().expect("reaper runs only with signaling");
    let idle_timeout = signal.config.idle_timeout;
    let mut tick = tokio::time::interval(Duration::from_millis(500).min(idle_timeout));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        for (id, tunnel) in shared.router.tunnels() {
            let on_demand = signal.presence(&id).is_some_and(|s| s.on_demand);
            if !on_demand || !tunnel.activity.idle_for(idle_timeout, Instant::now()) {
                continue;
            }
            if !shared.router.drop_tunnel(&id, tunnel.conn) {
                continue;
            }
            info!(device = %id, "tunnel idle for {idle_timeout:?}; closing");
            if let Err(e) = shared.registry.tunnel_down(&id, &shared.config.pivot_name).await {
                warn!(device = %id, error = %e, "could not record tunnel close");
            }
            let why = format!("tunnel idle for {}s", idle_timeout.as_secs());
            let _ = tunnel.handle.disconnect(russh::Disconnect::ByApplication, why, "en".into()).await;
        }
    }
}
