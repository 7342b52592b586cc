//! The devices' MQTT listener, served by the pivot itself.
//!
//! It serves only what burrow's topics need, framed and parsed by rumqttc's
//! MQTT 3.1.1 codec:
//! - CONNECT with the device's signed, single-use login token;
//! - QoS 0 and 1 (QoS 2 ends the connection);
//! - the device's presence and its last will, handled in process: nothing
//!   is stored for other subscribers, because there are none;
//! - keepalive: a device silent for 1.5 times its keepalive is dropped;
//! - a fixed ACL: a device publishes only to its own presence and status
//!   topics and subscribes only to its own request topic.
//!
//! Wake requests go straight to the device's connection and presence
//! straight to the pivot's handlers: no loopback hop, no internal account.
//! An idle device costs one task, one socket and one small [`Session`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use burrow_core::keys::parse_public_key;
use burrow_core::signal::{verify_login, LoginClaim, Topics, MAX_LOGIN_AGE};
use burrow_core::time::now_unix;
use burrow_core::Id;
use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4::{
    ConnAck, Connect, ConnectReturnCode, Packet, PubAck, Publish, SubAck, SubscribeReasonCode, UnsubAck,
};
use rumqttc::mqttbytes::{Error as CodecError, QoS};
use rumqttc::tokio_rustls::{rustls, TlsAcceptor};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::audit::AuditRecord;
use crate::Shared;

/// One limit for every MQTT endpoint burrow runs.
const MAX_PACKET: usize = burrow_core::signal::MAX_MQTT_PACKET;
/// Presence and status are a few hundred bytes of JSON.
const MAX_PAYLOAD: usize = 4096;
/// TLS handshake and CONNECT must both arrive within this (or within
/// `--login-grace-time`, if shorter).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Used when a device asks for no keepalive (0): it still may not sit silent forever.
const MAX_KEEPALIVE: Duration = Duration::from_secs(300);
/// Wake requests queued for one device; more means it is not reading.
const MAX_OUTBOX: usize = 8;
/// A write that cannot finish in this long means the peer stopped reading.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Publishes one device may make per [`PUBLISH_WINDOW`]; the agent makes a
/// handful per wake-up.
const MAX_PUBLISHES: u32 = 20;
const PUBLISH_WINDOW: Duration = Duration::from_secs(10);
/// Logins one device may make per minute (the agent makes one per
/// reconnect, backing off); more are refused as busy, not as failures.
const MAX_LOGINS_PER_MINUTE: u32 = 12;
/// Login tokens remembered per device.
const LOGINS_REMEMBERED: usize = 16;
/// Packets one session may send per [`PUBLISH_WINDOW`], pings included.
const MAX_PACKETS: u32 = 100;

