//! The gate in front of the embedded broker: it authenticates each MQTT
//! client with its device key and lets it touch only its own topics.
//!
//! rumqttd has no per-client ACL, so devices never reach it directly. The
//! gate reads the CONNECT packet, checks the device's signed login token
//! against the registry, swaps the credentials for the broker's internal
//! ones, then forwards packets: everything from the broker as is, and from
//! the device only SUBSCRIBE to its request topic and PUBLISH to its presence
//! and status topics. Anything else closes the connection.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use burrow_core::keys::parse_public_key;
use burrow_core::signal::{verify_login, Topics};
use burrow_core::time::now_unix;
use burrow_core::Id;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use crate::audit::AuditRecord;
use crate::Shared;

/// Devices send small control messages; anything bigger is abuse.
const MAX_PACKET: usize = burrow_core::signal::MAX_MQTT_PACKET;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

const CONNECT: u8 = 1;
const PUBLISH: u8 = 3;
const SUBSCRIBE: u8 = 8;
const DISCONNECT: u8 = 14;

#[derive(Debug, thiserror::Error)]
pub(crate) enum GateError {
    #[error("io")]
    Io(#[from] std::io::Error),
    #[error("malformed MQTT packet")]
    Malformed,
    #[error("packet larger than {MAX_PACKET} bytes")]
    TooLarge,
    #[error("first packet is not CONNECT")]
    NotConnect,
    #[error("only MQTT 3.1.1 is accepted here")]
    Version,
    #[error("login refused: {0}")]
    Login(String),
    #[error("device '{id}' may not {what} '{topic}'")]
    Denied { id: String, what: &'static str, topic: String },
}

/// Where the gate forwards to, and the credentials it presents there.
#[derive(Clone)]
pub(crate) struct Upstream {
    pub addr: SocketAddr,
    pub username: String,
    pub password: String,
}

pub(crate) async fn serve(
    shared: Arc<Shared>,
    listener: TcpListener,
    upstream: Upstream,
    topics: Topics,
    shutdown: CancellationToken,
) {
    loop {
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
        let (shared, upstream, topics, cancel) =
            (shared.clone(), upstream.clone(), topics.clone(), shutdown.child_token());
        let span = tracing::info_span!("mqtt", %peer);
        shared.clone().tracker.spawn(
            async move {
                let authed = AtomicBool::new(false);
                tokio::select! {
                    r = client(&shared, stream, &upstream, &topics, slot, &authed) => {
                        if let Err(e) = r {
                            debug!("mqtt client closed: {e}");
                            // Before login, anything but a plain hang-up
                            // counts toward a ban, as on the SSH port.
                            let before_login = !authed.load(Ordering::Relaxed);
                            if before_login && !matches!(e, GateError::Io(_)) {
                                let why = burrow_core::text::excerpt(&format!("mqtt: {e}"), 200);
                                info!(%peer, "mqtt login failed: {why}");
                                let mut rec = AuditRecord::new("auth").outcome(false, Some(why));
                                rec.source = Some(peer.to_string());
                                rec.method = Some("mqtt".into());
                                crate::ssh::accept::count_failure(&shared, peer, rec);
                            }
                        }
                    }
                    _ = cancel.cancelled() => {}
                }
            }
            .instrument(span),
        );
    }
}

async fn client(
    shared: &Shared,
    mut down: TcpStream,
    upstream: &Upstream,
    topics: &Topics,
    slot: crate::limits::PreAuthSlot,
    authed: &AtomicBool,
) -> Result<(), GateError> {
    let _ = down.set_nodelay(true);
    let (kind, body) =
        tokio::time::timeout(CONNECT_TIMEOUT, read_packet(&mut down)).await.map_err(|_| GateError::NotConnect)??;
    if kind >> 4 != CONNECT {
        return Err(GateError::NotConnect);
    }
    let connect = Connect::parse(&body)?;
    let (id, fingerprint) = match authenticate(shared, &connect).await {
        Ok(found) => found,
        Err(e) => {
            // CONNACK "bad user name or password", then close.
            let _ = down.write_all(&[0x20, 2, 0, 4]).await;
            return Err(e);
        }
    };
    drop(slot);
    authed.store(true, Ordering::Relaxed);
    // Revocation or removal ends this session (see `watch::enforce`).
    let live = shared.signal.as_ref().map(|s| s.mqtt_sessions.open(&id, &fingerprint));
    let revoked = async {
        match &live {
            Some(l) => l.token.cancelled().await,
            None => std::future::pending().await,
        }
    };
    let allowed = Allowed {
        id: id.to_string(),
        presence: topics.presence(id.as_str()),
        status: topics.status(id.as_str()),
        request: topics.request(id.as_str()),
    };
    if let Some(will) = &connect.will_topic {
        allowed.publish(will)?;
    }
    info!(device = %id, "mqtt client connected");
    let mut up = TcpStream::connect(upstream.addr).await?;
    let _ = up.set_nodelay(true);
    up.write_all(&connect.encode(&upstream.username, &upstream.password)).await?;

    let (mut up_read, mut up_write) = up.into_split();
    let (mut down_read, mut down_write) = down.into_split();
    let to_device = tokio::io::copy(&mut up_read, &mut down_write);
    let from_device = async {
        loop {
            let (kind, body) = read_packet(&mut down_read).await?;
            match kind >> 4 {
                PUBLISH => allowed.publish(&publish_topic(&body)?)?,
                SUBSCRIBE => {
                    for filter in subscribe_filters(&body)? {
                        allowed.subscribe(&filter)?;
                    }
                }
                CONNECT => return Err(GateError::Malformed),
                _ => {}
            }
            up_write.write_all(&encode_packet(kind, &body)).await?;
            if kind >> 4 == DISCONNECT {
                return Ok::<(), GateError>(());
            }
        }
    };
    let result = tokio::select! {
        r = to_device => r.map(|_| ()).map_err(GateError::from),
        r = from_device => r,
        _ = revoked => Err(GateError::Login(format!("device '{id}' was revoked or removed"))),
    };
    info!(device = %id, "mqtt client disconnected");
    if let Err(GateError::Denied { .. }) = &result {
        let why = result.as_ref().unwrap_err().to_string();
        warn!(device = %id, "{}", burrow_core::text::printable(&why));
    }
    result
}

/// The device and the fingerprint of the key it logged in with.
async fn authenticate(shared: &Shared, c: &Connect) -> Result<(Id, String), GateError> {
    let (Some(user), Some(password)) = (&c.username, &c.password) else {
        return Err(GateError::Login("anonymous clients are not allowed".into()));
    };
    let id = Id::parse(user).map_err(|e| GateError::Login(e.to_string()))?;
    if c.client_id != user.as_str() {
        return Err(GateError::Login(format!("client id must be the device id '{id}'")));
    }
    let record = shared
        .registry
        .device(&id)
        .await
        .map_err(|e| GateError::Login(format!("registry: {e}")))?
        .ok_or_else(|| GateError::Login(format!("unknown device '{id}'")))?;
    if record.revoked_at.is_some() {
        return Err(GateError::Login(format!("device '{id}' is revoked")));
    }
    let registered = record.public_key.ok_or_else(|| GateError::Login(format!("device '{id}' has not enrolled")))?;
    let key = parse_public_key(&registered, "registered key").map_err(|e| GateError::Login(e.to_string()))?;
    let token = std::str::from_utf8(password).map_err(|_| GateError::Login("password is not a login token".into()))?;
    verify_login(token, &c.client_id, &key, now_unix()).map_err(|e| GateError::Login(format!("device '{id}': {e}")))?;
    Ok((id, burrow_core::fingerprint(&key)))
}

struct Allowed {
    id: String,
    presence: String,
    status: String,
    request: String,
}

impl Allowed {
    fn publish(&self, topic: &str) -> Result<(), GateError> {
        if topic == self.presence || topic == self.status {
            return Ok(());
        }
        Err(GateError::Denied { id: self.id.clone(), what: "publish to", topic: topic.to_string() })
    }

    fn subscribe(&self, filter: &str) -> Result<(), GateError> {
        if filter == self.request {
            return Ok(());
        }
        Err(GateError::Denied { id: self.id.clone(), what: "subscribe to", topic: filter.to_string() })
    }
}

/// Reads one packet: `(first byte, body after the remaining-length field)`.
async fn read_packet<R: AsyncRead + Unpin>(r: &mut R) -> Result<(u8, Vec<u8>), GateError> {
    let kind = r.read_u8().await?;
    let mut len = 0usize;
    for i in 0..4 {
        let b = r.read_u8().await?;
        len |= ((b & 0x7f) as usize) << (7 * i);
        if b & 0x80 == 0 {
            if len > MAX_PACKET {
                return Err(GateError::TooLarge);
            }
            let mut body = vec![0; len];
            r.read_exact(&mut body).await?;
            return Ok((kind, body));
        }
    }
    Err(GateError::Malformed)
}

fn encode_packet(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(kind);
    let mut len = body.len();
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        out.push(b);
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn u8(&mut self) -> Result<u8, GateError> {
        let (&b, rest) = self.buf.split_first().ok_or(GateError::Malformed)?;
        self.buf = rest;
        Ok(b)
    }

    fn u16(&mut self) -> Result<u16, GateError> {
        Ok(u16::from_be_bytes([self.u8()?, self.u8()?]))
    }

    fn bytes(&mut self) -> Result<&'a [u8], GateError> {
        let n = self.u16()? as usize;
        if self.buf.len() < n {
            return Err(GateError::Malformed);
        }
        let (b, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(b)
    }

    fn string(&mut self) -> Result<String, GateError> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| GateError::Malformed)
    }
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u16).to_be_bytes());
    out.extend_from_slice(b);
}

