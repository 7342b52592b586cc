//! The admin commands: one implementation, reached two ways. On the pivot
//! host the CLI calls [`execute`] on the registry directly; from anywhere
//! else it sends the same [`Request`] over SSH and the pivot calls
//! [`execute`] with the caller's identity. The caller's role decides.

use burrow_core::cert::{device_users_or_default, DeviceTrust, DEFAULT_CERT_TTL, MAX_CA_KEYS, MAX_REVOKED_KEYS};
use burrow_core::enroll::EnrollToken;
use burrow_core::keys::{fingerprint, parse_public_key, PublicKey};
use burrow_core::rpc::{
    allowed, rotate_message, BanInfo, CaKeyInfo, CertificateIssued, DeviceAdded, DeviceInfo, ListenInfo, OperatorInfo,
    Request, Response, Selector, WhoamiInfo, ROTATE_NAMESPACE,
};
use std::time::Duration;

use burrow_core::text::printable;
use burrow_core::time::{expires_at, format_unix, now_unix};
use burrow_core::Id;
use russh::keys::ssh_key::SshSig;
use serde_json::{json, Value};

use crate::audit::AuditRecord;
use crate::refusal::Refusal;
use crate::registry::{DeviceRecord, HostKeyReport, Identity, Registry};

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
    /// How the audit names the caller.
    pub fn actor(&self) -> String {
        match self {
            Caller::Local => format!("local:{}", local_user()),
            Caller::Operator { name, .. } => format!("operator:{name}"),
            Caller::Device(id) => format!("device:{id}"),
            Caller::Enrollee(key) => format!("enrollee:{}", fingerprint(key)),
        }
    }

    /// `None` for a peer pivot: it makes no requests.
    pub fn from_identity(identity: &Identity) -> Option<Caller> {
        match identity {
            Identity::Device(id) => Some(Caller::Device(id.clone())),
            Identity::Operator { name, admin } => Some(Caller::Operator { name: name.clone(), admin: *admin }),
            Identity::Pivot(_) => None,
        }
    }
}

/// The Unix user running this process, for audit records of local commands.
pub fn local_user() -> String {
    // SAFETY: getuid cannot fail; getpwuid returns NULL or a valid entry
    // that is read before any other passwd call on this thread.
    let uid = unsafe { libc::getuid() };
    let name = unsafe {
        let pw = libc::getpwuid(uid);
        if pw.is_null() || (*pw).pw_name.is_null() {
            None
        } else {
            std::ffi::CStr::from_ptr((*pw).pw_name).to_str().ok().map(str::to_string)
        }
    };
    name.unwrap_or_else(|| format!("uid {uid}"))
}

/// Who made a request and from where, for the audit.
#[derive(Debug, Clone, Default)]
pub struct Origin {
    pub actor: String,
    pub source: Option<String>,
    pub session: Option<String>,
    /// The pivot that took the request; `None` for a local command.
    pub pivot: Option<String>,
}

/// What the pivot knows about itself, for enrollment tokens.
pub struct Context<'a> {
    pub registry: &'a Registry,
    /// The pivot's public host key, OpenSSH line (empty if unknown).
    pub host_key: String,
    pub origin: Origin,
}

impl Context<'_> {
    fn host_fingerprint(&self) -> Result<String, AdminError> {
        parse_public_key(&self.host_key, "the pivot host key").map(|k| fingerprint(&k)).map_err(|_| {
            AdminError::Invalid("the pivot's host key is unknown: start `burrow server` once first".into())
        })
    }
}

/// Meta key where a running pivot records its MQTT certificate's
/// fingerprint (empty when it serves no TLS MQTT itself).
pub const MQTT_FINGERPRINT_KEY: &str = "mqtt_fingerprint";

/// Meta key where a running pivot records the address devices should dial.
pub const ADVERTISE_KEY: &str = "advertise";

/// Meta key where a running pivot records its lease range (`FIRST-LAST`).
pub const LEASE_RANGE_KEY: &str = "lease_range";

/// Meta key where a running pivot records its `--lease-gateway-ports`.
pub const LEASE_GATEWAY_KEY: &str = "lease_gateway_ports";
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