#[derive(Debug, thiserror::Error)]
pub(crate) enum MqttError {
    #[error("connection closed")]
    Closed,
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
    #[error("the client refused the pivot's certificate ({0}); a device pinning an old --mqtt-fingerprint needs the one `burrow server` prints")]
    PinRefused(std::io::Error),
    #[error("device '{0}' sent its login without TLS to the TLS port; its token is now void. Give it mqtts:// and --mqtt-fingerprint")]
    Plaintext(String),
    #[error("no CONNECT within the login grace time")]
    ConnectTimeout,
    #[error("malformed MQTT: {0}")]
    Protocol(String),
    #[error("first packet is not CONNECT")]
    NotConnect,
    #[error("only MQTT 3.1.1 is served here")]
    Version,
    #[error("login refused: {0}")]
    Login(String),
    /// Refused for now, through no fault of the client's credentials.
    #[error("login deferred: {0}")]
    Busy(String),
    #[error("device '{id}' may not {what} '{topic}'")]
    Denied { id: Id, what: &'static str, topic: String },
    #[error("device '{0}' sent a payload over {MAX_PAYLOAD} bytes")]
    Oversized(Id),
    #[error("QoS 2 is not served here")]
    Qos2,
    #[error("silent for longer than 1.5 times its keepalive")]
    KeepAlive,
    #[error("not reading: a write did not finish within {}s", WRITE_TIMEOUT.as_secs())]
    WriteTimeout,
    #[error("more than {MAX_PUBLISHES} publishes or {MAX_PACKETS} packets in {}s", PUBLISH_WINDOW.as_secs())]
    TooFast,
    #[error("replaced by a newer connection of the same device")]
    TakenOver,
    #[error("device '{0}' was revoked or removed")]
    Revoked(Id),
}

impl MqttError {
    /// Before login, everything but a plain hang-up or a deferral counts
    /// toward a ban: also refusing our certificate (a stale pin) and a
    /// login sent without TLS, which the agent retries only every few
    /// minutes, under the ban's threshold.
    fn counts_as_failure(&self) -> bool {
        !matches!(self, MqttError::Closed | MqttError::Io(_) | MqttError::Busy(_))
    }
}

/// The devices connected now, and the login tokens already used.
pub(crate) struct Hub {
    sessions: Mutex<HashMap<Id, Arc<Session>>>,
    next: AtomicU64,
    used: Mutex<UsedLogins>,
    /// What login tokens must be signed for: this pivot's certificate pin
    /// (empty without TLS).
    audience: String,
}

/// One device's connection, as the rest of the pivot sees it.
pub(crate) struct Session {
    n: u64,
    pub fingerprint: String,
    subscribed: AtomicBool,
    next_pkid: AtomicU16,
    outbox: Mutex<Vec<Bytes>>,
    wake: Notify,
    /// Cancelled to end the connection (revocation, takeover).
    end: CancellationToken,
    ended_by: Mutex<Option<MqttError>>,
}

impl Session {
    /// Ends the session because its device was revoked, removed or re-keyed.
    pub fn revoke(&self, id: &Id) {
        self.close(MqttError::Revoked(id.clone()));
    }

    fn close(&self, why: MqttError) {
        self.ended_by.lock().unwrap().get_or_insert(why);
        self.end.cancel();
    }
}

/// Per device: the login tokens it used lately, and how often it logs in.
/// Only devices whose signature verified get an entry, so the map is
/// bounded by the fleet; each entry by [`LOGINS_REMEMBERED`].
#[derive(Default)]
struct UsedLogins {
    devices: HashMap<Id, DeviceLogins>,
    /// Pruned at most once a second.
    pruned_at: i64,
}

#[derive(Default)]
struct DeviceLogins {
    /// Tokens used, oldest first.
    tokens: std::collections::VecDeque<LoginClaim>,
    /// Tokens dated before this are refused: they might be forgotten ones.
    floor: i64,
    /// The minute `count` counts logins in.
    minute: i64,
    count: u32,
}

#[derive(Debug, PartialEq, Eq)]
enum LoginUse {
    First,
    Reused,
    /// Older than a token this device's memory had to let go of.
    TooOld,
    TooOften,
}

impl UsedLogins {
    fn check(&mut self, id: &Id, claim: LoginClaim, now: i64) -> LoginUse {
        if self.pruned_at != now {
            self.devices.retain(|_, d| {
                d.tokens.back().is_some_and(|c| c.issued_at.saturating_add(MAX_LOGIN_AGE) >= now)
                    || d.minute == now.div_euclid(60)
            });
            self.pruned_at = now;
        }
        let d = self.devices.entry(id.clone()).or_default();
        if d.minute != now.div_euclid(60) {
            (d.minute, d.count) = (now.div_euclid(60), 0);
        }
        if d.count >= MAX_LOGINS_PER_MINUTE {
            return LoginUse::TooOften;
        }
        if d.tokens.contains(&claim) {
            return LoginUse::Reused;
        }
        if claim.issued_at < d.floor {
            return LoginUse::TooOld;
        }
        d.count += 1;
        d.tokens.push_back(claim);
        if d.tokens.len() > LOGINS_REMEMBERED {
            let forgotten = d.tokens.pop_front().expect("not empty");
            d.floor = d.floor.max(forgotten.issued_at.saturating_add(1));
        }
        LoginUse::First
    }
}

impl Hub {
    pub fn new(audience: String) -> Self {
        Hub { sessions: Default::default(), next: Default::default(), used: Default::default(), audience }
    }

