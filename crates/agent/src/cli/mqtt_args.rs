//! MQTT client flags shared by `burrow server` (external broker) and `burrow agent`.

use std::path::PathBuf;

use burrow_core::mqtt_url::TlsFiles;
use burrow_core::signal::Topics;

#[derive(clap::Args)]
pub struct MqttClientArgs {
    /// CA certificate (PEM) for mqtts://.
    #[arg(long)]
    pub mqtt_ca: Option<PathBuf>,
    /// Client certificate (PEM), for brokers that require one such as AWS IoT Core.
    #[arg(long)]
    pub mqtt_cert: Option<PathBuf>,
    /// Client private key (PEM) for --mqtt-cert.
    #[arg(long)]
    pub mqtt_key: Option<PathBuf>,
    /// MQTT username [default: the device id].
    #[arg(long, env = "BURROW_MQTT_USERNAME")]
    pub mqtt_username: Option<String>,
    /// MQTT password [default: a login token signed with the device key].
    #[arg(long, env = "BURROW_MQTT_PASSWORD", hide_env_values = true)]
    pub mqtt_password: Option<String>,
    /// Prefix of every MQTT topic burrow uses.
    #[arg(long, default_value = "burrow")]
    pub topic_prefix: String,
}

impl MqttClientArgs {
    pub fn tls(&self) -> TlsFiles {
        TlsFiles { ca: self.mqtt_ca.clone(), cert: self.mqtt_cert.clone(), key: self.mqtt_key.clone() }
    }

    pub fn topics(&self) -> Topics {
        Topics::new(&self.topic_prefix)
    }
}
