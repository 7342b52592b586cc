//! On-demand tunnels: idle devices wait on MQTT, and the pivot wakes them
//! when an operator asks. Each scenario runs against the embedded broker and
//! against a real Mosquitto.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use burrow_core::signal::{Topics, WakeRequest};
use burrow_core::time::now_unix;
use burrow_core::Id;
use burrow_testkit::*;

const BURROW: &str = env!("CARGO_BIN_EXE_burrow");

#[derive(Clone, Copy, Debug)]
enum Broker {
    Embedded,
    Mosquitto,
}

/// A pivot with signaling, an operator, and a sleeping device `cam-42`.
struct Fleet {
    mosquitto: Option<Mosquitto>,
    pivot: TestPivot,
    op: Operator,
    sshd: Sshd,
    agent: TestAgent,
}

impl Fleet {
    fn start(broker: Broker, extra: &[&str]) -> Fleet {
        let mosquitto = matches!(broker, Broker::Mosquitto).then(Mosquitto::start);
        let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        if let Some(m) = &mosquitto {
            args.extend(["--mqtt-url".into(), m.url(), "--mqtt-username".into(), "pivot".into()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (pivot, op, sshd, key) = pivot_and_device(&args);
        let url = match &mosquitto {
            Some(m) => m.url(),
            None => pivot.mqtt_url(),
        };
        let agent = start_agent(&pivot, &key, &sshd, &url, &[]);
        let fleet = Fleet { mosquitto, pivot, op, sshd, agent };
        assert!(
            fleet.pivot.wait_online_present("cam-42", Duration::from_secs(20)),
            "device never showed presence:\n{}",
            fleet.agent.proc.log_text()
        );
        fleet
    }

    fn agent_log(&self) -> String {
        self.agent.proc.log_text()
    }

    fn server_log(&self) -> String {
        self.pivot.proc.log_text()
    }

    fn broker_url(&self) -> String {
        match &self.mosquitto {
            Some(m) => m.url(),
            None => self.pivot.mqtt_url(),
        }
    }
}

/// A pivot started with `args`, an operator, and `cam-42` registered with its own sshd.
fn pivot_and_device(args: &[&str]) -> (TestPivot, Operator, Sshd, KeyPair) {
    let (pivot, op) = TestPivot::with_operator(BURROW, args);
    let sshd = Sshd::start(&[&op.key]);
    let key = KeyPair::generate(sshd.dir.path(), "device");
    pivot.add_device("cam-42", &key);
    op.trust_device("cam-42", &sshd);
    (pivot, op, sshd, key)
}

/// An on-demand agent for `cam-42` on the broker at `url`, with `extra` flags.
fn start_agent(pivot: &TestPivot, key: &KeyPair, sshd: &Sshd, url: &str, extra: &[&str]) -> TestAgent {
    let mut flags = vec!["--keepalive", "2s"];
    flags.extend_from_slice(extra);
    TestAgent::on_demand(BURROW, pivot, "cam-42", key, &sshd.target(), url, &flags)
}

trait PresenceExt {
    fn wait_online_present(&self, id: &str, timeout: Duration) -> bool;
}

impl PresenceExt for TestPivot {
    fn wait_online_present(&self, id: &str, timeout: Duration) -> bool {
        wait_until(timeout, || self.is_present(id))
    }
}

/// Runs each scenario against both brokers.
macro_rules! both_brokers {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $( #[test] fn $name() { super::$name(super::Broker::Embedded) } )*
        }
        mod mosquitto {
            $( #[test] fn $name() { super::$name(super::Broker::Mosquitto) } )*
        }
    };
}

both_brokers!(
    idle_agent_holds_no_ssh_connection,
    ssh_through_a_sleeping_device,
    tunnel_closes_after_the_idle_grace,
    offline_device_is_refused_with_last_seen,
    crashed_agent_goes_offline_by_last_will,
    two_concurrent_operators_share_one_tunnel,
    broker_restart_resubscribes_and_wakes_again,
    unreachable_pivot_is_reported_to_the_operator,
    impostor_at_the_advertised_address_is_refused,
    silent_device_did_not_answer,
);

fn idle_agent_holds_no_ssh_connection(broker: Broker) {
    let f = Fleet::start(broker, &[]);
    let pid = f.agent.proc.pid();
    let mqtt_port: u16 = f.broker_url().rsplit(':').next().unwrap().parse().unwrap();
    assert!(wait_until(Duration::from_secs(5), || connections_to(pid, mqtt_port) == 1));
    assert_eq!(connections_to(pid, f.pivot.addr.port()), 0, "idle agent is connected to the SSH port");
    assert!(!f.pivot.is_online("cam-42"));
}

fn ssh_through_a_sleeping_device(broker: Broker) {
    let f = Fleet::start(broker, &[]);
    assert!(!f.pivot.is_online("cam-42"));
    let out = f.op.ssh_device("cam-42", "echo woke");
    assert!(out.status.success(), "{}\n{}", stderr(&out), f.agent_log());
    assert_eq!(stdout(&out).trim(), "woke");
    assert!(f.pivot.is_online("cam-42"));
    assert!(f.agent_log().contains("wake request; dialing the pivot"));
    // The wake-up and its outcome are in the audit trail.
    let woke = wait_until(Duration::from_secs(5), || {
        let out = f.pivot.admin_ok(&["audit", "--json", "--event", "wake", "--device", "cam-42"]);
        out.lines().any(|l| l.contains("\"outcome\":\"success\"") && l.contains("\"operator\":\"alice\""))
    });
    assert!(woke, "no wake record");
}

fn tunnel_closes_after_the_idle_grace(broker: Broker) {
    let f = Fleet::start(broker, &["--idle-timeout", "2s"]);
    let out = f.op.ssh_device("cam-42", "true");
    assert!(out.status.success(), "{}", stderr(&out));
    let closed_at = Instant::now();
    assert!(f.pivot.wait_online("cam-42", false, Duration::from_secs(15)), "tunnel stayed open");
    assert!(closed_at.elapsed() >= Duration::from_millis(1500), "closed before the grace ended");
    assert!(f.server_log().contains("tunnel idle for 2s; closing"));
    // Back to waiting: still present, no SSH connection, and it wakes again.
    assert!(f.pivot.is_present("cam-42"));
    assert!(wait_until(Duration::from_secs(5), || connections_to(f.agent.proc.pid(), f.pivot.addr.port()) == 0));
    let again = f.op.ssh_device("cam-42", "echo again");
    assert!(again.status.success(), "{}", stderr(&again));
}

fn offline_device_is_refused_with_last_seen(broker: Broker) {
    let mut f = Fleet::start(broker, &[]);
    f.agent.proc.terminate(Duration::from_secs(10));
    assert!(wait_until(Duration::from_secs(10), || !f.pivot.is_present("cam-42")), "presence stayed online");
    let last_seen = f.pivot.device_json("cam-42").unwrap()["last_seen"].as_str().unwrap().to_string();
    let out = f.op.ssh_device("cam-42", "true");
    assert!(!out.status.success());
    let expected = format!("device 'cam-42' is offline (last seen {last_seen})");
    assert!(stderr(&out).contains(&expected), "wanted {expected:?} in {}", stderr(&out));
}

fn crashed_agent_goes_offline_by_last_will(broker: Broker) {
    let mut f = Fleet::start(broker, &[]);
    // SIGKILL: no goodbye; the broker publishes the last will when the
    // keepalive (2 s here, x1.5) runs out.
    f.agent.proc.kill();
    assert!(wait_until(Duration::from_secs(15), || !f.pivot.is_present("cam-42")), "presence stayed online");
    let out = f.op.ssh_device("cam-42", "true");
    assert!(stderr(&out).contains("device 'cam-42' is offline (last seen "), "{}", stderr(&out));
}

fn two_concurrent_operators_share_one_tunnel(broker: Broker) {
    let f = Fleet::start(broker, &[]);
    let cfg = f.op.config.clone();
    let runs: Vec<_> = (0..2)
        .map(|i| {
            let cfg = cfg.clone();
            thread::spawn(move || {
                Command::new("ssh")
                    .arg("-F")
                    .arg(cfg)
                    .args(["-J", "pivot", "root@cam-42", &format!("sleep 1; echo op{i}")])
                    .output()
                    .unwrap()
            })
        })
        .collect();
    for (i, r) in runs.into_iter().enumerate() {
        let out = r.join().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(stdout(&out).trim(), format!("op{i}"));
    }
    let log = f.server_log();
    assert_eq!(log.matches("waking device").count(), 1, "{log}");
    assert_eq!(log.matches("device 'cam-42' authenticated").count(), 1, "{log}");
    assert_eq!(f.agent_log().matches("wake request; dialing").count(), 1);
}

fn broker_restart_resubscribes_and_wakes_again(broker: Broker) {
    let mut f = Fleet::start(broker, &[]);
    match f.mosquitto.as_mut() {
        Some(m) => m.restart(),
        // The embedded broker lives in the pivot: restart both.
        None => f.pivot.restart(),
    }
    let since = Instant::now();
    let woke = wait_until(Duration::from_secs(40), || {
        let out = f.op.ssh_device("cam-42", "echo after-restart");
        out.status.success() && stdout(&out).trim() == "after-restart"
    });
    assert!(woke, "no wake-up after the broker restart:\n{}\n{}", f.agent_log(), f.server_log());
    eprintln!("woke again {:?} after the restart", since.elapsed());
}

fn unreachable_pivot_is_reported_to_the_operator(broker: Broker) {
    // The pivot advertises an address nobody listens on: the device cannot
    // dial it and reports why over MQTT.
    let dead = free_port();
    let advertise = format!("127.0.0.1:{dead}");
    let f = Fleet::start(broker, &["--advertise", &advertise, "--wake-timeout", "10s"]);
    let out = f.op.ssh_device("cam-42", "true");
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains(&format!("device 'cam-42' could not connect to the pivot: cannot reach the pivot at {advertise}")),
        "{err}"
    );
}

fn impostor_at_the_advertised_address_is_refused(broker: Broker) {
    // The wake request is genuine, but the address in it leads to another
    // SSH server (as a hijacked DNS name would). The device checks the host
    // key against its pin, refuses, and says why.
    let impostor = Sshd::start(&[]);
    let advertise = format!("127.0.0.1:{}", impostor.port);
    let f = Fleet::start(broker, &["--advertise", &advertise, "--wake-timeout", "10s"]);
    let out = f.op.ssh_device("cam-42", "true");
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("device 'cam-42' could not connect to the pivot: host key mismatch"), "{err}");
    assert!(f.agent_log().contains("host key mismatch"), "{}", f.agent_log());
}

fn silent_device_did_not_answer(broker: Broker) {
    let f = Fleet::start(broker, &["--wake-timeout", "2s"]);
    let pid = f.agent.proc.pid().to_string();
    assert!(Command::new("kill").args(["-STOP", &pid]).status().unwrap().success());
    let out = f.op.ssh_device("cam-42", "true");
    let _ = Command::new("kill").args(["-CONT", &pid]).status();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("device 'cam-42' did not answer within 2s"), "{}", stderr(&out));
    let failed = wait_until(Duration::from_secs(5), || {
        let out = f.pivot.admin_ok(&["audit", "--json", "--event", "wake", "--device", "cam-42"]);
        out.lines().any(|l| l.contains("\"outcome\":\"failure\"") && l.contains("did not answer"))
    });
    assert!(failed, "no failed wake record");
}