    /// `(device, key fingerprint, session)` of every connected device.
    pub fn list(&self) -> Vec<(Id, Arc<Session>)> {
        self.sessions.lock().unwrap().iter().map(|(id, s)| (id.clone(), s.clone())).collect()
    }

    pub fn connected(&self) -> usize {
        self.sessions.lock().unwrap().len()
    }

    /// Queues `payload` on `topic` (QoS 1) for the device, if it is connected
    /// and subscribed. Returns whether it was queued.
    pub fn deliver(&self, id: &Id, topic: &str, payload: Vec<u8>) -> bool {
        let Some(session) = self.sessions.lock().unwrap().get(id).cloned() else { return false };
        if !session.subscribed.load(Ordering::Relaxed) {
            return false;
        }
        let mut publish = Publish::new(topic, QoS::AtLeastOnce, payload);
        // Any id but 0 will do: nothing is retransmitted, PUBACKs are ignored.
        publish.pkid = session.next_pkid.fetch_add(1, Ordering::Relaxed).max(1);
        let mut out = BytesMut::new();
        if Packet::Publish(publish).write(&mut out, MAX_PACKET).is_err() {
            return false;
        }
        {
            let mut outbox = session.outbox.lock().unwrap();
            if outbox.len() >= MAX_OUTBOX {
                return false;
            }
            outbox.push(out.freeze());
        }
        session.wake.notify_one();
        true
    }

    fn open(&self, id: &Id, fingerprint: String) -> Arc<Session> {
        let session = Arc::new(Session {
            n: self.next.fetch_add(1, Ordering::Relaxed),
            fingerprint,
            subscribed: AtomicBool::new(false),
            next_pkid: AtomicU16::new(1),
            outbox: Mutex::new(Vec::new()),
            wake: Notify::new(),
            end: CancellationToken::new(),
            ended_by: Mutex::new(None),
        });
        let old = self.sessions.lock().unwrap().insert(id.clone(), session.clone());
        if let Some(old) = old {
            old.close(MqttError::TakenOver);
        }
        session
    }

