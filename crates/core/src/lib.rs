//! Types every part of burrow shares, with no async runtime, database or SSH stack.
//!
//! # Layout
//! - [`id`]: device and operator names, validated once at the edge.
//! - [`keys`]: public keys, fingerprints and host-key pins.
//! - [`expose`]: the `PORT=HOST:PORT` mapping of tunnel ports to device services.
//! - [`mqtt_url`]: broker URLs and TLS files.
//! - [`signal`]: MQTT topics, signed wake requests, presence and status messages.
//! - [`time`]: the timestamp format used in refusals and listings.

pub mod expose;
pub mod id;
pub mod keys;
pub mod mqtt_url;
pub mod signal;
pub mod time;

pub use expose::{Expose, ExposeError};
pub use id::{Id, IdError};
pub use keys::{fingerprint, HostKeyPin, KeyError};