/// A raw MQTT client on Mosquitto, standing in for an attacker with broker access.
fn inject(url: &str, client_id: &str, topic: &str, payload: Vec<u8>) {
    mqtt_publish(url, client_id, &[(topic.to_string(), false, payload)]);
}

fn pivot_key(pivot: &TestPivot) -> russh::keys::PrivateKey {
    russh::keys::load_secret_key(pivot.data.path().join("host_key"), None).unwrap()
}

#[test]
fn forged_expired_and_replayed_requests_are_ignored() {
    let f = Fleet::start(Broker::Mosquitto, &[]);
    let topics = Topics::new("burrow");
    let id = Id::parse("cam-42").unwrap();
    let url = f.broker_url();
    let pid = f.agent.proc.pid();

    // Signed by a key that is not the pinned pivot key.
    let rogue = russh::keys::PrivateKey::random(&mut rand::rng(), russh::keys::Algorithm::Ed25519).unwrap();
    let forged = WakeRequest::new(&id, &f.pivot.addr.to_string(), now_unix(), 30).sign(&rogue).unwrap();
    inject(&url, "attacker-1", &topics.request("cam-42"), forged);
    assert!(wait_until(Duration::from_secs(10), || f.agent_log().contains("is not the pinned key")));

    // Signed by the real pivot key, but expired.
    let key = pivot_key(&f.pivot);
    let mut old = WakeRequest::new(&id, &f.pivot.addr.to_string(), now_unix() - 100, 30);
    old.expires_at = now_unix() - 60;
    inject(&url, "attacker-2", &topics.request("cam-42"), old.sign(&key).unwrap());
    assert!(wait_until(Duration::from_secs(10), || f.agent_log().contains("request expired")));

    // Tampered: a valid signature over a different pivot address.
    let good = WakeRequest::new(&id, &f.pivot.addr.to_string(), now_unix(), 30).sign(&key).unwrap();
    let tampered = String::from_utf8(good.clone()).unwrap().replace(&f.pivot.addr.to_string(), "127.0.0.1:1");
    inject(&url, "attacker-3", &topics.request("cam-42"), tampered.into_bytes());
    assert!(wait_until(Duration::from_secs(10), || f.agent_log().contains("signature does not verify")));
    assert_eq!(connections_to(pid, f.pivot.addr.port()), 0);
    assert!(!f.agent_log().contains("dialing the pivot"), "a bad request made the device dial");

    // A genuine request works once; replaying it does nothing.
    inject(&url, "pivot-replayer", &topics.request("cam-42"), good.clone());
    assert!(f.pivot.wait_online("cam-42", true, Duration::from_secs(10)));
    inject(&url, "attacker-4", &topics.request("cam-42"), good);
    assert!(wait_until(Duration::from_secs(10), || f.agent_log().contains("nonce was already used")));
    assert_eq!(f.agent_log().matches("dialing the pivot").count(), 1);
}

