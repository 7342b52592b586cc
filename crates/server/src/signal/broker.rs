//! The embedded MQTT broker (rumqttd), listening on loopback only; devices
//! reach it through the [gate](super::gate).

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};
use tracing::error;

/// Starts rumqttd on a free loopback port, accepting only `username`/`password`.
/// rumqttd runs its own threads for the life of the process.
pub(crate) fn start(username: &str, password: &str) -> std::io::Result<SocketAddr> {
    // rumqttd binds by address, so find a free port first.
    let addr = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let connections = ConnectionSettings {
        connection_timeout_ms: 10_000,
        max_payload_size: 64 * 1024,
        max_inflight_count: 100,
        auth: Some(HashMap::from([(username.to_string(), password.to_string())])),
        external_auth: None,
        dynamic_filters: true,
    };
    let server = ServerSettings {
        name: "burrow-internal".into(),
        listen: addr,
        tls: None,
        next_connection_delay_ms: 0,
        connections,
    };
    let config = Config {
        id: 0,
        router: RouterConfig {
            max_connections: 1_000_000,
            max_outgoing_packet_count: 200,
            // Messages are a few hundred bytes; keep little history per topic.
            max_segment_size: 64 * 1024,
            max_segment_count: 2,
            ..Default::default()
        },
        v4: Some(HashMap::from([("internal".to_string(), server)])),
        ..Default::default()
    };
    std::thread::Builder::new().name("mqtt-broker".into()).spawn(move || {
        let mut broker = Broker::new(config);
        if let Err(e) = broker.start() {
            error!(error = %e, "embedded MQTT broker stopped");
        }
    })?;
    // Wait until it accepts, so the pivot's own client connects on first try.
    for _ in 0..200 {
        if std::net::TcpStream::connect(addr).is_ok() {
            return Ok(addr);
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "embedded MQTT broker did not start"))
}
