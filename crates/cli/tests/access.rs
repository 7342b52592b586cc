//! Operators reach devices through the pivot with stock OpenSSH tools:
//! ssh, scp, sftp, rsync and local forwards, against real sshd targets.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use burrow_testkit::*;

const BURROW: &str = env!("CARGO_BIN_EXE_burrow");

fn setup(id: &str) -> (TestPivot, Operator, Device) {
    let (pivot, op) = TestPivot::with_operator(BURROW, &[]);
    let dev = Device::start(BURROW, &pivot, &op, id);
    (pivot, op, dev)
}

#[test]
fn ssh_round_trip_through_the_pivot() {
    let (_pivot, op, dev) = setup("cam-42");
    let mut child = op
        .ssh(&["-J", "pivot", "root@cam-42", "read line; echo \"got:$line\"; echo \"$SSH_CONNECTION\""])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"ping\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "ssh failed: {}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("got:ping"), "{text}");
    // The session ended at this device's sshd, not somewhere else.
    assert!(text.trim_end().ends_with(&format!(" {}", dev.sshd.port)), "{text}");
}

#[test]
fn scp_64_mib_upload_and_download_are_byte_identical() {
    require_tool("scp");
    let (_pivot, op, dev) = setup("cam-42");
    let local = op.dir.path().join("fw.bin");
    let mut data = vec![0u8; 64 * 1024 * 1024];
    // Cheap pseudo-random bytes: incompressible enough that nothing shortcuts the copy.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    std::fs::write(&local, &data).unwrap();
    let remote_dir = dev.sshd.dir.path().join("upload");
    std::fs::create_dir(&remote_dir).unwrap();

    let t = Instant::now();
    let out = op.scp(&[local.to_str().unwrap(), &format!("root@cam-42:{}/", remote_dir.display())]);
    let up = t.elapsed();
    assert!(out.status.success(), "scp upload failed: {}", stderr(&out));
    assert!(std::fs::read(remote_dir.join("fw.bin")).unwrap() == data, "uploaded bytes differ");

    let back = op.dir.path().join("fw.back");
    let t = Instant::now();
    let out = op.scp(&[&format!("root@cam-42:{}/fw.bin", remote_dir.display()), back.to_str().unwrap()]);
    let down = t.elapsed();
    assert!(out.status.success(), "scp download failed: {}", stderr(&out));
    assert!(std::fs::read(&back).unwrap() == data, "downloaded bytes differ");
    let mib = |d: Duration| 64.0 / d.as_secs_f64();
    eprintln!(
        "scp 64 MiB through the pivot (debug build): upload {:.1} MiB/s, download {:.1} MiB/s",
        mib(up),
        mib(down)
    );
}

#[test]
fn sftp_put_list_get() {
    require_tool("sftp");
    let (_pivot, op, dev) = setup("cam-42");
    let src = op.dir.path().join("notes.txt");
    std::fs::write(&src, "sftp through burrow\n").unwrap();
    let remote = dev.sshd.dir.path().join("sftp");
    std::fs::create_dir(&remote).unwrap();
    let back = op.dir.path().join("notes.back");
    let batch = op.dir.path().join("batch");
    std::fs::write(
        &batch,
        format!(
            "cd {r}\nput {s}\nls -l\nget notes.txt {b}\n",
            r = remote.display(),
            s = src.display(),
            b = back.display()
        ),
    )
    .unwrap();
    let out = Command::new("sftp")
        .arg("-F")
        .arg(&op.config)
        .args(["-J", "pivot", "-b"])
        .arg(&batch)
        .arg("root@cam-42")
        .output()
        .unwrap();
    assert!(out.status.success(), "sftp failed: {}", stderr(&out));
    assert!(stdout(&out).contains("notes.txt"), "{}", stdout(&out));
    assert_eq!(std::fs::read_to_string(remote.join("notes.txt")).unwrap(), "sftp through burrow\n");
    assert_eq!(std::fs::read_to_string(back).unwrap(), "sftp through burrow\n");
}

