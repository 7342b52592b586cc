//! The russh `Handler` for one connection: authentication and the few
//! requests each kind of peer may make. Everything else is refused by
//! construction: there is no shell, exec, pty, subsystem, X11 or agent
//! forwarding to grant, because no session channel is ever opened.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use burrow_core::fingerprint;
use burrow_core::text::{excerpt, printable};
use burrow_core::time::format_unix;
use russh::keys::ssh_key::{Algorithm, PublicKey};
use russh::server::{Auth, ChannelOpenHandle, Handler, Msg, PublicKeyOffer, Session, VerifiedPublicKey};
use russh::Channel;
use tracing::{debug, info, warn};

use super::kexinit::NegotiatedSlot;
use super::peers::{PEER_MAX_CHANNELS, PEER_USER_PREFIX};
use super::route::{open_for_operator, open_for_peer, refuse, Refusal, Request};
use super::rpc;
use crate::admin::Caller;
use crate::audit::AuditRecord;
use crate::limits::{Counter, PreAuthSlot, ENROLL_CHANNELS, ENROLL_REQUESTS};

/// Forward and cancel requests allowed per forwardable port, over a
/// connection's life: a device binds its ports once, not in a loop.
const FORWARD_REQUESTS_PER_PORT: usize = 4;
use crate::registry::{Identity, RegistryError};
use crate::router::{Bind, ConnId, Session as RouterSession};
use crate::Shared;
use burrow_core::rpc::{ENROLL_USER, RPC_HOST, RPC_PORT};

