//! `burrow-bench mqtt-hold N`: N idle on-demand devices held on the pivot's
//! embedded MQTT listener, then the same load on Mosquitto as the anchor.
//!
//! Each device does what the agent does: TLS (pinned; plain MQTT on
//! Mosquitto), CONNECT with its own signed login token and an "offline"
//! last will, SUBSCRIBE to its request topic, a retained "online" presence,
//! then a PINGREQ every keepalive. Devices are split over several
//! generator processes (this binary, `mqtt-devices`), each bound to its own
//! loopback source address, because every process here may hold at most
//! 20,000 descriptors.
//!
//! Figures:
//! - broker memory per idle device: PSS of the broker process after all
//!   devices are up, less its PSS before the first connected;
//! - connect and login rate: devices up per second, all processes together;
//! - wake-up latency. On burrow: an operator opens `direct-tcpip` to a
//!   device through the pivot, and the time runs until that device's
//!   generator reads the signed wake request. On Mosquitto: a client
//!   publishes to the device's request topic, and the time runs until the
//!   device reads it. Clocks are the same machine's wall clock.

use std::collections::HashMap;
use std::io::BufRead;
use std::net::{IpAddr, SocketAddr};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use burrow_core::signal::{login_token, Presence, Topics};
use burrow_testkit::{KeyPair, Mosquitto, TestPivot};
use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{Connect, LastWill, Login, Packet, Publish, Subscribe};
use rumqttc::mqttbytes::QoS;
use rumqttc::tokio_rustls::rustls::pki_types::ServerName;
use rumqttc::tokio_rustls::TlsConnector;
use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::PrivateKey;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::vs_openssh::pss_kib;

const PREFIX: &str = "dev";
const KEEPALIVE: u16 = 30;

pub struct Options {
    pub devices: usize,
    pub procs: usize,
    pub wakes: usize,
    pub skip_mosquitto: bool,
    pub plaintext: bool,
}

fn now_nanos() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos()
}

/// The same key for device `i` in every process, so none is passed around.
pub(crate) fn device_key(i: usize) -> PrivateKey {
    use sha2::Digest;
    let seed: [u8; 32] = sha2::Sha256::digest(format!("burrow-bench-device-{i}")).into();
    PrivateKey::from(Ed25519Keypair::from_seed(&seed))
}

pub(crate) fn device_id(i: usize) -> String {
    format!("{PREFIX}-{i}")
}

/// What one broker run measured.
struct Figures {
    up: usize,
    errors: usize,
    per_device_kib: f64,
    rate: f64,
    wakes: Vec<Duration>,
    before_kib: u64,
    after_kib: u64,
}

pub async fn run(bin: &str, o: Options) -> Result<()> {
    println!("mqtt-hold: {} idle devices over {} generator processes, {} wake-ups", o.devices, o.procs, o.wakes);
    let burrow = burrow_side(bin, &o).await?;
    let name = if o.plaintext { "burrow embedded (mqtt://)" } else { "burrow embedded (mqtts://, pinned)" };
    print_figures(name, "pivot memory per idle device", &burrow);
    if o.skip_mosquitto {
        return Ok(());
    }
    // Like for like: Mosquitto over TLS when burrow runs TLS.
    let mosq = mosquitto_side(&o).await?;
    let name = if o.plaintext { "mosquitto (mqtt://, documented ACL)" } else { "mosquitto (mqtts://, documented ACL)" };
    print_figures(name, "broker memory per idle device", &mosq);
    println!(
        "ratio burrow / mosquitto, memory per idle device: {:.2}x",
        burrow.per_device_kib / mosq.per_device_kib.max(0.001)
    );
    Ok(())
}

fn print_figures(name: &str, memory_label: &str, f: &Figures) {
    println!("{name}:");
    println!("  devices held: {}, errors: {}", f.up, f.errors);
    println!(
        "  {memory_label}: {:.1} KiB (PSS {:.1} MiB -> {:.1} MiB)",
        f.per_device_kib,
        f.before_kib as f64 / 1024.0,
        f.after_kib as f64 / 1024.0
    );
    println!("  connect and login rate: {:.0} devices/s", f.rate);
    let mut w = f.wakes.clone();
    if w.is_empty() {
        println!("  wake-up latency: no samples");
        return;
    }
    w.sort();
    let pct = |p: f64| crate::ms(w[((w.len() as f64 - 1.0) * p).round() as usize]);
    println!("  wake-up latency: p50 {:.2} ms, p99 {:.2} ms (n={})", pct(0.5), pct(0.99), w.len());
}

/// Generator processes and what they report on stdout.
struct Generators {
    children: Vec<std::process::Child>,
    up: Arc<AtomicUsize>,
    errors: Arc<AtomicUsize>,
    /// Device index -> when its first wake request arrived (unix ns).
    wakes: Arc<std::sync::Mutex<HashMap<usize, u128>>>,
}

