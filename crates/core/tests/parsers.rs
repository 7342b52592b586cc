//! Property tests for every parser in burrow-core: none panics on arbitrary
//! input, and each keeps its round trip or invariant. Bounded (a few hundred
//! cases per property) so the file runs in seconds in a debug build.

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::Duration;

use base64ct::{Base64UrlUnpadded, Encoding};
use burrow_core::agent_file::AgentFile;
use burrow_core::enroll::EnrollToken;
use burrow_core::keys::{generate_ed25519, parse_public_key, PrivateKey};
use burrow_core::label::{parse_label, validate_label, validate_labels, MAX_KEY_LEN, MAX_LABELS, MAX_VALUE_LEN};
use burrow_core::mqtt_url::MqttUrl;
use burrow_core::rpc::{Request, Response, Selector};
use burrow_core::signal::{
    login_token, verify_login, Presence, Status, Topics, WakeRequest, MAX_LOGIN_AGE, MAX_LOGIN_FUTURE, MAX_SKEW,
};
use burrow_core::text::{clip, printable, ELLIPSIS};
use burrow_core::time::{expires_at, format_unix, parse_duration, MAX_DURATION, MAX_UNIX};
use burrow_core::{Expose, HostKeyPin, Id};
use proptest::prelude::*;
use proptest::sample::Index;

// ---------------------------------------------------------------- strategies

/// Text a fuzzer would try: any Unicode, ASCII with controls, and strings
/// made of the characters the parsers split on.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[\\x00-\\x7f]{0,40}",
        "[a-z0-9._=,|:/@\\[\\]+ -]{0,40}",
        "[a-zA-Z0-9\\x1b\\n\\r\\t\\u{85}\\u{202e}\\u{2066}\\\\é-]{0,20}",
    ]
}

fn bytes() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..400)
}

/// Valid ids, drawn from the rule's own description rather than the parser.
fn valid_id() -> impl Strategy<Value = String> {
    "[a-z0-9][a-z0-9_-]{0,62}".prop_filter("an id has a letter and is not hex", |s| {
        s.bytes().any(|b| b.is_ascii_lowercase())
            && !s.strip_prefix("0x").is_some_and(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))
    })
}

fn label_key() -> impl Strategy<Value = String> {
    "[a-z0-9][a-z0-9._/-]{0,62}"
}

fn label_value() -> impl Strategy<Value = String> {
    "[!-~&&[^=,|]]{0,128}"
}

fn valid_labels() -> impl Strategy<Value = BTreeMap<String, String>> {
    prop::collection::btree_map(label_key(), label_value(), 0..6)
}

fn host() -> impl Strategy<Value = String> {
    prop_oneof!["[a-zA-Z0-9][a-zA-Z0-9._-]{0,30}", Just("[::1]".to_string()), Just("[2001:db8::7]".to_string()),]
}

fn fingerprint_text() -> impl Strategy<Value = String> {
    "[A-Za-z0-9+/]{43}".prop_map(|b| format!("SHA256:{b}"))
}

fn key() -> &'static PrivateKey {
    static KEY: OnceLock<PrivateKey> = OnceLock::new();
    KEY.get_or_init(generate_ed25519)
}

/// `s` with one byte replaced, where the index is drawn from the string.
fn mutate(s: &[u8], at: Index, byte: u8) -> Vec<u8> {
    let mut out = s.to_vec();
    if !out.is_empty() {
        let i = at.index(out.len());
        out[i] = if out[i] == byte { byte.wrapping_add(1) } else { byte };
    }
    out
}

// ---------------------------------------------------------------- ids, labels, text

/// Undoes [`printable`], to show it loses nothing.
fn unescape(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some('t') => out.push('\t'),
            Some('\\') => out.push('\\'),
            Some('u') => {
                let hex: String = chars.by_ref().skip(1).take_while(|c| *c != '}').collect();
                out.push(char::from_u32(u32::from_str_radix(&hex, 16).unwrap()).unwrap());
            }
            other => panic!("stray escape {other:?} in {s:?}"),
        }
    }
    out
}