    /// Forgets the session unless a newer one took its place; returns
    /// whether it was still the device's current one.
    fn close(&self, id: &Id, session: &Session) -> bool {
        let mut sessions = self.sessions.lock().unwrap();
        if sessions.get(id).is_some_and(|s| s.n == session.n) {
            sessions.remove(id);
            return true;
        }
        false
    }
}

pub(crate) async fn serve(
    shared: Arc<Shared>,
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: CancellationToken,
) {
    let tls = tls.map(TlsAcceptor::from);
    loop {
        // Devices' connections count against the same descriptor-derived
        // cap as SSH's, so a fleet cannot take the descriptors operators need.
        let permit = tokio::select! {
            _ = shutdown.cancelled() => return,
            p = shared.connections.clone().acquire_owned() => p.expect("semaphore is never closed"),
        };
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "mqtt accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // Devices' MQTT shares the SSH side's bans and unauthenticated slots:
        // a source cannot hold descriptors here that SSH needs.
        if shared.bans.banned(peer.ip()) {
            shared.metrics.dropped("banned");
            continue;
        }
        let slot = match shared.preauth.admit(crate::limits::source_of(peer.ip())) {
            Ok(slot) => slot,
            Err(why) => {
                shared.metrics.dropped(why.kind());
                continue;
            }
        };
        let (shared2, tls, cancel) = (shared.clone(), tls.clone(), shutdown.clone());
        // No span per connection: an idle device's task should carry as
        // little as possible (log lines name the device or the peer).
        shared.tracker.spawn(async move {
            let _permit = permit;
            // Handshake and login are boxed and freed once done: the
            // long-lived part of the task is the session loop alone.
            let established = tokio::select! {
                r = Box::pin(accept(&shared2, stream, peer, tls, slot)) => r,
                _ = cancel.cancelled() => return,
            };
            match established {
                Ok(device) => {
                    tokio::select! {
                        () = session(&shared2, device) => {}
                        _ = cancel.cancelled() => {}
                    }
                }
                Err(e) if e.counts_as_failure() => {
                    let why = burrow_core::text::excerpt(&format!("mqtt: {e}"), 200);
                    info!(%peer, "mqtt login failed: {why}");
                    let mut rec = AuditRecord::new("auth").outcome(false, Some(why));
                    rec.source = Some(peer.to_string());
                    rec.method = Some("mqtt".into());
                    crate::ssh::accept::count_failure(&shared2, peer, rec);
                }
                Err(e) => debug!(%peer, "mqtt connection closed before login: {e}"),
            }
        });
    }
}

/// A device that logged in: what its session needs, and nothing more (the
/// login token and the rest of CONNECT are gone).
struct Device {
    io: Framed<Box<dyn DeviceIo>>,
    peer: SocketAddr,
    id: Id,
    session: Arc<Session>,
    will: Option<Bytes>,
    keep_alive: u16,
}

/// TLS, CONNECT and login, within the login grace time.
async fn accept(
    shared: &Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    tls: Option<TlsAcceptor>,
    slot: crate::limits::PreAuthSlot,
) -> Result<Device, MqttError> {
    let _ = stream.set_nodelay(true);
    let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT.min(shared.config.limits.login_grace);
    let io: Box<dyn DeviceIo> = match tls {
        Some(acceptor) => {
            // A plain MQTT CONNECT (0x10; a TLS handshake starts with 0x16)
            // on the TLS port (an agent given mqtt://)
            // has just sent its login token in the clear: burn it, so
            // whoever saw it cannot use it, and say what to fix.
            let mut first = [0u8; 1];
            let peeked = tokio::time::timeout_at(deadline, stream.peek(&mut first)).await;
            if matches!(peeked, Ok(Ok(0))) {
                return Err(MqttError::Closed); // connect-and-close: a health check
            }
            if matches!(peeked, Ok(Ok(1))) && first[0] == 0x10 {
                return Err(plaintext_on_tls_port(shared, Framed::new(stream), deadline).await);
            }
            let stream = tokio::time::timeout_at(deadline, Box::pin(acceptor.accept(stream)))
                .await
                .map_err(|_| MqttError::ConnectTimeout)?
                .map_err(|e| match tls_alert(&e) {
                    // The client refused our certificate: a device with an
                    // out-of-date pin, not someone guessing logins.
                    true => MqttError::PinRefused(e),
                    false => MqttError::Tls(e),
                })?;
            Box::new(stream)
        }
        None => Box::new(stream),
    };
    log_in(shared, Framed::new(io), peer, deadline, slot).await
}

/// A device's byte stream, TLS or not. Boxed, so an idle device's task
/// holds a pointer, not the larger of the two stream types.
trait DeviceIo: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> DeviceIo for T {}

/// Whether a failed handshake ended with an alert from the client.
fn tls_alert(e: &std::io::Error) -> bool {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|e| matches!(e, rustls::Error::AlertReceived(_)))
}

/// Why a plain CONNECT on the TLS port was refused.
async fn plaintext_on_tls_port(
    shared: &Arc<Shared>,
    mut io: Framed<TcpStream>,
    deadline: tokio::time::Instant,
) -> MqttError {
    let packet = match tokio::time::timeout_at(deadline, io.next()).await {
        Err(_) => return MqttError::ConnectTimeout,
        Ok(Err(e)) => return e,
        Ok(Ok(p)) => p,
    };
    let Packet::Connect(connect) = packet else { return MqttError::NotConnect };
    let topics = shared.signal.as_ref().expect("signaling").topics().clone();
    let refusal = io.send(Packet::ConnAck(ConnAck::new(ConnectReturnCode::NotAuthorized, false)));
    let _ = tokio::time::timeout(Duration::from_secs(2), refusal).await;
    // Verifying the token marks it used; a forged one is an ordinary failure.
    match login(shared, &connect, &topics).await {
        Err((_, e)) => e,
        Ok(_) => MqttError::Plaintext(connect.client_id),
    }
}

