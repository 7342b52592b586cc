//! Signaling over MQTT: topic names, the pivot's signed wake requests, the
//! devices' presence and status reports, and the signed login token devices
//! present to the embedded broker.
//!
//! Wake requests are signed with the pivot's SSH host key in the `sshsig`
//! format, so an agent checks them against the same pin it uses for SSH. A
//! request carries an expiry and a nonce; agents drop expired, replayed,
//! misaddressed or badly signed requests without dialing anywhere.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use ssh_key::{HashAlg, LineEnding, PrivateKey, PublicKey, SshSig};

use crate::keys::HostKeyPin;
use crate::time::MAX_UNIX;
use crate::Id;

/// `sshsig` namespace of wake requests.
pub const WAKE_NAMESPACE: &str = "wake@burrow";
/// `sshsig` namespace of device logins to the embedded broker.
pub const LOGIN_NAMESPACE: &str = "mqtt-login@burrow";
/// Longest validity a wake request may claim, and the clock skew tolerated.
pub const MAX_WAKE_TTL: i64 = 300;
pub const MAX_SKEW: i64 = 300;
/// How old a login token may be when it arrives (a device clock running slow).
pub const MAX_LOGIN_AGE: i64 = MAX_SKEW;
/// How far ahead of the pivot's clock a login token may be dated.
pub const MAX_LOGIN_FUTURE: i64 = 5;
/// Largest signed wake request or login token; real ones are under 1 KiB.
pub const MAX_SIGNED_LEN: usize = 8 * 1024;
/// Longest nonce a status may echo; the pivot's are 32 hex digits.
pub const MAX_NONCE_LEN: usize = 64;

/// Topic names under a configurable prefix (default `burrow`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    prefix: String,
}

impl Topics {
    pub fn new(prefix: &str) -> Self {
        Topics { prefix: prefix.trim_end_matches('/').to_string() }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Where the pivot publishes wake requests for one device; only that device subscribes.
    pub fn request(&self, id: &str) -> String {
        format!("{}/devices/{id}/request", self.prefix)
    }

    /// Retained presence of one device, with an "offline" last will.
    pub fn presence(&self, id: &str) -> String {
        format!("{}/devices/{id}/presence", self.prefix)
    }

    /// What a device reports about a wake-up, e.g. why it could not connect.
    pub fn status(&self, id: &str) -> String {
        format!("{}/devices/{id}/status", self.prefix)
    }

    pub fn all_presence(&self) -> String {
        format!("{}/devices/+/presence", self.prefix)
    }

    pub fn all_status(&self) -> String {
        format!("{}/devices/+/status", self.prefix)
    }

    /// `(device id, kind)` for a device topic under this prefix.
    pub fn parse<'a>(&self, topic: &'a str) -> Option<(&'a str, &'a str)> {
        let rest = topic.strip_prefix(self.prefix.as_str())?.strip_prefix("/devices/")?;
        let (id, kind) = rest.split_once('/')?;
        Some((id, kind))
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignalError {
    #[error("message is not valid JSON of the expected shape")]
    Shape,
    #[error("signature does not verify")]
    BadSignature,
    #[error("pivot key {0} is not the pinned key")]
    WrongSigner(String),
    #[error("login token is dated {0}s ahead of the pivot's clock; check the device's clock")]
    FutureDated(i64),
    #[error("request is for device '{0}'")]
    OtherDevice(String),
    #[error("request expired at {0}")]
    Expired(i64),
    #[error("request claims an implausible time window")]
    BadWindow,
    #[error("request nonce was already used")]
    Replayed,
    #[error("login token was already used")]
    LoginReused,
    #[error("cannot sign: {0}")]
    Sign(String),
}

/// "Dial me": a pivot asks one device to open its tunnel to `pivot`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WakeRequest {
    pub device: String,
    /// `HOST:PORT` the device dials: the pivot's advertised address.
    pub pivot: String,
    pub nonce: String,
    pub issued_at: i64,
    pub expires_at: i64,
}

#[derive(Serialize, Deserialize)]
struct Signed {
    body: String,
    sig: String,
}

impl WakeRequest {
    pub fn new(device: &Id, pivot: &str, now: i64, ttl: i64) -> Self {
        let nonce: [u8; 16] = rand::random();
        WakeRequest {
            device: device.to_string(),
            pivot: pivot.to_string(),
            nonce: nonce.iter().map(|b| format!("{b:02x}")).collect(),
            issued_at: now,
            expires_at: now.saturating_add(ttl.clamp(1, MAX_WAKE_TTL)),
        }
    }

