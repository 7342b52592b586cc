//! The admin commands: one implementation, reached two ways. On the pivot
//! host the CLI calls [`execute`] on the registry directly; from anywhere
//! else it sends the same [`Request`] over SSH and the pivot calls
//! [`execute`] with the caller's identity. The caller's role decides.

use burrow_core::enroll::EnrollToken;
use burrow_core::keys::{fingerprint, parse_public_key, PublicKey};
use burrow_core::rpc::{allowed, rotate_message, Request, Response, Selector, ROTATE_NAMESPACE};
use burrow_core::time::{format_unix, now_unix};
use burrow_core::Id;
use russh::keys::ssh_key::SshSig;
use serde_json::{json, Value};

use crate::refusal::Refusal;
use crate::registry::{DeviceRecord, Identity, Registry};

/// Who is asking.
#[derive(Debug, Clone)]
pub enum Caller {
    /// Root on the pivot host, with the registry file in hand.
    Local,
    Operator {
        name: Id,
        admin: bool,
    },
    Device(Id),
    /// A device presenting an enrollment token, authenticated with its new key.
    Enrollee(PublicKey),
}

impl Caller {
    pub fn from_identity(identity: &Identity) -> Caller {
        match identity {
            Identity::Device(id) => Caller::Device(id.clone()),
            Identity::Operator { name, admin } => Caller::Operator { name: name.clone(), admin: *admin },
        }
    }
}

/// What the pivot knows about itself, for enrollment tokens.
pub struct Context<'a> {
    pub registry: &'a Registry,
    /// The pivot's public host key, OpenSSH line (empty if unknown).
    pub host_key: String,
}

impl Context<'_> {
    fn host_fingerprint(&self) -> Result<String, AdminError> {
        parse_public_key(&self.host_key, "the pivot host key").map(|k| fingerprint(&k)).map_err(|_| {
            AdminError::Invalid("the pivot's host key is unknown: start `burrow server` once first".into())
        })
    }
}