#[test]
fn signaling_unavailable_when_the_broker_is_down() {
    let mut f = Fleet::start(Broker::Mosquitto, &[]);
    f.mosquitto.as_mut().unwrap().stop();
    assert!(wait_until(Duration::from_secs(20), || {
        let out = f.op.ssh_device("cam-42", "true");
        stderr(&out).contains("signaling unavailable: ")
    }));
}

#[test]
fn embedded_broker_enforces_device_acl() {
    let f = Fleet::start(Broker::Embedded, &[]);
    let other = KeyPair::generate(f.sshd.dir.path(), "cam-43");
    f.pivot.add_device("cam-43", &other);
    let key43 = russh::keys::load_secret_key(&other.private, None).unwrap();
    let topics = Topics::new("burrow");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();

    // Connects as cam-43 with its own key, then tries `act`; true if the broker kept the connection.
    let survives = |act: &dyn Fn(&rumqttc::AsyncClient), user: &str, token: String| -> bool {
        rt.block_on(async {
            let mut opts = f.pivot.mqtt_options(user);
            opts.set_credentials(user, token);
            let (client, mut ev) = rumqttc::AsyncClient::new(opts, 10);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
            let mut acted = false;
            loop {
                match tokio::time::timeout_at(deadline, ev.poll()).await {
                    Err(_) => return true,
                    Ok(Err(_)) => return false,
                    Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_)))) if !acted => {
                        acted = true;
                        act(&client);
                    }
                    Ok(Ok(_)) => {}
                }
            }
        })
    };
    let token = || f.pivot.login_token(&key43, "cam-43");
    let own = |c: &rumqttc::AsyncClient| {
        c.try_subscribe(topics.request("cam-43"), rumqttc::QoS::AtLeastOnce).unwrap();
        c.try_publish(topics.presence("cam-43"), rumqttc::QoS::AtLeastOnce, false, "{}").unwrap();
    };
    assert!(survives(&own, "cam-43", token()), "own topics were refused");
    let snoop =
        |c: &rumqttc::AsyncClient| c.try_subscribe(topics.request("cam-42"), rumqttc::QoS::AtLeastOnce).unwrap();
    assert!(!survives(&snoop, "cam-43", token()), "subscribed to another device's requests");
    let wildcard = |c: &rumqttc::AsyncClient| c.try_subscribe("burrow/#", rumqttc::QoS::AtLeastOnce).unwrap();
    assert!(!survives(&wildcard, "cam-43", token()), "subscribed to a wildcard");
    let forge = |c: &rumqttc::AsyncClient| {
        c.try_publish(topics.request("cam-42"), rumqttc::QoS::AtLeastOnce, false, "x").unwrap()
    };
    assert!(!survives(&forge, "cam-43", token()), "published a request");
    let spoof = |c: &rumqttc::AsyncClient| {
        c.try_publish(topics.presence("cam-42"), rumqttc::QoS::AtLeastOnce, true, "{}").unwrap()
    };
    assert!(!survives(&spoof, "cam-43", token()), "published another device's presence");
    // Wrong key for the claimed id, and no credentials at all.
    let nothing = |_: &rumqttc::AsyncClient| {};
    let stolen_name = f.pivot.login_token(&key43, "cam-42");
    assert!(!survives(&nothing, "cam-42", stolen_name), "logged in as cam-42 with cam-43's key");
    assert!(!survives(&nothing, "cam-43", "garbage".into()), "logged in with a bad token");
    // The real device was never disturbed.
    assert!(f.pivot.is_present("cam-42"));
}