#[test]
fn rsync_over_ssh_jump() {
    require_tool("rsync");
    let (_pivot, op, dev) = setup("cam-42");
    let src = op.dir.path().join("tree");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    for i in 0..20 {
        std::fs::write(src.join(format!("f{i}")), format!("file {i}\n").repeat(100 * (i + 1))).unwrap();
    }
    std::fs::write(src.join("sub/deep"), "deep\n").unwrap();
    let dst = dev.sshd.dir.path().join("mirror");
    let out = Command::new("rsync")
        .args(["-a", "-e", &op.ssh_cmdline()])
        .arg(format!("{}/", src.display()))
        .arg(format!("root@cam-42:{}/", dst.display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "rsync failed: {}", stderr(&out));
    for i in 0..20 {
        let name = format!("f{i}");
        assert_eq!(std::fs::read(src.join(&name)).unwrap(), std::fs::read(dst.join(&name)).unwrap());
    }
    assert_eq!(std::fs::read_to_string(dst.join("sub/deep")).unwrap(), "deep\n");
}

#[test]
fn two_devices_served_at_once() {
    let (pivot, op) = TestPivot::with_operator(BURROW, &[]);
    let a = Device::start(BURROW, &pivot, &op, "cam-1");
    let b = Device::start(BURROW, &pivot, &op, "cam-2");
    let ta = std::thread::spawn({
        let cfg = op.config.clone();
        move || {
            Command::new("ssh")
                .arg("-F")
                .arg(cfg)
                .args(["-J", "pivot", "root@cam-1", "sleep 1; echo $SSH_CONNECTION"])
                .output()
                .unwrap()
        }
    });
    let out_b = op.ssh_device("cam-2", "echo $SSH_CONNECTION");
    let out_a = ta.join().unwrap();
    assert!(out_a.status.success(), "{}", stderr(&out_a));
    assert!(out_b.status.success(), "{}", stderr(&out_b));
    // Strict host-key checking already proved each name reached its own sshd;
    // the server port says so too.
    assert!(stdout(&out_a).trim_end().ends_with(&format!(" {}", a.sshd.port)));
    assert!(stdout(&out_b).trim_end().ends_with(&format!(" {}", b.sshd.port)));
}

#[test]
fn stock_openssh_device_with_ssh_dash_r() {
    let (pivot, op) = TestPivot::with_operator(BURROW, &[]);
    let sshd = Sshd::start(&[&op.key]);
    let dev_key = KeyPair::generate(sshd.dir.path(), "device");
    pivot.add_device("cam-42", &dev_key);
    op.trust_device("cam-42", &sshd);
    // The device has nothing but the OpenSSH client.
    let _device = op.stock_device(&pivot, "cam-42", &dev_key, &sshd, "device-ssh.log");
    assert!(pivot.wait_online("cam-42", true, Duration::from_secs(20)));
    let out = op.ssh_device("cam-42", "echo stock-ok");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "stock-ok");
}