/// The fields of a 3.1.1 CONNECT the gate needs.
struct Connect {
    flags: u8,
    keep_alive: u16,
    client_id: String,
    will_topic: Option<String>,
    will_message: Vec<u8>,
    username: Option<String>,
    password: Option<Vec<u8>>,
}

impl Connect {
    fn parse(body: &[u8]) -> Result<Connect, GateError> {
        let mut r = Reader { buf: body };
        if r.bytes()? != b"MQTT" {
            return Err(GateError::Version);
        }
        if r.u8()? != 4 {
            return Err(GateError::Version);
        }
        let flags = r.u8()?;
        let keep_alive = r.u16()?;
        let client_id = r.string()?;
        let (will_topic, will_message) =
            if flags & 0x04 != 0 { (Some(r.string()?), r.bytes()?.to_vec()) } else { (None, Vec::new()) };
        let username = if flags & 0x80 != 0 { Some(r.string()?) } else { None };
        let password = if flags & 0x40 != 0 { Some(r.bytes()?.to_vec()) } else { None };
        Ok(Connect { flags, keep_alive, client_id, will_topic, will_message, username, password })
    }

    /// The same CONNECT with the gate's own credentials.
    fn encode(&self, username: &str, password: &str) -> Vec<u8> {
        let mut body = Vec::new();
        put_bytes(&mut body, b"MQTT");
        body.push(4);
        body.push((self.flags & 0x3f) | 0xc0);
        body.extend_from_slice(&self.keep_alive.to_be_bytes());
        put_bytes(&mut body, self.client_id.as_bytes());
        if let Some(t) = &self.will_topic {
            put_bytes(&mut body, t.as_bytes());
            put_bytes(&mut body, &self.will_message);
        }
        put_bytes(&mut body, username.as_bytes());
        put_bytes(&mut body, password.as_bytes());
        encode_packet(CONNECT << 4, &body)
    }
}

