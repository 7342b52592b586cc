//! The pivot defends itself: each test plays an attack against a real pivot
//! (a russh client written to misbehave, raw sockets, or stock OpenSSH) and
//! checks the limit, ban or audit record that stops or records it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use burrow_core::rpc::{Request, RPC_HOST, RPC_PORT};
use burrow_testkit::*;
use russh::client;
use russh::keys::{PrivateKey, PrivateKeyWithHashAlg};
use serde_json::Value;

const BURROW: &str = env!("CARGO_BIN_EXE_burrow");

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// A client that trusts any host key: the attacker does not care.
struct Anything;

impl client::Handler for Anything {
    type Error = russh::Error;

    async fn check_server_key(&mut self, _key: &russh::keys::PublicKeyOrCertificate) -> Result<bool, Self::Error> {
        Ok(true)
    }
}

fn load_key(key: &KeyPair) -> Arc<PrivateKey> {
    Arc::new(russh::keys::load_secret_key(&key.private, None).unwrap())
}

/// Connects from `from` (a loopback address) and authenticates as `user`;
/// `Ok(None)` if the key was refused.
async fn login(
    pivot: SocketAddr,
    from: &str,
    user: &str,
    key: &Arc<PrivateKey>,
) -> Result<Option<client::Handle<Anything>>, russh::Error> {
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.bind(format!("{from}:0").parse().unwrap())?;
    let tcp = sock.connect(pivot).await?;
    let mut h = client::connect_stream(Arc::new(client::Config::default()), tcp, Anything).await?;
    let r = h.authenticate_publickey(user, PrivateKeyWithHashAlg::new(key.clone(), None)).await?;
    Ok(r.success().then_some(h))
}

/// Opens an `@burrow` channel, sends `bytes` and, with `finish`, reads the answer.
async fn rpc_raw(
    h: &client::Handle<Anything>,
    bytes: &[u8],
    finish: bool,
) -> Result<(russh::Channel<client::Msg>, Option<Value>), russh::Error> {
    let mut ch = h.channel_open_direct_tcpip(RPC_HOST, RPC_PORT, "127.0.0.1", 0).await?;
    if !bytes.is_empty() {
        ch.data(bytes).await?;
    }
    if !finish {
        return Ok((ch, None));
    }
    ch.eof().await?;
    let mut buf = Vec::new();
    while let Some(msg) = ch.wait().await {
        match msg {
            russh::ChannelMsg::Data { data } => buf.extend_from_slice(&data),
            russh::ChannelMsg::Eof | russh::ChannelMsg::Close => break,
            _ => {}
        }
    }
    Ok((ch, serde_json::from_slice(&buf).ok()))
}

/// Step between polls of [`eventually`].
const POLL: Duration = Duration::from_millis(50);

/// Retries `attempt` until it gives `Some`, for at most `within`: the async
/// counterpart of `wait_until`, for conditions only a client can observe.
async fn eventually<T, Fut: std::future::Future<Output = Option<T>>>(
    within: Duration,
    mut attempt: impl FnMut() -> Fut,
) -> Option<T> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = attempt().await {
            return Some(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(POLL).await;
    }
}

fn request_line(req: &Request) -> Vec<u8> {
    let mut line = serde_json::to_vec(req).unwrap();
    line.push(b'\n');
    line
}

/// russh's client keeps only the code of a refusal; its text reaches stock ssh.
fn assert_resource_shortage(e: russh::Error) {
    match e {
        russh::Error::ChannelOpenFailure(f) => assert_eq!(f, russh::ChannelOpenFailure::ResourceShortage),
        other => panic!("expected a channel refusal, got {other}"),
    }
}

/// `burrow audit --json ARGS` on the pivot host, one record per line.
fn audit(pivot: &TestPivot, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["audit", "--json", "--since", "1h"];
    all.extend_from_slice(args);
    let out = pivot.admin_ok(&all);
    out.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// Waits for the audit writer (it batches every quarter second).
fn wait_audit(pivot: &TestPivot, args: &[&str], pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let mut last = Vec::new();
    let ok = wait_until(Duration::from_secs(10), || {
        last = audit(pivot, args);
        pred(&last)
    });
    assert!(ok, "audit {args:?} never matched; last:\n{}", serde_json::to_string_pretty(&last).unwrap());
    last
}

/// Whether the server closes `s` (EOF or reset) within `within`.
fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {
                return false
            }
            Err(_) => return true,
        }
        if start.elapsed() > within {
            return false;
        }
    }
}

fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    runtime().block_on(async {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(format!("{from}:0").parse().unwrap()).unwrap();
        let s = sock.connect(to).await.unwrap().into_std().unwrap();
        s.set_nonblocking(false).unwrap();
        s
    })
}

// Finding 1: any key could authenticate as `enroll` and open unlimited
// `@burrow` channels, each buffering up to 256 KiB.
#[test]
fn an_enrollment_key_holds_two_channels_and_admin_bytes_are_bounded_pivot_wide() {
    let pivot = TestPivot::start_with(BURROW, &["--admin-buffer", "100000"]);
    let dir = tempfile::tempdir().unwrap();
    let key = load_key(&KeyPair::generate(dir.path(), "stranger"));
    let other = load_key(&KeyPair::generate(dir.path(), "stranger2"));
    runtime().block_on(async {
        let h = login(pivot.addr, "127.0.0.1", "enroll", &key).await.unwrap().expect("any key may try to enroll");
        // 60 KB of a request, unfinished, on the first channel.
        let (_a, _) = rpc_raw(&h, &vec![b' '; 60_000], false).await.unwrap();
        let (_b, _) = rpc_raw(&h, b"", false).await.unwrap();
        let third = rpc_raw(&h, b"", false).await.expect_err("a third channel is refused");
        assert_resource_shortage(third);

        // A second connection's 60 KB no longer fit in the pivot's 100 KB.
        let h2 = login(pivot.addr, "127.0.0.1", "enroll", &other).await.unwrap().unwrap();
        let (_, answer) = rpc_raw(&h2, &vec![b' '; 60_000], true).await.unwrap();
        let answer = answer.expect("the pivot answers");
        assert!(answer["error"].as_str().unwrap().starts_with("pivot busy"), "{answer}");

        // Once the first connection is gone, its bytes are given back: the
        // same 60 KB now fit, and get the parser's answer instead.
        drop((_a, _b));
        h.disconnect(russh::Disconnect::ByApplication, "", "en").await.unwrap();
        let answer = eventually(Duration::from_secs(5), || async {
            let (_, a) = rpc_raw(&h2, &vec![b' '; 60_000], true).await.unwrap();
            let answer = a.unwrap()["error"].as_str().unwrap_or_default().to_string();
            (!answer.starts_with("pivot busy")).then_some(answer)
        })
        .await
        .expect("the first connection's bytes were never given back");
        assert!(answer.starts_with("malformed request"), "{answer}");

        // One request may not exceed 64 KiB.
        let (_, big) = rpc_raw(&h2, &vec![b' '; 70_000], true).await.unwrap();
        assert!(big.unwrap()["error"].as_str().unwrap().contains("request too large"));
    });
}