    /// The MQTT payload: the JSON body and its `sshsig` by the pivot's host key.
    pub fn sign(&self, key: &PrivateKey) -> Result<Vec<u8>, SignalError> {
        let body = serde_json::to_string(self).map_err(|_| SignalError::Shape)?;
        let sig = key
            .sign(WAKE_NAMESPACE, HashAlg::Sha512, body.as_bytes())
            .and_then(|s| s.to_pem(LineEnding::LF))
            .map_err(|e| SignalError::Sign(e.to_string()))?;
        serde_json::to_vec(&Signed { body, sig }).map_err(|_| SignalError::Shape)
    }

    /// Checks signature, signer, addressee and time window. Replays are the
    /// caller's [`ReplayGuard`]'s job.
    pub fn verify(payload: &[u8], pin: &HostKeyPin, me: &Id, now: i64) -> Result<WakeRequest, SignalError> {
        if payload.len() > MAX_SIGNED_LEN {
            return Err(SignalError::Shape);
        }
        let signed: Signed = serde_json::from_slice(payload).map_err(|_| SignalError::Shape)?;
        let sig = SshSig::from_pem(signed.sig.as_bytes()).map_err(|_| SignalError::BadSignature)?;
        let signer = PublicKey::from(sig.public_key().clone());
        if !pin.matches(&signer) {
            return Err(SignalError::WrongSigner(crate::fingerprint(&signer)));
        }
        signer.verify(WAKE_NAMESPACE, signed.body.as_bytes(), &sig).map_err(|_| SignalError::BadSignature)?;
        let req: WakeRequest = serde_json::from_str(&signed.body).map_err(|_| SignalError::Shape)?;
        if req.device != me.as_str() {
            return Err(SignalError::OtherDevice(req.device));
        }
        // Checked arithmetic: the fields are any i64 the signer chose.
        let window = req.expires_at.checked_sub(req.issued_at);
        if !matches!(window, Some(0..=MAX_WAKE_TTL)) || req.issued_at > now.saturating_add(MAX_SKEW) {
            return Err(SignalError::BadWindow);
        }
        if now > req.expires_at {
            return Err(SignalError::Expired(req.expires_at));
        }
        Ok(req)
    }
}

impl WakeRequest {
    /// The nonce a payload claims, without checking anything else: what an
    /// agent echoes when it refuses a request, so the pivot can tell the
    /// operator why. Only a short hex nonce is returned.
    pub fn claimed_nonce(payload: &[u8]) -> Option<String> {
        if payload.len() > MAX_SIGNED_LEN {
            return None;
        }
        let signed: Signed = serde_json::from_slice(payload).ok()?;
        let body: serde_json::Value = serde_json::from_str(&signed.body).ok()?;
        let nonce = body.get("nonce")?.as_str()?;
        let plausible =
            !nonce.is_empty() && nonce.len() <= MAX_NONCE_LEN && nonce.bytes().all(|b| b.is_ascii_hexdigit());
        plausible.then(|| nonce.to_string())
    }
}

/// The largest MQTT packet any burrow endpoint accepts or sends: the
/// devices' listener, the pivot's client and the agent's client all use it,
/// so a packet one side lets through never makes another side drop its
/// connection.
pub const MAX_MQTT_PACKET: usize = 64 * 1024;

/// Remembers the nonces of accepted requests until they expire, so a request
/// captured off the broker cannot be replayed. Its JSON form lets the agent
/// keep it across restarts.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ReplayGuard {
    seen: HashMap<String, i64>,
}

/// Nonces a saved guard may bring back; more means the file is not ours.
const MAX_SAVED_NONCES: usize = 10_000;

impl ReplayGuard {
    /// A guard saved by [`ReplayGuard::to_json`]; anything unreadable or
    /// oversized gives an empty guard.
    pub fn from_json(text: &str) -> Self {
        match serde_json::from_str::<ReplayGuard>(text) {
            Ok(g) if g.seen.len() <= MAX_SAVED_NONCES => g,
            _ => ReplayGuard::default(),
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| "{}".into())
    }

    /// Records the request's nonce; fails if it was seen before.
    pub fn check(&mut self, req: &WakeRequest, now: i64) -> Result<(), SignalError> {
        // Bounded: only unexpired nonces stay, and each lives at most MAX_WAKE_TTL.
        self.seen.retain(|_, exp| exp.saturating_add(MAX_SKEW) >= now);
        if self.seen.contains_key(&req.nonce) {
            return Err(SignalError::Replayed);
        }
        self.seen.insert(req.nonce.clone(), req.expires_at);
        Ok(())
    }
}

