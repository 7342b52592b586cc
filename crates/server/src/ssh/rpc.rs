//! The `@burrow` channel: one admin request per channel, answered by
//! [`crate::admin::execute`] with the caller's identity.

use std::sync::Arc;

use burrow_core::rpc::{Request, Response};
use russh::server::{ChannelOpenHandle, Msg};
use russh::{Channel, ChannelMsg};
use tracing::info;

use crate::admin::{self, Caller};
use crate::Shared;

/// Requests are small; anything bigger is refused.
const MAX_REQUEST: usize = 256 * 1024;

pub(crate) async fn serve(shared: Arc<Shared>, caller: Caller, mut channel: Channel<Msg>, reply: ChannelOpenHandle) {
    reply.accept().await;
    let mut buf = Vec::new();
    let (response, mutated) = loop {
        match channel.wait().await {
            Some(ChannelMsg::Data { data }) => {
                buf.extend_from_slice(&data);
                if buf.len() > MAX_REQUEST {
                    break (Response::err("request too large"), false);
                }
                if let Some(end) = buf.iter().position(|b| *b == b'\n') {
                    break handle(&shared, &caller, &buf[..end]).await;
                }
            }
            Some(ChannelMsg::Eof) => break handle(&shared, &caller, &buf).await,
            Some(_) => {}
            None => return,
        }
    };
    let mut out = serde_json::to_vec(&response).unwrap_or_default();
    out.push(b'\n');
    let _ = channel.data(&out[..]).await;
    let _ = channel.eof().await;
    let _ = channel.close().await;
    if mutated {
        // Removals, revocations and rotations take effect now, not at the
        // next poll; after the answer, since the caller may be among them.
        crate::watch::enforce(&shared).await;
    }
}

/// Answers one request; also says whether it changed the registry.
async fn handle(shared: &Shared, caller: &Caller, line: &[u8]) -> (Response, bool) {
    let req: Request = match serde_json::from_slice(line) {
        Ok(r) => r,
        Err(e) => return (Response::err(format!("malformed request: {e}")), false),
    };
    let mutates = req.is_admin() || matches!(req, Request::Enroll { .. } | Request::RotateKey { .. });
    let what = serde_json::to_value(&req).ok().and_then(|v| v.get("op").cloned()).unwrap_or_default();
    let ctx = admin::Context { registry: &shared.registry, host_key: shared.host_key.clone() };
    let response = admin::execute(&ctx, caller, req).await;
    info!(?caller, op = %what, ok = response.ok, error = response.error.as_deref().unwrap_or(""), "admin request");
    let mutated = mutates && response.ok;
    (response, mutated)
}
