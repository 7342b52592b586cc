//! Issue 12: pivot-side ports. `burrow device listen ID PORT` makes the
//! pivot listen on a TCP port and relay each connection to the device's
//! exposed PORT, so a client that knows no SSH (curl here) reaches a real
//! HTTP server on the device, always-on or woken on demand.

use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use burrow_testkit::*;

const BURROW: &str = env!("CARGO_BIN_EXE_burrow");

/// A real HTTP server (Python's) on the "device", serving `body` as /hello.txt.
fn http_server(body: &str) -> (Proc, tempfile::TempDir, u16) {
    require_tool("python3");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("hello.txt"), body).unwrap();
    for _ in 0..5 {
        let port = free_port();
        let mut cmd = Command::new("python3");
        cmd.args(["-m", "http.server", &port.to_string(), "--bind", "127.0.0.1", "--directory"]).arg(dir.path());
        let mut proc = Proc::spawn("http server", &mut cmd, dir.path().join("http.log"));
        let up = wait_until(Duration::from_secs(10), || {
            !proc.is_running() || TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        if up && proc.is_running() {
            return (proc, dir, port);
        }
    }
    panic!("the HTTP server did not start");
}

fn curl(port: u16) -> Option<String> {
    require_tool("curl");
    let out = Command::new("curl")
        .args(["-s", "--max-time", "20", &format!("http://127.0.0.1:{port}/hello.txt")])
        .output()
        .unwrap();
    out.status.success().then(|| stdout(&out))
}

/// The address a `device listen` printed.
fn leased_port(out: &str) -> u16 {
    let addr = out.split("listens on ").nth(1).and_then(|s| s.split_whitespace().next()).expect("an address");
    addr.parse::<std::net::SocketAddr>().unwrap().port()
}

#[test]
fn curl_reaches_a_devices_http_server_through_a_lease() {
    let (_http, _www, http_port) = http_server("hello from cam-42\n");
    let (mut pivot, op) = TestPivot::with_operator(BURROW, &["--http-listen", "127.0.0.1:0"]);
    let target = format!("8081=127.0.0.1:{http_port}");
    let _dev = Device::start_exposing(BURROW, &pivot, &op, "cam-42", &[target]);

    // Issue 12's monitor: device show has the tunnel's round trip and
    // whether each exposed target answers.
    assert!(wait_until(Duration::from_secs(10), || pivot
        .admin_ok(&["device", "show", "cam-42"])
        .contains("round trip:")));
    let show = pivot.admin_ok(&["device", "show", "cam-42"]);
    assert!(show.contains("target 22    answers") && show.contains("target 8081  answers"), "{show}");
    let rtt = pivot.device_json("cam-42").unwrap()["rtt_ms"].as_i64();
    assert!(rtt.is_some_and(|ms| ms < 5000), "{show}");

    let port = leased_port(&pivot.admin_ok(&["device", "listen", "cam-42", "8081"]));
    assert!(wait_until(Duration::from_secs(10), || curl(port).is_some()), "{}", pivot.proc.log_text());
    assert_eq!(curl(port).unwrap(), "hello from cam-42\n");
    let list = pivot.admin_ok(&["device", "listens"]);
    assert!(list.contains(&format!("127.0.0.1:{port}")) && list.contains("cam-42"), "{list}");
    // Counted per lease, and audited.
    let metrics = http_get(pivot.http_port(), "/metrics");
    let count: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("burrow_lease_connections_total{device=\"cam-42\",port=\"8081\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no lease metric: {metrics}"));
    assert!(count >= 2, "{metrics}");
    assert!(metrics.contains("burrow_lease_bytes_total{device=\"cam-42\",port=\"8081\",direction=\"from_device\"}"));
    let audit = pivot.admin_ok(&["audit", "--event", "lease_add"]);
    assert!(audit.contains("cam-42"), "{audit}");

    // Leases live in the registry: a restarted pivot listens again.
    pivot.restart();
    assert!(pivot.wait_online("cam-42", true, Duration::from_secs(30)));
    assert!(wait_until(Duration::from_secs(10), || curl(port).is_some()), "lease not restored");

    // A second lease on the same address is refused; an ended one closes.
    let out = pivot.admin(&["device", "listen", "cam-42", "22", "--bind", &format!("127.0.0.1:{port}")]);
    assert!(!out.status.success() && stderr(&out).contains("already leased"), "{}", stderr(&out));
    pivot.admin_ok(&["device", "unlisten", "cam-42", "8081"]);
    assert!(wait_until(Duration::from_secs(10), || TcpStream::connect(("127.0.0.1", port)).is_err()));
    // Outside the range is refused.
    let out = pivot.admin(&["device", "listen", "cam-42", "8081", "--bind", "127.0.0.1:80"]);
    assert!(stderr(&out).contains("outside the pivot's lease range"), "{}", stderr(&out));
    // A removed device's leases go with it.
    let port = leased_port(&pivot.admin_ok(&["device", "listen", "cam-42", "8081"]));
    assert!(wait_until(Duration::from_secs(10), || TcpStream::connect(("127.0.0.1", port)).is_ok()));
    pivot.admin_ok(&["device", "remove", "cam-42"]);
    assert!(!pivot.admin_ok(&["device", "listens"]).contains("cam-42"));
    assert!(wait_until(Duration::from_secs(10), || TcpStream::connect(("127.0.0.1", port)).is_err()));
}

