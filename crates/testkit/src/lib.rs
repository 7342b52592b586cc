//! Test kit: real processes for integration tests.
//!
//! - [`Sshd`]: a real `/usr/sbin/sshd` as a device's target, in its own temp dir.
//! - [`TestPivot`]: `burrow server` on `127.0.0.1:0`, with its registry.
//! - [`TestAgent`]: `burrow agent` for one device.
//! - [`Operator`]: an OpenSSH client setup (key, ssh_config, known_hosts) that
//!   reaches devices through the pivot with strict host-key checking.
//! - [`wait_until`]: poll a condition with a deadline instead of sleeping.
//!
//! Every guard kills its process on drop and prints the process's log when
//! the test is failing, so a red test shows what the servers saw.

//! One module per component: [`process`], [`sshd`], [`pivot`], [`agent`],
//! [`operator`], [`mosquitto`] and [`postgres`]; everything is re-exported here.

pub mod agent;
pub mod mosquitto;
pub mod operator;
pub mod pivot;
pub mod postgres;
pub mod process;
pub mod sshd;

pub use agent::*;
pub use mosquitto::*;
pub use operator::*;
pub use pivot::*;
pub use postgres::*;
pub use process::*;
pub use sshd::*;
