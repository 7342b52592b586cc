//! Signaling: the pivot's side of on-demand tunnels.
//!
//! - `broker`: the embedded rumqttd, loopback only.
//! - `gate`: device-facing MQTT listener that authenticates and enforces topic ACLs.
//! - this module: the pivot's MQTT client (presence, status, wake requests),
//!   wake-up coordination, and closing idle on-demand tunnels.

mod broker;
mod gate;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use burrow_core::mqtt_url::{MqttUrl, TlsFiles};
use burrow_core::signal::{Presence, Status, Topics, WakeRequest};
use burrow_core::time::now_unix;
use burrow_core::Id;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use russh::keys::ssh_key::PrivateKey;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::router::Tunnel;
use crate::ssh::route::Refusal;
use crate::Shared;

/// Which broker the pivot signals through.
#[derive(Debug, Clone)]
pub enum BrokerConfig {
    /// rumqttd inside the pivot; devices connect to the listener passed to `run`.
    Embedded,
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
    #[error("cannot start the embedded MQTT broker")]
    Broker(#[source] std::io::Error),
    #[error("cannot read the MQTT TLS files")]
    Tls(#[source] std::io::Error),
    #[error("the embedded broker needs an MQTT listener")]
    NoListener,
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
    Failed(String),
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

pub(crate) struct Signal {
    config: SignalConfig,
    key: PrivateKey,
    client: AsyncClient,
    connected: AtomicBool,
    last_error: Mutex<String>,
    /// Only devices that published presence; bounded by the fleet size.
    presence: Mutex<HashMap<String, Seen>>,
    wakes: Mutex<HashMap<Id, PendingWake>>,
    /// Devices' sessions on the embedded broker, so revocation can end them.
    pub mqtt_sessions: MqttSessions,
}

/// Live device sessions on the devices' MQTT listener.
#[derive(Default)]
pub(crate) struct MqttSessions {
    next: std::sync::atomic::AtomicU64,
    // A std Mutex: map updates only, never across .await.
    by_n: Mutex<HashMap<u64, (Id, String, CancellationToken)>>,
}

/// One device's session; forgotten on drop.
pub(crate) struct MqttSession<'a> {
    sessions: &'a MqttSessions,
    n: u64,
    pub token: CancellationToken,
}

impl MqttSessions {
    pub fn open(&self, id: &Id, fingerprint: &str) -> MqttSession<'_> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let token = CancellationToken::new();
        self.by_n.lock().unwrap().insert(n, (id.clone(), fingerprint.to_string(), token.clone()));
        MqttSession { sessions: self, n, token }
    }

    /// `(device, key fingerprint, token)` of every live session.
    pub fn list(&self) -> Vec<(Id, String, CancellationToken)> {
        self.by_n.lock().unwrap().values().cloned().collect()
    }
}

impl Drop for MqttSession<'_> {
    fn drop(&mut self) {
        self.sessions.by_n.lock().unwrap().remove(&self.n);
    }
}