/// A byte stream read as MQTT packets. The read buffer grows only as bytes
/// arrive (never to a length the peer merely claims) and is given back
/// when the connection goes idle.
struct Framed<S> {
    io: S,
    buf: BytesMut,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Framed<S> {
    fn new(io: S) -> Self {
        Framed { io, buf: BytesMut::new() }
    }

    /// The next packet. Cancel-safe: bytes read so far stay in the buffer.
    async fn next(&mut self) -> Result<Packet, MqttError> {
        loop {
            match Packet::read(&mut self.buf, MAX_PACKET) {
                Ok(packet) => {
                    if self.buf.is_empty() {
                        self.buf = BytesMut::new();
                    }
                    return Ok(packet);
                }
                Err(CodecError::InsufficientBytes(n)) => {
                    self.buf.reserve(n.min(4096));
                    match self.io.read_buf(&mut self.buf).await {
                        Ok(0) => return Err(MqttError::Closed),
                        Ok(_) => {}
                        // A TLS peer that hung up without close_notify.
                        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(MqttError::Closed),
                        Err(e) => return Err(e.into()),
                    }
                }
                Err(CodecError::InvalidProtocolLevel(_)) | Err(CodecError::InvalidProtocol) => {
                    return Err(MqttError::Version)
                }
                Err(e) => return Err(MqttError::Protocol(format!("{e:?}"))),
            }
        }
    }

    async fn send(&mut self, packet: Packet) -> Result<(), MqttError> {
        let mut out = BytesMut::new();
        packet.write(&mut out, MAX_PACKET).map_err(|e| MqttError::Protocol(format!("{e:?}")))?;
        self.send_raw(&out).await
    }

    /// Writes with a deadline: a peer that stops reading cannot hold the
    /// connection (and its place under the connection cap) forever.
    async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), MqttError> {
        let write = async {
            self.io.write_all(bytes).await?;
            self.io.flush().await
        };
        tokio::time::timeout(WRITE_TIMEOUT, write).await.map_err(|_| MqttError::WriteTimeout)??;
        Ok(())
    }
}

async fn log_in(
    shared: &Arc<Shared>,
    mut io: Framed<Box<dyn DeviceIo>>,
    peer: SocketAddr,
    deadline: tokio::time::Instant,
    slot: crate::limits::PreAuthSlot,
) -> Result<Device, MqttError> {
    let signal = shared.signal.clone().expect("the embedded broker runs with signaling");
    let hub = signal.hub().expect("the embedded broker has a hub");
    let topics = signal.topics().clone();
    let first = match tokio::time::timeout_at(deadline, io.next()).await {
        Err(_) => return Err(MqttError::ConnectTimeout),
        Ok(Err(MqttError::Version)) => {
            let refusal = io.send(Packet::ConnAck(ConnAck::new(ConnectReturnCode::RefusedProtocolVersion, false)));
            let _ = tokio::time::timeout(Duration::from_secs(2), refusal).await;
            return Err(MqttError::Version);
        }
        Ok(r) => r?,
    };
    let Packet::Connect(connect) = first else { return Err(MqttError::NotConnect) };
    let (id, fingerprint) = match login(shared, &connect, &topics).await {
        Ok(found) => found,
        Err((code, e)) => {
            let refusal = io.send(Packet::ConnAck(ConnAck::new(code, false)));
            let _ = tokio::time::timeout(Duration::from_secs(2), refusal).await;
            return Err(e);
        }
    };
    drop(slot);
    let session = hub.open(&id, fingerprint);
    info!(device = %id, %peer, "mqtt client connected");
    // Copied: the will is a slice of the whole CONNECT buffer.
    let will = connect.last_will.as_ref().map(|w| Bytes::copy_from_slice(&w.message));
    Ok(Device { io, peer, id, session, will, keep_alive: connect.keep_alive })
}