#[test]
fn mosquitto_over_tls_with_client_certificates() {
    let m = Mosquitto::start_tls();
    let (ca, pivot_cert, pivot_key) = m.issue("pivot");
    let (_, dev_cert, dev_key) = m.issue("cam-42");
    let (pivot, op, sshd, key) = pivot_and_device(&[
        "--mqtt-url",
        &m.tls_url(),
        "--mqtt-ca",
        ca.to_str().unwrap(),
        "--mqtt-cert",
        pivot_cert.to_str().unwrap(),
        "--mqtt-key",
        pivot_key.to_str().unwrap(),
    ]);
    let agent = start_agent(
        &pivot,
        &key,
        &sshd,
        &m.tls_url(),
        &[
            "--mqtt-ca",
            ca.to_str().unwrap(),
            "--mqtt-cert",
            dev_cert.to_str().unwrap(),
            "--mqtt-key",
            dev_key.to_str().unwrap(),
        ],
    );
    assert!(
        wait_until(Duration::from_secs(20), || pivot.is_present("cam-42")),
        "no presence over TLS:\n{}\n{}\n{}",
        agent.proc.log_text(),
        pivot.proc.log_text(),
        m.proc.log_text()
    );
    let out = op.ssh_device("cam-42", "echo over-tls");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "over-tls");
}