#[test]
fn operator_channels_are_capped_per_connection() {
    let (pivot, op) = TestPivot::with_operator(BURROW, &["--max-channels", "3"]);
    let key = load_key(&op.key);
    runtime().block_on(async {
        let h = login(pivot.addr, "127.0.0.1", "alice", &key).await.unwrap().unwrap();
        let mut open = Vec::new();
        for _ in 0..3 {
            open.push(rpc_raw(&h, b"", false).await.unwrap().0);
        }
        let e = rpc_raw(&h, b"", false).await.expect_err("the fourth channel is refused");
        assert_resource_shortage(e);
        assert!(pivot.proc.log_text().contains("too many open on this connection"));
        open.pop().unwrap().close().await.unwrap();
        let a = eventually(Duration::from_secs(5), || async {
            rpc_raw(&h, &request_line(&Request::Whoami), true).await.ok().and_then(|(_, a)| a)
        })
        .await
        .expect("a closed channel frees its place");
        assert_eq!(a["data"]["name"], "alice");
    });
}

#[test]
fn a_revoked_device_key_cannot_authenticate_as_the_enrollment_user() {
    let pivot = TestPivot::start(BURROW);
    let dir = tempfile::tempdir().unwrap();
    let dev = KeyPair::generate(dir.path(), "dev");
    pivot.add_device("cam-42", &dev);
    pivot.admin_ok(&["device", "revoke", "cam-42"]);
    let key = load_key(&dev);
    runtime().block_on(async {
        // The revoked key's holder is let in only to be told why it is
        // refused: nothing opens, and the pivot hangs up.
        if let Some(h) = login(pivot.addr, "127.0.0.1", "cam-42", &key).await.unwrap() {
            assert!(h.channel_open_session().await.is_err(), "a refused key opened a channel");
            assert!(h.channel_open_direct_tcpip("cam-43", 22, "127.0.0.1", 0).await.is_err());
        }
        assert!(
            login(pivot.addr, "127.0.0.1", "enroll", &key).await.unwrap().is_none(),
            "revoked key got in as enroll"
        );
    });
    assert!(pivot.proc.log_text().contains("login refused: device 'cam-42' was revoked on"));
    assert!(wait_until(Duration::from_secs(5), || pivot
        .proc
        .log_text()
        .contains("a registered or revoked key may not enroll")));
}

// Finding 2: a connection that sends only a banner survived the grace time.
#[test]
fn login_grace_time_covers_the_key_exchange() {
    let pivot = TestPivot::start_with(BURROW, &["--login-grace-time", "2s"]);
    let start = Instant::now();
    let mut banner_only = TcpStream::connect(pivot.addr).unwrap();
    banner_only.write_all(b"SSH-2.0-attacker\r\n").unwrap();
    let mut silent = TcpStream::connect(pivot.addr).unwrap();
    assert!(closed_within(&mut banner_only, Duration::from_secs(6)), "banner-only connection outlived the grace time");
    assert!(closed_within(&mut silent, Duration::from_secs(2)), "silent connection outlived the grace time");
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(1800) && took < Duration::from_secs(6), "closed after {took:?}");
    assert!(wait_until(Duration::from_secs(5), || pivot.proc.log_text().contains("login grace time expired")));
}

// Finding 3: one source could hold any number of unauthenticated connections.
#[test]
fn one_source_gets_its_share_of_unauthenticated_slots_and_operators_still_get_in() {
    let (pivot, op) = TestPivot::with_operator(BURROW, &["--per-source-max-startups", "5"]);
    let mut held: Vec<TcpStream> = (0..30).map(|_| connect_from("127.0.0.2", pivot.addr)).collect();
    // Each served connection gets the pivot's version line; dropped ones get nothing.
    let mut served = 0;
    for s in &mut held {
        s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        let mut buf = [0u8; 64];
        if matches!(s.read(&mut buf), Ok(n) if n > 0 && buf.starts_with(b"SSH-2.0-burrow")) {
            served += 1;
        }
    }
    assert_eq!(served, 5, "one source should get exactly --per-source-max-startups slots");
    let key = load_key(&op.key);
    let start = Instant::now();
    runtime().block_on(async {
        assert!(login(pivot.addr, "127.0.0.1", "alice", &key).await.unwrap().is_some());
    });
    assert!(start.elapsed() < Duration::from_secs(2), "operator login took {:?}", start.elapsed());
}

#[test]
fn with_descriptors_scarce_a_flood_of_idle_connections_cannot_lock_out_an_operator() {
    // The pivot under a 300-descriptor limit, as a small VM would give it.
    let dir = tempfile::tempdir().unwrap();
    let wrapper = dir.path().join("burrow-lowfd");
    std::fs::write(&wrapper, format!("#!/bin/sh\nulimit -n 300\nexec {BURROW} \"$@\"\n")).unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let args = ["--max-startups", "20:30:40", "--per-source-max-startups", "10", "--fd-reserve", "64"];
    let (pivot, op) = TestPivot::with_operator(wrapper.to_str().unwrap(), &args);
    // 1,100 idle connections from one source, more than the descriptor limit.
    let mut held = Vec::new();
    for _ in 0..1100 {
        match runtime().block_on(async {
            let sock = tokio::net::TcpSocket::new_v4()?;
            sock.bind("127.0.0.2:0".parse().unwrap())?;
            sock.connect(pivot.addr).await
        }) {
            Ok(s) => held.push(s),
            Err(_) => break,
        }
    }
    let key = load_key(&op.key);
    for _ in 0..3 {
        let start = Instant::now();
        runtime().block_on(async {
            let h = login(pivot.addr, "127.0.0.1", "alice", &key).await.unwrap();
            assert!(h.is_some(), "operator refused while the flood holds the unauthenticated slots");
        });
        assert!(start.elapsed() < Duration::from_secs(3), "operator login took {:?}", start.elapsed());
    }
    drop(held);
}