/// Meta key where a running pivot records the address devices should dial.
pub const ADVERTISE_KEY: &str = "advertise";
/// Default lifetime of an enrollment token.
pub const DEFAULT_TOKEN_TTL: u64 = 24 * 3600;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("permission denied: {0}")]
    Denied(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Registry(#[from] crate::RegistryError),
    #[error(transparent)]
    Refused(#[from] Refusal),
}

pub async fn execute(ctx: &Context<'_>, caller: &Caller, req: Request) -> Response {
    match run(ctx, caller, req).await {
        Ok(v) => Response::ok(v),
        Err(e) => Response::err(e),
    }
}

fn id(s: &str) -> Result<Id, AdminError> {
    Id::parse(s).map_err(|e| AdminError::Invalid(e.to_string()))
}

fn key(line: &str, what: &str) -> Result<PublicKey, AdminError> {
    parse_public_key(line, what).map_err(|e| AdminError::Invalid(e.to_string()))
}

async fn run(ctx: &Context<'_>, caller: &Caller, req: Request) -> Result<Value, AdminError> {
    authorize(caller, &req)?;
    let reg = ctx.registry;
    match req {
        Request::Whoami => {
            let mut me = match caller {
                Caller::Local => json!({"kind": "local", "role": "admin"}),
                Caller::Operator { name, admin } => {
                    json!({"kind": "operator", "name": name.as_str(), "role": role(*admin)})
                }
                Caller::Device(id) => json!({"kind": "device", "name": id.as_str()}),
                Caller::Enrollee(_) => json!({"kind": "enrollee"}),
            };
            me["pivot_host_key"] = Value::String(ctx.host_key.clone());
            Ok(me)
        }
        Request::DeviceList => {
            let selectors = selectors_of(reg, caller).await?;
            let list: Vec<Value> =
                reg.devices().await?.iter().filter(|d| allowed(&selectors, &d.labels)).map(device_json).collect();
            Ok(Value::Array(list))
        }
        Request::DeviceShow { id: name } => {
            let id = id(&name)?;
            let selectors = selectors_of(reg, caller).await?;
            match reg.device(&id).await? {
                Some(d) if allowed(&selectors, &d.labels) => Ok(device_json(&d)),
                Some(_) => Err(Refusal::NotAllowed(id).into()),
                None => Err(Refusal::Unknown(id.to_string()).into()),
            }
        }
        Request::Check { id: name, port } => {
            let id = id(&name)?;
            let selectors = selectors_of(reg, caller).await?;
            let dev = reg.device(&id).await?.ok_or_else(|| Refusal::Unknown(id.to_string()))?;
            if !allowed(&selectors, &dev.labels) {
                return Err(Refusal::NotAllowed(id).into());
            }
            check(&id, &dev, port)?;
            Ok(device_json(&dev))
        }
        Request::DeviceAdd { id: name, key: pubkey, labels, ttl_secs, address } => {
            let id = id(&name)?;
            match pubkey {
                Some(line) => {
                    let k = key(&line, "the device key")?;
                    reg.add_device(&id, &k, &labels).await?;
                    Ok(json!({"id": id.as_str(), "fingerprint": fingerprint(&k)}))
                }
                None => {
                    let pivot = match address {
                        Some(a) => a,
                        None => reg.meta(ADVERTISE_KEY).await?.ok_or_else(|| {
                            AdminError::Invalid(
                                "the pivot's address is unknown: start `burrow server` with --advertise, or pass --address HOST:PORT".into(),
                            )
                        })?,
                    };
                    let ttl = ttl_secs.unwrap_or(DEFAULT_TOKEN_TTL);
                    let expires_at = now_unix() + ttl as i64;
                    let token = EnrollToken::new(&pivot, &ctx.host_fingerprint()?, id.as_str());
                    reg.add_pending_device(&id, &labels, &token.digest(), expires_at).await?;
                    Ok(json!({
                        "id": id.as_str(),
                        "token": token.encode(),
                        "expires_at": format_unix(expires_at),
                        "pivot": pivot,
                    }))
                }
            }
        }
        Request::DeviceRemove { id: name } => {
            let id = id(&name)?;
            if !reg.remove_device(&id).await? {
                return Err(Refusal::Unknown(id.to_string()).into());
            }
            Ok(json!({"id": id.as_str()}))
        }
        Request::DeviceRevoke { id: name } => {
            let id = id(&name)?;
            if !reg.revoke_device(&id).await? {
                return Err(Refusal::Unknown(id.to_string()).into());
            }
            Ok(json!({"id": id.as_str()}))
        }
        Request::OperatorAdd { name, key: line, admin, allow } => {
            let name = id(&name)?;
            let k = key(&line, "the operator key")?;
            let allow: Vec<String> = allow
                .iter()
                .map(|s| s.parse::<Selector>().map(|s| s.to_string()).map_err(AdminError::Invalid))
                .collect::<Result<_, _>>()?;
            reg.add_operator(&name, &k, admin, &allow).await?;
            Ok(json!({"name": name.as_str(), "role": role(admin), "fingerprint": fingerprint(&k), "allow": allow}))
        }
        Request::OperatorList => {
            let list: Vec<Value> = reg
                .operators()
                .await?
                .iter()
                .map(|o| {
                    json!({
                        "name": o.name,
                        "role": role(o.admin),
                        "fingerprint": o.fingerprint,
                        "allow": o.allow,
                        "added": format_unix(o.created_at),
                    })
                })
                .collect();
            Ok(Value::Array(list))
        }
        Request::OperatorRemove { name } => {
            let name = id(&name)?;
            if !reg.remove_operator(&name).await? {
                return Err(AdminError::Invalid(format!("unknown operator '{name}'")));
            }
            Ok(json!({"name": name.as_str()}))
        }
        Request::Enroll { token, host_keys } => {
            let Caller::Enrollee(device_key) = caller else { unreachable!("authorized above") };
            let token = EnrollToken::decode(&token).map_err(|e| AdminError::Invalid(e.to_string()))?;
            let id = id(&token.device)?;
            let mut lines = Vec::new();
            for (i, line) in host_keys.iter().enumerate() {
                lines.push(burrow_core::keys::openssh_line(&key(line, &format!("host key #{}", i + 1))?));
            }
            reg.enroll(&token.digest(), &id, device_key, &lines).await?;
            Ok(json!({"id": id.as_str(), "fingerprint": fingerprint(device_key), "host_keys": lines.len()}))
        }
        Request::RotateKey { new_key, proof } => {
            let Caller::Device(id) = caller else { unreachable!("authorized above") };
            let new = key(&new_key, "the new key")?;
            let dev = reg.device(id).await?.ok_or_else(|| Refusal::Unknown(id.to_string()))?;
            let old_fp = dev.fingerprint.unwrap_or_default();
            let sig = SshSig::from_pem(proof.as_bytes()).map_err(|_| AdminError::Invalid("unreadable proof".into()))?;
            new.verify(ROTATE_NAMESPACE, rotate_message(id.as_str(), &old_fp).as_bytes(), &sig)
                .map_err(|_| AdminError::Invalid("the proof is not signed by the new key".into()))?;
            reg.rotate_key(id, &old_fp, &new).await?;
            Ok(json!({"id": id.as_str(), "fingerprint": fingerprint(&new)}))
        }
    }
}

fn role(admin: bool) -> &'static str {
    if admin {
        "admin"
    } else {
        "operator"
    }
}

fn authorize(caller: &Caller, req: &Request) -> Result<(), AdminError> {
    let ok = match (caller, req) {
        (Caller::Enrollee(_), Request::Enroll { .. }) => true,
        (Caller::Enrollee(_), _) | (_, Request::Enroll { .. }) => false,
        (Caller::Device(_), Request::RotateKey { .. } | Request::Whoami) => true,
        (Caller::Device(_), _) | (_, Request::RotateKey { .. }) => false,
        (Caller::Local, _) => true,
        (Caller::Operator { admin, .. }, r) => *admin || !r.is_admin(),
    };
    if ok {
        return Ok(());
    }
    Err(AdminError::Denied(match caller {
        Caller::Operator { name, .. } => format!("operator '{name}' does not have the admin role"),
        Caller::Device(id) => format!("device '{id}' may only rotate its own key"),
        Caller::Enrollee(_) => "an unregistered key may only enroll".into(),
        Caller::Local => "not for local use".into(),
    }))
}

async fn selectors_of(reg: &Registry, caller: &Caller) -> Result<Vec<Selector>, AdminError> {
    let Caller::Operator { name, .. } = caller else { return Ok(Vec::new()) };
    let Some(op) = reg.operator(name).await? else { return Ok(Vec::new()) };
    Ok(op.allow.iter().filter_map(|s| s.parse().ok()).collect())
}

/// Whether an operator may reach `id:port` per the registry (any pivot's view).
fn check(id: &Id, dev: &DeviceRecord, port: u32) -> Result<(), Refusal> {
    if dev.revoked_at.is_some() {
        return Err(Refusal::Revoked(id.clone()));
    }
    if dev.fingerprint.is_none() {
        return Err(Refusal::NotEnrolled(id.clone()));
    }
    if dev.tunnel_open() {
        if dev.ports.contains(&port) {
            return Ok(());
        }
        return Err(Refusal::PortNotExposed { id: id.clone(), port });
    }
    if dev.presence.as_deref() == Some("online") {
        return Ok(());
    }
    Err(Refusal::Offline { id: id.clone(), last_seen: dev.last_seen })
}

/// The JSON shape of a device in `device list --json` and `device show`.
pub fn device_json(d: &DeviceRecord) -> Value {
    json!({
        "id": d.id,
        "online": d.online(),
        "presence": d.presence,
        "tunnel": d.tunnel_open(),
        "last_seen": d.last_seen.map(format_unix),
        "labels": d.labels,
        "ports": d.ports,
        "fingerprint": d.fingerprint,
        "enrolled": d.fingerprint.is_some(),
        "revoked": d.revoked_at.is_some(),
        "host_keys": d.host_keys,
        "pivot": d.tunnel_pivot,
        "added": format_unix(d.created_at),
    })
}
