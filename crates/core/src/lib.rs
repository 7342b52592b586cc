//! Types every part of burrow shares, with no async runtime, database or SSH stack.
//!
//! # Layout
//! - [`id`]: device and operator names, validated once at the edge.
//! - [`keys`]: public keys, fingerprints and host-key pins.
//! - [`agent_file`]: the agent config file.
//! - [`enroll`]: one-time enrollment tokens.
//! - [`expose`]: the `PORT=HOST:PORT` mapping of tunnel ports to device services.
//! - [`mqtt_url`]: broker URLs and TLS files.
//! - [`rpc`]: the admin protocol over SSH, label selectors.
//! - [`signal`]: MQTT topics, signed wake requests, presence and status messages.
//! - [`time`]: the timestamp format used in refusals and listings.

pub mod agent_file;
pub mod enroll;
pub mod expose;
pub mod id;
pub mod keys;
pub mod mqtt_url;
pub mod rpc;
pub mod signal;
pub mod time;

pub use expose::{Expose, ExposeError};
pub use id::{Id, IdError};
pub use keys::{fingerprint, HostKeyPin, KeyError};
