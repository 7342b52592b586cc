//! Several pivots sharing one PostgreSQL registry and one Mosquitto broker,
//! as in production behind a DNS name or a TCP load balancer: operators
//! land on either pivot, devices connect to one, and a pivot can die.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use burrow_testkit::*;

const BURROW: &str = env!("CARGO_BIN_EXE_burrow");

/// An operator's ssh_config for pivot `b` beside the `pivot` (a) entry the
/// testkit writes: the same host key, pinned for b's port too.
fn add_pivot_entry(op: &Operator, name: &str, pivot: &TestPivot, bind: Option<&str>) {
    let mut config = std::fs::read_to_string(&op.config).unwrap();
    let bind = bind.map(|b| format!("  BindAddress {b}\n")).unwrap_or_default();
    config = format!("Host {name}\n  HostName 127.0.0.1\n  Port {}\n{bind}\n{config}", pivot.addr.port());
    std::fs::write(&op.config, config).unwrap();
    let mut kh = std::fs::read_to_string(&op.known_hosts).unwrap();
    kh.push_str(&format!("[127.0.0.1]:{} {}\n", pivot.addr.port(), pivot.host_key_line()));
    std::fs::write(&op.known_hosts, kh).unwrap();
}

fn ssh_via(op: &Operator, jump: &str, id: &str, remote: &str) -> Output {
    op.ssh(&["-J", jump, &format!("root@{id}"), remote]).stdin(Stdio::null()).output().expect("ssh runs")
}

/// `burrow ARGS` over SSH on `pivot`, as the admin operator `key`.
fn remote_admin(pivot: &TestPivot, key: &KeyPair, home: &std::path::Path, args: &[&str]) -> Output {
    Command::new(BURROW)
        .args(args)
        .args(["--pivot", &pivot.addr.to_string(), "--identity", key.private.to_str().unwrap()])
        .args(["--pivot-host-key", pivot.host_key_pub().to_str().unwrap()])
        .env("HOME", home)
        .env_remove("BURROW_DATABASE_URL")
        .output()
        .unwrap()
}

fn metric(pivot: &TestPivot, name: &str) -> u64 {
    let out = Command::new("curl").args(["-sf", &format!("http://127.0.0.1:{}/metrics", pivot.http_port())]).output();
    let text = String::from_utf8_lossy(&out.unwrap().stdout).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("{name} not in /metrics:\n{text}"))
}

fn sha256(path: &std::path::Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap().to_string()
}

