//! The russh `Handler` for one connection: authentication and the few
//! requests each kind of peer may make. Everything else is refused by
//! construction: there is no shell, exec, pty, subsystem, X11 or agent
//! forwarding to grant, because no session channel is ever opened.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use burrow_core::fingerprint;
use russh::keys::ssh_key::PublicKey;
use russh::server::{Auth, ChannelOpenHandle, Handler, Msg, PublicKeyOffer, Session, VerifiedPublicKey};
use russh::Channel;
use tracing::{debug, info, warn};

use super::route::{open_for_operator, refuse, Refusal, Request};
use super::rpc;
use crate::admin::Caller;
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

/// Who authenticated on a connection; set once, read by the accept task for cleanup.
pub(crate) type Authenticated = Arc<OnceLock<Identity>>;

pub(crate) struct Connection {
    pub shared: Arc<Shared>,
    pub conn: ConnId,
    pub peer: SocketAddr,
    pub authenticated: Authenticated,
    /// Set after the signature check, before `auth_succeeded`.
    pending: Option<(Identity, String)>,
    /// An unregistered key that authenticated as the enrollment user.
    enrollee: Option<PublicKey>,
}

impl Connection {
    pub(crate) fn new(shared: Arc<Shared>, conn: ConnId, peer: SocketAddr, authenticated: Authenticated) -> Self {
        Connection { shared, conn, peer, authenticated, pending: None, enrollee: None }
    }

    fn identity(&self) -> Option<&Identity> {
        self.authenticated.get()
    }

    async fn lookup(&self, key: &PublicKey) -> Result<Option<(Identity, String)>, HandlerError> {
        let fp = fingerprint(key);
        // Boxed (as every registry call here): russh keeps the largest future
        // any handler method can await inside each connection's task for the
        // whole life of the connection, and a query's future is large.
        Ok(Box::pin(self.shared.registry.identify(&fp)).await?.map(|i| (i, fp)))
    }
}

impl Handler for Connection {
    type Error = HandlerError;

    async fn auth_publickey_offered(&mut self, user: &str, offer: PublicKeyOffer<'_>) -> Result<Auth, Self::Error> {
        Ok(match self.lookup(offer.public_key).await? {
            Some(_) => Auth::Accept,
            None if user == ENROLL_USER => Auth::Accept,
            None => Auth::reject(),
        })
    }

    async fn auth_publickey(&mut self, user: &str, key: VerifiedPublicKey<'_>) -> Result<Auth, Self::Error> {
        match self.lookup(key.public_key).await? {
            Some(found) => {
                debug!(user, identity = %found.0, "public key accepted");
                self.pending = Some(found);
                Ok(Auth::Accept)
            }
            // A device enrolling proves it holds its new key; it may then
            // present a token on the `@burrow` channel and nothing else.
            None if user == ENROLL_USER => {
                info!(peer = %self.peer, fingerprint = %fingerprint(key.public_key), "enrollment key authenticated");
                self.enrollee = Some(key.public_key.clone());
                Ok(Auth::Accept)
            }
            None => {
                info!(peer = %self.peer, fingerprint = %fingerprint(key.public_key), "unknown key refused");
                Ok(Auth::reject())
            }
        }
    }

    async fn auth_succeeded(&mut self, session: &mut Session) -> Result<(), Self::Error> {
        let Some((identity, fp)) = self.pending.take() else {
            return Ok(());
        };
        info!(peer = %self.peer, conn = self.conn, "{identity} authenticated");
        self.shared.router.add_session(
            self.conn,
            RouterSession { identity: identity.clone(), fingerprint: fp, handle: session.handle() },
        );
        let _ = self.authenticated.set(identity);
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
        if host_to_connect == RPC_HOST && port_to_connect == RPC_PORT {
            let caller = match (self.identity(), &self.enrollee) {
                (Some(identity), _) => Caller::from_identity(identity),
                (None, Some(key)) => Caller::Enrollee(key.clone()),
                (None, None) => return Ok(()),
            };
            self.shared.tracker.spawn(rpc::serve(self.shared.clone(), caller, channel, reply));
            return Ok(());
        }
        let operator = match self.identity() {
            Some(Identity::Operator { name, .. }) => name.clone(),
            other => {
                warn!(peer = %self.peer, identity = ?other, host_to_connect, "direct-tcpip refused: not an operator");
                Box::pin(refuse(&self.shared, reply, Refusal::DeviceForbidden)).await;
                return Ok(());
            }
        };
        let req = Request {
            operator,
            host: host_to_connect.to_string(),
            port: port_to_connect,
            originator: (originator_address.to_string(), originator_port),
        };
        // Resolving may wait on the registry or the device; never block this
        // connection's other channels on it.
        self.shared.tracker.spawn(open_for_operator(self.shared.clone(), req, channel, reply));
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
                warn!(peer = %self.peer, identity = ?other, address, "tcpip-forward refused: operators may not forward");
                return Ok(false);
            }
        };
        if address != id.as_str() || *port == 0 || *port > u16::MAX as u32 {
            warn!(device = %id, address, port = *port, "tcpip-forward refused: a device may forward only its own id and a fixed port");
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