/// Builds the client; `drive` must run for it to connect.
pub(crate) fn setup(
    config: SignalConfig,
    key: PrivateKey,
    pivot_name: &str,
) -> Result<(Signal, EventLoop, Option<gate::Upstream>), SignalSetupError> {
    let client_id = format!("burrow-pivot-{pivot_name}-{}", std::process::id());
    let (mut opts, upstream) = match &config.broker {
        BrokerConfig::Embedded => {
            let secret: [u8; 24] = rand::random();
            let password: String = secret.iter().map(|b| format!("{b:02x}")).collect();
            let username = "burrow-internal".to_string();
            let addr = broker::start(&username, &password).map_err(SignalSetupError::Broker)?;
            let mut opts = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
            opts.set_credentials(username.clone(), password.clone());
            (opts, Some(gate::Upstream { addr, username, password }))
        }
        BrokerConfig::External { url, tls, username, password } => {
            let mut opts = MqttOptions::new(client_id, url.host.clone(), url.port);
            if url.tls {
                let (ca, client_auth) = tls.load().map_err(SignalSetupError::Tls)?;
                opts.set_transport(Transport::Tls(TlsConfiguration::Simple { ca, alpn: None, client_auth }));
            }
            if let Some(u) = username {
                opts.set_credentials(u.clone(), password.clone().unwrap_or_default());
            }
            (opts, None)
        }
    };
    opts.set_keep_alive(Duration::from_secs(15));
    // The same limit as the devices' listener: rumqttc's 10 KiB default made
    // one larger publish cost the whole fleet a reconnect.
    opts.set_max_packet_size(burrow_core::signal::MAX_MQTT_PACKET, burrow_core::signal::MAX_MQTT_PACKET);
    opts.set_clean_session(true);
    // Bounded request queue between the pivot and the MQTT event loop.
    let (client, eventloop) = AsyncClient::new(opts, 256);
    let signal = Signal {
        config,
        key,
        client,
        connected: AtomicBool::new(false),
        last_error: Mutex::new("not connected to the broker yet".into()),
        presence: Mutex::new(HashMap::new()),
        wakes: Mutex::new(HashMap::new()),
        mqtt_sessions: Default::default(),
    };
    Ok((signal, eventloop, upstream))
}

/// Starts the background tasks: the MQTT event loop, the device gate (for
/// the embedded broker) and the idle-tunnel reaper.
pub(crate) fn spawn(
    shared: &Arc<Shared>,
    eventloop: EventLoop,
    upstream: Option<gate::Upstream>,
    mqtt_listener: Option<TcpListener>,
    shutdown: &CancellationToken,
) -> Result<(), SignalSetupError> {
    let Some(signal) = shared.signal.clone() else { return Ok(()) };
    if let Some(upstream) = upstream {
        let listener = mqtt_listener.ok_or(SignalSetupError::NoListener)?;
        shared.tracker.spawn(gate::serve(
            shared.clone(),
            listener,
            upstream,
            signal.config.topics.clone(),
            shutdown.clone(),
        ));
    }
    shared.tracker.spawn(drive(shared.clone(), eventloop, shutdown.clone()));
    shared.tracker.spawn(reap_idle(shared.clone(), shutdown.clone()));
    Ok(())
}

async fn drive(shared: Arc<Shared>, mut eventloop: EventLoop, shutdown: CancellationToken) {
    let signal = shared.signal.clone().expect("drive runs only with signaling");
    let topics = signal.config.topics.clone();
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => {
                let _ = signal.client.try_disconnect();
                return;
            }
            ev = eventloop.poll() => ev,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                info!("connected to the MQTT broker");
                signal.connected.store(true, Ordering::Relaxed);
                // try_*: the event loop is this task, so never await the request queue here.
                let _ = signal.client.try_subscribe(topics.all_presence(), QoS::AtLeastOnce);
                let _ = signal.client.try_subscribe(topics.all_status(), QoS::AtLeastOnce);
            }
            Ok(Event::Incoming(Packet::Publish(p))) => on_publish(&shared, &signal, &p).await,
            Ok(_) => {}
            Err(e) => {
                if signal.connected.swap(false, Ordering::Relaxed) {
                    warn!(error = %e, "lost the MQTT broker");
                } else {
                    debug!(error = %e, "MQTT broker unreachable");
                }
                *signal.last_error.lock().unwrap() = e.to_string();
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
}