fn is_unsafe_for_display(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{2028}' | '\u{2029}')
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn ids_accept_only_dns_labels_that_are_not_numbers(s in text()) {
        match Id::parse(&s) {
            Ok(id) => {
                prop_assert_eq!(id.as_str(), s.as_str());
                prop_assert!((1..=63).contains(&s.len()));
                prop_assert!(s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-'));
                prop_assert!(s.bytes().any(|b| b.is_ascii_lowercase()));
                prop_assert!(!s.starts_with(['-', '_']));
                prop_assert!(!s.contains('.'));
                prop_assert!(!s.strip_prefix("0x").is_some_and(|h| h.bytes().all(|b| b.is_ascii_hexdigit())));
            }
            Err(e) => prop_assert!(!e.to_string().chars().any(is_unsafe_for_display), "{}", e),
        }
    }

    #[test]
    fn valid_ids_round_trip(s in valid_id()) {
        let id = Id::parse(&s).unwrap();
        prop_assert_eq!(id.to_string(), s.clone());
        prop_assert_eq!(s.parse::<Id>().unwrap(), id);
    }

    #[test]
    fn labels_accept_only_safe_characters(s in text()) {
        match parse_label(&s) {
            Ok((k, v)) => {
                prop_assert_eq!(format!("{k}={v}"), s);
                prop_assert!((1..=MAX_KEY_LEN).contains(&k.len()) && v.len() <= MAX_VALUE_LEN);
                prop_assert!(k.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._/-".contains(&b)));
                prop_assert!(v.bytes().all(|b| b.is_ascii_graphic() && !b"=,|".contains(&b)));
            }
            Err(e) => prop_assert!(!e.to_string().chars().any(is_unsafe_for_display), "{}", e),
        }
    }

    #[test]
    fn valid_labels_round_trip(k in label_key(), v in label_value()) {
        prop_assert!(validate_label(&k, &v).is_ok());
        prop_assert_eq!(parse_label(&format!("{k}={v}")).unwrap(), (k, v));
    }

    #[test]
    fn label_maps_are_capped(labels in prop::collection::btree_map("[a-z][a-z0-9]{0,8}", "[a-z]{0,3}", 0..40)) {
        prop_assert_eq!(validate_labels(&labels).is_ok(), labels.len() <= MAX_LABELS);
    }

    #[test]
    fn selectors_accept_only_valid_labels(s in text()) {
        if let Ok(sel) = s.parse::<Selector>() {
            prop_assert!(!sel.0.is_empty() && sel.0.len() <= MAX_LABELS);
            for (k, v) in &sel.0 {
                prop_assert!(validate_label(k, v).is_ok());
            }
            prop_assert_eq!(sel.to_string().parse::<Selector>().unwrap(), sel);
        }
    }

    #[test]
    fn selectors_round_trip_and_match_their_own_labels(labels in prop::collection::btree_map(label_key(), label_value(), 1..6)) {
        let sel = Selector(labels.clone());
        let back: Selector = sel.to_string().parse().unwrap();
        prop_assert_eq!(&back, &sel);
        prop_assert!(back.matches(&labels));
    }

    #[test]
    fn printable_leaves_no_control_characters(s in text()) {
        let p = printable(&s);
        prop_assert!(!p.chars().any(is_unsafe_for_display), "{:?}", p);
        prop_assert_eq!(unescape(&p), s.clone());
        prop_assert_eq!(matches!(p, std::borrow::Cow::Borrowed(_)), p == s.as_str());
    }

    #[test]
    fn clip_cuts_between_characters(s in text(), max in 0usize..50) {
        let c = clip(&s, max);
        prop_assert!(c.chars().count() <= max);
        if s.chars().count() <= max {
            prop_assert_eq!(c, s);
        } else if max > 0 {
            let kept = c.strip_suffix(ELLIPSIS).unwrap();
            prop_assert!(s.starts_with(kept));
            prop_assert_eq!(kept.chars().count(), max - 1);
        }
    }
}

// ---------------------------------------------------------------- time

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn format_unix_takes_any_i64(t in any::<i64>()) {
        let text = format_unix(t);
        let parsed = humantime::parse_rfc3339(&text).unwrap();
        let secs = parsed.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
        prop_assert_eq!(secs, t.clamp(0, MAX_UNIX));
    }

    #[test]
    fn format_unix_near_the_limits(t in prop_oneof![MAX_UNIX - 100_000..=i64::MAX, i64::MIN..=100_000]) {
        prop_assert_eq!(format_unix(t).len(), "9999-12-31T23:59:59Z".len());
    }

    #[test]
    fn expires_at_never_overflows(now in any::<i64>(), secs in any::<u64>(), nanos in 0u32..1_000_000_000) {
        let ttl = Duration::new(secs, nanos);
        if let Ok(t) = expires_at(now, ttl) {
            prop_assert!(t <= MAX_UNIX && t >= now);
            prop_assert_eq!((t - now) as u64, secs + u64::from(nanos > 0));
        }
    }

    #[test]
    fn expires_at_accepts_sane_inputs(now in 0..=4_102_444_800i64, secs in 1..=MAX_DURATION.as_secs()) {
        prop_assert_eq!(expires_at(now, Duration::from_secs(secs)), Ok(now + secs as i64));
    }

    #[test]
    fn parse_duration_stays_within_limits(s in prop_oneof![text(), "[0-9]{1,25} ?(ns|us|ms|s|m|h|d|days|w|months|y|years|x)"]) {
        match parse_duration(&s) {
            Ok(d) => prop_assert!(!d.is_zero() && d <= MAX_DURATION),
            Err(e) => prop_assert!(!e.to_string().chars().any(is_unsafe_for_display), "{}", e),
        }
    }

    #[test]
    fn parse_duration_agrees_with_arithmetic(n in 0u64..200_000, unit in prop::sample::select(vec![("s", 1u64), ("m", 60), ("h", 3600), ("days", 86_400), ("years", 31_557_600)])) {
        let secs = n * unit.1;
        let parsed = parse_duration(&format!("{n}{}", unit.0));
        prop_assert_eq!(parsed.is_ok(), secs > 0 && secs <= MAX_DURATION.as_secs());
        if let Ok(d) = parsed {
            prop_assert_eq!(d, Duration::from_secs(secs));
        }
    }
}

// ---------------------------------------------------------------- expose, mqtt, keys, topics, agent file

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn expose_round_trips_what_it_accepts(s in text()) {
        match s.parse::<Expose>() {
            Ok(e) => {
                prop_assert!(e.port > 0);
                prop_assert!(e.target.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-:[]".contains(&b)));
                prop_assert_eq!(e.to_string().parse::<Expose>().unwrap(), e);
            }
            Err(e) => prop_assert!(!e.to_string().chars().any(is_unsafe_for_display), "{}", e),
        }
    }

    #[test]
    fn valid_expose_specs_parse(port in 1u16.., h in host(), target_port in 1u16..) {
        let e: Expose = format!("{port}={h}:{target_port}").parse().unwrap();
        prop_assert_eq!(e.port, port);
        prop_assert_eq!(e.target, format!("{h}:{target_port}"));
    }

    #[test]
    fn mqtt_urls_round_trip_what_they_accept(s in prop_oneof![text(), text().prop_map(|s| format!("mqtt://{s}")), text().prop_map(|s| format!("mqtts://{s}"))]) {
        if let Ok(u) = s.parse::<MqttUrl>() {
            prop_assert!(u.port > 0 && !u.host.is_empty());
            prop_assert!(u.host.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-:".contains(&b)));
            prop_assert_eq!(u.to_string().parse::<MqttUrl>().unwrap(), u);
        }
    }

    #[test]
    fn valid_mqtt_urls_parse(tls in any::<bool>(), h in host(), port in prop::option::of(1u16..)) {
        let scheme = if tls { "mqtts" } else { "mqtt" };
        let url = match port {
            Some(p) => format!("{scheme}://{h}:{p}"),
            None => format!("{scheme}://{h}"),
        };
        let u: MqttUrl = url.parse().unwrap();
        prop_assert_eq!(u.tls, tls);
        prop_assert_eq!(u.port, port.unwrap_or(if tls { 8883 } else { 1883 }));
        prop_assert_eq!(u.host.as_str(), h.trim_start_matches('[').trim_end_matches(']'));
    }

    #[test]
    fn host_key_pins_parse_only_fingerprints(s in prop_oneof![text().prop_map(|s| format!("SHA256:{s}")), "SHA256:[A-Za-z0-9+/=]{40,46}"]) {
        if let Ok(pin) = HostKeyPin::parse(&s) {
            let HostKeyPin::Fingerprint(fp) = &pin else { panic!("a SHA256: argument is never a file") };
            prop_assert_eq!(fp.len(), "SHA256:".len() + 43);
            prop_assert!(s.starts_with(fp.as_str()));
        }
    }

    #[test]
    fn host_key_pins_never_panic(s in text()) {
        let _ = HostKeyPin::parse(&s);
    }

    #[test]
    fn public_keys_never_panic(s in prop_oneof![text(), text().prop_map(|s| format!("ssh-ed25519 {s}")), "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5[A-Za-z0-9+/]{0,60}=?"]) {
        let _ = parse_public_key(&s, "fuzz");
    }

    #[test]
    fn topics_give_back_the_id(prefix in text(), topic in text(), id in valid_id()) {
        let t = Topics::new(&prefix);
        let _ = t.parse(&topic);
        for (built, kind) in [(t.request(&id), "request"), (t.presence(&id), "presence"), (t.status(&id), "status")] {
            prop_assert_eq!(t.parse(&built), Some((id.as_str(), kind)));
        }
    }

    #[test]
    fn agent_files_never_panic(s in prop_oneof![text(), "(id|server|key|pivot_host_key|expose|mqtt_url|always_on) = ([\"'][a-z]{0,5}[\"']|\\[\\]|true|1)\n{0,3}"]) {
        let _ = toml::from_str::<AgentFile>(&s);
    }

    #[test]
    fn agent_files_round_trip(id in valid_id(), server in host(), key in "/[a-z/]{1,20}", pin in fingerprint_text(), expose in prop::collection::vec("[0-9]{1,5}=[a-z]{1,5}:[0-9]{1,5}", 0..3), mqtt in prop::option::of("mqtt://[a-z]{1,8}"), always_on in any::<bool>()) {
        let f = AgentFile { id, server, key: key.into(), pivot_host_key: pin, expose, mqtt_url: mqtt, mqtt_fingerprint: None, always_on, trust_dir: None };
        let text = toml::to_string(&f).unwrap();
        prop_assert_eq!(toml::from_str::<AgentFile>(&text).unwrap(), f);
    }
}

// ---------------------------------------------------------------- enrollment tokens

fn token() -> impl Strategy<Value = EnrollToken> {
    (host(), 1u16.., fingerprint_text(), valid_id())
        .prop_map(|(h, port, fp, id)| EnrollToken::new(&format!("{h}:{port}"), &fp, &id))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn tokens_never_panic(s in prop_oneof![
        text(),
        text().prop_map(|s| format!("burrow-enroll-v1.{s}")),
        bytes().prop_map(|b| format!("burrow-enroll-v1.{}", Base64UrlUnpadded::encode_string(&b))),
    ]) {
        if let Ok(t) = EnrollToken::decode(&s) {
            prop_assert!(Id::parse(&t.device).is_ok());
        }
    }

    #[test]
    fn tokens_round_trip(t in token()) {
        let s = t.encode();
        prop_assert!(s.bytes().all(|b| b.is_ascii_graphic()));
        let back = EnrollToken::decode(&s).unwrap();
        prop_assert_eq!(back.digest(), t.digest());
        prop_assert_eq!(back, t);
    }

    #[test]
    fn changed_tokens_are_refused_or_match_nothing(t in token(), at in any::<Index>(), byte in any::<u8>()) {
        let s = t.encode();
        let changed = mutate(s.as_bytes(), at, byte);
        let Ok(changed) = String::from_utf8(changed) else { return Ok(()) };
        if changed.trim() == s {
            return Ok(()); // whitespace around a token is allowed
        }
        if let Ok(other) = EnrollToken::decode(&changed) {
            prop_assert_ne!(other.digest(), t.digest());
        }
    }

    #[test]
    fn changed_payloads_are_refused_or_match_nothing(t in token(), at in any::<Index>(), byte in any::<u8>()) {
        let json = serde_json::to_vec(&t).unwrap();
        let changed = mutate(&json, at, byte);
        let s = format!("burrow-enroll-v1.{}", Base64UrlUnpadded::encode_string(&changed));
        if let Ok(other) = EnrollToken::decode(&s) {
            prop_assert_ne!(other.digest(), t.digest());
        }
    }
}

// ---------------------------------------------------------------- signaling

fn signed_request() -> &'static (WakeRequest, Vec<u8>) {
    static SIGNED: OnceLock<(WakeRequest, Vec<u8>)> = OnceLock::new();
    SIGNED.get_or_init(|| {
        let req = WakeRequest::new(&Id::parse("cam-42").unwrap(), "pivot.example.com:443", 1_000_000, 60);
        let payload = req.sign(key()).unwrap();
        (req, payload)
    })
}

fn pin() -> HostKeyPin {
    HostKeyPin::Key(key().public_key().clone())
}

fn signed_login() -> &'static str {
    static TOKEN: OnceLock<String> = OnceLock::new();
    TOKEN.get_or_init(|| login_token(key(), "cam-42", "", 5000).unwrap())
}