impl Drop for Generators {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn start_generators(addr: SocketAddr, pin: Option<&str>, o: &Options) -> Result<Generators> {
    let exe = std::env::current_exe()?;
    let per = o.devices.div_ceil(o.procs);
    let (up, errors) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let wakes = Arc::new(std::sync::Mutex::new(HashMap::new()));
    let mut children = Vec::new();
    for p in 0..o.procs {
        let first = p * per;
        let count = per.min(o.devices.saturating_sub(first));
        if count == 0 {
            break;
        }
        let mut cmd = Command::new(&exe);
        cmd.args(["mqtt-devices", &addr.to_string(), &format!("127.0.1.{}", p + 1)])
            .args([first.to_string(), count.to_string()])
            .arg(pin.unwrap_or("-"))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().context("cannot start a generator")?;
        let out = child.stdout.take().expect("piped");
        let (up, errors, wakes) = (up.clone(), errors.clone(), wakes.clone());
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                let mut it = line.split_whitespace();
                match it.next() {
                    Some("up") => {
                        up.fetch_add(1, Ordering::Relaxed);
                    }
                    // The first few errors are shown, all are counted.
                    Some("error") if errors.fetch_add(1, Ordering::Relaxed) < 5 => eprintln!("generator: {line}"),
                    Some("error") => {}
                    Some("wake") => {
                        let (Some(i), Some(t)) = (it.next(), it.next()) else { continue };
                        if let (Ok(i), Ok(t)) = (i.parse(), t.parse()) {
                            wakes.lock().unwrap().entry(i).or_insert(t);
                        }
                    }
                    _ => {}
                }
            }
        });
        children.push(child);
    }
    Ok(Generators { children, up, errors, wakes })
}