#[test]
fn local_forward_reaches_another_exposed_service() {
    // A tiny line echo service standing in for the device's HTTP API on 8081.
    let api = TcpListener::bind("127.0.0.1:0").unwrap();
    let api_addr = api.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in api.incoming() {
            let Ok(mut conn) = conn else { break };
            std::thread::spawn(move || {
                let mut buf = [0u8; 1024];
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 || conn.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    let (pivot, op) = TestPivot::with_operator(BURROW, &[]);
    let _dev = Device::start_exposing(BURROW, &pivot, &op, "cam-42", &[format!("8081={api_addr}")]);
    let local_port = free_port();
    let mut cmd =
        op.ssh(&["-N", "-o", "ExitOnForwardFailure=yes", "-L", &format!("{local_port}:cam-42:8081"), "pivot"]);
    let _fwd = Proc::spawn("ssh -L", &mut cmd, op.dir.path().join("fwd.log"));
    let mut conn = None;
    assert!(wait_until(Duration::from_secs(15), || {
        conn = TcpStream::connect(("127.0.0.1", local_port)).ok();
        conn.is_some()
    }));
    let mut conn = conn.unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    conn.write_all(b"GET /status\n").unwrap();
    let mut buf = [0u8; 12];
    conn.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"GET /status\n");
}

#[test]
fn relays_across_several_ssh_threads() {
    require_tool("scp");
    // Connections are spread over the threads in turn, so with three of them
    // the operator's and the devices' connections land on different ones.
    let (pivot, op) = TestPivot::with_operator(BURROW, &["--ssh-threads", "3"]);
    let devs: Vec<Device> = ["cam-1", "cam-2"].iter().map(|id| Device::start(BURROW, &pivot, &op, id)).collect();
    let data: Vec<u8> = (0..8 * 1024 * 1024u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let local = op.dir.path().join("blob.bin");
    std::fs::write(&local, &data).unwrap();
    std::thread::scope(|s| {
        for (dev, id) in devs.iter().zip(["cam-1", "cam-2"]) {
            let (op, local, data) = (&op, &local, &data);
            s.spawn(move || {
                for round in 0..3 {
                    let remote = dev.sshd.dir.path().join(format!("blob-{round}.bin"));
                    let out = op.scp(&[local.to_str().unwrap(), &format!("root@{id}:{}", remote.display())]);
                    assert!(out.status.success(), "{id} round {round}: {}", stderr(&out));
                    assert!(std::fs::read(&remote).unwrap() == *data, "{id} round {round}: bytes differ");
                    let out = op.ssh_device(id, "echo back");
                    assert_eq!(stdout(&out).trim(), "back", "{id}: {}", stderr(&out));
                }
            });
        }
    });
}

/// A plain HTTP/1.1 GET: (status line, body).
fn http_get(port: u16, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: pivot\r\nConnection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_string(), body.to_string())
}

fn sample(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} not in\n{metrics}"))
}

#[test]
fn health_and_metrics_over_http() {
    let (pivot, op) = TestPivot::with_operator(BURROW, &["--http-listen", "127.0.0.1:0"]);
    let http = pivot.http_port();
    let _dev = Device::start(BURROW, &pivot, &op, "cam-42");

    let (status, body) = http_get(http, "/healthz");
    assert!(status.contains(" 200 "), "{status}\n{body}");
    assert!(body.contains("registry: ok"), "{body}");
    // Issue 13: the pivot's name, its registry backend and its peers.
    assert!(body.contains("pivot: local") && body.contains("(sqlite)") && body.contains("peers: none"), "{body}");
    let (_, m) = http_get(http, "/metrics");
    assert!(m.contains("burrow_pivot_info{pivot=\"local\",backend=\"sqlite\"} 1"), "{m}");

    let out = op.ssh_device("cam-42", "head -c 100000 /dev/urandom");
    assert_eq!(out.stdout.len(), 100_000, "{}", stderr(&out));
    let refused = op.ssh_device("nope", "true");
    assert!(!refused.status.success());

    // The operator's session has ended; its channel is closed by now or soon.
    let mut m = String::new();
    assert!(wait_until(Duration::from_secs(10), || {
        m = http_get(http, "/metrics").1;
        sample(&m, "burrow_channels_open") == 0 && sample(&m, "burrow_channels_opened_total") == 1
    }));
    assert_eq!(sample(&m, "burrow_tunnels"), 1, "{m}");
    assert_eq!(sample(&m, "burrow_sessions{role=\"device\"}"), 1, "{m}");
    assert_eq!(sample(&m, "burrow_refusals_total{reason=\"unknown\"}"), 1, "{m}");
    // The inner session's bytes, encrypted end to end: more than the payload.
    assert!(sample(&m, "burrow_relayed_bytes_total{direction=\"to_operator\"}") > 100_000, "{m}");
    assert!(sample(&m, "burrow_relayed_bytes_total{direction=\"to_device\"}") > 0, "{m}");
    assert!(sample(&m, "burrow_connections_accepted_total") >= 3, "{m}");
}