// Properties that never reach a signature check run many cases.
proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn wake_requests_never_verify_from_garbage(payload in prop_oneof![bytes(), text().prop_map(String::into_bytes)], now in any::<i64>()) {
        let me = Id::parse("cam-42").unwrap();
        prop_assert!(WakeRequest::verify(&payload, &pin(), &me, now).is_err());
    }

    #[test]
    fn wake_request_envelopes_never_verify(body in text(), sig in prop_oneof![text(), text().prop_map(|s| format!("-----BEGIN SSH SIGNATURE-----\n{s}\n-----END SSH SIGNATURE-----\n"))]) {
        let payload = serde_json::to_vec(&serde_json::json!({"body": body, "sig": sig})).unwrap();
        let me = Id::parse("cam-42").unwrap();
        prop_assert!(WakeRequest::verify(&payload, &pin(), &me, 1_000_010).is_err());
    }

    #[test]
    fn login_tokens_never_verify_from_garbage(token in text(), client in text(), now in any::<i64>()) {
        prop_assert!(verify_login(&token, &client, "", key().public_key(), now).is_err());
    }

    #[test]
    fn presence_and_status_never_panic(payload in prop_oneof![bytes(), text().prop_map(String::into_bytes)]) {
        // The pivot's own entry points (server signal::on_publish).
        let _ = serde_json::from_slice::<Presence>(&payload);
        let _ = serde_json::from_slice::<Status>(&payload);
    }

    #[test]
    fn presence_accepts_known_states_and_times(state in prop_oneof![Just("online".to_string()), Just("offline".to_string()), text()], mode in prop::option::of(text()), at in prop::option::of(prop_oneof![any::<i64>(), 0..=MAX_UNIX])) {
        let p = Presence { state, mode, at };
        let parsed = serde_json::from_slice::<Presence>(&serde_json::to_vec(&p).unwrap());
        let plausible = matches!(p.state.as_str(), "online" | "offline") && at.is_none_or(|t| (0..=MAX_UNIX).contains(&t));
        prop_assert_eq!(parsed.is_ok(), plausible);
        if let Ok(back) = parsed {
            prop_assert_eq!(back, p);
        }
    }

    #[test]
    fn status_round_trips_plausible_reports(nonce in "[0-9a-f]{0,64}", pivot in text(), state in text(), reason in prop::option::of(text()), at in prop_oneof![any::<i64>(), 0..=MAX_UNIX]) {
        let s = Status { nonce, pivot, state, reason, at };
        let parsed = serde_json::from_slice::<Status>(&serde_json::to_vec(&s).unwrap());
        prop_assert_eq!(parsed.is_ok(), (0..=MAX_UNIX).contains(&at));
        if let Ok(back) = parsed {
            prop_assert_eq!(back, s);
        }
    }
}