// Finding 4: failed logins left no trace, cost nothing, and had no metric.
#[test]
fn failed_logins_are_logged_audited_counted_and_banned() {
    let args = ["--ban-ignoreip", "127.0.0.1/32", "--ban-maxretry", "3", "--http-listen", "127.0.0.1:0"];
    let (mut pivot, op) = TestPivot::with_operator(BURROW, &args);
    let http = pivot.http_port();
    let dir = tempfile::tempdir().unwrap();
    let stranger = KeyPair::generate(dir.path(), "stranger");
    // Stock OpenSSH from 127.0.0.2 with a key nobody registered.
    let attempt = || {
        op.bare_ssh(&pivot, &stranger)
            .args(["-b", "127.0.0.2", "-o", "ConnectTimeout=5", "mallory@127.0.0.1", "true"])
            .stderr(Stdio::piped())
            .output()
            .unwrap()
    };
    for _ in 0..3 {
        let out = attempt();
        assert!(stderr(&out).contains("Permission denied (publickey)"), "{}", stderr(&out));
    }
    // Banned now: the fourth connection is closed before the version line.
    let wait_banned = |addr: SocketAddr| {
        wait_until(Duration::from_secs(5), || {
            let mut s = connect_from("127.0.0.2", addr);
            closed_within(&mut s, Duration::from_secs(1))
        })
    };
    assert!(wait_banned(pivot.addr), "source not banned after 3 failures");
    let out = attempt();
    assert!(!stderr(&out).contains("Permission denied"), "a banned source reached authentication");

    // The operator, from an ignored address, is untouched and quick.
    let start = Instant::now();
    let key = load_key(&op.key);
    runtime().block_on(async { assert!(login(pivot.addr, "127.0.0.1", "alice", &key).await.unwrap().is_some()) });
    assert!(start.elapsed() < Duration::from_secs(1));

    let log = pivot.proc.log_text();
    assert!(log.contains("key refused: unknown key"), "{log}");
    assert!(log.contains("banned until"), "{log}");
    let bans = pivot.admin_ok(&["ban", "list"]);
    assert!(bans.contains("127.0.0.2/32"), "{bans}");
    let failures = wait_audit(&pivot, &["--source", "127.0.0.2", "--event", "auth"], |r| r.len() >= 3);
    assert!(failures.iter().all(|r| r["outcome"] == "failure" && r["user"] == "mallory"), "{failures:?}");
    assert!(failures.iter().any(|r| r["ban"].as_str().is_some_and(|b| b.contains("banned 127.0.0.2/32"))));
    assert!(failures[0]["fingerprint"].as_str().unwrap().starts_with("SHA256:"));
    let metrics = http_get(http, "/metrics");
    assert!(metrics.contains("burrow_auth_failures_total 3"), "{metrics}");
    assert!(metrics.contains("burrow_bans_total 1"), "{metrics}");

    // The ban is in the registry: it survives a restart, and lifts by hand.
    pivot.restart();
    assert!(wait_banned(pivot.addr), "ban lost on restart");
    pivot.admin_ok(&["ban", "remove", "127.0.0.2"]);
    assert!(wait_until(Duration::from_secs(5), || {
        let mut s = connect_from("127.0.0.2", pivot.addr);
        !closed_within(&mut s, Duration::from_millis(500))
    }));
    let unban = audit(&pivot, &["--event", "ban_remove"]);
    assert_eq!(unban.len(), 1, "{unban:?}");
    assert!(unban[0]["actor"].as_str().unwrap().starts_with("local:"));
}

#[test]
fn a_flood_of_failures_is_banned_fast_and_summarised_in_the_audit() {
    // 127.0.0.2 is ignored here, so the flood goes on for the whole test.
    let args = ["--ban-ignoreip", "127.0.0.1/32", "--ban-ignoreip", "127.0.0.2/32"];
    let (mut pivot, op) = TestPivot::with_operator(BURROW, &args);
    let dir = tempfile::tempdir().unwrap();
    let stranger = load_key(&KeyPair::generate(dir.path(), "stranger"));
    let key = load_key(&op.key);
    let flood = {
        let addr = pivot.addr;
        let stranger = stranger.clone();
        std::thread::spawn(move || {
            runtime().block_on(async {
                for _ in 0..40 {
                    assert!(login(addr, "127.0.0.2", "root", &stranger).await.unwrap().is_none());
                }
            })
        })
    };
    // During the flood an operator still gets in within a second.
    for _ in 0..5 {
        let start = Instant::now();
        runtime().block_on(async { assert!(login(pivot.addr, "127.0.0.1", "alice", &key).await.unwrap().is_some()) });
        assert!(start.elapsed() < Duration::from_secs(1), "operator waited {:?}", start.elapsed());
    }
    flood.join().unwrap();
    // Stopping the pivot closes the flood window and writes its summary.
    pivot.proc.terminate(Duration::from_secs(15));
    let one_by_one = audit(&pivot, &["--source", "127.0.0.2", "--event", "auth"]);
    assert_eq!(one_by_one.len(), 5, "{one_by_one:?}");
    let summary = audit(&pivot, &["--source", "127.0.0.2", "--event", "auth_failures"]);
    assert_eq!(summary.len(), 1, "{summary:?}");
    assert_eq!(summary[0]["count"], 35);
}