/// A logged-in device, until it leaves, is dropped or is revoked.
async fn session(shared: &Arc<Shared>, device: Device) {
    let Device { mut io, peer, id, session, will, keep_alive } = device;
    let signal = shared.signal.clone().expect("the embedded broker runs with signaling");
    let hub = signal.hub().expect("the embedded broker has a hub");
    // Revocation and takeover end the session even in the middle of a write.
    let result = tokio::select! {
        r = serve_device(shared, &mut io, &id, &session, keep_alive) => r,
        () = session.end.cancelled() => {
            Err(session.ended_by.lock().unwrap().take().unwrap_or(MqttError::Revoked(id.clone())))
        }
    };
    let current = hub.close(&id, &session);
    match &result {
        Ok(()) => info!(device = %id, "mqtt client disconnected"),
        Err(e @ (MqttError::Denied { .. } | MqttError::Oversized(_) | MqttError::Qos2 | MqttError::TooFast)) => {
            warn!(device = %id, %peer, "closing mqtt: {e}");
        }
        Err(e) => info!(device = %id, "mqtt client gone: {e}"),
    }
    // The last will, unless the device said goodbye or a newer connection
    // of the same device already speaks for it. After login, how a
    // connection ends is the device's business, not a ban's.
    if result.is_err() && current {
        if let Some(will) = &will {
            Box::pin(signal.on_device_message(shared, &id, "presence", will, true)).await;
        }
    }
}

/// Checks CONNECT: the client id is the device id, the login token is the
/// device's and unused, the will goes to its own presence topic.
async fn login(shared: &Shared, c: &Connect, topics: &Topics) -> Result<(Id, String), (ConnectReturnCode, MqttError)> {
    let bad = |why: String| (ConnectReturnCode::BadUserNamePassword, MqttError::Login(why));
    if c.protocol != rumqttc::mqttbytes::Protocol::V4 {
        return Err((ConnectReturnCode::RefusedProtocolVersion, MqttError::Version));
    }
    let refused = |why: String| (ConnectReturnCode::NotAuthorized, MqttError::Login(why));
    let Some(login) = &c.login else { return Err(bad("anonymous clients are not allowed".into())) };
    let id = Id::parse(&login.username).map_err(|e| bad(e.to_string()))?;
    if c.client_id != login.username {
        return Err(refused(format!("client id must be the device id '{id}'")));
    }
    let record = match shared.registry.device(&id).await {
        Ok(Some(r)) => r,
        Ok(None) => return Err(bad(format!("unknown device '{id}'"))),
        Err(e) => return Err((ConnectReturnCode::ServiceUnavailable, MqttError::Busy(format!("registry: {e}")))),
    };
    // Revoked and not enrolled get the same code as unknown: CONNACK tells
    // an unauthenticated client nothing about a device's state.
    if record.revoked_at.is_some() {
        return Err(bad(format!("device '{id}' is revoked")));
    }
    let registered = record.public_key.ok_or_else(|| bad(format!("device '{id}' has not enrolled")))?;
    let key = parse_public_key(&registered, "registered key").map_err(|e| refused(e.to_string()))?;
    let now = now_unix();
    let hub = shared.signal.as_ref().and_then(|s| s.hub()).expect("the embedded broker has a hub");
    let claim = verify_login(&login.password, &c.client_id, &hub.audience, &key, now)
        .map_err(|e| bad(format!("device '{id}': {e}")))?;
    let used = hub.used.lock().unwrap().check(&id, claim, now);
    match used {
        LoginUse::First => {}
        LoginUse::Reused => return Err(bad(format!("device '{id}': login token was already used"))),
        LoginUse::TooOld => return Err(bad(format!("device '{id}': login token is older than one already used"))),
        LoginUse::TooOften => {
            let why = format!("device '{id}' logged in more than {MAX_LOGINS_PER_MINUTE} times this minute");
            return Err((ConnectReturnCode::ServiceUnavailable, MqttError::Busy(why)));
        }
    }
    if let Some(will) = &c.last_will {
        if will.topic != topics.presence(id.as_str()) {
            return Err(refused(format!("device '{id}' may not leave a will on '{}'", excerpt(&will.topic))));
        }
        if will.qos == QoS::ExactlyOnce {
            return Err(refused("QoS 2 is not served here".into()));
        }
        if will.message.len() > MAX_PAYLOAD {
            return Err(refused(format!("device '{id}' left a will over {MAX_PAYLOAD} bytes")));
        }
    }
    Ok((id, burrow_core::fingerprint(&key)))
}

fn excerpt(s: &str) -> String {
    burrow_core::text::excerpt(s, 120)
}