// Checking an ed25519 sshsig takes ~15 ms in a debug build, so the
// properties that reach the check run fewer cases.
proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn mutated_wake_requests_never_verify_as_another(at in any::<Index>(), byte in any::<u8>(), now in prop_oneof![any::<i64>(), 999_000i64..1_001_000]) {
        let (req, payload) = signed_request();
        let me = Id::parse("cam-42").unwrap();
        let changed = mutate(payload, at, byte);
        if let Ok(got) = WakeRequest::verify(&changed, &pin(), &me, now) {
            prop_assert_eq!(&got, req);
        }
    }

    #[test]
    fn mutated_wake_bodies_never_verify(at in any::<Index>(), c in any::<char>()) {
        let (_, payload) = signed_request();
        let mut signed: serde_json::Value = serde_json::from_slice(payload).unwrap();
        let mut chars: Vec<char> = signed["body"].as_str().unwrap().chars().collect();
        let i = at.index(chars.len());
        prop_assume!(chars[i] != c);
        chars[i] = c;
        signed["body"] = chars.into_iter().collect::<String>().into();
        let me = Id::parse("cam-42").unwrap();
        prop_assert!(WakeRequest::verify(&serde_json::to_vec(&signed).unwrap(), &pin(), &me, 1_000_010).is_err());
    }

    #[test]
    fn valid_wake_requests_verify_only_for_their_device_and_window(now in prop_oneof![any::<i64>(), 999_000i64..1_001_000]) {
        let (req, payload) = signed_request();
        let me = Id::parse("cam-42").unwrap();
        let ok = WakeRequest::verify(payload, &pin(), &me, now).is_ok();
        prop_assert_eq!(ok, now >= req.issued_at - MAX_SKEW && now <= req.expires_at);
        let other = Id::parse("cam-43").unwrap();
        prop_assert!(WakeRequest::verify(payload, &pin(), &other, now).is_err());
    }

    #[test]
    fn login_tokens_verify_only_for_their_client_and_time(ts in prop_oneof![any::<i64>(), 4000i64..6000], now in prop_oneof![any::<i64>(), 4000i64..6000]) {
        let token = signed_login();
        let (_, rest) = token.split_once('\n').unwrap();
        let moved = format!("{ts}\n{rest}");
        let ok = verify_login(&moved, "cam-42", "", key().public_key(), now).is_ok();
        prop_assert_eq!(ok, ts == 5000 && (5000 - MAX_LOGIN_FUTURE..=5000 + MAX_LOGIN_AGE).contains(&now));
        prop_assert!(verify_login(token, "cam-43", "", key().public_key(), 5000).is_err());
    }

    #[test]
    fn mutated_login_tokens_never_verify_for_another_time(at in any::<Index>(), byte in any::<u8>()) {
        let changed = mutate(signed_login().as_bytes(), at, byte);
        let Ok(changed) = String::from_utf8(changed) else { return Ok(()) };
        if verify_login(&changed, "cam-42", "", key().public_key(), 5000).is_ok() {
            prop_assert!(changed.starts_with("5000\n"));
        }
    }
}