#[test]
fn bad_ban_and_algorithm_settings_are_refused_at_start_naming_the_rule() {
    let dir = tempfile::tempdir().unwrap();
    for (args, rule) in [
        (vec!["--ban-maxretry", "20"], "0 < maxretry < 20"),
        (vec!["--ban-maxretry", "0"], "0 < maxretry < 20"),
        (vec!["--ban-findtime", "30s"], "findtime >= 60s"),
        (vec!["--ban-bantime", "5m"], "bantime >= findtime"),
        (vec!["--ban-ignoreip", "10.0.0.0/8"], "must include localhost"),
        (vec!["--ciphers", "aes128-cbc"], "cipher 'aes128-cbc' is not in the known-good set"),
        (vec!["--macs", "hmac-sha1"], "MAC 'hmac-sha1' is not in the known-good set"),
        (vec!["--kex-algorithms", "diffie-hellman-group1-sha1"], "not in the known-good set"),
        (vec!["--audit-retention", "30d"], "under the 90 days"),
    ] {
        let out = Command::new(BURROW)
            .args(["server", "--no-mqtt", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path().join("data"))
            .args(&args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(stderr(&out).contains(rule), "{args:?}: {}", stderr(&out));
    }
    assert!(!dir.path().join("data").exists(), "a refused configuration still created the data dir");
}

// Finding 5: admin changes were logged as an op name only, local changes not
// at all, and removals lost what existed.
#[test]
fn admin_changes_are_audited_with_actor_and_arguments_remote_and_local() {
    let (pivot, op) = TestPivot::with_operator(BURROW, &[]);
    pivot.admin_ok(&["operator", "remove", "alice"]);
    pivot.admin_ok(&["operator", "add", "alice", "--admin", "--key", op.key.public.to_str().unwrap()]);
    let mallory = KeyPair::generate(op.dir.path(), "mallory");
    let dev = KeyPair::generate(op.dir.path(), "dev");
    // Remote, over SSH as alice.
    let remote = |args: &[&str]| {
        let mut cmd = Command::new(BURROW);
        cmd.args(args)
            .args(["--pivot", &pivot.addr.to_string(), "--identity", op.key.private.to_str().unwrap()])
            .args(["--pivot-host-key", pivot.host_key_pub().to_str().unwrap()])
            .env("HOME", op.dir.path());
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    };
    remote(&["operator", "add", "mallory", "--admin", "--key", mallory.public.to_str().unwrap()]);
    pivot.admin_ok(&["device", "add", "cam-42", "--key", dev.public.to_str().unwrap(), "--label", "site=lab"]);
    remote(&["device", "remove", "cam-42"]);

    let added = wait_audit(&pivot, &["--event", "operator_add"], |r| r.len() >= 3);
    let by_alice = added.iter().find(|r| r["actor"] == "operator:alice").expect("alice's change is audited");
    assert_eq!(by_alice["args"]["name"], "mallory");
    assert_eq!(by_alice["args"]["role"], "admin");
    assert!(by_alice["args"]["fingerprint"].as_str().unwrap().starts_with("SHA256:"));
    assert!(by_alice["source"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert_eq!(by_alice["outcome"], "success");
    let user = String::from_utf8(Command::new("id").arg("-un").output().unwrap().stdout).unwrap();
    assert!(added.iter().any(|r| r["actor"] == format!("local:{}", user.trim())), "{added:?}");

    let removed = wait_audit(&pivot, &["--event", "device_remove"], |r| !r.is_empty());
    let what = &removed[0]["args"]["removed"];
    assert_eq!(what["labels"]["site"], "lab", "{removed:?}");
    assert!(what["fingerprint"].as_str().unwrap().starts_with("SHA256:"));
    assert_eq!(removed[0]["device"], "cam-42");
}

// Finding 6: channel lines carried no connection id, peer, bytes or duration.
// Also: the audit trail of a whole session, and its JSON-lines export.
#[test]
fn channel_lines_and_audit_carry_connection_peer_bytes_duration_and_algorithms() {
    let dir = tempfile::tempdir().unwrap();
    let export = dir.path().join("audit.jsonl");
    let (pivot, op) = TestPivot::with_operator(BURROW, &["--audit-log", export.to_str().unwrap()]);
    let _dev = Device::start(BURROW, &pivot, &op, "cam-42");
    let out = op.ssh_device("cam-42", "head -c 50000 /dev/zero");
    assert_eq!(out.stdout.len(), 50_000, "{}", stderr(&out));

    assert!(wait_until(Duration::from_secs(10), || pivot.proc.log_text().contains("channel closed")));
    let log = pivot.proc.log_text();
    let line = log.lines().find(|l| l.contains("channel closed")).unwrap();
    for field in ["conn=", "peer=127.0.0.1:", "bytes_to_device=", "bytes_to_operator=", "duration_ms=", "device=cam-42"]
    {
        assert!(line.contains(field), "{field} missing in: {line}");
    }

    let closed = wait_audit(&pivot, &["--event", "channel_close", "--device", "cam-42"], |r| !r.is_empty());
    assert!(closed[0]["bytes_to_operator"].as_u64().unwrap() > 50_000, "{closed:?}");
    assert!(closed[0]["ended"].as_i64() >= closed[0]["started"].as_i64());
    assert_eq!(closed[0]["operator"], "alice");
    assert_eq!(closed[0]["target"], "cam-42:22");
    let auths = audit(&pivot, &["--event", "auth", "--operator", "alice"]);
    let a = auths.first().expect("operator login audited");
    assert_eq!(a["outcome"], "success");
    assert_eq!(a["method"], "publickey");
    // The jump host's login name: the operator's local user, as ssh -J sends it.
    let me = String::from_utf8(Command::new("id").arg("-un").output().unwrap().stdout).unwrap();
    assert_eq!(a["user"], me.trim());
    // OpenSSH's first choice that the pivot offers.
    assert_eq!(a["cipher"], "chacha20-poly1305@openssh.com", "{a}");
    assert!(a["kex"].as_str().unwrap().contains("25519"), "{a}");
    assert!(!audit(&pivot, &["--event", "tunnel_up", "--device", "cam-42"]).is_empty());
    assert!(wait_until(Duration::from_secs(5), || {
        let text = std::fs::read_to_string(&export).unwrap_or_default();
        text.lines().any(|l| l.contains("\"event\":\"channel_close\""))
    }));
    let text = std::fs::read_to_string(&export).unwrap();
    for l in text.lines() {
        serde_json::from_str::<Value>(l).expect("each line of the export is one JSON object");
    }
}

// Finding 8: a restricted operator could tell existing devices from unknown ids.
#[test]
fn a_restricted_operator_cannot_tell_unknown_devices_from_forbidden_ones() {
    let pivot = TestPivot::start(BURROW);
    let op = Operator::new(&pivot);
    pivot.admin_ok(&["operator", "add", "bob", "--key", op.key.public.to_str().unwrap(), "--allow", "site=berlin"]);
    let key = KeyPair::generate(op.dir.path(), "dev");
    pivot.admin_ok(&["device", "add", "cam-paris", "--key", key.public.to_str().unwrap(), "--label", "site=paris"]);
    let exists = op.ssh_device("cam-paris", "true");
    let missing = op.ssh_device("cam-nowhere", "true");
    assert!(stderr(&exists).contains("not allowed to reach device 'cam-paris'"), "{}", stderr(&exists));
    assert!(stderr(&missing).contains("not allowed to reach device 'cam-nowhere'"), "{}", stderr(&missing));
    let remote = |id: &str| {
        Command::new(BURROW)
            .args(["device", "show", id])
            .args(["--pivot", &pivot.addr.to_string(), "--identity", op.key.private.to_str().unwrap()])
            .args(["--pivot-host-key", pivot.host_key_pub().to_str().unwrap()])
            .env("HOME", op.dir.path())
            .output()
            .unwrap()
    };
    assert!(stderr(&remote("cam-paris")).contains("not allowed to reach device 'cam-paris'"));
    assert!(stderr(&remote("cam-nowhere")).contains("not allowed to reach device 'cam-nowhere'"));
}

// Finding 9: the data dir was 0755 and the registry 0644.
#[test]
fn the_data_dir_and_registry_files_are_private() {
    let pivot = TestPivot::start(BURROW);
    let dir = tempfile::tempdir().unwrap();
    pivot.add_device("cam-42", &KeyPair::generate(dir.path(), "k"));
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(pivot.data.path()), 0o700);
    for f in ["registry.db", "registry.db-wal", "registry.db-shm", "host_key"] {
        let p = pivot.data.path().join(f);
        if p.exists() {
            assert_eq!(mode(&p), 0o600, "{f}");
        }
    }
    assert!(pivot.data.path().join("registry.db-wal").exists());

    // Files an older version left open are tightened at start.
    let mut pivot = pivot;
    pivot.proc.terminate(Duration::from_secs(15));
    std::fs::set_permissions(pivot.data.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let db = pivot.data.path().join("registry.db");
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
    pivot.restart();
    assert_eq!(mode(pivot.data.path()), 0o700);
    assert_eq!(mode(&db), 0o600);
}

// Finding 10: overflowing lifetimes, control characters in labels, ids that
// look like addresses or pivot names.
#[test]
fn hostile_values_in_admin_requests_are_refused_without_harm() {
    let (pivot, op) = TestPivot::with_operator(BURROW, &[]);
    for (args, says) in [
        (vec!["device", "add", "cam-1", "--ttl", "18446744073709551615s"], "ttl"),
        (vec!["device", "add", "cam-1", "--ttl", "9000years"], "ttl"),
        (vec!["device", "add", "cam-1", "--label", "site=a\u{1b}[31mred"], "label"),
        (vec!["device", "add", "cam-1", "--label", "site=a\nX"], "label"),
        (vec!["device", "add", "127.0.0.1"], "id"),
        (vec!["device", "add", "x.burrow"], "id"),
        (vec!["device", "add", "12345"], "id"),
    ] {
        let out = pivot.admin(&args);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(stderr(&out).to_lowercase().contains(says), "{args:?}: {}", stderr(&out));
    }
    // The same over the wire, hand-written so that the client's own checks
    // cannot stop them; the pivot answers each and keeps serving.
    let key = load_key(&op.key);
    let hostile = [
        r#"{"op":"device_add","id":"cam-1","key":null,"labels":{},"ttl_secs":18446744073709551615,"address":"p:1"}"#,
        r#"{"op":"device_add","id":"cam-1","key":null,"labels":{},"ttl_secs":252423993600,"address":"p:1"}"#,
        r#"{"op":"device_add","id":"cam-1","key":null,"labels":{"site":"a\u001b[2Jb"},"address":"p:1"}"#,
        r#"{"op":"device_add","id":"10.0.0.1","key":null,"labels":{},"address":"p:1"}"#,
        r#"{"op":"ban_add","net":"10.0.0.1","secs":18446744073709551615}"#,
    ];
    runtime().block_on(async {
        let h = login(pivot.addr, "127.0.0.1", "alice", &key).await.unwrap().unwrap();
        for line in hostile {
            let (_, a) = rpc_raw(&h, format!("{line}\n").as_bytes(), true).await.unwrap();
            let a = a.expect("the pivot answers");
            assert_eq!(a["ok"], false, "{line} -> {a}");
        }
        let (_, a) = rpc_raw(&h, &request_line(&Request::DeviceList), true).await.unwrap();
        assert_eq!(a.unwrap()["ok"], true);
    });
    let list = pivot.admin_ok(&["device", "list"]);
    assert_eq!(list.lines().count(), 1, "nothing was registered: {list}");
}

// Algorithms: a stock client limited to weak algorithms is refused.
#[test]
fn weak_algorithms_offered_by_a_stock_client_are_refused() {
    let (pivot, op) = TestPivot::with_operator(BURROW, &[]);
    let try_with = |opts: &[&str]| {
        let mut cmd = op.bare_ssh(&pivot, &op.key);
        for o in opts {
            cmd.args(["-o", o]);
        }
        let out = cmd.args(["alice@127.0.0.1", "true"]).stderr(Stdio::piped()).output().unwrap();
        assert!(!out.status.success());
        stderr(&out)
    };
    assert!(try_with(&["Ciphers=aes128-cbc,aes256-cbc,3des-cbc"]).contains("no matching cipher"));
    assert!(try_with(&["Ciphers=aes128-ctr", "MACs=hmac-sha1"]).contains("no matching MAC"));
    assert!(try_with(&["KexAlgorithms=diffie-hellman-group1-sha1"]).contains("no matching key exchange"));
    assert!(try_with(&["HostKeyAlgorithms=ssh-rsa"]).contains("no matching host key type"));

    // An RSA user key that signs with SHA-1 only.
    let rsa = op.dir.path().join("rsa");
    let gen =
        Command::new("ssh-keygen").args(["-q", "-t", "rsa", "-b", "2048", "-N", "", "-f"]).arg(&rsa).output().unwrap();
    assert!(gen.status.success());
    pivot.admin_ok(&["operator", "add", "rsa-user", "--key", rsa.with_extension("pub").to_str().unwrap()]);
    let rsa_key = KeyPair { private: rsa.clone(), public: rsa.with_extension("pub") };
    let sha1 = op
        .bare_ssh(&pivot, &rsa_key)
        .args(["-o", "PubkeyAcceptedAlgorithms=ssh-rsa", "rsa-user@127.0.0.1", "true"])
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(stderr(&sha1).contains("Permission denied (publickey)"), "{}", stderr(&sha1));
    // OpenSSH does not even offer it, since the pivot does not list ssh-rsa;
    // a client that signs with SHA-1 anyway is refused by the pivot itself.
    let key = Arc::new(russh::keys::load_secret_key(&rsa, None).unwrap());
    runtime().block_on(async {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        let tcp = sock.connect(pivot.addr).await.unwrap();
        let mut h = client::connect_stream(Arc::new(client::Config::default()), tcp, Anything).await.unwrap();
        let r = h.authenticate_publickey("rsa-user", PrivateKeyWithHashAlg::new(key.clone(), None)).await.unwrap();
        assert!(!r.success(), "an ssh-rsa (SHA-1) signature was accepted");
        let r = h
            .authenticate_publickey("rsa-user", PrivateKeyWithHashAlg::new(key, Some(russh::keys::HashAlg::Sha256)))
            .await
            .unwrap();
        assert!(r.success(), "rsa-sha2-256 was refused");
    });
    assert!(pivot.proc.log_text().contains("ssh-rsa (SHA-1) signatures are not accepted"));
    // The same key with SHA-2 is fine (the pivot then refuses a shell, as always).
    let sha2 = op
        .bare_ssh(&pivot, &rsa_key)
        .args(["-o", "PubkeyAcceptedAlgorithms=rsa-sha2-256", "rsa-user@127.0.0.1", "true"])
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(!stderr(&sha2).contains("Permission denied"), "{}", stderr(&sha2));
}

/// `GET path` on the pivot's HTTP port.
fn http_get(port: u16, path: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

// Finding 7: a device-supplied status reason with newlines forged log lines.
#[test]
fn a_status_reason_from_the_broker_cannot_forge_log_lines() {
    let mosquitto = Mosquitto::start();
    let args = ["--mqtt-url", &mosquitto.url(), "--mqtt-username", "pivot"];
    let (pivot, op) = TestPivot::with_operator(BURROW, &args);
    assert!(wait_until(Duration::from_secs(10), || pivot.proc.log_text().contains("connected to the MQTT broker")));
    let dir = tempfile::tempdir().unwrap();
    pivot.add_device("cam-42", &KeyPair::generate(dir.path(), "cam-42"));
    // A reason reaches the log only as the answer to a wake-up under way.
    let forged = "boom\n2026-12-01T00:00:00Z  INFO burrow_server: FAKE operator 'root' authenticated\u{1b}[2J";
    let standin = mqtt_standin(&mosquitto.url(), "cam-42", "error", forged, Duration::from_secs(8));
    assert!(wait_until(Duration::from_secs(5), || pivot.is_present("cam-42")));
    let out = op.ssh_device("cam-42", "true");
    let err = stderr(&out);
    assert!(err.contains("could not connect to the pivot: boom\\"), "{err}");
    assert!(!err.lines().any(|l| l.starts_with("2026-12-01")), "a forged line reached the operator: {err}");
    assert!(!stderr(&out).contains('\u{1b}'), "an escape sequence reached the operator");
    assert!(standin.join().unwrap() >= 1);
    assert!(wait_until(Duration::from_secs(10), || pivot.proc.log_text().contains("device could not connect")));
    let log = pivot.proc.log_text();
    for line in log.lines().filter(|l| l.contains("FAKE")) {
        assert!(line.contains("boom\\n2026"), "forged line: {line}");
    }
    assert!(!log.contains('\u{1b}'), "an escape sequence reached the log");
}

// Review: an enrollment key kept its connection past the grace time and
// outside the per-source cap, and could loop requests on one connection.
#[test]
fn enrollment_connections_keep_the_grace_time_the_per_source_cap_and_few_requests() {
    let pivot = TestPivot::start_with(BURROW, &["--login-grace-time", "2s", "--per-source-max-startups", "3"]);
    let dir = tempfile::tempdir().unwrap();
    let key = load_key(&KeyPair::generate(dir.path(), "stranger"));
    runtime().block_on(async {
        let mut held = Vec::new();
        for _ in 0..5 {
            if let Ok(Some(h)) = login(pivot.addr, "127.0.0.2", "enroll", &key).await {
                held.push(h);
            }
        }
        assert_eq!(held.len(), 3, "enrollment connections escaped the per-source cap");
        // Three requests, then no more channels on this connection.
        for _ in 0..3 {
            let (_, a) = rpc_raw(&held[0], b"{}\n", true).await.unwrap();
            assert_eq!(a.unwrap()["ok"], false);
        }
        assert_resource_shortage(rpc_raw(&held[0], b"", false).await.expect_err("a fourth request was served"));
        // The grace time (2 s) ends them all.
        let closed = eventually(Duration::from_secs(6), || async { held.iter().all(|h| h.is_closed()).then_some(()) });
        assert!(closed.await.is_some(), "an enrollment connection outlived the grace time");
    });
}

// Review: partial admin requests held the pivot-wide buffer for ever, and one
// operator connection could take all of it.
#[test]
fn partial_admin_requests_time_out_and_one_connection_gets_only_its_share() {
    let (pivot, op) = TestPivot::with_operator(BURROW, &[]);
    let key = load_key(&op.key);
    runtime().block_on(async {
        let h = login(pivot.addr, "127.0.0.1", "alice", &key).await.unwrap().unwrap();
        let mut open = Vec::new();
        for _ in 0..4 {
            open.push(rpc_raw(&h, &vec![b' '; 60_000], false).await.unwrap().0);
        }
        let (_, a) = rpc_raw(&h, &vec![b' '; 60_000], true).await.unwrap();
        assert!(
            a.unwrap()["error"].as_str().unwrap().starts_with("pivot busy"),
            "one connection took more than its share"
        );
        // Another connection is not affected.
        let h2 = login(pivot.addr, "127.0.0.1", "alice", &key).await.unwrap().unwrap();
        let (_, a) = rpc_raw(&h2, &request_line(&Request::Whoami), true).await.unwrap();
        assert_eq!(a.unwrap()["ok"], true);
        // The unfinished requests are answered, and their bytes given back, after 10 s.
        let mut first = open.remove(0);
        let answer = tokio::time::timeout(Duration::from_secs(15), async {
            let mut buf = Vec::new();
            while let Some(msg) = first.wait().await {
                match msg {
                    russh::ChannelMsg::Data { data } => buf.extend_from_slice(&data),
                    russh::ChannelMsg::Eof | russh::ChannelMsg::Close => break,
                    _ => {}
                }
            }
            buf
        })
        .await
        .expect("an unfinished request was held for ever");
        let a: Value = serde_json::from_slice(&answer).unwrap();
        assert!(a["error"].as_str().unwrap().contains("not complete within"), "{a}");
    });
}

// Review: every rejected key counted as a failure (a full ssh-agent got its
// owner banned), and so did a bare TCP connect-and-close (health checks).
#[test]
fn a_client_with_many_keys_or_a_health_check_is_not_banned() {
    let args = ["--ban-ignoreip", "127.0.0.1/32", "--ban-maxretry", "3"];
    let (pivot, op) = TestPivot::with_operator(BURROW, &args);
    let first = KeyPair::generate(op.dir.path(), "k0");
    let mut cmd = op.bare_ssh(&pivot, &first);
    for i in 1..6 {
        let k = KeyPair::generate(op.dir.path(), &format!("k{i}"));
        cmd.arg("-i").arg(&k.private);
    }
    let out = cmd.args(["-b", "127.0.0.2", "mallory@127.0.0.1", "true"]).stderr(Stdio::piped()).output().unwrap();
    let err = stderr(&out);
    assert!(err.contains("Permission denied") || err.contains("Too many authentication attempts"), "{err}");
    for _ in 0..5 {
        drop(connect_from("127.0.0.2", pivot.addr));
    }
    // The key-trying connection is counted once it has ended: its audit record shows it.
    wait_audit(&pivot, &["--source", "127.0.0.2", "--event", "auth"], |r| !r.is_empty());
    let mut s = connect_from("127.0.0.2", pivot.addr);
    assert!(!closed_within(&mut s, Duration::from_millis(500)), "127.0.0.2 was banned");
    assert_eq!(pivot.admin_ok(&["ban", "list", "--json"]).trim(), "[]");
}

// Review: a huge user name was copied whole into every failure record.
#[test]
fn a_huge_user_name_is_clipped_in_logs_and_audit() {
    let pivot = TestPivot::start(BURROW);
    let dir = tempfile::tempdir().unwrap();
    let key = load_key(&KeyPair::generate(dir.path(), "stranger"));
    let name = "\u{202e}".repeat(20_000);
    runtime().block_on(async {
        assert!(login(pivot.addr, "127.0.0.1", &name, &key).await.unwrap().is_none());
    });
    let rec = wait_audit(&pivot, &["--event", "auth"], |r| !r.is_empty());
    let user = rec[0]["user"].as_str().unwrap();
    assert!(user.len() < 1000, "user name kept at {} bytes", user.len());
    assert!(!user.contains('\u{202e}'), "a bidi override reached the audit");
}

// Review: a device could loop forward/cancel requests, each an audit row and
// a registry write.
#[test]
fn a_device_cannot_loop_forward_requests() {
    let pivot = TestPivot::start_with(BURROW, &["--max-forwards", "2"]);
    let dir = tempfile::tempdir().unwrap();
    let dev = KeyPair::generate(dir.path(), "dev");
    pivot.add_device("cam-42", &dev);
    let key = load_key(&dev);
    runtime().block_on(async {
        let h = login(pivot.addr, "127.0.0.1", "cam-42", &key).await.unwrap().unwrap();
        let mut granted = 0;
        for _ in 0..20 {
            if h.tcpip_forward("cam-42", 22).await.is_ok() {
                granted += 1;
            }
            let _ = h.cancel_tcpip_forward("cam-42", 22).await;
        }
        assert!(granted <= 4, "{granted} forwards granted for 2 ports");
    });
    let ups = wait_audit(&pivot, &["--event", "tunnel_up"], |r| !r.is_empty());
    assert_eq!(ups.len(), 1, "{ups:?}");
}

// Review: a device's MQTT topic with a newline forged a log line.
#[test]
fn a_device_topic_cannot_forge_log_lines() {
    let pivot = TestPivot::start(BURROW);
    let key = pivot.new_device("cam-42");
    let token = pivot.login_token(&key, "cam-42");
    runtime().block_on(async {
        let mut opts = pivot.mqtt_options("cam-42");
        opts.set_credentials("cam-42", token);
        let (client, mut ev) = rumqttc::AsyncClient::new(opts, 10);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            match tokio::time::timeout_at(deadline, ev.poll()).await {
                Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_)))) => {
                    client.try_publish("x\n2026 WARN FAKE banned", rumqttc::QoS::AtMostOnce, false, "x").unwrap();
                }
                Ok(Ok(_)) => {}
                _ => break,
            }
        }
    });
    assert!(wait_until(Duration::from_secs(5), || pivot.proc.log_text().contains("FAKE")));
    for line in pivot.proc.log_text().lines().filter(|l| l.contains("FAKE")) {
        assert!(line.contains("x\\n2026"), "forged line: {line}");
    }
}