#[test]
fn revocation_closes_the_devices_mqtt_session() {
    let f = Fleet::start(Broker::Embedded, &[]);
    let pid = f.agent.proc.pid();
    let port = f.pivot.mqtt_addr.unwrap().port();
    assert!(wait_until(Duration::from_secs(5), || connections_to(pid, port) == 1));
    f.pivot.admin_ok(&["device", "revoke", "cam-42"]);
    // Within the watch interval (1 s) plus a margin; the agent's retries are refused.
    assert!(wait_until(Duration::from_secs(3), || f.pivot.proc.log_text().contains("closing its MQTT session")));
    assert!(
        wait_until(Duration::from_secs(3), || connections_to(pid, port) == 0),
        "the revoked device kept its MQTT session"
    );
}

/// Issue 10: a wake request the device missed was never sent again while
/// operators kept waiting. A stand-in device on Mosquitto claims presence
/// and ignores every request; the pivot must publish fresh ones, bounded.
#[test]
fn an_unanswered_wake_request_is_published_again_with_a_fresh_nonce() {
    let m = Mosquitto::start();
    let url = m.url();
    let args = ["--mqtt-url", url.as_str(), "--mqtt-username", "pivot", "--wake-timeout", "8s"];
    let (pivot, op, _sshd, _key) = pivot_and_device(&args);
    let port: u16 = url.rsplit(':').next().unwrap().parse().unwrap();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let listener = thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let topics = Topics::new("burrow");
            let mut opts = rumqttc::MqttOptions::new("cam-42-standin", "127.0.0.1", port);
            opts.set_credentials("pivot", "");
            let (client, mut ev) = rumqttc::AsyncClient::new(opts, 10);
            client.subscribe(topics.request("cam-42"), rumqttc::QoS::AtLeastOnce).await.unwrap();
            let online = serde_json::json!({"state": "online", "mode": "on-demand", "at": now_unix()});
            client
                .publish(topics.presence("cam-42"), rumqttc::QoS::AtLeastOnce, true, online.to_string())
                .await
                .unwrap();
            let mut payloads = std::collections::BTreeSet::new();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(14);
            let mut told = false;
            loop {
                match tokio::time::timeout_at(deadline, ev.poll()).await {
                    Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)))) => {
                        payloads.insert(p.payload.to_vec());
                    }
                    Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_)))) if !told => {
                        told = true;
                        let _ = ready_tx.send(());
                    }
                    Ok(_) => {}
                    Err(_) => return payloads.len(),
                }
            }
        })
    });
    ready_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert!(wait_until(Duration::from_secs(5), || pivot.is_present("cam-42")));
    let out = op.ssh_device("cam-42", "true");
    assert!(stderr(&out).contains("did not answer within 8s"), "{}", stderr(&out));
    let distinct = listener.join().unwrap();
    assert!((2..=4).contains(&distinct), "{distinct} distinct wake requests in 8 s");
}