// ---------------------------------------------------------------- admin protocol

/// Valid ids: a request that parses carries only these.
fn ids() -> impl Strategy<Value = burrow_core::Id> {
    "[a-z][a-z0-9_-]{0,20}".prop_filter_map("an id", |s| burrow_core::Id::parse(&s).ok())
}

fn request() -> impl Strategy<Value = Request> {
    let s = text;
    prop_oneof![
        prop::sample::select(vec![Request::DeviceList, Request::OperatorList, Request::Whoami]),
        ids().prop_map(|id| Request::DeviceShow { id }),
        ids().prop_map(|id| Request::DeviceRemove { id }),
        ids().prop_map(|id| Request::DeviceRevoke { id }),
        ids().prop_map(|name| Request::OperatorRemove { name }),
        (ids(), any::<u32>()).prop_map(|(id, port)| Request::Check { id, port }),
        (
            ids(),
            prop::option::of(s()),
            valid_labels(),
            prop::option::of(1..=MAX_DURATION.as_secs()),
            prop::option::of(s())
        )
            .prop_map(|(id, key, labels, ttl_secs, address)| Request::DeviceAdd {
                id,
                key,
                labels,
                ttl_secs,
                address,
                host_keys: Vec::new(),
            }),
        (ids(), s(), any::<bool>(), prop::collection::vec(s(), 0..3)).prop_map(|(name, key, admin, allow)| {
            Request::OperatorAdd { name, key, admin, allow, device_users: vec![], cert_ttl_secs: None }
        }),
        (s(), prop::collection::vec(s(), 0..3)).prop_map(|(token, host_keys)| Request::Enroll { token, host_keys }),
        (s(), s()).prop_map(|(new_key, proof)| Request::RotateKey { new_key, proof }),
    ]
}

