//! Issue 12: OpenSSH mode. `burrow openssh render` turns the registry into
//! files for stock sshd as the pivot; each is checked by the real program:
//! `sshd -t`, a real sshd carrying a real `ssh -R` device tunnel that an
//! operator reaches with the rendered ssh_config, and fail2ban.

use std::net::TcpStream;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use burrow_testkit::*;

const BURROW: &str = env!("CARGO_BIN_EXE_burrow");
// Existing system users stand in for the rendered defaults (burrow-dev,
// burrow-op), so the test creates no account on the machine.
const DEVICE_USER: &str = "nobody";
const OPERATOR_USER: &str = "daemon";

fn burrow(args: &[&str]) -> String {
    let out = Command::new(BURROW).args(args).output().unwrap();
    assert!(out.status.success(), "burrow {args:?}: {}", stderr(&out));
    stdout(&out)
}

fn ssh(args: &[&str]) -> Output {
    Command::new("ssh").args(["-o", "BatchMode=yes"]).args(args).stdin(Stdio::null()).output().unwrap()
}

#[test]
fn stock_sshd_runs_the_rendered_files() {
    for tool in [SSHD, "ssh", "ssh-keygen", "fail2ban-regex", "fail2ban-client"] {
        require_tool(tool);
    }
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let data = w.join("data");
    let data_s = data.to_str().unwrap();
    burrow(&["openssh", "init", "--data-dir", data_s]);

    let alice = KeyPair::generate(w, "alice");
    let (k1, k2) = (KeyPair::generate(w, "cam-1"), KeyPair::generate(w, "cam-2"));
    let device_sshd = Sshd::start(&[&alice]);
    let other_host = KeyPair::generate(w, "cam-2-host");
    let host1 = device_sshd.host_key.public.to_str().unwrap();
    let host2 = other_host.public.to_str().unwrap();
    for (id, key, host, site) in [("cam-1", &k1, host1, "site=a"), ("cam-2", &k2, host2, "site=b")] {
        let key = key.public.to_str().unwrap();
        burrow(&["device", "add", id, "--key", key, "--host-key", host, "--label", site, "--data-dir", data_s]);
    }
    burrow(&[
        "operator",
        "add",
        "alice",
        "--key",
        alice.public.to_str().unwrap(),
        "--allow",
        "site=a",
        "--data-dir",
        data_s,
    ]);

    // Render, and start stock sshd from it.
    let pivot_port = free_port();
    let pivot_key = KeyPair::generate(w, "pivot_host_key");
    let out = w.join("out");
    let sshd_log = w.join("sshd.log");
    let pivot_addr = format!("127.0.0.1:{pivot_port}");
    let render_args = [
        "openssh",
        "render",
        "--out",
        out.to_str().unwrap(),
        "--data-dir",
        data_s,
        "--pivot",
        &pivot_addr,
        "--device-user",
        DEVICE_USER,
        "--operator-user",
        OPERATOR_USER,
        "--sshd-log",
        sshd_log.to_str().unwrap(),
        "--operator-dir",
        out.to_str().unwrap(),
        "--pivot-host-key",
        pivot_key.public.to_str().unwrap(),
    ];
    let rendered = burrow(&render_args);
    let port_of = |id: &str| -> u16 {
        let line = rendered.lines().find(|l| l.trim_start().starts_with(&format!("{id}:"))).expect("a lease line");
        line.split("-R 127.0.0.1:").nth(1).unwrap().split(':').next().unwrap().parse().unwrap()
    };
    let (p1, p2) = (port_of("cam-1"), port_of("cam-2"));
    assert_ne!(p1, p2);
    // Leases hold across renders.
    let again = burrow(&render_args);
    assert_eq!(again, rendered);

    let main_config = w.join("sshd_config");
    std::fs::write(
        &main_config,
        format!(
            "Port {pivot_port}\nListenAddress 127.0.0.1\nHostKey {}\nStrictModes no\nUsePAM no\nPidFile none\n\
             LogLevel VERBOSE\nInclude {}/sshd_burrow.conf\n",
            pivot_key.private.display(),
            out.display()
        ),
    )
    .unwrap();
    let t = Command::new(SSHD).arg("-t").arg("-f").arg(&main_config).output().unwrap();
    assert!(t.status.success(), "sshd -t refused the rendered config: {}", stderr(&t));
    let mut cmd = Command::new(SSHD);
    cmd.arg("-D").arg("-f").arg(&main_config).arg("-E").arg(&sshd_log);
    let _pivot = Proc::spawn("stock sshd pivot", &mut cmd, w.join("pivot-stderr.log"));
    assert!(wait_until(Duration::from_secs(10), || TcpStream::connect(("127.0.0.1", pivot_port)).is_ok()));

    let known_hosts = out.join("known_hosts");
    let device_ssh = |key: &KeyPair, extra: &[&str]| -> Command {
        let mut c = Command::new("ssh");
        // Devices pin the pivot's key too: the rendered known_hosts has it.
        c.args(["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-o"])
            .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
            .args(["-o", "IdentitiesOnly=yes", "-i"])
            .arg(&key.private)
            .args(["-p", &pivot_port.to_string()])
            .args(extra)
            .stdin(Stdio::null());
        c
    };
    // cam-1 holds a real `ssh -R` on its leased port.
    let mut tunnel = device_ssh(&k1, &["-N", "-o", "ExitOnForwardFailure=yes", "-R"]);
    tunnel.arg(format!("127.0.0.1:{p1}:{}", device_sshd.target())).arg(format!("{DEVICE_USER}@127.0.0.1"));
    let _tunnel = Proc::spawn("device ssh -R", &mut tunnel, w.join("tunnel.log"));
    assert!(wait_until(Duration::from_secs(10), || TcpStream::connect(("127.0.0.1", p1)).is_ok()), "no tunnel");

    // The operator reaches cam-1 by name with the rendered ssh_config and
    // known_hosts, which pins the pivot's key and cam-1's.
    let op_config = w.join("operator_config");
    std::fs::write(
        &op_config,
        format!("IdentityFile {}\nIdentitiesOnly yes\nInclude {}/ssh_config\n", alice.private.display(), out.display()),
    )
    .unwrap();
    let op = |args: &[&str]| ssh(&[&["-F", op_config.to_str().unwrap()], args].concat());
    let reached = op(&["cam-1", "echo via-stock-sshd"]);
    assert_eq!(stdout(&reached).trim(), "via-stock-sshd", "{}", stderr(&reached));

    // A device key cannot listen on another port, nor get a shell.
    let mut other = device_ssh(&k1, &["-N", "-o", "ExitOnForwardFailure=yes", "-R"]);
    other.arg(format!("127.0.0.1:{p2}:127.0.0.1:22")).arg(format!("{DEVICE_USER}@127.0.0.1"));
    let o = other.output().unwrap();
    assert!(!o.status.success(), "a device listened on another device's port");
    assert!(stderr(&o).contains("remote port forwarding failed"), "{}", stderr(&o));
    let shell = device_ssh(&k1, &[&format!("{DEVICE_USER}@127.0.0.1"), "echo got-a-shell"]).output().unwrap();
    assert!(!shell.status.success() && !stdout(&shell).contains("got-a-shell"), "{}", stdout(&shell));

    // The operator may open only the ports of devices their labels allow,
    // and gets no shell on the pivot either.
    let denied = op(&["-W", &format!("127.0.0.1:{p2}"), "burrow-pivot"]);
    assert!(!denied.status.success());
    assert!(stderr(&denied).contains("administratively prohibited"), "{}", stderr(&denied));
    let shell = op(&["burrow-pivot", "echo got-a-shell"]);
    assert!(!shell.status.success() && !stdout(&shell).contains("got-a-shell"));

    // fail2ban: the rendered filter matches real failed logins in sshd's
    // log, and fail2ban accepts the rendered jail.
    let stranger = KeyPair::generate(w, "stranger");
    for _ in 0..2 {
        let _ = device_ssh(&stranger, &[&format!("{OPERATOR_USER}@127.0.0.1"), "true"]).output();
    }
    assert!(wait_until(Duration::from_secs(5), || std::fs::read_to_string(&sshd_log)
        .unwrap_or_default()
        .contains("Connection closed by authenticating user")));
    let conf = w.join("fail2ban");
    let copy = Command::new("cp").args(["-r", "/etc/fail2ban"]).arg(&conf).output().unwrap();
    assert!(copy.status.success());
    // Only the rendered jail is tested, not the distribution's own.
    let _ = std::fs::remove_file(conf.join("jail.d/defaults-debian.conf"));
    for f in ["jail.d/burrow-sshd.conf", "filter.d/burrow-sshd.conf"] {
        std::fs::copy(out.join("fail2ban").join(f), conf.join(f)).unwrap();
    }
    let regex = Command::new("fail2ban-regex")
        .args(["-d", "{NONE}"])
        .arg(&sshd_log)
        .arg(conf.join("filter.d/burrow-sshd.conf"))
        .output()
        .unwrap();
    let report = stdout(&regex);
    let matched: usize = report
        .lines()
        .find_map(|l| l.strip_prefix("Lines: "))
        .and_then(|l| l.split(", ").find_map(|p| p.strip_suffix(" matched")?.parse().ok()))
        .unwrap_or_else(|| panic!("no summary: {report}{}", stderr(&regex)));
    assert!(matched >= 2, "the filter matched {matched} failed logins:\n{report}");
    let jail = std::fs::read_to_string(conf.join("jail.d/burrow-sshd.conf")).unwrap();
    assert!(
        jail.contains("maxretry = 5") && jail.contains("findtime = 600") && jail.contains("bantime = 3600"),
        "{jail}"
    );
    let t = Command::new("fail2ban-client").arg("-c").arg(&conf).arg("-t").output().unwrap();
    assert!(t.status.success(), "fail2ban-client -t: {}{}", stdout(&t), stderr(&t));
    // Seed 004's rules are checked before anything is written.
    let bad = Command::new(BURROW)
        .args(["openssh", "render", "--out", out.to_str().unwrap(), "--data-dir", data_s])
        .args(["--pivot", "127.0.0.1:22", "--ban-findtime", "10m", "--ban-bantime", "1m"])
        .output()
        .unwrap();
    assert!(!bad.status.success() && stderr(&bad).contains("bantime"), "{}", stderr(&bad));
}