#[test]
fn ban_and_audit_commands_are_for_admins_locally_and_over_ssh() {
    let (pivot, op) = TestPivot::with_operator(BURROW, &[]);
    let admin = KeyPair::generate(op.dir.path(), "admin");
    pivot.admin_ok(&["operator", "add", "root-admin", "--admin", "--key", admin.public.to_str().unwrap()]);
    let remote = |key: &KeyPair, args: &[&str]| {
        Command::new(BURROW)
            .args(args)
            .args(["--pivot", &pivot.addr.to_string(), "--identity", key.private.to_str().unwrap()])
            .args(["--pivot-host-key", pivot.host_key_pub().to_str().unwrap()])
            .env("HOME", op.dir.path())
            .output()
            .unwrap()
    };
    // A plain operator may not, and the refusal itself is audited.
    for args in [&["ban", "list"][..], &["audit"], &["ban", "add", "203.0.113.7"]] {
        let out = remote(&op.key, args);
        assert!(stderr(&out).contains("does not have the admin role"), "{args:?}: {}", stderr(&out));
    }
    wait_audit(&pivot, &["--event", "admin_denied", "--operator", "alice"], |r| r.len() >= 2);
    // An admin may, remotely.
    let out = remote(&admin, &["ban", "add", "203.0.113.0/24", "--for", "2h"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).starts_with("banned 203.0.113.0/24 until "), "{}", stdout(&out));
    let out = remote(&admin, &["ban", "list", "--json"]);
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[0]["net"], "203.0.113.0/24");
    assert_eq!(list[0]["by"], "operator:root-admin");
    // Bans of everyone or of localhost are refused.
    for net in ["0.0.0.0/0", "127.0.0.1", "::/0"] {
        let out = remote(&admin, &["ban", "add", net]);
        assert!(!out.status.success(), "{net} was banned");
    }
    let out = remote(&admin, &["audit", "--json", "--event", "ban_add"]);
    assert!(stdout(&out).contains("203.0.113.0/24"), "{}", stdout(&out));
    let out = remote(&admin, &["ban", "remove", "203.0.113.0/24"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = remote(&admin, &["audit", "--event", "bogus"]);
    assert!(stderr(&out).contains("unknown event 'bogus'"), "{}", stderr(&out));
}

// Second review: an answer the client never read (its window kept at 0)
// parked the request task, and with it the connection's unauthenticated
// slot, after the connection was gone.
#[test]
fn an_unread_admin_answer_does_not_keep_the_unauthenticated_slot() {
    let pivot = TestPivot::start_with(BURROW, &["--per-source-max-startups", "3", "--login-grace-time", "3s"]);
    let dir = tempfile::tempdir().unwrap();
    let key = load_key(&KeyPair::generate(dir.path(), "stranger"));
    runtime().block_on(async {
        for _ in 0..5 {
            let sock = tokio::net::TcpSocket::new_v4().unwrap();
            sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
            let tcp = sock.connect(pivot.addr).await.unwrap();
            let config = client::Config { window_size: 0, ..Default::default() };
            let mut h = client::connect_stream(Arc::new(config), tcp, Anything).await.unwrap();
            let r = h.authenticate_publickey("enroll", PrivateKeyWithHashAlg::new(key.clone(), None)).await.unwrap();
            assert!(r.success());
            let answered = pivot.proc.log_text().matches("admin request").count();
            let ch = h.channel_open_direct_tcpip(RPC_HOST, RPC_PORT, "127.0.0.1", 0).await.unwrap();
            ch.data(&request_line(&Request::Whoami)[..]).await.unwrap();
            // Gone once the pivot has its answer ready (and no window to send it in).
            let handled =
                || async { (pivot.proc.log_text().matches("admin request").count() > answered).then_some(()) };
            assert!(eventually(Duration::from_secs(5), handled).await.is_some());
            drop(h);
        }
        // The source still gets served: its slots came back with its connections.
        let served = eventually(Duration::from_secs(5), || async {
            login(pivot.addr, "127.0.0.2", "enroll", &key).await.ok().flatten()
        });
        assert!(served.await.is_some(), "slots leaked");
    });
}

// Second review: one registered key could take every connection.
#[test]
fn one_key_holds_a_bounded_number_of_connections_and_is_not_banned_for_it() {
    let args = ["--max-sessions-per-key", "3", "--ban-ignoreip", "127.0.0.1/32", "--ban-maxretry", "2"];
    let (pivot, op) = TestPivot::with_operator(BURROW, &args);
    let key = load_key(&op.key);
    runtime().block_on(async {
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(login(pivot.addr, "127.0.0.2", "alice", &key).await.unwrap().expect("within the limit"));
        }
        for _ in 0..3 {
            assert!(login(pivot.addr, "127.0.0.2", "alice", &key).await.unwrap().is_none(), "past the limit");
        }
        held.pop().unwrap().disconnect(russh::Disconnect::ByApplication, "", "en").await.unwrap();
        let again = eventually(Duration::from_secs(5), || async {
            login(pivot.addr, "127.0.0.2", "alice", &key).await.ok().flatten()
        });
        assert!(again.await.is_some(), "a freed place was not reusable");
    });
    assert!(pivot.proc.log_text().contains("the key already holds 3 connections"));
    assert_eq!(pivot.admin_ok(&["ban", "list", "--json"]).trim(), "[]", "hitting the limit is no failure");
}