/// JSON close to a request: a known op with fields of any type.
fn request_like_json() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(Into::into),
        any::<i64>().prop_map(Into::into),
        any::<u64>().prop_map(Into::into),
        text().prop_map(Into::into),
    ];
    let value = leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
            prop::collection::btree_map(prop_oneof![label_key(), text()], inner, 0..4)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    });
    let op = prop::sample::select(vec![
        "device_list",
        "device_show",
        "device_add",
        "device_remove",
        "device_revoke",
        "operator_add",
        "operator_list",
        "operator_remove",
        "check",
        "enroll",
        "rotate_key",
        "whoami",
        "nope",
    ]);
    let field = prop::sample::select(vec![
        "id",
        "key",
        "labels",
        "ttl_secs",
        "address",
        "name",
        "admin",
        "allow",
        "port",
        "token",
        "host_keys",
        "new_key",
        "proof",
    ]);
    (op, prop::collection::btree_map(field, value, 0..6)).prop_map(|(op, fields)| {
        let mut obj: serde_json::Map<String, serde_json::Value> =
            fields.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        obj.insert("op".into(), op.into());
        serde_json::Value::Object(obj)
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn requests_never_panic(b in prop_oneof![bytes(), text().prop_map(String::into_bytes)]) {
        let _ = serde_json::from_slice::<Request>(&b);
        let _ = serde_json::from_slice::<Response>(&b);
    }

    #[test]
    fn parsed_requests_carry_only_valid_labels_and_ttls(v in request_like_json()) {
        let text = serde_json::to_string(&v).unwrap();
        if let Ok(Request::DeviceAdd { labels, ttl_secs, .. }) = serde_json::from_str::<Request>(&text) {
            prop_assert!(validate_labels(&labels).is_ok());
            prop_assert!(ttl_secs.is_none_or(|t| t > 0 && t <= MAX_DURATION.as_secs()));
        }
    }

    #[test]
    fn requests_round_trip(req in request()) {
        let text = serde_json::to_string(&req).unwrap();
        prop_assert!(!text.contains('\n'), "one request per line");
        prop_assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), req);
    }

    #[test]
    fn requests_with_invalid_labels_are_refused(id in valid_id(), k in text(), v in text()) {
        let labels: BTreeMap<String, String> = [(k.clone(), v.clone())].into();
        let json = serde_json::json!({"op": "device_add", "id": id, "labels": labels}).to_string();
        prop_assert_eq!(serde_json::from_str::<Request>(&json).is_ok(), validate_label(&k, &v).is_ok());
    }
}

proptest! {
    /// A saved replay guard read back from any text: no panic.
    #[test]
    fn replay_guards_load_from_any_text(text in "\\PC{0,200}") {
        let _ = burrow_core::signal::ReplayGuard::from_json(&text);
    }
}
