//! A real Mosquitto broker, its TLS material, and MQTT clients that stand in for devices or attackers.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tempfile::TempDir;

use crate::*;

pub const MOSQUITTO: &str = "/usr/sbin/mosquitto";

/// A real Mosquitto broker on a free loopback port, with the ACL burrow
/// documents: each device reads only its request topic and writes only its
/// presence and status; the pivot (user `pivot`) reads and writes all.
pub struct Mosquitto {
    pub dir: TempDir,
    pub port: u16,
    pub proc: Proc,
    starts: usize,
}

impl Mosquitto {
    pub fn start() -> Mosquitto {
        Self::start_with_listener(|_| String::new())
    }

    /// Mosquitto with TLS only, requiring client certificates whose CN is the
    /// MQTT username (as AWS IoT Core does). Issue certificates with [`Mosquitto::issue`].
    pub fn start_tls() -> Mosquitto {
        Self::start_with_listener(|dir| {
            let ca = TestCa::create(dir);
            let (cert, key) = ca.issue(dir, "127.0.0.1", true);
            format!(
                "cafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\nuse_identity_as_username true\n",
                ca.cert.display(),
                cert.display(),
                key.display()
            )
        })
    }

    /// Mosquitto with a TLS listener and no client certificates (devices
    /// authenticate as on the plain listener): the TLS anchor for
    /// benchmarks. [`Mosquitto::server_cert`] is the certificate it serves.
    pub fn start_tls_anonymous() -> Mosquitto {
        Self::start_with_listener(|dir| {
            let ca = TestCa::create(dir);
            let (cert, key) = ca.issue(dir, "127.0.0.1", true);
            format!("certfile {}\nkeyfile {}\nallow_anonymous true\n", cert.display(), key.display())
        })
    }

    /// The server certificate (PEM) of a TLS listener.
    pub fn server_cert(&self) -> PathBuf {
        self.dir.path().join("127.0.0.1.pem")
    }

    /// `(ca, cert, key)` PEM paths for a client named `cn`.
    pub fn issue(&self, cn: &str) -> (PathBuf, PathBuf, PathBuf) {
        let ca = TestCa { cert: self.dir.path().join("ca.pem"), key: self.dir.path().join("ca.key") };
        let (cert, key) = ca.issue(self.dir.path(), cn, false);
        (ca.cert, cert, key)
    }

    fn start_with_listener(tls: impl FnOnce(&Path) -> String) -> Mosquitto {
        require_tool(MOSQUITTO);
        let dir = tempfile::Builder::new().prefix("burrow-mosquitto").tempdir().unwrap();
        let tls = tls(dir.path());
        // Plain listeners take anonymous devices; a TLS one says itself.
        let anonymous = match (tls.is_empty(), tls.contains("allow_anonymous")) {
            (true, _) => "allow_anonymous true\n",
            (false, true) => "",
            (false, false) => "allow_anonymous false\n",
        };
        // free_port() can race with another test taking the port: retry.
        for attempt in 0..5 {
            let port = free_port();
            let acl = dir.path().join("acl");
            std::fs::write(
                &acl,
                "user pivot\ntopic readwrite burrow/#\n\n\
             pattern read burrow/devices/%u/request\n\
             pattern write burrow/devices/%u/presence\n\
             pattern write burrow/devices/%u/status\n",
            )
            .unwrap();
            let conf = dir.path().join("mosquitto.conf");
            std::fs::write(
                &conf,
                format!(
                    "user root\nlistener {port} 127.0.0.1\n{tls}{anonymous}acl_file {}\npersistence false\n\
                 log_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\nlog_type subscribe\n",
                    acl.display()
                ),
            )
            .unwrap();
            match Self::try_spawn(&dir, &conf, port, attempt) {
                Ok(proc) => return Mosquitto { dir, port, proc, starts: attempt + 1 },
                Err(log) if attempt == 4 => panic!("mosquitto did not start: {log}"),
                Err(_) => continue,
            }
        }
        unreachable!("the loop returns or panics")
    }

    fn spawn(dir: &TempDir, conf: &Path, port: u16, n: usize) -> Proc {
        Self::try_spawn(dir, conf, port, n).unwrap_or_else(|log| panic!("mosquitto did not start: {log}"))
    }

