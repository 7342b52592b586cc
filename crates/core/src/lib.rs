//! Types every part of burrow shares, with no async runtime, database or SSH stack.
//!
//! # Layout
//! - [`id`]: device and operator names (one DNS label), validated once at the edge.
//! - [`label`]: device labels `k=v`, checked wherever they enter.
//! - [`keys`]: public keys, fingerprints and host-key pins.
//! - [`agent_file`]: the agent config file.
//! - [`atomic`]: whole-file writes that no planted symlink can redirect.
//! - [`cert`]: operator certificates: principals and what a device trusts.
//! - [`enroll`]: one-time enrollment tokens.
//! - [`expose`]: the `PORT=HOST:PORT` mapping of tunnel ports to device services.
//! - [`mqtt_url`]: broker URLs and TLS files.
//! - [`rpc`]: the admin protocol over SSH, label selectors.
//! - [`signal`]: MQTT topics, signed wake requests, presence and status messages.
//! - [`text`]: untrusted text made safe for logs and terminals.
//! - [`time`]: the timestamp format used in refusals and listings, durations and expiries.
//!
//! Every parser here takes untrusted input without panicking;
//! `tests/parsers.rs` holds the property tests that keep it so.

pub mod agent_file;
pub mod atomic;
pub mod cert;
pub mod enroll;
pub mod expose;
mod host;
pub mod id;
pub mod keys;
pub mod label;
pub mod mqtt_url;
pub mod rpc;
pub mod signal;
pub mod text;
pub mod time;

pub use expose::{Expose, ExposeError};
pub use id::{Id, IdError};
pub use keys::{fingerprint, HostKeyPin, KeyError};
pub use label::LabelError;