/// Waits until every device is up (or stalls for 30 s); returns the rate.
async fn wait_up(g: &Generators, n: usize) -> f64 {
    let started = Instant::now();
    let (mut last, mut last_change) = (0, Instant::now());
    loop {
        let done = g.up.load(Ordering::Relaxed) + g.errors.load(Ordering::Relaxed);
        if done >= n || last_change.elapsed() > Duration::from_secs(30) {
            return g.up.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
        }
        if done != last {
            (last, last_change) = (done, Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Settles, then reads PSS (the median of three reads a second apart).
async fn settled_pss(pid: u32) -> u64 {
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut reads = Vec::new();
    for _ in 0..3 {
        reads.push(pss_kib(pid));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    reads.sort();
    reads[1]
}

async fn burrow_side(bin: &str, o: &Options) -> Result<Figures> {
    let mut flags = vec![
        // 20,000 descriptors: 19,000 devices, 500 unauthenticated slots
        // (two descriptors each) and a small reserve.
        "--max-startups",
        "500:30:500",
        "--per-source-max-startups",
        "500",
        "--ban-ignoreip",
        "127.0.0.0/8",
        "--wake-timeout",
        "2s",
        "--max-channels",
        "256",
        "--fd-reserve",
        "64",
    ];
    if o.plaintext {
        flags.push("--mqtt-plaintext");
    }
    let pivot = TestPivot::start_with(bin, &flags);
    let registered = Instant::now();
    register(pivot.data.path(), o.devices).await?;
    println!("registered {} devices in {:.1} s", o.devices, registered.elapsed().as_secs_f64());
    let op = KeyPair::generate(pivot.data.path(), "bench-operator");
    pivot.add_operator("bench", &op);
    let pid = pivot.proc.pid();
    let before = settled_pss(pid).await;
    let g = start_generators(pivot.mqtt_addr.context("embedded broker")?, pivot.mqtt_fingerprint.as_deref(), o)?;
    let rate = wait_up(&g, o.devices).await;
    let after = settled_pss(pid).await;
    let up = g.up.load(Ordering::Relaxed);

    // Wake-ups: one at a time, 50 ms apart, each to a different device.
    let key = Arc::new(russh::keys::load_secret_key(&op.private, None)?);
    let handle = crate::vs_openssh::connect(pivot.addr.port(), "bench", key).await?;
    let handle = Arc::new(handle);
    let wakes = sample_wakes(&g, o, up, |i| {
        let (h, id) = (handle.clone(), device_id(i));
        // The device never dials back; the open fails at the wake timeout.
        tokio::spawn(async move { h.channel_open_direct_tcpip(id, 22, "127.0.0.1", 40000).await });
        async { Ok(()) }
    })
    .await?;
    Ok(figures(&g, up, rate, wakes, before, after))
}

fn figures(g: &Generators, up: usize, rate: f64, wakes: Vec<Duration>, before: u64, after: u64) -> Figures {
    let errors = g.errors.load(Ordering::Relaxed);
    let per_device_kib = after.saturating_sub(before) as f64 / up.max(1) as f64;
    Figures { up, errors, per_device_kib, rate, wakes, before_kib: before, after_kib: after }
}

/// Wake-ups one at a time, 50 ms apart, each to a different device: `wake(i)`
/// asks for device `i`, and the time runs until its generator reads it.
async fn sample_wakes<F, Fut>(g: &Generators, o: &Options, up: usize, mut wake: F) -> Result<Vec<Duration>>
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let mut wakes = Vec::new();
    for s in 0..o.wakes.min(up) {
        let i = (s * 7919) % o.devices;
        let t0 = now_nanos();
        wake(i).await?;
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if let Some(t) = g.wakes.lock().unwrap().get(&i) {
                wakes.push(Duration::from_nanos(t.saturating_sub(t0) as u64));
                break;
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        // Pacing, so one sample does not queue behind the last.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(wakes)
}

pub async fn register(data_dir: &std::path::Path, n: usize) -> Result<()> {
    let registry = burrow_server::Registry::open(data_dir).await?;
    for i in 0..n {
        let id = burrow_core::Id::parse(&device_id(i))?;
        registry.add_device(&id, device_key(i).public_key(), &Default::default(), &[]).await?;
    }
    registry.close().await;
    Ok(())
}

async fn mosquitto_side(o: &Options) -> Result<Figures> {
    let m = if o.plaintext { Mosquitto::start() } else { Mosquitto::start_tls_anonymous() };
    let pid = m.proc.pid();
    let before = settled_pss(pid).await;
    let addr: SocketAddr = m.url().trim_start_matches("mqtt://").parse()?;
    // Devices pin Mosquitto's certificate as they pin the pivot's.
    let pin = match o.plaintext {
        true => None,
        false => {
            use rumqttc::tokio_rustls::rustls::pki_types::{pem::PemObject, CertificateDer};
            let der = CertificateDer::from_pem_file(m.server_cert()).context("mosquitto's certificate")?;
            Some(burrow_core::mqtt_url::CertPin::of_der(&der))
        }
    };
    let mode = match pin {
        Some(p) => format!("mosquitto:{p}"),
        None => "mosquitto".to_string(),
    };
    let g = start_generators(addr, Some(&mode), o)?;
    let rate = wait_up(&g, o.devices).await;
    let after = settled_pss(pid).await;
    let up = g.up.load(Ordering::Relaxed);

    // The pivot's role: publish each request, time it to the device.
    let mut opts = rumqttc::MqttOptions::new("bench-pivot", addr.ip().to_string(), addr.port());
    opts.set_credentials("pivot", "");
    if let Some(pin) = pin {
        let tls = burrow_agent::tls::pinned_client_config(pin);
        opts.set_transport(rumqttc::Transport::Tls(rumqttc::TlsConfiguration::Rustls(tls)));
    }
    let (client, mut ev) = rumqttc::AsyncClient::new(opts, 64);
    // Connected before the first sample, then polled in the background.
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ev.poll()).await {
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_)))) => break,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => bail!("the publisher cannot connect to mosquitto: {e}"),
            Err(_) => bail!("the publisher got no CONNACK from mosquitto"),
        }
    }
    tokio::spawn(async move { while ev.poll().await.is_ok() {} });
    let topics = Topics::new("burrow");
    let wakes = sample_wakes(&g, o, up, |i| {
        let (client, topic) = (client.clone(), topics.request(&device_id(i)));
        async move { Ok(client.publish(topic, QoS::AtLeastOnce, false, vec![b'x'; 600]).await?) }
    })
    .await?;
    Ok(figures(&g, up, rate, wakes, before, after))
}

/// The generator process: `mqtt-devices ADDR SOURCE FIRST COUNT PIN`, where
/// PIN is the pivot's certificate pin, `-` for plain MQTT with a login
/// token, `mosquitto` for plain MQTT without one, or `mosquitto:PIN` for
/// pinned TLS without one. Runs until killed.
pub async fn generator(args: &[String]) -> Result<()> {
    let [addr, source, first, count, pin] = args else {
        bail!("usage: burrow-bench mqtt-devices ADDR SOURCE FIRST COUNT PIN")
    };
    let addr: SocketAddr = addr.parse()?;
    let source: IpAddr = source.parse()?;
    let (first, count): (usize, usize) = (first.parse()?, count.parse()?);
    let pinned = |fp: &str| -> Result<TlsConnector> {
        Ok(TlsConnector::from(burrow_agent::tls::pinned_client_config(fp.parse()?)))
    };
    let (tls, token) = match pin.as_str() {
        "mosquitto" => (None, false),
        "-" => (None, true),
        p => match p.strip_prefix("mosquitto:") {
            Some(fp) => (Some(pinned(fp)?), false),
            None => (Some(pinned(p)?), true),
        },
    };
    let audience = if token && pin != "-" { pin.clone() } else { String::new() };
    let dev = Arc::new(Dev { addr, source, tls, token, audience });
    // Bounded handshakes in flight, like a fleet coming back after an outage.
    let gate = Arc::new(tokio::sync::Semaphore::new(64));
    for i in first..first + count {
        let (dev, gate) = (dev.clone(), gate.clone());
        tokio::spawn(async move {
            let permit = gate.acquire_owned().await.expect("never closed");
            if let Err(e) = dev.run(i, permit).await {
                println!("error {i} {e:#}");
            }
        });
    }
    std::future::pending::<()>().await;
    Ok(())
}