/// Issue 10: the replay guard lived in memory only, so a captured request
/// worked again after the agent restarted, within its lifetime.
#[test]
fn a_captured_wake_request_is_refused_after_the_agent_restarts() {
    let mosquitto = Mosquitto::start();
    let url = mosquitto.url();
    let args = ["--mqtt-url", url.as_str(), "--mqtt-username", "pivot", "--idle-timeout", "1s"];
    let (pivot, _op, sshd, key) = pivot_and_device(&args);
    let agent = start_agent(&pivot, &key, &sshd, &url, &[]);
    assert!(pivot.wait_online_present("cam-42", Duration::from_secs(10)));
    let id = Id::parse("cam-42").unwrap();
    let topics = Topics::new("burrow");
    let good = WakeRequest::new(&id, &pivot.addr.to_string(), now_unix(), 60).sign(&pivot_key(&pivot)).unwrap();
    inject(&url, "pivot-replayer", &topics.request("cam-42"), good.clone());
    assert!(pivot.wait_online("cam-42", true, Duration::from_secs(10)), "{}", agent.proc.log_text());
    assert!(pivot.wait_online("cam-42", false, Duration::from_secs(10)), "idle tunnel did not close");
    let saved = key.private.with_extension("replay");
    assert!(saved.exists(), "the replay guard was not saved next to the key");
    assert_eq!(std::fs::metadata(&saved).unwrap().permissions().mode() & 0o777, 0o600);

    // A new agent process, same key: the same request is refused.
    drop(agent);
    let agent = start_agent(&pivot, &key, &sshd, &url, &[]);
    assert!(wait_until(Duration::from_secs(10), || agent.proc.log_text().contains("connected to the MQTT broker")));
    // Sent until the new agent, once subscribed, has seen and judged it.
    let judged = wait_until(Duration::from_secs(10), || {
        inject(&url, "attacker", &topics.request("cam-42"), good.clone());
        wait_until(Duration::from_secs(1), || agent.proc.log_text().contains("refused a wake request"))
    });
    assert!(judged, "{}", agent.proc.log_text());
    assert!(
        wait_until(Duration::from_secs(10), || agent.proc.log_text().contains("nonce was already used")),
        "{}",
        agent.proc.log_text()
    );
    assert!(!agent.proc.log_text().contains("dialing the pivot"), "the replayed request made the device dial");
}
