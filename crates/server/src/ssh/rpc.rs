//! The `@burrow` channel: one admin request per channel, answered by
//! [`crate::admin::execute`] with the caller's identity.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use burrow_core::text::printable;

use burrow_core::rpc::{Request, Response};
use russh::server::{ChannelOpenHandle, Msg};
use russh::{Channel, ChannelMsg};
use tracing::info;

use super::accept::failed;
use super::handler::ConnState;
use crate::admin::{self, Caller};
use crate::limits::{source_of, Counted, Counter, ADMIN_REQUEST_TIMEOUT, CONN_ADMIN_BUFFER, MAX_ADMIN_REQUEST};

/// Takes `n` more bytes of `counter` (up to `max`) into `held`.
fn reserve(held: &mut Option<Counted>, counter: &Arc<Counter>, n: usize, max: usize) -> bool {
    match held {
        Some(h) => h.grow(n, max),
        None => {
            *held = counter.try_add(n, max);
            held.is_some()
        }
    }
}
use crate::Shared;

/// Where a request came from, for failures and the audit.
pub(crate) struct From {
    pub peer: SocketAddr,
    pub conn: u64,
    pub state: Arc<ConnState>,
}

pub(crate) async fn serve(
    shared: Arc<Shared>,
    caller: Caller,
    from: From,
    mut channel: Channel<Msg>,
    reply: ChannelOpenHandle,
    _open: Counted,
) {
    reply.accept().await;
    let mut buf = Vec::new();
    // What this request holds of the pivot-wide admin buffer.
    // What this request holds of the pivot-wide buffer, and of its connection's share.
    let mut held: Option<Counted> = None;
    let mut mine: Option<Counted> = None;
    let limit = shared.config.limits.admin_buffer;
    let share = if matches!(caller, Caller::Enrollee(_)) { MAX_ADMIN_REQUEST } else { CONN_ADMIN_BUFFER };
    let deadline = tokio::time::Instant::now() + ADMIN_REQUEST_TIMEOUT;
    let busy = || (Response::err("pivot busy: too many admin requests in progress; retry shortly"), false);
    let (response, mutated) = loop {
        let msg = match tokio::time::timeout_at(deadline, channel.wait()).await {
            Ok(msg) => msg,
            Err(_) => break (Response::err(format!("request not complete within {ADMIN_REQUEST_TIMEOUT:?}")), false),
        };
        match msg {
            Some(ChannelMsg::Data { data }) => {
                if buf.len() + data.len() > MAX_ADMIN_REQUEST {
                    break (Response::err(format!("request too large (limit {MAX_ADMIN_REQUEST} bytes)")), false);
                }
                if !reserve(&mut mine, &from.state.admin_buffered, data.len(), share) {
                    break busy();
                }
                if !reserve(&mut held, &shared.admin_buffered, data.len(), limit) {
                    break busy();
                }
                buf.extend_from_slice(&data);
                if let Some(end) = buf.iter().position(|b| *b == b'\n') {
                    break handle(&shared, &caller, &from, &buf[..end]).await;
                }
            }
            Some(ChannelMsg::Eof) => break handle(&shared, &caller, &from, &buf).await,
            Some(_) => {}
            None => return,
        }
    };
    drop(buf);
    drop((held, mine));
    let mut out = serde_json::to_vec(&response).unwrap_or_default();
    out.push(b'\n');
    // A peer that never opens its window would park this write (and what it
    // holds) for ever: the answer gets as long as a request.
    let reply = async {
        channel.data(&out[..]).await?;
        channel.eof().await?;
        channel.close().await
    };
    let _ = tokio::time::timeout(ADMIN_REQUEST_TIMEOUT, reply).await;
    if mutated {
        // Removals, revocations and rotations take effect now, not at the
        // next poll; after the answer, since the caller may be among them.
        crate::watch::enforce(&shared).await;
    }
}

/// Answers one request; also says whether it changed the registry.
async fn handle(shared: &Arc<Shared>, caller: &Caller, from: &From, line: &[u8]) -> (Response, bool) {
    let req: Request = match serde_json::from_slice(line) {
        Ok(r) => r,
        Err(e) => return (Response::err(format!("malformed request: {e}")), false),
    };
    // A device reports its host keys once per connection: each report takes
    // the registry's write lock and adds an audit record.
    if matches!(req, Request::HostKeys { .. }) && from.state.host_keys_reported.swap(true, Ordering::Relaxed) {
        return (Response::err("host keys were already reported on this connection"), false);
    }
    if let Some(why) = throttled(shared, caller, from, &req) {
        return (Response::err(why), false);
    }
    // Host keys, certificates and CA keys change no session: nothing to enforce after them.
    let mutates = req.changes_access();
    let enrolling = matches!(req, Request::Enroll { .. });
    let what = serde_json::to_value(&req).ok().and_then(|v| v.get("op").cloned()).unwrap_or_default();
    let origin = admin::Origin {
        actor: caller.actor(),
        source: Some(from.peer.to_string()),
        session: Some(shared.session_id(from.conn)),
        pivot: Some(shared.config.pivot_name.clone()),
    };
    let ctx = admin::Context { registry: &shared.registry, host_key: shared.host_key.clone(), origin };
    let (response, record) = admin::execute_audited(&ctx, caller, req).await;
    if let Some(rec) = record {
        // Refusals are summarised per source like failed logins, so that a
        // request loop cannot fill the audit.
        match response.ok {
            true => shared.audit.record(rec),
            false => shared.audit.failure(source_of(from.peer.ip()), rec),
        }
    }
    info!(
        caller = %caller.actor(), peer = %from.peer, conn = from.conn, op = %what, ok = response.ok,
        error = %printable(response.error.as_deref().unwrap_or("")), "admin request"
    );
    if enrolling && !response.ok {
        // A refused token counts toward a ban like a refused key.
        let why = format!("enrollment refused: {}", response.error.as_deref().unwrap_or(""));
        failed(shared, &from.state, from.peer, from.conn, why);
    }
    if response.ok && what == "certificate" {
        shared.metrics.certificates_issued.fetch_add(1, Ordering::Relaxed);
    }
    let mutated = mutates && response.ok;
    (response, mutated)
}

/// Certificates an operator may get in a minute: each one is a registry
/// write and an audit record.
const CERTIFICATES_PER_MINUTE: u32 = 10;
/// The shortest wait between two trust fetches on one device connection
/// (agents fetch on connect and hourly).
const TRUST_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

/// Why a certificate or trust request must wait, if it must.
fn throttled(shared: &Shared, caller: &Caller, from: &From, req: &Request) -> Option<String> {
    let now = std::time::Instant::now();
    match (req, caller) {
        (Request::Certificate, Caller::Operator { name, .. }) => {
            let mut map = shared.certificates.lock().unwrap();
            map.retain(|_, (start, _)| now.duration_since(*start) < std::time::Duration::from_secs(60));
            let (_, n) = map.entry(name.to_string()).or_insert((now, 0));
            *n += 1;
            (*n > CERTIFICATES_PER_MINUTE).then(|| {
                format!("operator '{name}' asked for more than {CERTIFICATES_PER_MINUTE} certificates in a minute; retry shortly")
            })
        }
        (Request::Trust, Caller::Device(_)) => {
            let mut last = from.state.trust_fetched.lock().unwrap();
            if last.is_some_and(|t| now.duration_since(t) < TRUST_INTERVAL) {
                return Some(format!("trust fetched less than {TRUST_INTERVAL:?} ago on this connection"));
            }
            *last = Some(now);
            None
        }
        _ => None,
    }
}