struct Dev {
    addr: SocketAddr,
    source: IpAddr,
    tls: Option<TlsConnector>,
    token: bool,
    /// The pivot's pin, which login tokens are signed for.
    audience: String,
}

impl Dev {
    async fn run(&self, i: usize, permit: tokio::sync::OwnedSemaphorePermit) -> Result<()> {
        let sock = tokio::net::TcpSocket::new_v4()?;
        sock.bind(SocketAddr::new(self.source, 0))?;
        let tcp = sock.connect(self.addr).await?;
        tcp.set_nodelay(true)?;
        match &self.tls {
            Some(tls) => {
                let name = ServerName::try_from("burrow-pivot").expect("valid name");
                self.session(i, tls.connect(name, tcp).await?, permit).await
            }
            None => self.session(i, tcp, permit).await,
        }
    }

    async fn session<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        i: usize,
        mut io: S,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> Result<()> {
        let id = device_id(i);
        let topics = Topics::new("burrow");
        let mut buf = BytesMut::new();
        let mut connect = Connect::new(id.clone());
        connect.keep_alive = KEEPALIVE;
        connect.clean_session = true;
        let offline = serde_json::to_vec(&Presence::offline())?;
        connect.last_will = Some(LastWill::new(topics.presence(&id), offline, QoS::AtLeastOnce, true));
        let password = match self.token {
            true => login_token(&device_key(i), &id, &self.audience, burrow_core::time::now_unix())?,
            false => String::new(),
        };
        connect.login = Some(Login::new(id.clone(), password));
        send(&mut io, Packet::Connect(connect)).await?;
        match next(&mut io, &mut buf).await? {
            Packet::ConnAck(a) if a.code == rumqttc::ConnectReturnCode::Success => {}
            other => bail!("refused: {other:?}"),
        }
        let mut subscribe = Subscribe::new(topics.request(&id), QoS::AtLeastOnce);
        subscribe.pkid = 1;
        send(&mut io, Packet::Subscribe(subscribe)).await?;
        let online = serde_json::to_vec(&Presence::online("on-demand", burrow_core::time::now_unix()))?;
        let mut presence = Publish::new(topics.presence(&id), QoS::AtLeastOnce, online);
        presence.retain = true;
        presence.pkid = 2;
        send(&mut io, Packet::Publish(presence)).await?;
        let mut acked = (false, false);
        while acked != (true, true) {
            match next(&mut io, &mut buf).await? {
                Packet::SubAck(_) => acked.0 = true,
                Packet::PubAck(_) => acked.1 = true,
                _ => {}
            }
        }
        drop(permit);
        println!("up {i}");
        let mut ping = tokio::time::interval(Duration::from_secs(KEEPALIVE as u64));
        ping.tick().await;
        loop {
            tokio::select! {
                p = next(&mut io, &mut buf) => {
                    if let Packet::Publish(p) = p? {
                        println!("wake {i} {}", now_nanos());
                        if p.qos == QoS::AtLeastOnce {
                            send(&mut io, Packet::PubAck(rumqttc::mqttbytes::v4::PubAck::new(p.pkid))).await?;
                        }
                    }
                }
                _ = ping.tick() => send(&mut io, Packet::PingReq).await?,
            }
        }
    }
}

async fn send<S: AsyncWrite + Unpin>(io: &mut S, p: Packet) -> Result<()> {
    let mut out = BytesMut::new();
    p.write(&mut out, 64 * 1024).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    io.write_all(&out).await?;
    io.flush().await?;
    Ok(())
}

async fn next<S: AsyncRead + Unpin>(io: &mut S, buf: &mut BytesMut) -> Result<Packet> {
    loop {
        match Packet::read(buf, 64 * 1024) {
            Ok(p) => return Ok(p),
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(n)) => {
                buf.reserve(n);
                if io.read_buf(buf).await? == 0 {
                    bail!("closed by the broker");
                }
            }
            Err(e) => bail!("{e:?}"),
        }
    }
}