#[test]
fn two_pivots_share_postgres_and_mosquitto() {
    require_tool("curl");
    let pg = Postgres::start();
    let url = pg.create_database();
    let mosquitto = Mosquitto::start();
    let murl = mosquitto.url();
    let common = |name: &'static str| -> Vec<String> {
        [
            "--database-url",
            &url,
            "--pivot-name",
            name,
            "--mqtt-url",
            &murl,
            "--mqtt-username",
            "pivot",
            "--idle-timeout",
            "2s",
            "--http-listen",
            "127.0.0.1:0",
            // Operators of the ban test connect from 127.0.0.2.
            "--ban-ignoreip",
            "127.0.0.1/32",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let args_a = common("a");
    let a = TestPivot::start_with(BURROW, &args_a.iter().map(String::as_str).collect::<Vec<_>>());
    let args_b = common("b");
    let b = TestPivot::start_sharing_host_key(BURROW, &args_b.iter().map(String::as_str).collect::<Vec<_>>(), &a);
    assert_eq!(a.host_key_line(), b.host_key_line());

    // /healthz names the pivot, its peers and the backend.
    let health = |p: &TestPivot| {
        let out = Command::new("curl").args(["-s", &format!("http://127.0.0.1:{}/healthz", p.http_port())]).output();
        String::from_utf8_lossy(&out.unwrap().stdout).into_owned()
    };
    // "listening" is printed before a pivot registers: wait until both are.
    let both = wait_until(Duration::from_secs(20), || {
        let h = health(&b);
        h.contains(&format!("a 127.0.0.1:{} (alive)", a.addr.port())) && h.contains("pivot: b")
    });
    assert!(both, "the pivots did not register: {}", health(&b));
    // A third pivot under a's name, one left at the default name, or one
    // with its own embedded broker is refused, before it touches anything.
    let spare = tempfile::tempdir().unwrap();
    for (extra, why) in [
        (vec!["--pivot-name", "a", "--mqtt-url", &murl], "a pivot named 'a' at 127.0.0.1:"),
        (vec!["--mqtt-url", &murl], "give this one its own --pivot-name"),
        (vec!["--pivot-name", "c"], "give them one broker with --mqtt-url"),
    ] {
        let mut cmd = Command::new(BURROW);
        cmd.args(["server", "--listen", "127.0.0.1:0", "--mqtt-listen", "127.0.0.1:0", "--database-url", &url])
            .arg("--data-dir")
            .arg(spare.path())
            .args(&extra);
        // Bounded: a pivot that wrongly starts must not hang the test.
        let mut p = Proc::spawn("refused pivot", &mut cmd, spare.path().join("refused.log"));
        assert!(wait_until(Duration::from_secs(20), || !p.is_running()), "{extra:?} was not refused: {}", p.log_text());
        assert!(p.log_text().contains(why), "{extra:?}: {}", p.log_text());
    }
    assert!(!a.proc.log_text().contains("cleared the tunnel records"));

    // Alice lands on a, Bob on b; Carol is an admin. One registry: each is
    // added once.
    let alice = Operator::new(&a);
    let bob = Operator::new(&a);
    add_pivot_entry(&bob, "pivot-b", &b, None);
    add_pivot_entry(&alice, "pivot-b", &b, None);
    a.add_operator("alice", &alice.key);
    b.add_operator("bob", &bob.key);
    let carol = KeyPair::generate(alice.dir.path(), "carol");
    a.admin_ok(&["operator", "add", "carol", "--admin", "--key", carol.public.to_str().unwrap()]);

    // One user CA for both: the pivot that started first made it, and a
    // certificate from the other is signed by that same key.
    let cas = a.admin_ok(&["ca", "show"]);
    assert_eq!(cas.lines().count(), 1, "{cas}");
    let makers: Vec<&TestPivot> = [&a, &b].into_iter().filter(|p| p.data.path().join("user_ca").exists()).collect();
    assert_eq!(makers.len(), 1, "each pivot made a CA of its own");
    let ca_line = std::fs::read_to_string(makers[0].data.path().join("user_ca.pub")).unwrap();
    let dana = Laptop::new(BURROW);
    a.admin_ok(&["operator", "add", "dana", "--key", dana.key.public.to_str().unwrap()]);
    let out = dana.login(&b);
    assert!(out.status.success(), "{}", stderr(&out));
    let cert_text = std::fs::read_to_string(dana.home.path().join(".ssh/burrow/id-cert.pub")).unwrap();
    let cert = russh::keys::ssh_key::Certificate::from_openssh(cert_text.trim()).unwrap();
    let signer = russh::keys::ssh_key::PublicKey::from(cert.signature_key().clone());
    assert_eq!(burrow_core::keys::openssh_line(&signer), ca_line.trim());
    assert_eq!(metric(&b, "burrow_certificates_issued_total"), 1);

    let h = health(&b);
    assert!(
        h.contains("pivot: b") && h.contains("(postgres)") && h.contains(&format!("a 127.0.0.1:{}", a.addr.port())),
        "{h}"
    );

    // An always-on device on a, given both pivots, reachable from b.
    let sshd = Sshd::start(&[&alice.key, &bob.key]);
    let key = KeyPair::generate(sshd.dir.path(), "cam-a");
    a.add_device("cam-a", &key);
    alice.trust_device("cam-a", &sshd);
    bob.trust_device("cam-a", &sshd);
    let mut cmd = Command::new(BURROW);
    cmd.args(["agent", "--id", "cam-a", "--expose", &format!("22={}", sshd.target())])
        .args(["--pivot", &a.addr.to_string(), "--pivot", &b.addr.to_string(), "--key"])
        .arg(&key.private)
        .arg("--pivot-host-key")
        .arg(a.host_key_pub());
    let agent = Proc::spawn("burrow agent cam-a", &mut cmd, sshd.dir.path().join("agent.log"));
    let on = |p: &TestPivot, id: &str, pivot: &str| p.device_json(id).is_some_and(|d| d["pivot"] == pivot);
    assert!(wait_until(Duration::from_secs(20), || on(&a, "cam-a", "a")), "{}", agent.log_text());
    let out = ssh_via(&bob, "pivot-b", "cam-a", "echo via-b");
    assert_eq!(stdout(&out).trim(), "via-b", "{}\n{}", stderr(&out), b.proc.log_text());
    assert!(metric(&b, "burrow_channels_via_peer_total") >= 1);
    assert_eq!(metric(&b, "burrow_peer_connections"), 1);
    assert_eq!(metric(&a, "burrow_peer_sessions"), 1);
    // 64 MiB each way through the relay, checked end to end.
    let big = bob.dir.path().join("big");
    let mut f = std::fs::File::create(&big).unwrap();
    std::io::copy(&mut std::io::Read::take(std::fs::File::open("/dev/urandom").unwrap(), 64 << 20), &mut f).unwrap();
    let remote = sshd.dir.path().join("big.copy");
    let out = Command::new("scp")
        .arg("-F")
        .arg(&bob.config)
        .args(["-q", "-J", "pivot-b"])
        .arg(&big)
        .arg(format!("root@cam-a:{}", remote.display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "scp to cam-a via b: {}", stderr(&out));
    assert_eq!(sha256(&big), sha256(&remote));
    let back = bob.dir.path().join("big.back");
    let out = Command::new("scp")
        .arg("-F")
        .arg(&bob.config)
        .args(["-q", "-J", "pivot-b"])
        .arg(format!("root@cam-a:{}", remote.display()))
        .arg(&back)
        .output()
        .unwrap();
    assert!(out.status.success(), "scp from cam-a via b: {}", stderr(&out));
    assert_eq!(sha256(&big), sha256(&back));
    // The audit is shared: b's channel names the pivot it went through.
    let mut audit = String::new();
    let relayed = wait_until(Duration::from_secs(10), || {
        audit = a.admin_ok(&["audit", "--device", "cam-a", "--event", "channel_open", "--json"]);
        audit.contains("\"via\":\"a\"") && audit.contains("\"pivot\":\"b\"")
    });
    assert!(relayed, "{audit}");

    // A stock `ssh -R` device (no agent, no MQTT, one connection) on a is
    // reached from b the same way.
    let sshd_s = Sshd::start(&[&bob.key]);
    let key_s = KeyPair::generate(sshd_s.dir.path(), "cam-s");
    a.add_device("cam-s", &key_s);
    bob.trust_device("cam-s", &sshd_s);
    let _stock = alice.stock_device(&a, "cam-s", &key_s, &sshd_s, "stock-ssh.log");
    assert!(wait_until(Duration::from_secs(20), || on(&a, "cam-s", "a")), "the stock device did not connect");
    let out = ssh_via(&bob, "pivot-b", "cam-s", "echo stock-via-b");
    assert_eq!(stdout(&out).trim(), "stock-via-b", "{}", stderr(&out));

    // An on-demand device is woken to dial the pivot the operator is on.
    let sshd_d = Sshd::start(&[&alice.key, &bob.key]);
    let key_d = KeyPair::generate(sshd_d.dir.path(), "cam-d");
    a.add_device("cam-d", &key_d);
    alice.trust_device("cam-d", &sshd_d);
    bob.trust_device("cam-d", &sshd_d);
    let sleepy =
        TestAgent::on_demand(BURROW, &a, "cam-d", &key_d, &sshd_d.target(), &murl, &["--mqtt-username", "cam-d"]);
    assert!(wait_until(Duration::from_secs(20), || a.is_present("cam-d")), "{}", sleepy.proc.log_text());
    for (op, jump, pivot, p) in [(&alice, "pivot", "a", &a), (&bob, "pivot-b", "b", &b)] {
        assert!(wait_until(Duration::from_secs(15), || !a.is_online("cam-d")), "the idle tunnel did not close");
        let out = ssh_via(op, jump, "cam-d", &format!("echo woken-for-{pivot}"));
        assert_eq!(stdout(&out).trim(), format!("woken-for-{pivot}"), "{}\n{}", stderr(&out), sleepy.proc.log_text());
        let mut woken = String::new();
        let by = wait_until(Duration::from_secs(10), || {
            woken = p.admin_ok(&["audit", "--device", "cam-d", "--event", "wake", "--json"]);
            woken.contains(&format!("\"pivot\":\"{pivot}\""))
        });
        assert!(by, "{woken}");
    }

    // A ban added on b drops the banned source on a: the open session and
    // any new one.
    let dave = Operator::new(&a);
    add_pivot_entry(&dave, "pivot-a-from-2", &a, Some("127.0.0.2"));
    a.add_operator("dave", &dave.key);
    let mut held = dave.ssh(&["-N", "pivot-a-from-2"]);
    held.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    let mut held = held.spawn().unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || a.proc.log_text().contains("operator 'dave' authenticated")),
        "dave did not log in"
    );
    let mut held_out = String::new();
    if let Some(status) = held.try_wait().unwrap() {
        std::io::Read::read_to_string(held.stderr.as_mut().unwrap(), &mut held_out).unwrap();
        panic!("dave's session ended before the ban ({status}): {held_out}");
    }
    let out = remote_admin(&b, &carol, alice.dir.path(), &["ban", "add", "127.0.0.2", "--for", "1h"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let banned_at = Instant::now();
    assert!(
        wait_until(Duration::from_secs(5), || held.try_wait().unwrap().is_some()),
        "a did not drop the session banned on b"
    );
    println!("ban on b dropped the session on a after {:?}", banned_at.elapsed());
    let out = dave.ssh(&["pivot-a-from-2", "true"]).stdin(Stdio::null()).output().unwrap();
    assert!(!out.status.success(), "a banned source got in again");

    // An operator removed on a is disconnected from b within 1 s.
    let logins = |p: &TestPivot| p.proc.log_text().matches("operator 'bob' authenticated").count();
    let before = logins(&b);
    let mut session = bob.ssh(&["-J", "pivot-b", "root@cam-a", "sleep 60"]);
    session.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    let mut session = session.spawn().unwrap();
    assert!(wait_until(Duration::from_secs(10), || logins(&b) > before), "bob's session did not start");
    let out = remote_admin(&a, &carol, alice.dir.path(), &["operator", "remove", "bob"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let removed_at = Instant::now();
    assert!(
        wait_until(Duration::from_secs(5), || session.try_wait().unwrap().is_some()),
        "bob is still connected to b"
    );
    let took = removed_at.elapsed();
    println!("removal on a ended bob's session on b after {took:?}");
    assert!(took < Duration::from_secs(1), "took {took:?}");

    // Pivot a dies: the always-on device is back through b within 10 s,
    // and the next ssh works.
    let mut a = a;
    a.proc.kill();
    let died = Instant::now();
    assert!(wait_until(Duration::from_secs(10), || on(&b, "cam-a", "b")), "no failover: {}", agent.log_text());
    println!("cam-a back through b after {:?}", died.elapsed());
    let out = ssh_via(&alice, "pivot-b", "cam-a", "echo after-failover");
    assert_eq!(stdout(&out).trim(), "after-failover", "{}", stderr(&out));
    // b clears a's tunnel records once a stopped beating: the stock
    // device's record (a never closed it) goes, and a with it.
    assert!(
        wait_until(Duration::from_secs(20), || b.device_json("cam-s").is_some_and(|d| d["pivot"].is_null())),
        "a's tunnel record of cam-s was left: {:?}",
        b.device_json("cam-s")
    );
    let out = ssh_via(&alice, "pivot-b", "cam-s", "true");
    assert!(stderr(&out).contains("device 'cam-s' is offline"), "{}", stderr(&out));
    assert!(
        wait_until(Duration::from_secs(20), || health(&b).contains("peers: none")),
        "b still lists a: {}",
        health(&b)
    );
    drop(held);
    let _ = session.kill();
}

/// A network namespace of this test's own, whose `/etc/hosts` (bind-mounted
/// by `ip netns exec` from `/etc/netns/NAME/hosts`) gives one name two
/// addresses. Removed on drop.
struct Namespace {
    name: String,
}

impl Namespace {
    fn new(hosts: &str) -> Namespace {
        require_tool("ip");
        let name = format!("burrow-dns-{}", std::process::id());
        let ok = |args: &[&str]| {
            let st = Command::new("ip").args(args).status().unwrap();
            assert!(st.success(), "ip {args:?} failed");
        };
        ok(&["netns", "add", &name]);
        let ns = Namespace { name };
        ok(&["-n", &ns.name, "link", "set", "lo", "up"]);
        std::fs::create_dir_all(format!("/etc/netns/{}", ns.name)).unwrap();
        std::fs::write(format!("/etc/netns/{}/hosts", ns.name), hosts).unwrap();
        ns
    }

    fn exec(&self, bin: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, bin]);
        cmd
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
        let _ = std::fs::remove_dir_all(format!("/etc/netns/{}", self.name));
    }
}

/// The registry in `dir` (a pivot's own) records device `id`'s tunnel.
fn tunnel_in(dir: &std::path::Path, id: &str) -> bool {
    let out = Command::new(BURROW).args(["device", "list", "--json", "--data-dir"]).arg(dir).output().unwrap();
    let list: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
    list.iter().any(|x| x["id"] == id && x["tunnel"] == true)
}

/// An always-on agent given one name with two addresses (two pivots behind
/// one DNS name) moves to the other address when its pivot dies.
#[test]
fn an_agent_given_a_name_with_several_addresses_fails_over_between_them() {
    let ns = Namespace::new("127.0.0.1 localhost\n127.0.0.1 pivots.test\n127.0.0.2 pivots.test\n");
    let resolved = ns.exec("getent").args(["hosts", "pivots.test"]).output().unwrap();
    let text = stdout(&resolved);
    assert!(text.contains("127.0.0.1") && text.contains("127.0.0.2"), "pivots.test: {text}");
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let start = |dir: &std::path::Path, ip: &str, n: usize| {
        let mut cmd = ns.exec(BURROW);
        cmd.args(["server", "--no-mqtt", "--listen", &format!("{ip}:2222"), "--data-dir"]).arg(dir);
        let p = Proc::spawn(&format!("pivot {ip}"), &mut cmd, dir.join(format!("server-{n}.log")));
        assert!(
            wait_until(Duration::from_secs(20), || p.log_text().contains("burrow pivot listening on")),
            "{}",
            p.log_text()
        );
        p
    };
    let a = start(da.path(), "127.0.0.1", 0);
    for f in ["host_key", "host_key.pub"] {
        std::fs::copy(da.path().join(f), db.path().join(f)).unwrap();
    }
    let b = start(db.path(), "127.0.0.2", 0);
    let key = KeyPair::generate(da.path(), "cam-n");
    for d in [da.path(), db.path()] {
        let out = Command::new(BURROW)
            .args(["device", "add", "cam-n", "--key", key.public.to_str().unwrap(), "--data-dir"])
            .arg(d)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let mut agent = ns.exec(BURROW);
    agent
        .args(["agent", "--id", "cam-n", "--pivot", "pivots.test:2222", "--expose", "22=127.0.0.1:9", "--key"])
        .arg(&key.private)
        .arg("--pivot-host-key")
        .arg(da.path().join("host_key.pub"))
        .args(["--status-file", da.path().join("agent.status.json").to_str().unwrap()]);
    let agent = Proc::spawn("agent", &mut agent, da.path().join("agent.log"));
    let dirs = [da.path(), db.path()];
    let mut first = None;
    assert!(wait_until(Duration::from_secs(20), || {
        first = dirs.iter().position(|d| tunnel_in(d, "cam-n"));
        first.is_some()
    }));
    let first = first.unwrap();
    let mut pivots = [a, b];
    pivots[first].kill();
    let died = Instant::now();
    let other = 1 - first;
    assert!(
        wait_until(Duration::from_secs(10), || tunnel_in(dirs[other], "cam-n")),
        "no failover to the name's other address: {}",
        agent.log_text()
    );
    println!("moved to the name's other address after {:?}", died.elapsed());
}