async fn serve_device(
    shared: &Arc<Shared>,
    io: &mut Framed<Box<dyn DeviceIo>>,
    id: &Id,
    session: &Session,
    keep_alive: u16,
) -> Result<(), MqttError> {
    let signal = shared.signal.clone().expect("signaling");
    let topics = signal.topics();
    let (presence, status, request) =
        (topics.presence(id.as_str()), topics.status(id.as_str()), topics.request(id.as_str()));
    Box::pin(io.send(Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, false)))).await?;
    let keepalive = match keep_alive {
        0 => MAX_KEEPALIVE,
        s => Duration::from_secs(s as u64).min(MAX_KEEPALIVE),
    };
    let silence = keepalive + keepalive / 2;
    let timer = tokio::time::sleep(silence);
    tokio::pin!(timer);
    let (mut window, mut published, mut packets) = (tokio::time::Instant::now(), 0u32, 0u32);
    let mut resent = false;
    loop {
        let packet = tokio::select! {
            r = io.next() => r?,
            () = &mut timer => return Err(MqttError::KeepAlive),
            () = session.wake.notified() => {
                let queued = std::mem::take(&mut *session.outbox.lock().unwrap());
                for bytes in queued {
                    Box::pin(io.send_raw(&bytes)).await?;
                }
                continue;
            }
            () = session.end.cancelled() => {
                return Err(session.ended_by.lock().unwrap().take().unwrap_or(MqttError::Revoked(id.clone())));
            }
        };
        timer.as_mut().reset(tokio::time::Instant::now() + silence);
        if window.elapsed() > PUBLISH_WINDOW {
            (window, published, packets) = (tokio::time::Instant::now(), 0, 0);
        }
        packets += 1;
        if packets > MAX_PACKETS {
            return Err(MqttError::TooFast);
        }
        match packet {
            Packet::Publish(p) => {
                if p.qos == QoS::ExactlyOnce {
                    return Err(MqttError::Qos2);
                }
                if p.qos == QoS::AtLeastOnce && p.pkid == 0 {
                    return Err(MqttError::Protocol("packet identifier 0".into()));
                }
                published += 1;
                if published > MAX_PUBLISHES {
                    return Err(MqttError::TooFast);
                }
                let kind = if p.topic == presence {
                    "presence"
                } else if p.topic == status {
                    "status"
                } else {
                    return Err(MqttError::Denied { id: id.clone(), what: "publish to", topic: excerpt(&p.topic) });
                };
                if p.payload.len() > MAX_PAYLOAD {
                    return Err(MqttError::Oversized(id.clone()));
                }
                // Received now: live, whatever the retain flag says.
                Box::pin(signal.on_device_message(shared, id, kind, &p.payload, true)).await;
                if p.qos == QoS::AtLeastOnce {
                    Box::pin(io.send(Packet::PubAck(PubAck::new(p.pkid)))).await?;
                }
            }
            Packet::Subscribe(s) if s.pkid == 0 => return Err(MqttError::Protocol("packet identifier 0".into())),
            Packet::Subscribe(s) => {
                // A refused filter is answered, then the connection ends,
                // like any other step outside the ACL.
                let denied = s.filters.iter().find(|f| f.path != request);
                let codes = s
                    .filters
                    .iter()
                    .map(|f| match f.path == request {
                        true => SubscribeReasonCode::Success(f.qos.min_qos1()),
                        false => SubscribeReasonCode::Failure,
                    })
                    .collect();
                Box::pin(io.send(Packet::SubAck(SubAck::new(s.pkid, codes)))).await?;
                if let Some(f) = denied {
                    return Err(MqttError::Denied { id: id.clone(), what: "subscribe to", topic: excerpt(&f.path) });
                }
                // A wake-up may be waiting for exactly this device: sent on
                // the session's first subscription only.
                session.subscribed.store(true, Ordering::Relaxed);
                if !std::mem::replace(&mut resent, true) {
                    Box::pin(signal.resend_pending(id)).await;
                }
            }
            Packet::Unsubscribe(u) => {
                if u.topics.contains(&request) {
                    session.subscribed.store(false, Ordering::Relaxed);
                }
                Box::pin(io.send(Packet::UnsubAck(UnsubAck::new(u.pkid)))).await?;
            }
            Packet::PingReq => Box::pin(io.send(Packet::PingResp)).await?,
            Packet::PubAck(_) => {}
            Packet::Disconnect => return Ok(()),
            Packet::Connect(_) => return Err(MqttError::Protocol("second CONNECT".into())),
            other => return Err(MqttError::Protocol(format!("{:?} is not served here", packet_name(&other)))),
        }
    }
}