async fn on_publish(shared: &Shared, signal: &Signal, p: &rumqttc::Publish) {
    let Some((id, kind)) = signal.config.topics.parse(&p.topic) else { return };
    let Ok(id) = Id::parse(id) else { return };
    match kind {
        "presence" => {
            let Ok(presence) = serde_json::from_slice::<Presence>(&p.payload) else {
                debug!(device = %id, "unreadable presence");
                return;
            };
            // A live message happens now, by the pivot's clock. A retained
            // one tells an old state at a time only the device claims: not
            // trusted, so it moves no "last seen".
            let at = if p.retain { None } else { Some(now_unix()) };
            let seen =
                Seen { online: presence.is_online(), on_demand: presence.mode.as_deref() == Some("on-demand"), at };
            debug!(device = %id, online = seen.online, "presence");
            signal.presence.lock().unwrap().insert(id.to_string(), seen.clone());
            if let Err(e) = shared.registry.set_presence(&id, seen.online, at).await {
                warn!(device = %id, error = %e, "cannot record presence");
            }
        }
        "status" => {
            let Ok(status) = serde_json::from_slice::<Status>(&p.payload) else { return };
            if status.state == "error" {
                // Device-supplied text: escaped so it cannot forge log lines
                // or terminal output, and clipped.
                let reason = status.reason.unwrap_or_else(|| "unknown error".into());
                let reason = burrow_core::text::excerpt(&reason, 200);
                info!(device = %id, "device could not connect: {reason}");
                signal.fail(&id, &status.nonce, reason);
            }
        }
        _ => {}
    }
}

impl Signal {
    /// Why the broker cannot be used right now, if it cannot.
    pub(crate) fn unavailable(&self) -> Option<String> {
        if self.connected.load(Ordering::Relaxed) {
            return None;
        }
        Some(self.last_error.lock().unwrap().clone())
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

    fn fail(&self, id: &Id, nonce: &str, reason: String) {
        let mut wakes = self.wakes.lock().unwrap();
        if wakes.get(id).is_some_and(|p| p.nonce == nonce) {
            let p = wakes.remove(id).expect("checked above");
            let _ = p.tx.send(WakeEvent::Failed(reason));
        }
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
                    let req = WakeRequest::new(id, &self.config.advertise, now_unix(), timeout.as_secs() as i64 + 5);
                    let (tx, rx) = watch::channel(WakeEvent::Waiting);
                    wakes.insert(id.clone(), PendingWake { nonce: req.nonce.clone(), tx, published: Instant::now() });
                    (rx, Some(req))
                }
            }
        };
        if let Some(req) = request {
            info!(device = %id, pivot = %req.pivot, "waking device");
            if let Err(why) = self.publish_request(&req).await {
                self.fail(id, &req.nonce, String::new());
                return Err(Refusal::Signaling(why));
            }
        }
        loop {
            if let Some(t) = shared.router.tunnel(id) {
                if t.ports.contains(&port) {
                    return Ok(t);
                }
            }
            if let Some(req) = self.due_again(id, timeout) {
                info!(device = %id, "no answer to the wake request yet; publishing it again");
                if let Err(why) = self.publish_request(&req).await {
                    debug!(device = %id, "cannot publish the wake request again: {why}");
                }
            }
            let event = rx.borrow_and_update().clone();
            match event {
                WakeEvent::Failed(reason) if reason.is_empty() => {
                    return Err(Refusal::Signaling(self.last_error.lock().unwrap().clone()))
                }
                WakeEvent::Failed(reason) => return Err(Refusal::CouldNotConnect { id: id.clone(), reason }),
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
    fn due_again(&self, id: &Id, timeout: Duration) -> Option<WakeRequest> {
        let mut wakes = self.wakes.lock().unwrap();
        let p = wakes.get_mut(id)?;
        if p.published.elapsed() < WAKE_ATTEMPT || !matches!(*p.tx.borrow(), WakeEvent::Waiting) {
            return None;
        }
        let req = WakeRequest::new(id, &self.config.advertise, now_unix(), timeout.as_secs() as i64 + 5);
        p.nonce = req.nonce.clone();
        p.published = Instant::now();
        Some(req)
    }

    async fn publish_request(&self, req: &WakeRequest) -> Result<(), String> {
        if !self.connected.load(Ordering::Relaxed) {
            return Err(self.last_error.lock().unwrap().clone());
        }
        let payload = req.sign(&self.key).map_err(|e| e.to_string())?;
        let topic = self.config.topics.request(&req.device);
        self.client.publish(topic, QoS::AtLeastOnce, false, payload).await.map_err(|e| e.to_string())
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