// Second review: garbage on the devices' MQTT port never counted toward a ban.
#[test]
fn mqtt_garbage_counts_toward_a_ban_like_ssh_garbage() {
    let pivot = TestPivot::start_with(BURROW, &["--ban-ignoreip", "127.0.0.1/32", "--ban-maxretry", "3"]);
    let mqtt = pivot.mqtt_addr.unwrap();
    for _ in 0..3 {
        let mut s = connect_from("127.0.0.2", mqtt);
        s.write_all(&[0x30, 0x00]).unwrap(); // a PUBLISH where CONNECT must come first
        assert!(closed_within(&mut s, Duration::from_secs(5)));
    }
    // A bare connect-and-close is not counted; the three above are.
    drop(connect_from("127.0.0.3", mqtt));
    assert!(wait_until(Duration::from_secs(5), || {
        let mut s = connect_from("127.0.0.2", pivot.addr);
        closed_within(&mut s, Duration::from_secs(1))
    }));
    let bans = pivot.admin_ok(&["ban", "list"]);
    assert!(bans.contains("127.0.0.2/32") && !bans.contains("127.0.0.3"), "{bans}");
    let recs = wait_audit(&pivot, &["--source", "127.0.0.2", "--event", "auth"], |r| r.len() >= 3);
    assert!(recs.iter().all(|r| r["method"] == "mqtt"), "{recs:?}");
}