fn packet_name(p: &Packet) -> &'static str {
    match p {
        Packet::ConnAck(_) => "CONNACK",
        Packet::PubRec(_) | Packet::PubRel(_) | Packet::PubComp(_) => "QoS 2",
        Packet::SubAck(_) | Packet::UnsubAck(_) => "a server's ack",
        Packet::PingResp => "PINGRESP",
        _ => "this packet",
    }
}

trait MinQos1 {
    fn min_qos1(self) -> QoS;
}

impl MinQos1 for QoS {
    fn min_qos1(self) -> QoS {
        match self {
            QoS::AtMostOnce => QoS::AtMostOnce,
            _ => QoS::AtLeastOnce,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Whatever a client sends, framing answers without panicking and
        /// never buffers more than it was sent.
        #[test]
        fn framing_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let (mut client, server) = tokio::io::duplex(4096);
            rt.block_on(async {
                client.write_all(&bytes).await.unwrap();
                drop(client);
                let mut framed = Framed::new(server);
                while framed.next().await.is_ok() {}
                assert!(framed.buf.len() <= bytes.len());
            });
        }
    }

    #[tokio::test]
    async fn a_claimed_length_is_not_allocated_before_it_arrives() {
        let (mut client, server) = tokio::io::duplex(64);
        // PUBLISH claiming 60,000 bytes, then silence.
        client.write_all(&[0x30, 0xe0, 0xd4, 0x03, 0, 1]).await.unwrap();
        let mut framed = Framed::new(server);
        assert!(tokio::time::timeout(Duration::from_millis(50), framed.next()).await.is_err());
        assert!(framed.buf.capacity() <= 8192, "buffered {} bytes", framed.buf.capacity());
        // Over the limit: refused from the header alone.
        let (mut client, server) = tokio::io::duplex(64);
        client.write_all(&[0x30, 0xff, 0xff, 0xff, 0x7f]).await.unwrap();
        assert!(matches!(Framed::new(server).next().await, Err(MqttError::Protocol(_))));
    }

    #[test]
    fn a_login_token_is_used_once_and_logins_are_rationed_per_device() {
        let mut used = UsedLogins::default();
        let id = Id::parse("cam-42").unwrap();
        let claim = |t: i64, n: &str| LoginClaim { issued_at: t, nonce: n.into() };
        assert_eq!(used.check(&id, claim(1000, "ab"), 1000), LoginUse::First);
        assert_eq!(used.check(&id, claim(1000, "ab"), 1001), LoginUse::Reused);
        let other = Id::parse("cam-43").unwrap();
        assert_eq!(used.check(&other, claim(1000, "ab"), 1001), LoginUse::First);
        // A device gets MAX_LOGINS_PER_MINUTE a minute, then waits.
        let base = 6000; // a minute boundary
        for i in 0..MAX_LOGINS_PER_MINUTE - 1 {
            assert_eq!(used.check(&id, claim(base, &format!("{i:x}")), base), LoginUse::First);
        }
        assert_eq!(used.check(&id, claim(base, "ff0"), base), LoginUse::First);
        assert_eq!(used.check(&id, claim(base, "ff1"), base + 1), LoginUse::TooOften);
        // Its memory is bounded; what it let go of cannot come back.
        for m in 1..=3 {
            for i in 0..MAX_LOGINS_PER_MINUTE {
                let t = base + 60 * m;
                assert_eq!(used.check(&id, claim(t, &format!("{m}{i:x}")), t), LoginUse::First);
            }
        }
        let d = &used.devices[&id];
        assert!(d.tokens.len() <= LOGINS_REMEMBERED);
        assert_eq!(used.check(&id, claim(base, "ab0"), base + 240), LoginUse::TooOld);
        // Entries go once their tokens are too old to use anyway.
        used.check(&other, claim(base + 600, "x"), base + 600);
        assert!(!used.devices.contains_key(&id));
    }
}