/// Runs a request from a local command: its audit record goes straight
/// into the registry.
pub async fn execute(ctx: &Context<'_>, caller: &Caller, req: Request) -> Response {
    let (response, record) = execute_audited(ctx, caller, req).await;
    if let Some(rec) = record {
        if let Err(e) = ctx.registry.insert_audit(&[rec]).await {
            tracing::warn!(error = %e, "cannot write the audit record of an admin change");
        }
    }
    response
}

/// Runs a request; also returns the audit record it calls for, which the
/// caller writes (the pivot through its batched, flood-summarising writer).
pub async fn execute_audited(ctx: &Context<'_>, caller: &Caller, req: Request) -> (Response, Option<AuditRecord>) {
    // Changes are audited whatever their outcome; reads only when refused.
    let event = audit_event(&req).or_else(|| authorize(caller, &req).is_err().then_some("admin_denied"));
    let args = event.map(|_| match audit_args(&req) {
        Value::Null => json!({"op": serde_json::to_value(&req).ok().and_then(|v| v.get("op").cloned())}),
        args => args,
    });
    let result = run(ctx, caller, req).await;
    let mut record = None;
    if let (Some(event), Some(mut args)) = (event, args) {
        if let Ok(v) = &result {
            // What a removal deleted stays in the audit trail.
            if let Some(removed) = v.get("removed") {
                args["removed"] = removed.clone();
            }
            // What was signed: an auditor ties a device's sshd log line
            // (key id and serial) to the operator and what it allowed.
            if event == "certificate" {
                for k in ["serial", "key_id", "principals", "valid_after", "valid_before", "ca_fingerprint"] {
                    args[k] = v[k].clone();
                }
            }
        }
        let mut rec = AuditRecord::new(event)
            .outcome(result.is_ok(), result.as_ref().err().map(|e| printable(&e.to_string()).into_owned()));
        rec.actor = Some(ctx.origin.actor.clone());
        rec.source = ctx.origin.source.clone();
        rec.session = ctx.origin.session.clone();
        rec.pivot = Some(ctx.origin.pivot.clone().unwrap_or_else(|| "cli".into()));
        match caller {
            Caller::Operator { name, .. } => rec.operator = Some(name.to_string()),
            Caller::Device(id) => rec.device = Some(id.to_string()),
            _ => {}
        }
        if let Some(id) = args.get("id").and_then(Value::as_str) {
            rec.device = Some(id.to_string());
        }
        if let Some(name) = args.get("name").and_then(Value::as_str) {
            rec.target = Some(format!("operator:{name}"));
        }
        rec.args = Some(args);
        record = Some(rec);
    }
    let response = match result {
        Ok(v) => Response::ok(v),
        Err(e) => Response::err(e),
    };
    (response, record)
}

/// The audit event of a request that changes something; `None` for reads.
fn audit_event(req: &Request) -> Option<&'static str> {
    Some(match req {
        Request::DeviceAdd { .. } => "device_add",
        Request::DeviceRemove { .. } => "device_remove",
        Request::DeviceRevoke { .. } => "device_revoke",
        Request::OperatorAdd { .. } => "operator_add",
        Request::OperatorRemove { .. } => "operator_remove",
        Request::Enroll { .. } => "enroll",
        Request::RotateKey { .. } => "rotate_key",
        Request::HostKeys { .. } => "host_keys",
        Request::DeviceListen { .. } => "lease_add",
        Request::DeviceUnlisten { .. } => "lease_remove",
        Request::DeviceHostKeysReset { .. } => "host_keys_reset",
        Request::BanAdd { .. } => "ban_add",
        Request::BanRemove { .. } => "ban_remove",
        Request::Certificate => "certificate",
        Request::CaRotate { .. } => "ca_rotate",
        _ => return None,
    })
}