// A retained presence carries a time only the device vouches for; it must
// not move "last seen" (issue 10 found one set to year 10000).
#[test]
fn a_retained_presence_cannot_set_last_seen_in_the_future() {
    let mosquitto = Mosquitto::start();
    let future = burrow_core::time::now_unix() + 10 * 365 * 86_400;
    let presence = serde_json::json!({"state": "online", "mode": "on-demand", "at": future});
    let topic = burrow_core::signal::Topics::new("burrow").presence("cam-42");
    mqtt_publish(&mosquitto.url(), "cam-42", &[(topic, true, presence.to_string().into_bytes())]);
    let args = ["--mqtt-url", &mosquitto.url(), "--mqtt-username", "pivot"];
    let mut pivot = TestPivot::start_with(BURROW, &args);
    let dir = tempfile::tempdir().unwrap();
    pivot.add_device("cam-42", &KeyPair::generate(dir.path(), "k"));
    pivot.restart();
    assert!(wait_until(Duration::from_secs(10), || pivot.is_present("cam-42")), "retained presence not heard");
    let d = pivot.device_json("cam-42").unwrap();
    assert!(d["last_seen"].is_null(), "a device-supplied time became last seen: {d}");
}

/// Issue 10 asks: no value from a device can make any command panic. Extreme
/// presence and status values go in over the broker, then every listing
/// command runs and must succeed.
#[test]
fn extreme_device_values_leave_every_listing_command_working() {
    let mosquitto = Mosquitto::start();
    let args = ["--mqtt-url", &mosquitto.url(), "--mqtt-username", "pivot"];
    let pivot = TestPivot::start_with(BURROW, &args);
    assert!(wait_until(Duration::from_secs(10), || pivot.proc.log_text().contains("connected to the MQTT broker")));
    let dir = tempfile::tempdir().unwrap();
    for id in ["cam-1", "cam-2", "cam-3"] {
        pivot.add_device(id, &KeyPair::generate(dir.path(), id));
    }
    let topics = burrow_core::signal::Topics::new("burrow");
    let weird = format!("\u{0}\u{1b}[2J\u{202e}{}\n\r", "\u{fffd}x".repeat(3000));
    let messages: Vec<(String, bool, String)> = vec![
        (topics.presence("cam-1"), true, serde_json::json!({"state": "online", "at": i64::MAX}).to_string()),
        (topics.presence("cam-2"), false, serde_json::json!({"state": "online", "at": i64::MIN, "mode": weird}).to_string()),
        (topics.presence("cam-3"), true, "\u{ff}\u{fe}not json".to_string()),
        (topics.status("cam-1"), false, serde_json::json!({"nonce": weird, "pivot": weird, "state": "error", "reason": weird, "at": -1}).to_string()),
        (topics.status("cam-2"), false, serde_json::json!({"nonce": "n", "pivot": "p", "state": "error", "reason": weird, "at": 1}).to_string()),
        (topics.status("cam-3"), false, serde_json::json!({"nonce": "n", "pivot": "p", "state": "error", "reason": "\u{1b}[2J\u{202e}boom\n", "at": 1}).to_string()),
        // A sane message last: once it is in, every one before it was handled.
        (topics.presence("cam-4"), false, serde_json::json!({"state": "online", "mode": "on-demand"}).to_string()),
    ];
    pivot.add_device("cam-4", &KeyPair::generate(dir.path(), "cam-4"));
    let messages: Vec<_> = messages.into_iter().map(|(t, r, p)| (t, r, p.into_bytes())).collect();
    mqtt_publish(&mosquitto.url(), "weird-device", &messages);
    assert!(wait_until(Duration::from_secs(5), || pivot.is_present("cam-4")));
    for args in [
        &["device", "list"][..],
        &["device", "list", "--json"],
        &["device", "show", "cam-1"],
        &["device", "show", "cam-2", "--json"],
        &["operator", "list"],
        &["ban", "list"],
        &["audit"],
        &["audit", "--json"],
    ] {
        let out = pivot.admin(args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        assert!(!stdout(&out).contains('\u{1b}'), "{args:?} printed an escape sequence");
    }
    let list: Vec<Value> = serde_json::from_str(&pivot.admin_ok(&["device", "list", "--json"])).unwrap();
    for d in &list {
        if let Some(seen) = d["last_seen"].as_str() {
            assert!(seen < "2100", "{d}");
        }
    }
    // The pivot is still up and serving.
    assert!(pivot.admin(&["device", "list"]).status.success());
    let mut p = pivot;
    assert!(p.proc.is_running(), "the pivot died");
}
