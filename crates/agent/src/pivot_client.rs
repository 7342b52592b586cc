//! A short SSH connection to the pivot for admin requests, enrollment and
//! key rotation: pin the host key, authenticate, send one request on the
//! `@burrow` channel, read the answer.

use std::sync::{Arc, Mutex};

use burrow_core::rpc::{Request, Response, RPC_HOST, RPC_PORT};
use burrow_core::{fingerprint, HostKeyPin};
use russh::client::{self, AuthResult, Handle};
use russh::keys::{PrivateKey, PrivateKeyWithHashAlg, PublicKeyOrCertificate};
use russh::ChannelMsg;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the pivot at {0}")]
    Connect(String, #[source] std::io::Error),
    #[error("host key mismatch: the pivot offered {got} but {expected} is pinned; refusing to connect")]
    HostKeyMismatch { expected: String, got: String },
    #[error("the pivot refused our key{0}")]
    AuthRejected(String),
    #[error("no usable key: give --identity FILE or run an ssh-agent")]
    NoKey,
    #[error("ssh-agent: {0}")]
    Agent(String),
    #[error("ssh connection failed")]
    Ssh(#[from] russh::Error),
    #[error("the pivot sent a malformed answer")]
    Malformed,
    /// The pivot answered with an error; its text is for the user.
    #[error("{0}")]
    Refused(String),
}

/// Checks the pivot's host key against a pin, remembering what it saw.
pub(crate) struct Pinned {
    pub pin: HostKeyPin,
    pub mismatch: Arc<Mutex<Option<String>>>,
}

impl Pinned {
    pub(crate) fn new(pin: HostKeyPin) -> Self {
        Pinned { pin, mismatch: Arc::new(Mutex::new(None)) }
    }

    /// True if the offered key matches; otherwise records what was offered.
    pub(crate) fn check(&self, key: &PublicKeyOrCertificate) -> bool {
        let offered = match key {
            PublicKeyOrCertificate::PublicKey { key, .. } => key,
            PublicKeyOrCertificate::Certificate(_) => {
                *self.mismatch.lock().unwrap() = Some("a certificate".into());
                return false;
            }
        };
        if self.pin.matches(offered) {
            return true;
        }
        *self.mismatch.lock().unwrap() = Some(fingerprint(offered));
        false
    }

    pub(crate) fn mismatch_error(&self) -> Option<(String, String)> {
        self.mismatch.lock().unwrap().take().map(|got| (self.pin.fingerprint(), got))
    }
}

pub struct PivotClient(Pinned);

impl client::Handler for PivotClient {
    type Error = russh::Error;

    async fn check_server_key(&mut self, key: &PublicKeyOrCertificate) -> Result<bool, Self::Error> {
        Ok(self.0.check(key))
    }
}

/// How to authenticate.
pub enum Credentials {
    Key(Arc<PrivateKey>),
    /// The first key in `$SSH_AUTH_SOCK` that the pivot accepts.
    Agent,
}

/// Connects to `addr`, pins its host key and authenticates as `user`.
pub async fn connect(
    addr: &str,
    pin: HostKeyPin,
    user: &str,
    creds: &Credentials,
) -> Result<Handle<PivotClient>, ClientError> {
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| ClientError::Connect(addr.to_string(), e))?;
    let _ = tcp.set_nodelay(true);
    let pinned = Pinned::new(pin);
    let mismatch = Pinned { pin: pinned.pin.clone(), mismatch: pinned.mismatch.clone() };
    let config = Arc::new(client::Config { nodelay: true, ..Default::default() });
    let mut handle = match client::connect_stream(config, tcp, PivotClient(pinned)).await {
        Ok(h) => h,
        Err(e) => {
            if let Some((expected, got)) = mismatch.mismatch_error() {
                return Err(ClientError::HostKeyMismatch { expected, got });
            }
            return Err(e.into());
        }
    };
    let ok = match creds {
        Credentials::Key(key) => {
            let r = handle.authenticate_publickey(user, PrivateKeyWithHashAlg::new(key.clone(), None)).await?;
            matches!(r, AuthResult::Success)
        }
        Credentials::Agent => {
            let mut agent = russh::keys::agent::client::AgentClient::connect_env()
                .await
                .map_err(|e| ClientError::Agent(e.to_string()))?;
            let ids = agent.request_identities().await.map_err(|e| ClientError::Agent(e.to_string()))?;
            if ids.is_empty() {
                return Err(ClientError::NoKey);
            }
            let mut ok = false;
            for id in ids {
                let russh::keys::agent::AgentIdentity::PublicKey { key, .. } = id else { continue };
                let r = handle
                    .authenticate_publickey_with(user, key, None, &mut agent)
                    .await
                    .map_err(|e| ClientError::Agent(e.to_string()))?;
                if matches!(r, AuthResult::Success) {
                    ok = true;
                    break;
                }
            }
            ok
        }
    };
    if !ok {
        return Err(ClientError::AuthRejected(String::new()));
    }
    Ok(handle)
}

/// Sends one request and returns the answer's data, or the pivot's refusal.
pub async fn call<H: client::Handler>(handle: &Handle<H>, req: &Request) -> Result<serde_json::Value, ClientError> {
    let mut ch = handle.channel_open_direct_tcpip(RPC_HOST, RPC_PORT, "127.0.0.1", 0).await?;
    let mut line = serde_json::to_vec(req).map_err(|_| ClientError::Malformed)?;
    line.push(b'\n');
    ch.data(&line[..]).await?;
    ch.eof().await?;
    let mut buf = Vec::new();
    while let Some(msg) = ch.wait().await {
        match msg {
            ChannelMsg::Data { data } => buf.extend_from_slice(&data),
            ChannelMsg::Eof | ChannelMsg::Close => break,
            _ => {}
        }
    }
    let resp: Response = serde_json::from_slice(&buf).map_err(|_| ClientError::Malformed)?;
    if resp.ok {
        Ok(resp.data)
    } else {
        Err(ClientError::Refused(resp.error.unwrap_or_default()))
    }
}