#[derive(Debug, thiserror::Error)]
pub(crate) enum HandlerError {
    #[error("ssh protocol error")]
    Ssh(#[from] russh::Error),
    #[error("registry error")]
    Registry(#[from] RegistryError),
}

/// What the accept task and the handler both know about one connection.
pub(crate) struct ConnState {
    /// Who authenticated; set once.
    pub identity: OnceLock<Identity>,
    /// The algorithms negotiated, once the client's KEXINIT went by.
    pub negotiated: NegotiatedSlot,
    /// When this connection's tunnel came up (devices).
    pub tunnel_since: OnceLock<i64>,
    /// Failures of this connection were already counted.
    pub counted: AtomicBool,
    /// The peer sent at least one byte (a bare connect-and-close is no failure).
    pub spoke: Arc<AtomicBool>,
    /// Bytes of `@burrow` requests this connection has buffered now.
    pub admin_buffered: Arc<Counter>,
    /// `@burrow` channels an enrollment key has opened, ever.
    pub enroll_requests: AtomicUsize,
    /// The device reported its host keys on this connection.
    pub host_keys_reported: AtomicBool,
    /// `tcpip-forward` and cancel requests, ever.
    pub forward_requests: AtomicUsize,
    /// When the device last fetched what it trusts on this connection.
    pub trust_fetched: Mutex<Option<std::time::Instant>>,
    // std Mutexes: each is taken for a field update, never across .await.
    /// Until authentication: the connection's unauthenticated slot, and a
    /// duplicate of its socket to close it with when the grace time ends
    /// (russh owns the socket itself).
    preauth: Mutex<Option<(PreAuthSlot, Option<std::net::TcpStream>)>>,
    /// Why keys were refused, and the last user name and key tried.
    attempts: Mutex<Attempts>,
}

#[derive(Default)]
struct Attempts {
    rejected: Vec<String>,
    last: Option<(String, Option<String>)>,
}

impl ConnState {
    pub fn new(slot: PreAuthSlot, killer: std::net::TcpStream) -> Self {
        let killer = Some(killer);
        ConnState {
            identity: OnceLock::new(),
            negotiated: Default::default(),
            tunnel_since: OnceLock::new(),
            counted: AtomicBool::new(false),
            spoke: Default::default(),
            admin_buffered: Default::default(),
            enroll_requests: AtomicUsize::new(0),
            host_keys_reported: AtomicBool::new(false),
            forward_requests: AtomicUsize::new(0),
            trust_fetched: Mutex::new(None),
            preauth: Mutex::new(Some((slot, killer))),
            attempts: Mutex::default(),
        }
    }

    /// Closes the socket under russh, ending the session.
    pub fn kill(&self) {
        if let Some((_, Some(sock))) = self.preauth.lock().unwrap().take() {
            let _ = sock.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Gives back the unauthenticated slot and the socket duplicate.
    pub fn release_preauth(&self) {
        self.preauth.lock().unwrap().take();
    }

    pub fn take_rejected(&self) -> Vec<String> {
        std::mem::take(&mut self.attempts.lock().unwrap().rejected)
    }

    pub fn last_attempt(&self) -> Option<(String, Option<String>)> {
        self.attempts.lock().unwrap().last.clone()
    }

    fn attempt(&self, user: &str, fp: &str) {
        self.attempts.lock().unwrap().last = Some((excerpt(user, 64), Some(fp.to_string())));
    }

    fn reject(&self, why: String) {
        let mut a = self.attempts.lock().unwrap();
        // russh ends the connection after max_auth_attempts; this bounds the list too.
        if a.rejected.len() < 100 {
            a.rejected.push(why);
        }
    }
}

pub(crate) struct Connection {
    pub shared: Arc<Shared>,
    pub conn: ConnId,
    pub peer: SocketAddr,
    pub state: Arc<ConnState>,
    /// Set after the signature check, before `auth_succeeded`.
    pending: Option<(Identity, String)>,
    /// An unregistered key that authenticated as the enrollment user.
    enrollee: Option<PublicKey>,
    /// The key and user name that got in, for the audit.
    authed: Option<(String, String)>,
    /// Why a key that proved itself is refused anyway. Only its holder may
    /// learn this, so the key is let in and the connection is then ended
    /// with the reason as the disconnect message (SSH has no other way to
    /// say why a key was refused).
    refusal: Option<String>,
    /// Channels open now on this connection.
    channels: Arc<Counter>,
}

impl Connection {
    pub(crate) fn new(shared: Arc<Shared>, conn: ConnId, peer: SocketAddr, state: Arc<ConnState>) -> Self {
        Connection {
            shared,
            conn,
            peer,
            state,
            pending: None,
            enrollee: None,
            authed: None,
            refusal: None,
            channels: Default::default(),
        }
    }

    fn identity(&self) -> Option<&Identity> {
        self.state.identity.get()
    }

    /// Logs a refused key now; it counts as a failure if the connection never gets in.
    fn refuse_key(&self, user: &str, fp: &str, why: &str) -> Auth {
        info!(peer = %self.peer, conn = self.conn, user = %excerpt(user, 64), fingerprint = fp, "key refused: {why}");
        self.state.reject(format!("{why} ({fp})"));
        Auth::reject()
    }

    /// Lets a key that proved itself in only to end the connection with
    /// `why` (see `refusal`). It counts toward a ban like any refused key.
    fn refuse_with_reason(&mut self, user: &str, fp: &str, why: String) -> Auth {
        info!(peer = %self.peer, conn = self.conn, user = %excerpt(user, 64), fingerprint = fp, "login refused: {why}");
        self.state.reject(format!("{why} ({fp})"));
        self.authed = Some((excerpt(user, 64), fp.to_string()));
        self.refusal = Some(why);
        Auth::Accept
    }

    fn audit(&self, event: &str) -> AuditRecord {
        let mut rec = AuditRecord::new(event);
        rec.source = Some(self.peer.to_string());
        rec.session = Some(self.shared.session_id(self.conn));
        match self.identity() {
            Some(Identity::Device(id)) => rec.device = Some(id.to_string()),
            Some(Identity::Operator { name, .. }) => rec.operator = Some(name.to_string()),
            Some(Identity::Pivot(name)) => rec.user = Some(format!("{PEER_USER_PREFIX}{name}")),
            None => {}
        }
        rec
    }

    async fn lookup(&self, key: &PublicKey) -> Result<Option<(Identity, String)>, HandlerError> {
        let fp = fingerprint(key);
        // Boxed (as every registry call here): russh keeps the largest future
        // any handler method can await inside each connection's task for the
        // whole life of the connection, and a query's future is large.
        Ok(Box::pin(self.shared.registry.identify(&fp)).await?.map(|i| (i, fp)))
    }

    /// Another live pivot of this registry, logging in as `@pivot:NAME`
    /// with the host key NAME registered.
    async fn peer_pivot(&self, name: &str, fp: &str) -> Result<Option<Identity>, HandlerError> {
        let Ok(id) = burrow_core::Id::parse(name) else { return Ok(None) };
        if id.as_str() == self.shared.config.pivot_name {
            return Ok(None);
        }
        let Some(pivot) = Box::pin(self.shared.registry.pivot(id.as_str())).await? else { return Ok(None) };
        let registered =
            burrow_core::keys::parse_public_key(&pivot.host_key, "pivot host key").map(|k| fingerprint(&k));
        let alive = pivot.alive(self.shared.registry_now());
        Ok((alive && registered.as_deref().ok() == Some(fp)).then_some(Identity::Pivot(id)))
    }
}

impl Handler for Connection {
    type Error = HandlerError;

    async fn auth_publickey_offered(&mut self, user: &str, offer: PublicKeyOffer<'_>) -> Result<Auth, Self::Error> {
        let fp = fingerprint(offer.public_key);
        self.state.attempt(user, &fp);
        if *offer.algorithm == (Algorithm::Rsa { hash: None }) {
            return Ok(self.refuse_key(
                user,
                &fp,
                "ssh-rsa (SHA-1) signatures are not accepted; use rsa-sha2-256 or an ed25519 key",
            ));
        }
        if let Some(name) = user.strip_prefix(PEER_USER_PREFIX) {
            return Ok(match self.peer_pivot(name, &fp).await? {
                Some(_) => Auth::Accept,
                None => self.refuse_key(user, &fp, "not the host key of a live pivot of this registry"),
            });
        }
        Ok(match self.lookup(offer.public_key).await? {
            Some(_) => Auth::Accept,
            None if user == ENROLL_USER => Auth::Accept,
            // A revoked device's key, logging in as that device, may sign
            // to be told it is revoked. Anything else tries its next key.
            None if Box::pin(self.shared.registry.revoked_device(&fp)).await?.is_some_and(|(id, _)| id == user) => {
                Auth::Accept
            }
            None => self.refuse_key(user, &fp, "unknown key"),
        })
    }

    async fn auth_publickey(&mut self, user: &str, key: VerifiedPublicKey<'_>) -> Result<Auth, Self::Error> {
        let fp = fingerprint(key.public_key);
        if *key.algorithm == (Algorithm::Rsa { hash: None }) {
            return Ok(self.refuse_key(user, &fp, "ssh-rsa (SHA-1) signatures are not accepted"));
        }
        if let Some(name) = user.strip_prefix(PEER_USER_PREFIX) {
            return Ok(match self.peer_pivot(name, &fp).await? {
                Some(identity) => {
                    self.authed = Some((excerpt(user, 64), fp.clone()));
                    self.pending = Some((identity, fp));
                    Auth::Accept
                }
                None => self.refuse_key(user, &fp, "not the host key of a live pivot of this registry"),
            });
        }
        match self.lookup(key.public_key).await? {
            Some(found) => {
                // A device logs in as its own id: a mismatch is a
                // misconfigured agent, told whose key it holds.
                if let Identity::Device(id) = &found.0 {
                    if user != id.as_str() && user != ENROLL_USER {
                        let why = format!(
                            "this key belongs to device '{id}', not '{}'; log in as {id}",
                            printable(&excerpt(user, 64))
                        );
                        return Ok(self.refuse_with_reason(user, &fp, why));
                    }
                }
                // One key may hold only so many connections: a stolen key
                // cannot take every connection the pivot has. Not a failure.
                let limit = self.shared.config.limits.max_sessions_per_key;
                let held = self.shared.router.sessions_of(&found.1);
                if held >= limit {
                    info!(peer = %self.peer, conn = self.conn, identity = %found.0, limit, "login refused: the key already holds {held} connections");
                    return Ok(Auth::reject());
                }
                debug!(user, identity = %found.0, "public key accepted");
                self.authed = Some((excerpt(user, 64), fp));
                self.pending = Some(found);
                Ok(Auth::Accept)
            }
            // A device enrolling proves it holds its new key; it may then
            // present a token on the `@burrow` channel and nothing else. A
            // key registered to anyone (a revoked device's, say) may not.
            None if user == ENROLL_USER => {
                if Box::pin(self.shared.registry.key_registered(&fp)).await? {
                    return Ok(self.refuse_key(user, &fp, "a registered or revoked key may not enroll"));
                }
                // It keeps its unauthenticated slot and grace time: it must
                // enroll and leave within them.
                info!(peer = %self.peer, fingerprint = %fp, "enrollment key authenticated");
                self.authed = Some((ENROLL_USER.to_string(), fp));
                self.enrollee = Some(key.public_key.clone());
                Ok(Auth::Accept)
            }
            None => match Box::pin(self.shared.registry.revoked_device(&fp)).await? {
                Some((id, at)) => {
                    let why = format!(
                        "device '{}' was revoked on {}; it needs a new enrollment",
                        printable(&id),
                        format_unix(at)
                    );
                    Ok(self.refuse_with_reason(user, &fp, why))
                }
                None => Ok(self.refuse_key(user, &fp, "unknown key")),
            },
        }
    }

    async fn auth_succeeded(&mut self, session: &mut Session) -> Result<(), Self::Error> {
        if let Some(why) = self.refusal.take() {
            // Nothing was granted: no identity is set, so every channel and
            // forward is refused until the disconnect below ends it. The
            // refusal is audited with the connection's failure, as any other.
            self.authed = None;
            session.disconnect(russh::Disconnect::NoMoreAuthMethodsAvailable, &why, "en")?;
            return Ok(());
        }
        let Some((identity, fp)) = self.pending.take() else {
            return Ok(());
        };
        // A registered peer gives its unauthenticated slot and the socket
        // duplicate back now.
        self.state.preauth.lock().unwrap().take();
        info!(peer = %self.peer, conn = self.conn, "{identity} authenticated");
        self.shared.router.add_session(
            self.conn,
            RouterSession {
                identity: identity.clone(),
                fingerprint: fp,
                handle: session.handle(),
                peer: self.peer.ip().to_canonical(),
            },
        );
        let _ = self.state.identity.set(identity);
        let mut rec = self.audit("auth").outcome(true, None);
        rec.method = Some("publickey".into());
        if let Some((user, fp)) = self.authed.take() {
            rec.user = Some(user);
            rec.fingerprint = Some(fp);
        }
        if let Some(n) = self.state.negotiated.get() {
            rec.cipher = Some(n.cipher.clone());
            rec.kex = Some(n.kex.clone());
        }
        self.shared.audit.record(rec);
        Ok(())
    }

    async fn channel_open_session(
        &mut self,
        _channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        Box::pin(refuse(&self.shared, reply, Refusal::NoShell)).await;
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        originator_address: &str,
        originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let limit = match (self.identity(), &self.enrollee) {
            (Some(Identity::Pivot(_)), _) => PEER_MAX_CHANNELS,
            (Some(_), _) => self.shared.config.limits.max_channels,
            (None, Some(_)) => ENROLL_CHANNELS,
            (None, None) => return Ok(()),
        };
        let Some(open) = self.channels.try_add(1, limit) else {
            info!(peer = %self.peer, conn = self.conn, limit, "channel refused: too many open on this connection");
            Box::pin(refuse(&self.shared, reply, Refusal::TooManyChannels(limit))).await;
            return Ok(());
        };
        if host_to_connect == RPC_HOST && port_to_connect == RPC_PORT {
            if self.identity().is_none()
                && self.state.enroll_requests.fetch_add(1, Ordering::Relaxed) >= ENROLL_REQUESTS
            {
                info!(peer = %self.peer, conn = self.conn, "enrollment channel refused: {ENROLL_REQUESTS} requests already made");
                Box::pin(refuse(&self.shared, reply, Refusal::TooManyChannels(ENROLL_REQUESTS))).await;
                return Ok(());
            }
            let caller = match (self.identity().map(Caller::from_identity), &self.enrollee) {
                (Some(Some(caller)), _) => caller,
                (None, Some(key)) => Caller::Enrollee(key.clone()),
                _ => {
                    Box::pin(refuse(&self.shared, reply, Refusal::DeviceForbidden)).await;
                    return Ok(());
                }
            };
            let from = rpc::From { peer: self.peer, conn: self.conn, state: self.state.clone() };
            self.shared.tracker.spawn(rpc::serve(self.shared.clone(), caller, from, channel, reply, open));
            return Ok(());
        }
        let operator = match self.identity() {
            Some(Identity::Operator { name, .. }) => name.clone(),
            Some(Identity::Pivot(pivot)) => {
                let (shared, pivot) = (self.shared.clone(), pivot.clone());
                let (host, originator) =
                    (host_to_connect.to_string(), (originator_address.to_string(), originator_port));
                self.shared.tracker.spawn(async move {
                    open_for_peer(shared, pivot, host, port_to_connect, originator, channel, reply).await;
                    drop(open);
                });
                return Ok(());
            }
            other => {
                warn!(peer = %self.peer, identity = %other.map_or("an enrollment key".to_string(), |i| i.to_string()), host_to_connect, "direct-tcpip refused: not an operator");
                Box::pin(refuse(&self.shared, reply, Refusal::DeviceForbidden)).await;
                return Ok(());
            }
        };
        let req = Request {
            operator,
            host: host_to_connect.to_string(),
            port: port_to_connect,
            originator: (originator_address.to_string(), originator_port),
            peer: self.peer,
            conn: self.conn,
        };
        // Resolving may wait on the registry or the device; never block this
        // connection's other channels on it.
        let shared = self.shared.clone();
        self.shared.tracker.spawn(async move {
            open_for_operator(shared, req, channel, reply).await;
            drop(open);
        });
        Ok(())
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let id = match self.identity() {
            Some(Identity::Device(id)) => id.clone(),
            other => {
                warn!(peer = %self.peer, identity = %other.map_or("an enrollment key".to_string(), |i| i.to_string()), address, "tcpip-forward refused: operators may not forward");
                return Ok(false);
            }
        };
        if address != id.as_str() || *port == 0 || *port > u16::MAX as u32 {
            warn!(device = %id, address = %printable(address), port = *port, "tcpip-forward refused: a device may forward only its own id and a fixed port");
            return Ok(false);
        }
        let max = self.shared.config.limits.max_forwards;
        if self.state.forward_requests.fetch_add(1, Ordering::Relaxed) >= max * FORWARD_REQUESTS_PER_PORT {
            warn!(device = %id, "tcpip-forward refused: too many forward requests on this connection");
            return Ok(false);
        }
        if self
            .shared
            .router
            .tunnel(&id)
            .is_some_and(|t| t.conn == self.conn && t.ports.len() >= max && !t.ports.contains(port))
        {
            warn!(device = %id, port = *port, max, "tcpip-forward refused: too many ports forwarded on this connection");
            return Ok(false);
        }
        let (bind, ports) = self.shared.router.bind(&id, self.conn, &session.handle(), *port);
        if let Bind::Replaced(old) = bind {
            info!(device = %id, "new connection replaces the old tunnel");
            tokio::spawn(async move {
                let _ = old
                    .disconnect(
                        russh::Disconnect::ByApplication,
                        "replaced by a newer connection of the same device".into(),
                        "en".into(),
                    )
                    .await;
            });
        }
        info!(device = %id, port = *port, "tunnel port open");
        // One record per connection's tunnel, not per forward request.
        if self.state.tunnel_since.set(burrow_core::time::now_unix()).is_ok() {
            let mut rec = self.audit("tunnel_up");
            rec.target = Some(format!("{id}:{port}"));
            rec.started = self.state.tunnel_since.get().copied();
            self.shared.audit.record(rec);
        }
        Box::pin(self.shared.registry.tunnel_up(&id, &self.shared.config.pivot_name, &ports)).await?;
        if let Some(signal) = &self.shared.signal {
            signal.tunnel_bound(&id);
        }
        Ok(true)
    }

    async fn cancel_tcpip_forward(
        &mut self,
        address: &str,
        port: u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let Some(Identity::Device(id)) = self.identity().cloned() else {
            return Ok(false);
        };
        if address != id.as_str() {
            return Ok(false);
        }
        let max = self.shared.config.limits.max_forwards;
        if self.state.forward_requests.fetch_add(1, Ordering::Relaxed) >= max * FORWARD_REQUESTS_PER_PORT {
            return Ok(false);
        }
        let Some(left) = self.shared.router.unbind(&id, self.conn, port) else {
            return Ok(false);
        };
        info!(device = %id, port, "tunnel port closed");
        let pivot = &self.shared.config.pivot_name;
        if left.is_empty() {
            Box::pin(self.shared.registry.tunnel_down(&id, pivot)).await?;
        } else {
            Box::pin(self.shared.registry.tunnel_up(&id, pivot, &left)).await?;
        }
        Ok(true)
    }
}
