//! Issue 10: the devices' MQTT listener the pivot serves itself. Each test
//! names the finding it covers; they run against the real `burrow` binary,
//! real agents, sshd and OpenSSH clients.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use burrow_core::enroll::EnrollToken;
use burrow_core::time::now_unix;
use burrow_testkit::*;

const BURROW: &str = env!("CARGO_BIN_EXE_burrow");

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// What the embedded broker answered to one CONNECT with `token`.
fn connect_with(pivot: &TestPivot, id: &str, token: String) -> Result<(), String> {
    runtime().block_on(async {
        let mut opts = pivot.mqtt_options(id);
        opts.set_credentials(id, token);
        let (_client, mut ev) = rumqttc::AsyncClient::new(opts, 10);
        match tokio::time::timeout(Duration::from_secs(10), ev.poll()).await {
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(a)))) => match a.code {
                rumqttc::ConnectReturnCode::Success => Ok(()),
                code => Err(format!("{code:?}")),
            },
            Ok(Ok(other)) => Err(format!("unexpected {other:?}")),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("no answer".into()),
        }
    })
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Finding 5: the listener was plaintext, so a captured token could take
/// over a device's session. Now TLS is the default, devices pin the
/// certificate, and the pin reaches them through the enrollment token.
#[test]
fn tls_is_the_default_and_enrolled_devices_pin_the_certificate() {
    let pivot = TestPivot::start(BURROW);
    let fp = pivot.mqtt_fingerprint.clone().expect("TLS by default");
    assert!(pivot.proc.log_text().contains(&format!("mqtt certificate {fp}")));
    let mqtt = pivot.mqtt_addr.unwrap();

    // A device given mqtt:// sends its login in the clear to the TLS port:
    // refused (CONNACK "not authorized"), and the token it exposed is void.
    let dir = tempfile::tempdir().unwrap();
    let dev = KeyPair::generate(dir.path(), "cam-7");
    pivot.add_device("cam-7", &dev);
    let key = russh::keys::load_secret_key(&dev.private, None).unwrap();
    let token = pivot.login_token(&key, "cam-7");
    let mut connect = rumqttc::mqttbytes::v4::Connect::new("cam-7");
    connect.login = Some(rumqttc::mqttbytes::v4::Login::new("cam-7", token.clone()));
    let mut wire = bytes::BytesMut::new();
    rumqttc::mqttbytes::v4::Packet::Connect(connect).write(&mut wire, 65536).unwrap();
    let mut s = TcpStream::connect(mqtt).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&wire).unwrap();
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack).unwrap();
    assert_eq!(ack, [0x20, 2, 0, 5], "a plaintext login was not refused");
    assert!(wait_until(Duration::from_secs(5), || pivot.proc.log_text().contains("sent its login without TLS")));
    assert!(connect_with(&pivot, "cam-7", token).is_err(), "the token seen in the clear still worked");

    // The token carries the pin; enrollment writes it to agent.toml.
    let sshd = Sshd::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let address = pivot.addr.to_string();
    let token = pivot.admin_ok(&["device", "add", "cam-9", "--address", &address]).trim().to_string();
    let decoded = EnrollToken::decode(&token).unwrap();
    assert_eq!(decoded.mqtt_fingerprint.as_deref(), Some(fp.as_str()));
    let config = dir.path().join("agent.toml");
    let out = Command::new(BURROW)
        .args(["agent", "enroll", "--token", &token, "--config"])
        .arg(&config)
        .arg("--host-keys")
        .arg(&sshd.host_key.public)
        .args(["--expose", &format!("22={}", sshd.target()), "--mqtt-url", &pivot.mqtt_url()])
        .arg("--trust-dir")
        .arg(dir.path().join("trust"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let written = std::fs::read_to_string(&config).unwrap();
    assert!(written.contains(&format!("mqtt_fingerprint = \"{fp}\"")), "{written}");
    let mut cmd = Command::new(BURROW);
    cmd.args(["agent", "--config"]).arg(&config);
    let agent = Proc::spawn("burrow agent cam-9", &mut cmd, dir.path().join("agent.log"));
    assert!(wait_until(Duration::from_secs(15), || pivot.is_present("cam-9")), "{}", agent.log_text());

    // The same device told to trust another certificate refuses the pivot.
    let key = dir.path().join("device_key");
    let wrong = burrow_core::mqtt_url::CertPin::of_der(b"not the pivot's certificate").to_string();
    let mut cmd = Command::new(BURROW);
    cmd.args(["agent", "--config"]).arg(&config).args(["--mqtt-fingerprint", &wrong, "--key"]).arg(&key);
    let impostor = Proc::spawn("burrow agent cam-9 (wrong pin)", &mut cmd, dir.path().join("wrong.log"));
    assert!(
        wait_until(Duration::from_secs(10), || impostor.log_text().contains(&format!("is not the pinned {wrong}"))),
        "{}",
        impostor.log_text()
    );
}

/// Finding 5: a login token was accepted any number of times within
/// ±300 s, including tokens dated in the future.
#[test]
fn a_login_token_works_once_and_never_from_the_future() {
    let pivot = TestPivot::start(BURROW);
    let key = pivot.new_device("cam-42");
    let token = pivot.login_token(&key, "cam-42");
    assert_eq!(connect_with(&pivot, "cam-42", token.clone()), Ok(()));
    let again = connect_with(&pivot, "cam-42", token);
    assert!(again.is_err(), "a used token was accepted again");
    assert!(wait_until(Duration::from_secs(5), || pivot.proc.log_text().contains("login token was already used")));

    let ahead =
        burrow_core::signal::login_token(&key, "cam-42", pivot.mqtt_fingerprint.as_deref().unwrap(), now_unix() + 60)
            .unwrap();
    assert!(connect_with(&pivot, "cam-42", ahead).is_err(), "a token dated a minute ahead was accepted");
    assert!(wait_until(Duration::from_secs(5), || pivot.proc.log_text().contains("ahead of the pivot's clock")));
    // A token signed for another pivot's certificate is worthless here.
    let elsewhere = burrow_core::signal::login_token(&key, "cam-42", "SHA256:another-pivot", now_unix()).unwrap();
    assert!(connect_with(&pivot, "cam-42", elsewhere).is_err(), "a token for another pivot was accepted");
    // A fresh token still works: refusals did not lock the device out.
    let fresh = pivot.login_token(&key, "cam-42");
    assert_eq!(connect_with(&pivot, "cam-42", fresh), Ok(()));
}

/// Finding 2: the gate allocated a packet's claimed length before reading
/// it (3,000 four-byte connections cost 186 MB) and had no CONNECT deadline.
#[test]
fn claimed_packet_lengths_cost_nothing_and_silent_connections_are_dropped() {
    let pivot = TestPivot::start_with(
        BURROW,
        &[
            "--mqtt-plaintext",
            "--login-grace-time",
            "3s",
            "--max-startups",
            "400:30:500",
            "--per-source-max-startups",
            "400",
            "--ban-ignoreip",
            "127.0.0.0/8",
        ],
    );
    let mqtt = pivot.mqtt_addr.unwrap();
    let before = rss_kib(pivot.proc.pid());
    // CONNECT headers claiming 65,535 bytes each, then silence.
    let mut held: Vec<TcpStream> = (0..300)
        .map(|_| {
            let mut s = TcpStream::connect(mqtt).unwrap();
            s.write_all(&[0x10, 0xff, 0xff, 0x03]).unwrap();
            s
        })
        .collect();
    // The pivot's memory is watched for as long as it holds them: the
    // largest growth counts, not a reading at one chosen moment.
    let pid = pivot.proc.pid();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut peak = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(rss_kib(pid));
                std::thread::yield_now();
            }
            peak
        })
    };
    // All are closed at the grace time.
    let started = Instant::now();
    for s in &mut held {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut b = [0u8; 1];
        assert!(matches!(s.read(&mut b), Ok(0) | Err(_)), "a silent connection was kept");
    }
    assert!(started.elapsed() < Duration::from_secs(8), "silent connections outlived the grace time");
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let grown = watcher.join().unwrap().saturating_sub(before);
    // Allocating the claims would take 300 × 64 KiB = 19 MiB.
    assert!(grown < 6 * 1024, "pivot grew by {grown} KiB for 300 claimed packets");
}