/// Retained on the presence topic. Parsing refuses a `state` other than
/// "online" or "offline" and an `at` outside 1970..=9999.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawPresence")]
pub struct Presence {
    /// "online" or "offline".
    pub state: String,
    /// "on-demand" or "always-on"; absent in the last will.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<i64>,
}

impl Presence {
    pub fn online(mode: &str, now: i64) -> Self {
        Presence { state: "online".into(), mode: Some(mode.into()), at: Some(now) }
    }

    pub fn offline() -> Self {
        Presence { state: "offline".into(), mode: None, at: None }
    }

    pub fn is_online(&self) -> bool {
        self.state == "online"
    }
}

/// Published on the status topic when a wake-up did not produce a tunnel.
/// Parsing refuses a nonce longer than [`MAX_NONCE_LEN`] and an `at`
/// outside 1970..=9999. `reason` is the device's own text: pass it through
/// [`crate::text::excerpt`] before logging or showing it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawStatus")]
pub struct Status {
    /// Nonce of the request this answers.
    pub nonce: String,
    pub pivot: String,
    /// "error" (with `reason`) or "connected".
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub at: i64,
}

// What the wire carries, checked into `Presence` and `Status`.
#[derive(Deserialize)]
struct RawPresence {
    state: String,
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    at: Option<i64>,
}

impl TryFrom<RawPresence> for Presence {
    type Error = String;
    fn try_from(r: RawPresence) -> Result<Self, String> {
        if !matches!(r.state.as_str(), "online" | "offline") {
            return Err("presence state is neither online nor offline".into());
        }
        check_at(r.at)?;
        Ok(Presence { state: r.state, mode: r.mode, at: r.at })
    }
}

#[derive(Deserialize)]
struct RawStatus {
    nonce: String,
    pivot: String,
    state: String,
    #[serde(default)]
    reason: Option<String>,
    at: i64,
}

impl TryFrom<RawStatus> for Status {
    type Error = String;
    fn try_from(r: RawStatus) -> Result<Self, String> {
        if r.nonce.len() > MAX_NONCE_LEN {
            return Err(format!("status nonce is longer than {MAX_NONCE_LEN} bytes"));
        }
        check_at(Some(r.at))?;
        Ok(Status { nonce: r.nonce, pivot: r.pivot, state: r.state, reason: r.reason, at: r.at })
    }
}

fn check_at(at: Option<i64>) -> Result<(), String> {
    match at {
        Some(t) if !(0..=MAX_UNIX).contains(&t) => Err(format!("timestamp {t} is outside 1970..=9999")),
        _ => Ok(()),
    }
}

/// The MQTT password a device presents to the embedded broker: a time, a
/// random nonce and an `sshsig` over the client id, time, nonce and
/// `audience`, so no second secret needs provisioning. The audience is the
/// pivot's MQTT certificate pin (empty without TLS): a token one pivot saw
/// is worthless at another. The broker accepts each token once.
pub fn login_token(key: &PrivateKey, client_id: &str, audience: &str, now: i64) -> Result<String, SignalError> {
    let nonce: [u8; 12] = rand::random();
    let nonce: String = nonce.iter().map(|b| format!("{b:02x}")).collect();
    let msg = format!("{client_id}\n{now}\n{nonce}\n{audience}");
    let sig = key
        .sign(LOGIN_NAMESPACE, HashAlg::Sha512, msg.as_bytes())
        .and_then(|s| s.to_pem(LineEnding::LF))
        .map_err(|e| SignalError::Sign(e.to_string()))?;
    Ok(format!("{now}\n{nonce}\n{sig}"))
}

/// What a verified login token claims; the broker remembers it until
/// `issued_at + MAX_LOGIN_AGE` to refuse a second use.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LoginClaim {
    pub issued_at: i64,
    pub nonce: String,
}