/// A request's arguments as the audit keeps them: keys by fingerprint,
/// never a token or a signature.
fn audit_args(req: &Request) -> Value {
    let fp =
        |line: &str| parse_public_key(line, "key").map(|k| fingerprint(&k)).unwrap_or_else(|_| "unreadable key".into());
    match req {
        Request::DeviceAdd { id, key, labels, ttl_secs, address, .. } => json!({
            "id": id.as_str(), "fingerprint": key.as_deref().map(fp), "labels": labels,
            "enrollment_token": key.is_none(), "ttl_secs": ttl_secs, "address": address.as_deref().map(printable),
        }),
        Request::DeviceRemove { id } | Request::DeviceRevoke { id } => json!({"id": id.as_str()}),
        Request::OperatorAdd { name, key, admin, allow, device_users, cert_ttl_secs } => json!({
            "name": name.as_str(), "fingerprint": fp(key), "role": role(*admin),
            "allow": allow.iter().map(|a| printable(a).into_owned()).collect::<Vec<_>>(),
            "device_users": device_users.iter().map(|u| printable(u).into_owned()).collect::<Vec<_>>(),
            "cert_ttl_secs": cert_ttl_secs,
        }),
        Request::Certificate => json!({}),
        Request::CaRotate { overlap_secs, now } => json!({"overlap_secs": overlap_secs, "now": now}),
        Request::OperatorRemove { name } => json!({"name": name.as_str()}),
        Request::Enroll { token, host_keys } => json!({
            "id": EnrollToken::decode(token).map(|t| printable(&t.device).into_owned()).ok(),
            "host_keys": host_keys.len(),
        }),
        Request::RotateKey { new_key, .. } => json!({"new_fingerprint": fp(new_key)}),
        Request::HostKeys { keys } => {
            json!({"fingerprints": keys.iter().take(MAX_HOST_KEYS).map(|k| fp(k)).collect::<Vec<_>>()})
        }
        Request::DeviceHostKeysReset { id, forget } => json!({"id": id.as_str(), "forget": forget}),
        Request::DeviceListen { id, port, bind } => {
            json!({"id": id.as_str(), "port": port, "bind": bind.as_deref().map(printable)})
        }
        Request::DeviceUnlisten { id, port } => json!({"id": id.as_str(), "port": port}),
        Request::BanAdd { net, secs } => json!({"net": printable(net), "secs": secs}),
        Request::BanRemove { net } => json!({"net": printable(net)}),
        _ => Value::Null,
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
            let (kind, name, role_name) = match caller {
                Caller::Local => ("local", None, Some("admin")),
                Caller::Operator { name, admin } => ("operator", Some(name.to_string()), Some(role(*admin))),
                Caller::Device(id) => ("device", Some(id.to_string()), None),
                Caller::Enrollee(_) => ("enrollee", None, None),
            };
            let me = WhoamiInfo {
                kind: kind.into(),
                name,
                role: role_name.map(str::to_string),
                pivot_host_key: ctx.host_key.clone(),
            };
            Ok(serde_json::to_value(me).expect("serializes"))
        }
        Request::DeviceList => {
            let selectors = selectors_of(reg, caller).await?;
            let list: Vec<Value> =
                reg.devices().await?.iter().filter(|d| allowed(&selectors, &d.labels)).map(device_json).collect();
            Ok(Value::Array(list))
        }
        Request::DeviceShow { id: name } => {
            let id = name;
            let selectors = selectors_of(reg, caller).await?;
            match reg.device(&id).await? {
                Some(d) if allowed(&selectors, &d.labels) => Ok(device_json(&d)),
                // Unknown and not allowed read alike to a restricted operator.
                Some(_) => Err(Refusal::NotAllowed(id).into()),
                None if !selectors.is_empty() => Err(Refusal::NotAllowed(id).into()),
                None => Err(unknown(reg, &id).await.into()),
            }
        }
        Request::Check { id: name, port } => {
            let id = name;
            let selectors = selectors_of(reg, caller).await?;
            let dev = match reg.device(&id).await? {
                Some(dev) if allowed(&selectors, &dev.labels) => dev,
                Some(_) => return Err(Refusal::NotAllowed(id).into()),
                None if !selectors.is_empty() => return Err(Refusal::NotAllowed(id).into()),
                None => return Err(unknown(reg, &id).await.into()),
            };
            check(&id, &dev, port)?;
            Ok(device_json(&dev))
        }
        Request::DeviceAdd { id: name, key: pubkey, labels, ttl_secs, address, host_keys } => {
            let id = name;
            if pubkey.is_none() && !host_keys.is_empty() {
                return Err(AdminError::Invalid(
                    "--host-key goes with --key; an enrolling device registers its own host keys".into(),
                ));
            }
            match pubkey {
                Some(line) => {
                    let k = key(&line, "the device key")?;
                    let mut lines = Vec::new();
                    for (i, line) in host_keys.iter().enumerate() {
                        lines.push(burrow_core::keys::openssh_line(&key(line, &format!("host key #{}", i + 1))?));
                    }
                    reg.add_device(&id, &k, &labels, &lines).await?;
                    let added = DeviceAdded {
                        id: id.to_string(),
                        fingerprint: Some(fingerprint(&k)),
                        token: None,
                        expires_at: None,
                        pivot: None,
                    };
                    Ok(serde_json::to_value(added).expect("serializes"))
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
                    let ttl = Duration::from_secs(ttl_secs.unwrap_or(DEFAULT_TOKEN_TTL));
                    let expires_at = expires_at(now_unix(), ttl).map_err(|e| AdminError::Invalid(e.to_string()))?;
                    let mut token = EnrollToken::new(&pivot, &ctx.host_fingerprint()?, id.as_str());
                    token.mqtt_fingerprint = reg.meta(MQTT_FINGERPRINT_KEY).await?.filter(|p| !p.is_empty());
                    reg.add_pending_device(&id, &labels, &token.digest(), expires_at).await?;
                    let added = DeviceAdded {
                        id: id.to_string(),
                        fingerprint: None,
                        token: Some(token.encode()),
                        expires_at: Some(format_unix(expires_at)),
                        pivot: Some(pivot),
                    };
                    Ok(serde_json::to_value(added).expect("serializes"))
                }
            }
        }
        Request::DeviceRemove { id: name } => {
            let id = name;
            let removed = reg.device(&id).await?.map(|d| device_json(&d));
            if !reg.remove_device(&id).await? {
                return Err(unknown(reg, &id).await.into());
            }
            Ok(json!({"id": id.as_str(), "removed": removed}))
        }
        Request::DeviceRevoke { id: name } => {
            let id = name;
            if !reg.revoke_device(&id).await? {
                return Err(unknown(reg, &id).await.into());
            }
            Ok(json!({"id": id.as_str()}))
        }
        Request::OperatorAdd { name, key: line, admin, allow, device_users, cert_ttl_secs } => {
            let k = key(&line, "the operator key")?;
            let selectors: Vec<Selector> =
                allow.iter().map(|s| s.parse::<Selector>().map_err(AdminError::Invalid)).collect::<Result<_, _>>()?;
            let allow: Vec<String> = selectors.iter().map(Selector::to_string).collect();
            if device_users.len() > burrow_core::cert::MAX_DEVICE_USERS {
                return Err(AdminError::Invalid(format!(
                    "at most {} device users per operator",
                    burrow_core::cert::MAX_DEVICE_USERS
                )));
            }
            let mut users: Vec<String> = Vec::new();
            for u in device_users {
                burrow_core::cert::validate_device_user(&u).map_err(AdminError::Invalid)?;
                if !users.contains(&u) {
                    users.push(u);
                }
            }
            // The certificate this operator will get must be one sshd takes.
            let principals =
                burrow_core::cert::principals(&selectors, &device_users_or_default(&users, admin, name.as_str()))
                    .map_err(AdminError::Invalid)?;
            // A key re-added with less than its certificates still carry
            // would keep the more until they expire: devices cannot revoke
            // one certificate of a key and not another.
            let now = now_unix();
            for (had, until) in reg.live_certificates_of_key(&fingerprint(&k), now).await? {
                if let Some(extra) = had.iter().find(|p| !principals.contains(p)) {
                    return Err(AdminError::Invalid(format!(
                        "key {} has a certificate until {} that also grants {}; add the operator under a new key, or after it expires",
                        fingerprint(&k),
                        format_unix(until),
                        printable(extra)
                    )));
                }
            }
            let ttl = cert_ttl_secs.map(|t| t as i64);
            reg.add_operator(&name, &k, admin, &allow, &users, ttl).await?;
            Ok(json!({
                "name": name.as_str(), "role": role(admin), "fingerprint": fingerprint(&k), "allow": allow,
                "device_users": device_users_or_default(&users, admin, name.as_str()),
                "cert_ttl_secs": cert_ttl_secs.unwrap_or(DEFAULT_CERT_TTL.as_secs()),
            }))
        }
        Request::Certificate => {
            let Caller::Operator { name, .. } = caller else { unreachable!("authorized above") };
            let op = reg
                .operator(name)
                .await?
                .ok_or_else(|| AdminError::Denied(format!("operator '{name}' was removed")))?;
            let k = key(&op.public_key, "the operator key")?;
            let selectors: Vec<Selector> = op.allow.iter().filter_map(|s| s.parse().ok()).collect();
            let principals = burrow_core::cert::principals(
                &selectors,
                &device_users_or_default(&op.device_users, op.admin, &op.name),
            )
            .map_err(AdminError::Invalid)?;
            let ttl = op.cert_ttl.map_or(DEFAULT_CERT_TTL, |t| Duration::from_secs(t.max(1) as u64));
            let issued = crate::ca::issue(reg, name, &k, &principals, ttl, now_unix()).await?;
            let info = CertificateIssued {
                certificate: issued.certificate,
                serial: issued.serial,
                key_id: crate::ca::key_id(name, issued.serial),
                principals,
                valid_after: format_unix(issued.valid_after),
                valid_before: format_unix(issued.valid_before),
                ca_fingerprint: issued.ca_fingerprint,
            };
            Ok(serde_json::to_value(info).expect("serializes"))
        }
        Request::Trust => {
            let Caller::Device(id) = caller else { unreachable!("authorized above") };
            let dev = reg.device(id).await?.ok_or_else(|| Refusal::Unknown(id.to_string()))?;
            let now = now_unix();
            let ca_keys: Vec<String> = reg
                .user_cas()
                .await?
                .into_iter()
                .filter(|c| c.trusted(now))
                .take(MAX_CA_KEYS)
                .map(|c| c.public_key)
                .collect();
            if ca_keys.is_empty() {
                return Err(crate::RegistryError::NoUserCa.into());
            }
            let revoked_keys = reg.revoked_operator_keys(now, MAX_REVOKED_KEYS).await?;
            reg.set_trust_at(id, now).await?;
            let trust = DeviceTrust { id: id.to_string(), labels: dev.labels, ca_keys, revoked_keys, pivot_time: now };
            Ok(serde_json::to_value(trust).expect("serializes"))
        }
        Request::CaShow => {
            let now = now_unix();
            let cas = reg.user_cas().await?;
            let signing = crate::registry::signing_ca(&cas, now).map(|c| c.fingerprint.clone());
            let list: Vec<CaKeyInfo> = cas
                .iter()
                .filter(|c| c.trusted(now))
                .map(|c| CaKeyInfo {
                    public_key: c.public_key.clone(),
                    fingerprint: c.fingerprint.clone(),
                    state: if signing.as_deref() == Some(c.fingerprint.as_str()) {
                        "signing"
                    } else if c.signs_from > now {
                        "next"
                    } else {
                        "retiring"
                    }
                    .into(),
                    added: format_unix(c.created_at),
                    signs_from: format_unix(c.signs_from),
                    retires_at: c.retires_at.map(format_unix),
                })
                .collect();
            Ok(serde_json::to_value(list).expect("serializes"))
        }
        Request::CaRotate { overlap_secs, now: at_once } => {
            if overlap_secs > burrow_core::time::MAX_DURATION.as_secs() {
                return Err(AdminError::Invalid("--overlap is longer than 100 years".into()));
            }
            let (public, fp, pem, _key) = crate::ca::new_key();
            let now = now_unix();
            let (signs_from, old_retires) =
                reg.rotate_user_ca(&public, &fp, &pem, now, Duration::from_secs(overlap_secs), at_once).await?;
            Ok(json!({
                "fingerprint": fp, "public_key": public, "signs_from": format_unix(signs_from),
                "old_retires_at": old_retires.map(format_unix),
            }))
        }
        Request::OperatorList => Ok(Value::Array(reg.operators().await?.iter().map(operator_json).collect())),
        Request::OperatorRemove { name } => {
            let removed = reg.operator(&name).await?.map(|o| operator_json(&o));
            if !reg.remove_operator(&name).await? {
                return Err(AdminError::Invalid(format!("unknown operator '{name}'")));
            }
            Ok(json!({"name": name.as_str(), "removed": removed}))
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
        Request::BanList => {
            let list: Vec<Value> = reg
                .bans()
                .await?
                .iter()
                .map(|b| {
                    let info = BanInfo {
                        net: b.net.clone(),
                        until: format_unix(b.until),
                        reason: printable(&b.reason).into_owned(),
                        by: printable(&b.actor).into_owned(),
                        added: format_unix(b.created_at),
                    };
                    serde_json::to_value(info).expect("serializes")
                })
                .collect();
            Ok(Value::Array(list))
        }
        Request::BanAdd { net, secs } => {
            let net = crate::bans::parse_net(&net).map_err(AdminError::Invalid)?;
            crate::bans::check_manual(&net).map_err(AdminError::Invalid)?;
            if secs == 0 {
                return Err(AdminError::Invalid("a ban must last at least 1s".into()));
            }
            let until =
                expires_at(now_unix(), Duration::from_secs(secs)).map_err(|e| AdminError::Invalid(e.to_string()))?;
            reg.add_ban(&net.to_string(), until, "added by hand", &ctx.origin.actor).await?;
            // An earlier, longer ban of the same net stays as it was.
            let until = reg.bans().await?.into_iter().find(|b| b.net == net.to_string()).map_or(until, |b| b.until);
            Ok(json!({"net": net.to_string(), "until": format_unix(until)}))
        }
        Request::BanRemove { net } => {
            let net = crate::bans::parse_net(&net).map_err(AdminError::Invalid)?;
            if !reg.remove_ban(&net.to_string()).await? {
                return Err(AdminError::Invalid(format!("{net} is not banned")));
            }
            Ok(json!({"net": net.to_string()}))
        }
        Request::Audit { since, until, device, operator, source, event, limit } => {
            if let Some(e) = event.as_deref().filter(|e| !crate::audit::EVENTS.contains(e)) {
                let known = crate::audit::EVENTS.join(", ");
                return Err(AdminError::Invalid(format!("unknown event '{}'; events are: {known}", printable(e))));
            }
            if let (Some(s), Some(u)) = (since, until) {
                if s > u {
                    return Err(AdminError::Invalid("--since is later than --until".into()));
                }
            }
            // `ip:port` as the SOURCE column shows it means its address.
            let source = source.map(|s| s.parse::<std::net::SocketAddr>().map(|a| a.ip().to_string()).unwrap_or(s));
            let q = crate::audit::AuditQuery { since, until, device, operator, source, event, limit };
            Ok(serde_json::to_value(reg.audit(&q).await?).unwrap_or_default())
        }
        Request::DeviceListen { id, port, bind } => {
            if port == 0 {
                return Err(AdminError::Invalid("the device port must be 1-65535".into()));
            }
            let range = reg.meta(LEASE_RANGE_KEY).await?.ok_or_else(|| {
                AdminError::Invalid("the pivot's lease range is unknown: start `burrow server` once first".into())
            })?;
            let range = parse_lease_range(&range).map_err(AdminError::Invalid)?;
            let bind: std::net::SocketAddr = match bind.as_deref() {
                None => std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
                Some(b) => b.parse().map_err(|_| {
                    AdminError::Invalid(format!("--bind {}: give ADDRESS:PORT, e.g. 127.0.0.1:9081", printable(b)))
                })?,
            };
            // The address the pivot will really bind, as its GatewayPorts
            // setting says: what is stored, shown and checked.
            let gateway: crate::leases::GatewayPorts =
                reg.meta(LEASE_GATEWAY_KEY).await?.and_then(|g| g.parse().ok()).unwrap_or_default();
            let bind = gateway.bind(bind);
            if bind.port() != 0 && !range.contains(&bind.port()) {
                return Err(AdminError::Invalid(format!(
                    "port {} is outside the pivot's lease range {}-{}",
                    bind.port(),
                    range.start(),
                    range.end()
                )));
            }
            // A port another program holds is skipped (this runs on the pivot's host).
            let ip = bind.ip();
            let bindable = |p: u16| std::net::TcpListener::bind((ip, p)).is_ok();
            let bound = reg.add_listen(&id, port, bind, range, bindable).await?;
            if !bound.ip().is_loopback() {
                tracing::warn!(device = %id, %bound, "a lease on a non-loopback address: anyone who reaches it reaches the device's port, with no authentication");
            }
            Ok(json!({"id": id.as_str(), "port": port, "bind": bound.to_string()}))
        }
        Request::DeviceUnlisten { id, port } => {
            if !reg.remove_listen(&id, port).await? {
                return Err(AdminError::Invalid(format!("device '{id}' has no lease for port {port}")));
            }
            Ok(json!({"id": id.as_str(), "port": port}))
        }
        Request::DeviceListens => {
            let list: Vec<ListenInfo> = reg
                .listens()
                .await?
                .into_iter()
                .map(|(id, port, bind, at)| ListenInfo { id, port, bind, added: format_unix(at) })
                .collect();
            Ok(serde_json::to_value(list).expect("serializes"))
        }
        Request::HostKeys { keys } => {
            let Caller::Device(id) = caller else { unreachable!("authorized above") };
            if keys.is_empty() || keys.len() > MAX_HOST_KEYS {
                return Err(AdminError::Invalid(format!("report 1 to {MAX_HOST_KEYS} host keys")));
            }
            let mut lines = Vec::new();
            for (i, line) in keys.iter().enumerate() {
                let k = key(line, &format!("host key #{}", i + 1))?;
                host_key_kind(&k).map_err(|e| AdminError::Invalid(format!("host key #{}: {e}", i + 1)))?;
                let line = burrow_core::keys::openssh_line(&k);
                if !lines.contains(&line) {
                    lines.push(line);
                }
            }
            let report = reg.report_host_keys(id, &lines).await?;
            let fps: Vec<String> =
                lines.iter().filter_map(|l| parse_public_key(l, "").ok()).map(|k| fingerprint(&k)).collect();
            match report {
                HostKeyReport::Registered => {
                    tracing::info!(device = %id, keys = ?fps, "host keys registered from the device's report")
                }
                HostKeyReport::Known => {}
                HostKeyReport::Changed => {
                    tracing::warn!(device = %id, keys = ?fps, "the device reports different host keys; kept the registered ones (accept with `burrow device host-keys reset {id}`)")
                }
            }
            let state = match report {
                HostKeyReport::Registered => "registered",
                HostKeyReport::Known => "known",
                HostKeyReport::Changed => "changed",
            };
            Ok(json!({"id": id.as_str(), "host_keys": state}))
        }
        Request::DeviceHostKeysReset { id: name, forget } => {
            let id = name;
            let now = reg.reset_host_keys(&id, forget).await?.ok_or_else(|| {
                AdminError::Invalid(format!(
                    "device '{id}' reported no changed host keys; to drop its keys so that its next report registers them, add --forget"
                ))
            })?;
            let fingerprints: Vec<String> =
                now.iter().filter_map(|l| parse_public_key(l, "").ok()).map(|k| fingerprint(&k)).collect();
            Ok(json!({"id": id.as_str(), "host_keys": now, "fingerprints": fingerprints}))
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
        (
            Caller::Device(_),
            Request::RotateKey { .. } | Request::HostKeys { .. } | Request::Trust | Request::Whoami,
        ) => true,
        (Caller::Device(_), _) | (_, Request::RotateKey { .. } | Request::HostKeys { .. } | Request::Trust) => false,
        // A certificate is for the key that asks: an operator's.
        (Caller::Operator { .. }, Request::Certificate) => true,
        (_, Request::Certificate) => false,
        (Caller::Local, _) => true,
        (Caller::Operator { admin, .. }, r) => *admin || !r.needs_admin(),
    };
    if ok {
        return Ok(());
    }
    Err(AdminError::Denied(match caller {
        Caller::Operator { name, .. } => format!("operator '{name}' does not have the admin role"),
        Caller::Device(id) => {
            format!("device '{id}' may only rotate its own key, report its host keys and fetch what it trusts")
        }
        Caller::Local if matches!(req, Request::Certificate) => {
            "certificates are for operators: run `burrow login` with an operator's key".into()
        }
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

fn operator_json(o: &crate::registry::OperatorRecord) -> Value {
    let info = OperatorInfo {
        name: o.name.clone(),
        role: role(o.admin).into(),
        fingerprint: o.fingerprint.clone(),
        allow: o.allow.clone(),
        device_users: device_users_or_default(&o.device_users, o.admin, &o.name),
        cert_ttl_secs: o.cert_ttl.map_or(DEFAULT_CERT_TTL.as_secs(), |t| t.max(0) as u64),
        added: format_unix(o.created_at),
    };
    serde_json::to_value(info).expect("serializes")
}

/// `FIRST-LAST`, unprivileged.
pub fn parse_lease_range(s: &str) -> Result<std::ops::RangeInclusive<u16>, String> {
    let (a, b) = s.split_once('-').ok_or("give FIRST-LAST, e.g. 30000-39999")?;
    let a: u16 = a.trim().parse().map_err(|_| "FIRST is a port")?;
    let b: u16 = b.trim().parse().map_err(|_| "LAST is a port")?;
    if a < 1024 || a > b {
        return Err("a lease range is unprivileged (from 1024) with FIRST <= LAST".into());
    }
    Ok(a..=b)
}

/// The most host keys a device may report (sshd has three kinds; room for rotation).
const MAX_HOST_KEYS: usize = 8;

/// "unknown device", with a near-miss id if there is one. Only for callers
/// who may see every device: a restricted operator gets "not allowed".
async fn unknown(reg: &Registry, id: &Id) -> Refusal {
    match reg.near_miss(id.as_str()).await {
        Ok(Some(near)) => Refusal::UnknownNear { id: id.to_string(), near },
        _ => Refusal::Unknown(id.to_string()),
    }
}

/// The host key types an sshd has: ed25519, ECDSA and RSA of 2048 bits or more.
fn host_key_kind(k: &burrow_core::keys::PublicKey) -> Result<(), String> {
    use russh::keys::ssh_key::public::KeyData;
    match k.key_data() {
        KeyData::Ed25519(_) | KeyData::Ecdsa(_) => Ok(()),
        KeyData::Rsa(rsa) if rsa.n().as_positive_bytes().map_or(0, <[u8]>::len) * 8 >= 2048 => Ok(()),
        KeyData::Rsa(_) => Err("RSA host keys must have at least 2048 bits".into()),
        _ => Err(format!("{} is not an sshd host key type burrow accepts", k.algorithm())),
    }
}

/// One word a person can read for where a device stands.
fn device_status(d: &DeviceRecord) -> &'static str {
    if d.revoked_at.is_some() {
        "revoked"
    } else if d.fingerprint.is_none() {
        "not-enrolled"
    } else if d.tunnel_open() {
        "connected"
    } else if d.presence.as_deref() == Some("online") {
        "waiting" // on MQTT, for a wake-up
    } else {
        "offline"
    }
}

/// The JSON shape of a device in `device list --json` and `device show`.
pub fn device_json(d: &DeviceRecord) -> Value {
    serde_json::to_value(device_info(d)).expect("serializes")
}

pub fn device_info(d: &DeviceRecord) -> DeviceInfo {
    DeviceInfo {
        id: d.id.clone(),
        status: device_status(d).into(),
        online: d.online(),
        presence: d.presence.clone(),
        tunnel: d.tunnel_open(),
        last_seen: d.last_seen.map(format_unix),
        labels: d.labels.clone(),
        ports: d.ports.clone(),
        fingerprint: d.fingerprint.clone(),
        enrolled: d.fingerprint.is_some(),
        revoked: d.revoked_at.is_some(),
        host_keys: d.host_keys.clone(),
        host_keys_changed: d.host_keys_changed.clone(),
        pivot: d.tunnel_pivot.clone(),
        rtt_ms: d.rtt_ms,
        health_at: d.health_at.map(format_unix),
        targets: d.targets.clone(),
        access: if d.trust_at.is_some() { "certificates" } else { "authorized_keys" }.into(),
        trust_at: d.trust_at.map(format_unix),
        added: format_unix(d.created_at),
    }
}