/// Finding 7: an agent that ignored a wake request (its pinned pivot key
/// was wrong) said why only in its own log; the operator waited 15 s.
#[test]
fn a_device_refusing_a_wake_request_tells_the_operator_why_at_once() {
    let (pivot, op) = TestPivot::with_operator(BURROW, &[]);
    let sshd = Sshd::start(&[&op.key]);
    let dev = KeyPair::generate(sshd.dir.path(), "device");
    pivot.add_device("cam-42", &dev);
    op.trust_device("cam-42", &sshd);
    // The device pins some other key as the pivot's.
    let other = KeyPair::generate(sshd.dir.path(), "not-the-pivot");
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(BURROW);
    cmd.arg("agent")
        .args(pivot.agent_mqtt_args())
        .args(["--id", "cam-42", "--key"])
        .arg(&dev.private)
        .arg("--pivot-host-key")
        .arg(&other.public)
        .args(["--expose", &format!("22={}", sshd.target())]);
    let agent = Proc::spawn("burrow agent cam-42", &mut cmd, dir.path().join("agent.log"));
    assert!(wait_until(Duration::from_secs(15), || pivot.is_present("cam-42")), "{}", agent.log_text());

    let started = Instant::now();
    let out = op.ssh_device("cam-42", "true");
    let took = started.elapsed();
    assert!(!out.status.success());
    let pivot_fp = burrow_core::fingerprint(&burrow_core::keys::read_public_key(&pivot.host_key_pub()).unwrap());
    let want = format!("device 'cam-42' refused the wake request: pivot key {pivot_fp} is not the pinned key");
    assert!(stderr(&out).contains(&want), "{}\n{}", stderr(&out), agent.log_text());
    // Well inside the 15 s wake timeout (the refusal itself takes one round trip).
    assert!(took < Duration::from_secs(5), "the refusal took {took:?}");
    let audited = wait_until(Duration::from_secs(5), || {
        pivot
            .admin_ok(&["audit", "--json", "--event", "wake", "--device", "cam-42"])
            .contains("refused the wake request")
    });
    assert!(audited, "the refusal is not in the audit");
}