fn publish_topic(body: &[u8]) -> Result<String, GateError> {
    Reader { buf: body }.string()
}

fn subscribe_filters(body: &[u8]) -> Result<Vec<String>, GateError> {
    let mut r = Reader { buf: body };
    r.u16()?;
    let mut filters = Vec::new();
    while !r.buf.is_empty() {
        filters.push(r.string()?);
        r.u8()?;
    }
    if filters.is_empty() {
        return Err(GateError::Malformed);
    }
    Ok(filters)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Whatever a device sends, the gate's parsers answer without
        /// panicking, and a packet is never bigger than MAX_PACKET.
        #[test]
        fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = Connect::parse(&bytes);
            let _ = publish_topic(&bytes);
            let _ = subscribe_filters(&bytes);
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            if let Ok((_, body)) = rt.block_on(read_packet(&mut &bytes[..])) {
                prop_assert!(body.len() <= MAX_PACKET);
            }
        }

        /// encode_packet and read_packet agree for every length.
        #[test]
        fn packets_round_trip(kind in any::<u8>(), body in proptest::collection::vec(any::<u8>(), 0..3000)) {
            let wire = encode_packet(kind, &body);
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let (k, b) = rt.block_on(read_packet(&mut &wire[..])).unwrap();
            prop_assert_eq!(k, kind);
            prop_assert_eq!(b, body);
        }
    }

    #[test]
    fn connect_round_trips_with_new_credentials() {
        let mut body = Vec::new();
        put_bytes(&mut body, b"MQTT");
        body.push(4);
        body.push(0x80 | 0x40 | 0x20 | 0x04 | 0x02 | 0x08);
        body.extend_from_slice(&30u16.to_be_bytes());
        put_bytes(&mut body, b"cam-42");
        put_bytes(&mut body, b"burrow/devices/cam-42/presence");
        put_bytes(&mut body, b"{\"state\":\"offline\"}");
        put_bytes(&mut body, b"cam-42");
        put_bytes(&mut body, b"token");
        let c = Connect::parse(&body).unwrap();
        assert_eq!(c.client_id, "cam-42");
        assert_eq!(c.will_topic.as_deref(), Some("burrow/devices/cam-42/presence"));
        let re = c.encode("internal", "secret");
        let c2 = Connect::parse(&re[2..]).unwrap();
        assert_eq!(c2.username.as_deref(), Some("internal"));
        assert_eq!(c2.password.as_deref(), Some(&b"secret"[..]));
        assert_eq!(c2.flags & 0x3f, c.flags & 0x3f);
        assert_eq!(c2.will_message, c.will_message);
    }

    #[test]
    fn acl_allows_only_own_topics() {
        let t = Topics::new("burrow");
        let a = Allowed {
            id: "cam-42".into(),
            presence: t.presence("cam-42"),
            status: t.status("cam-42"),
            request: t.request("cam-42"),
        };
        assert!(a.publish("burrow/devices/cam-42/presence").is_ok());
        assert!(a.publish("burrow/devices/cam-42/status").is_ok());
        assert!(a.publish("burrow/devices/cam-43/presence").is_err());
        assert!(a.publish("burrow/devices/cam-43/request").is_err());
        assert!(a.subscribe("burrow/devices/cam-42/request").is_ok());
        assert!(a.subscribe("burrow/devices/+/request").is_err());
        assert!(a.subscribe("#").is_err());
    }

    #[test]
    fn remaining_length_encoding() {
        for n in [0usize, 127, 128, 16383, 16384, 60000] {
            let body = vec![7u8; n];
            let enc = encode_packet(0x30, &body);
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let (k, b) = rt.block_on(read_packet(&mut &enc[..])).unwrap();
            assert_eq!((k, b.len()), (0x30, n));
        }
    }
}