/// Checks a login token against the device's registered key: signed by it,
/// for this client id, dated at most [`MAX_LOGIN_AGE`] ago and at most
/// [`MAX_LOGIN_FUTURE`] ahead. Single use is the caller's job.
pub fn verify_login(
    token: &str,
    client_id: &str,
    audience: &str,
    key: &PublicKey,
    now: i64,
) -> Result<LoginClaim, SignalError> {
    if token.len() > MAX_SIGNED_LEN {
        return Err(SignalError::Shape);
    }
    let mut parts = token.splitn(3, '\n');
    let (Some(ts), Some(nonce), Some(pem)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(SignalError::Shape);
    };
    if ts.is_empty() || ts.len() > 20 || !ts.bytes().all(|b| b.is_ascii_digit()) {
        return Err(SignalError::Shape);
    }
    if nonce.is_empty() || nonce.len() > MAX_NONCE_LEN || !nonce.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(SignalError::Shape);
    }
    let ts: i64 = ts.parse().map_err(|_| SignalError::Shape)?;
    // Checked: `ts` is whatever the client sent, and now - ts can overflow.
    match now.checked_sub(ts) {
        Some(age) if age > MAX_LOGIN_AGE => return Err(SignalError::Expired(ts)),
        Some(age) if age < -MAX_LOGIN_FUTURE => return Err(SignalError::FutureDated(-age)),
        Some(_) => {}
        None => return Err(SignalError::Expired(ts)),
    }
    let sig = SshSig::from_pem(pem.as_bytes()).map_err(|_| SignalError::BadSignature)?;
    if sig.public_key() != key.key_data() {
        return Err(SignalError::WrongSigner(crate::fingerprint(&PublicKey::from(sig.public_key().clone()))));
    }
    let msg = format!("{client_id}\n{ts}\n{nonce}\n{audience}");
    key.verify(LOGIN_NAMESPACE, msg.as_bytes(), &sig).map_err(|_| SignalError::BadSignature)?;
    Ok(LoginClaim { issued_at: ts, nonce: nonce.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ssh_key::Algorithm;

    fn key() -> PrivateKey {
        PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519).unwrap()
    }

    #[test]
    fn signed_request_round_trips() {
        let k = key();
        let id = Id::parse("cam-42").unwrap();
        let req = WakeRequest::new(&id, "pivot:2222", 1000, 30);
        let payload = req.sign(&k).unwrap();
        let pin = HostKeyPin::Key(k.public_key().clone());
        assert_eq!(WakeRequest::verify(&payload, &pin, &id, 1001).unwrap(), req);
        let fp_pin = HostKeyPin::Fingerprint(crate::fingerprint(k.public_key()));
        assert!(WakeRequest::verify(&payload, &fp_pin, &id, 1001).is_ok());
    }

    #[test]
    fn a_saved_replay_guard_still_refuses_its_nonces() {
        let id = Id::parse("cam-42").unwrap();
        let now = 1_800_000_000;
        let req = WakeRequest::new(&id, "pivot:443", now, 30);
        let mut guard = ReplayGuard::default();
        guard.check(&req, now).unwrap();
        let mut back = ReplayGuard::from_json(&guard.to_json());
        assert!(matches!(back.check(&req, now + 1), Err(SignalError::Replayed)));
        assert!(ReplayGuard::from_json("not json").check(&req, now).is_ok());
    }

    #[test]
    fn forged_expired_misaddressed_and_replayed_requests_fail() {
        let k = key();
        let pin = HostKeyPin::Key(k.public_key().clone());
        let id = Id::parse("cam-42").unwrap();
        let req = WakeRequest::new(&id, "pivot:2222", 1000, 30);

        let forged = req.sign(&key()).unwrap();
        assert!(matches!(WakeRequest::verify(&forged, &pin, &id, 1001), Err(SignalError::WrongSigner(_))));

        // Body swapped under a valid signature.
        let good = req.sign(&k).unwrap();
        let mut signed: Signed = serde_json::from_slice(&good).unwrap();
        signed.body = signed.body.replace("pivot:2222", "evil:22");
        let tampered = serde_json::to_vec(&signed).unwrap();
        assert_eq!(WakeRequest::verify(&tampered, &pin, &id, 1001), Err(SignalError::BadSignature));

        assert_eq!(WakeRequest::verify(&good, &pin, &id, 1031), Err(SignalError::Expired(1030)));
        let other = Id::parse("cam-43").unwrap();
        assert!(matches!(WakeRequest::verify(&good, &pin, &other, 1001), Err(SignalError::OtherDevice(_))));
        assert_eq!(WakeRequest::verify(b"garbage", &pin, &id, 1001), Err(SignalError::Shape));

        let mut guard = ReplayGuard::default();
        guard.check(&req, 1001).unwrap();
        assert_eq!(guard.check(&req, 1002), Err(SignalError::Replayed));
    }

    #[test]
    fn login_tokens_bind_key_client_and_time() {
        let k = key();
        let token = login_token(&k, "cam-42", "", 5000).unwrap();
        verify_login(&token, "cam-42", "", k.public_key(), 5010).unwrap();
        assert!(verify_login(&token, "cam-43", "", k.public_key(), 5010).is_err());
        assert!(verify_login(&token, "cam-42", "", key().public_key(), 5010).is_err());
        assert!(verify_login(&token, "cam-42", "", k.public_key(), 5000 + MAX_LOGIN_AGE + 1).is_err());
        // Dated ahead of the pivot: a few seconds pass, more does not.
        assert!(verify_login(&token, "cam-42", "", k.public_key(), 5000 - MAX_LOGIN_FUTURE).is_ok());
        assert_eq!(
            verify_login(&token, "cam-42", "", k.public_key(), 5000 - MAX_LOGIN_FUTURE - 1),
            Err(SignalError::FutureDated(MAX_LOGIN_FUTURE + 1))
        );
        // Bound to one pivot's certificate.
        let bound = login_token(&k, "cam-42", "SHA256:pivot-a", 5000).unwrap();
        assert!(verify_login(&bound, "cam-42", "SHA256:pivot-a", k.public_key(), 5000).is_ok());
        assert_eq!(
            verify_login(&bound, "cam-42", "SHA256:pivot-b", k.public_key(), 5000),
            Err(SignalError::BadSignature)
        );
        // Two tokens of the same second differ, so each can be used once.
        assert_ne!(login_token(&k, "cam-42", "", 5000).unwrap(), token);
    }

    #[test]
    fn extreme_times_are_refused_not_overflowed() {
        let k = key();
        let token = login_token(&k, "cam-42", "", 5000).unwrap();
        let (_, rest) = token.split_once('\n').unwrap();
        for ts in ["-9223372036854775808", "9223372036854775807", "+5000", " 5000", ""] {
            assert!(verify_login(&format!("{ts}\n{rest}"), "cam-42", "", k.public_key(), 5000).is_err(), "{ts}");
        }
        assert!(verify_login(&token, "cam-42", "", k.public_key(), i64::MIN).is_err());
        assert!(verify_login(&token, "cam-42", "", k.public_key(), i64::MAX).is_err());

        let pin = HostKeyPin::Key(k.public_key().clone());
        let id = Id::parse("cam-42").unwrap();
        for (issued_at, expires_at) in [(i64::MIN, i64::MAX), (i64::MAX, i64::MIN), (i64::MAX - 1, i64::MAX)] {
            let req =
                WakeRequest { device: "cam-42".into(), pivot: "p:22".into(), nonce: "n".into(), issued_at, expires_at };
            let payload = req.sign(&k).unwrap();
            for now in [0, i64::MIN, 1_795_428_251] {
                assert!(WakeRequest::verify(&payload, &pin, &id, now).is_err());
            }
        }
        let mut guard = ReplayGuard::default();
        let req = WakeRequest::new(&id, "p:22", i64::MAX, 30);
        guard.check(&req, i64::MAX).unwrap();
        assert_eq!(guard.check(&req, i64::MAX), Err(SignalError::Replayed));
    }

    #[test]
    fn presence_and_status_refuse_implausible_fields() {
        let p = |s: &str| serde_json::from_str::<Presence>(s);
        assert_eq!(p(r#"{"state":"offline"}"#).unwrap(), Presence::offline());
        assert_eq!(p(r#"{"state":"online","mode":"on-demand","at":5}"#).unwrap(), Presence::online("on-demand", 5));
        assert!(p(r#"{"state":"sleeping"}"#).is_err());
        assert!(p(r#"{"state":"online","at":9223372036854775807}"#).is_err());
        assert!(p(r#"{"state":"online","at":-1}"#).is_err());
        let st = |s: &str| serde_json::from_str::<Status>(s);
        assert!(st(r#"{"nonce":"ab","pivot":"p:22","state":"error","reason":"refused","at":5}"#).is_ok());
        assert!(st(r#"{"nonce":"ab","pivot":"p:22","state":"error","at":-5}"#).is_err());
        let long = format!(r#"{{"nonce":"{}","pivot":"p:22","state":"error","at":5}}"#, "a".repeat(MAX_NONCE_LEN + 1));
        assert!(st(&long).is_err());
    }

    #[test]
    fn topics_parse() {
        let t = Topics::new("burrow/");
        assert_eq!(t.request("cam-42"), "burrow/devices/cam-42/request");
        assert_eq!(t.parse("burrow/devices/cam-42/presence"), Some(("cam-42", "presence")));
        assert_eq!(t.parse("other/devices/cam-42/presence"), None);
    }
}