/// Presence lives in the pivot's process now: after a restart, a device
/// that has not logged in again is not listed as online.
#[test]
fn after_a_restart_only_devices_that_logged_in_again_are_present() {
    let mut pivot = TestPivot::start(BURROW);
    let dir = tempfile::tempdir().unwrap();
    let dev = KeyPair::generate(dir.path(), "dev");
    pivot.add_device("cam-42", &dev);
    let mut cmd = Command::new(BURROW);
    cmd.arg("agent")
        .args(pivot.agent_mqtt_args())
        .args(["--id", "cam-42", "--key"])
        .arg(&dev.private)
        .arg("--pivot-host-key")
        .arg(pivot.host_key_pub())
        .args(["--expose", "22=127.0.0.1:1"]);
    let mut agent = Proc::spawn("burrow agent cam-42", &mut cmd, dir.path().join("agent.log"));
    assert!(wait_until(Duration::from_secs(15), || pivot.is_present("cam-42")), "{}", agent.log_text());
    agent.kill();
    pivot.proc.kill();
    pivot.restart();
    // The restarted pivot clears presence as it opens its registry, which
    // may come just after its listeners print.
    let offline = wait_until(Duration::from_secs(5), || pivot.device_json("cam-42").unwrap()["presence"] == "offline");
    assert!(offline, "{:?}", pivot.device_json("cam-42"));
}

/// Attacker review: a logged-in device that stops reading blocked the
/// pivot's write to it, and with it keepalive, takeover and revocation; and
/// a PINGREQ flood took most of the main thread.
#[test]
fn a_device_that_floods_or_stops_reading_loses_its_session() {
    let pivot = TestPivot::start_with(BURROW, &["--mqtt-plaintext"]);
    let key = pivot.new_device("cam-42");
    let mqtt = pivot.mqtt_addr.unwrap();
    let log_in = |s: &mut TcpStream| {
        use rumqttc::mqttbytes::v4::{Connect, Login, Packet};
        let mut connect = Connect::new("cam-42");
        connect.login = Some(Login::new("cam-42", pivot.login_token(&key, "cam-42")));
        let mut out = bytes::BytesMut::new();
        Packet::Connect(connect).write(&mut out, 65536).unwrap();
        s.write_all(&out).unwrap();
        let mut ack = [0u8; 4];
        s.read_exact(&mut ack).unwrap();
        assert_eq!(ack, [0x20, 2, 0, 0], "login refused");
    };
    // PINGREQs as fast as it can, never reading a PINGRESP: cut off.
    let mut s = TcpStream::connect(mqtt).unwrap();
    log_in(&mut s);
    let _ = s.write_all(&[0xc0u8, 0x00].repeat(4096));
    assert!(wait_until(Duration::from_secs(5), || pivot
        .proc
        .log_text()
        .contains("more than 20 publishes or 100 packets")));

    // Logged in, reading nothing, then revoked: gone within the watch tick.
    let mut s = TcpStream::connect(mqtt).unwrap();
    log_in(&mut s);
    pivot.admin_ok(&["device", "revoke", "cam-42"]);
    let gone = wait_until(Duration::from_secs(5), || {
        pivot.proc.log_text().contains("mqtt client gone: device 'cam-42' was revoked or removed")
    });
    assert!(gone, "the session outlived the revocation:\n{}", pivot.proc.log_text());
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 1];
    assert!(matches!(s.read(&mut b), Ok(0) | Err(_)), "the socket stayed open");
}

/// Attacker review: one device could write thousands of log lines a second
/// with status messages that answer nothing.
#[test]
fn a_chatty_device_is_cut_off_and_its_unsolicited_status_is_not_logged() {
    let pivot = TestPivot::start(BURROW);
    let key = pivot.new_device("cam-42");
    let topic = burrow_core::signal::Topics::new("burrow").status("cam-42");
    let status = serde_json::json!({"nonce": "ab", "pivot": "p:1", "state": "error", "reason": "SPAM", "at": 5});
    let closed = runtime().block_on(async {
        let mut opts = pivot.mqtt_options("cam-42");
        opts.set_credentials("cam-42", pivot.login_token(&key, "cam-42"));
        let (client, mut ev) = rumqttc::AsyncClient::new(opts, 100);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match tokio::time::timeout_at(deadline, ev.poll()).await {
                Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_)))) => {
                    for _ in 0..40 {
                        client.try_publish(&topic, rumqttc::QoS::AtMostOnce, false, status.to_string()).unwrap();
                    }
                }
                Ok(Ok(_)) => {}
                Ok(Err(_)) => return true,
                Err(_) => return false,
            }
        }
    });
    assert!(closed, "40 publishes in a burst were all taken");
    assert!(wait_until(Duration::from_secs(5), || pivot.proc.log_text().contains("more than 20 publishes")));
    assert!(!pivot.proc.log_text().contains("SPAM"), "an unsolicited status reached the log");
}