#[test]
fn a_lease_wakes_an_on_demand_device_and_binds_loopback_only() {
    let (_http, _www, http_port) = http_server("hello from a sleeper\n");
    // Its own part of the range, so the parallel test cannot take its port.
    let pivot = TestPivot::start_with(BURROW, &["--idle-timeout", "2s", "--lease-range", "38000-38999"]);
    let sshd = Sshd::start(&[]);
    let key = KeyPair::generate(sshd.dir.path(), "cam-7");
    pivot.add_device("cam-7", &key);
    let expose = format!("8081=127.0.0.1:{http_port}");
    let health = free_port();
    let health_at = format!("127.0.0.1:{health}");
    let extra = ["--expose", &expose, "--health-listen", &health_at];
    let _agent = TestAgent::on_demand(BURROW, &pivot, "cam-7", &key, &sshd.target(), &pivot.mqtt_url(), &extra);
    assert!(wait_until(Duration::from_secs(20), || pivot.is_present("cam-7")));
    // The agent's own /healthz: 200 and its state while it waits for wake-ups.
    let status = |path: &str| {
        let out = Command::new("curl")
            .args(["-s", "-o", "/dev/stderr", "-w", "%{http_code}", &format!("http://{health_at}{path}")])
            .output()
            .unwrap();
        (stdout(&out), stderr(&out))
    };
    assert!(wait_until(Duration::from_secs(10), || status("/healthz").0 == "200"));
    assert!(status("/healthz").1.contains("\"state\":\"waiting\""), "{:?}", status("/healthz"));
    assert_eq!(status("/nope").0, "404");
    assert!(!pivot.is_online("cam-7") || pivot.device_json("cam-7").unwrap()["tunnel"] == false);

    // Asked for every address, the lease binds loopback (GatewayPorts no),
    // and says so.
    let free = free_port_in(38000..=38999);
    let out = pivot.admin_ok(&["device", "listen", "cam-7", "8081", "--bind", &format!("0.0.0.0:{free}")]);
    assert!(out.contains(&format!("listens on 127.0.0.1:{free}")), "{out}");
    assert!(wait_until(Duration::from_secs(10), || TcpStream::connect(("127.0.0.1", free)).is_ok()));
    let bound = Command::new("ss").args(["-Htln", &format!("sport = :{free}")]).output().unwrap();
    assert!(stdout(&bound).contains(&format!("127.0.0.1:{free}")), "{}", stdout(&bound));
    // curl wakes the sleeping device through the lease.
    assert_eq!(curl(free).as_deref(), Some("hello from a sleeper\n"), "{}", pivot.proc.log_text());
}

/// A free port within `range`.
fn free_port_in(range: std::ops::RangeInclusive<u16>) -> u16 {
    range
        .clone()
        .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .expect("a free port in the lease range")
}

fn http_get(port: u16, path: &str) -> String {
    let out = Command::new("curl").args(["-s", &format!("http://127.0.0.1:{port}{path}")]).output().unwrap();
    stdout(&out)
}