    /// Starts mosquitto; its log if it did not come up.
    fn try_spawn(dir: &TempDir, conf: &Path, port: u16, n: usize) -> Result<Proc, String> {
        let mut cmd = Command::new(MOSQUITTO);
        cmd.arg("-c").arg(conf);
        let mut proc = Proc::spawn("mosquitto", &mut cmd, dir.path().join(format!("mosquitto-{n}.log")));
        let up = wait_until(Duration::from_secs(10), || {
            !proc.is_running() || TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        if up && proc.is_running() {
            Ok(proc)
        } else {
            Err(proc.log_text())
        }
    }

    /// Stops the broker (clients see the connection drop) and starts it again on the same port.
    pub fn restart(&mut self) {
        self.proc.terminate(Duration::from_secs(10));
        self.proc = Self::spawn(&self.dir, &self.dir.path().join("mosquitto.conf"), self.port, self.starts);
        self.starts += 1;
    }

    pub fn stop(&mut self) {
        self.proc.terminate(Duration::from_secs(10));
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    pub fn tls_url(&self) -> String {
        format!("mqtts://127.0.0.1:{}", self.port)
    }
}

/// A throwaway certificate authority made with the openssl CLI.
struct TestCa {
    cert: PathBuf,
    key: PathBuf,
}

impl TestCa {
    fn create(dir: &Path) -> TestCa {
        require_tool("openssl");
        let ca = TestCa { cert: dir.join("ca.pem"), key: dir.join("ca.key") };
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=burrow-test-ca",
            "-keyout",
            ca.key.to_str().unwrap(),
            "-out",
            ca.cert.to_str().unwrap(),
        ]);
        ca
    }

    fn issue(&self, dir: &Path, cn: &str, server: bool) -> (PathBuf, PathBuf) {
        let (cert, key, csr, ext) = (
            dir.join(format!("{cn}.pem")),
            dir.join(format!("{cn}.key")),
            dir.join(format!("{cn}.csr")),
            dir.join(format!("{cn}.ext")),
        );
        let ext_text = if server {
            format!("subjectAltName=IP:{cn}\nextendedKeyUsage=serverAuth\n")
        } else {
            "extendedKeyUsage=clientAuth\n".to_string()
        };
        std::fs::write(&ext, ext_text).unwrap();
        openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            &format!("/CN={cn}"),
            "-keyout",
            key.to_str().unwrap(),
            "-out",
            csr.to_str().unwrap(),
        ]);
        openssl(&[
            "x509",
            "-req",
            "-in",
            csr.to_str().unwrap(),
            "-CA",
            self.cert.to_str().unwrap(),
            "-CAkey",
            self.key.to_str().unwrap(),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            ext.to_str().unwrap(),
            "-out",
            cert.to_str().unwrap(),
        ]);
        (cert, key)
    }
}

fn openssl(args: &[&str]) {
    let out = Command::new("openssl").args(args).output().expect("openssl runs");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Publishes `messages` (topic, retained, payload) at QoS 1 to the broker at
/// `url` (`mqtt://HOST:PORT`) as its user `pivot`, waiting for every PUBACK:
/// an MQTT client with broker access, for tests that inject what a device or
/// an attacker could send.
pub fn mqtt_publish(url: &str, client_id: &str, messages: &[(String, bool, Vec<u8>)]) {
    let port: u16 = url.rsplit(':').next().and_then(|p| p.parse().ok()).expect("mqtt://HOST:PORT");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut opts = rumqttc::MqttOptions::new(client_id, "127.0.0.1", port);
        opts.set_credentials("pivot", "");
        opts.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut ev) = rumqttc::AsyncClient::new(opts, 10);
        for (topic, retain, payload) in messages {
            client.publish(topic, rumqttc::QoS::AtLeastOnce, *retain, payload.clone()).await.unwrap();
        }
        let mut acks = 0;
        while acks < messages.len() {
            match tokio::time::timeout(Duration::from_secs(5), ev.poll()).await {
                Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)))) => acks += 1,
                Ok(Ok(_)) => {}
                other => panic!("publish failed: {other:?}"),
            }
        }
    });
}

/// A stand-in for device `id` on the broker at `url` (as user `pivot`): it
/// publishes an on-demand "online" presence, then answers every wake request
/// on its status topic with `{"state": state, "reason": reason}` and the
/// request's nonce, for `for_how_long`. Returns once subscribed.
pub fn mqtt_standin(
    url: &str,
    id: &str,
    state: &str,
    reason: &str,
    for_how_long: Duration,
) -> std::thread::JoinHandle<usize> {
    let port: u16 = url.rsplit(':').next().and_then(|p| p.parse().ok()).expect("mqtt://HOST:PORT");
    let (id, state, reason) = (id.to_string(), state.to_string(), reason.to_string());
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let topics = burrow_core::signal::Topics::new("burrow");
            let mut opts = rumqttc::MqttOptions::new(format!("{id}-standin"), "127.0.0.1", port);
            opts.set_credentials("pivot", "");
            let (client, mut ev) = rumqttc::AsyncClient::new(opts, 10);
            client.subscribe(topics.request(&id), rumqttc::QoS::AtLeastOnce).await.unwrap();
            let online = serde_json::json!({"state": "online", "mode": "on-demand"});
            client.publish(topics.presence(&id), rumqttc::QoS::AtLeastOnce, true, online.to_string()).await.unwrap();
            let deadline = tokio::time::Instant::now() + for_how_long;
            let (mut answered, mut told) = (0, false);
            loop {
                match tokio::time::timeout_at(deadline, ev.poll()).await {
                    Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)))) => {
                        let Some(nonce) = burrow_core::signal::WakeRequest::claimed_nonce(&p.payload) else { continue };
                        let at = burrow_core::time::now_unix();
                        let status = serde_json::json!({"nonce": nonce, "pivot": "", "state": state, "reason": reason, "at": at});
                        let _ = client.try_publish(topics.status(&id), rumqttc::QoS::AtLeastOnce, false, status.to_string());
                        answered += 1;
                    }
                    Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_)))) if !told => {
                        told = true;
                        let _ = ready_tx.send(());
                    }
                    Ok(_) => {}
                    Err(_) => return answered,
                }
            }
        })
    });
    ready_rx.recv_timeout(Duration::from_secs(10)).expect("the stand-in device subscribed");
    handle
}
