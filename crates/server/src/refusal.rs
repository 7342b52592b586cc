//! Refusals: why an operator cannot reach a device, in words that reach
//! the operator's ssh client verbatim.

use burrow_core::time::format_unix;
use burrow_core::Id;
use russh::ChannelOpenFailure;

/// Why a channel was not opened. The text reaches the operator's ssh client
/// verbatim, so it names the device and the reason.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("unknown device '{0}'")]
    Unknown(String),
    /// An unknown id close to a known one (a typo, likely).
    #[error("unknown device '{id}'; did you mean '{near}'?")]
    UnknownNear { id: String, near: String },
    #[error("device '{id}' is offline ({})", last_seen_text(*.last_seen))]
    Offline { id: Id, last_seen: Option<i64> },
    #[error("device '{id}' does not expose port {port}")]
    PortNotExposed { id: Id, port: u32 },
    #[error("device '{id}' could not connect to its port {port}: {reason}")]
    DeviceRefused { id: Id, port: u32, reason: String },
    #[error("device '{id}' tunnel failed: {reason}")]
    TunnelFailed { id: Id, reason: String },
    #[error("not allowed to reach device '{0}'")]
    NotAllowed(Id),
    #[error("device '{0}' is revoked")]
    Revoked(Id),
    #[error("device '{0}' has not enrolled yet")]
    NotEnrolled(Id),
    #[error("devices may not open connections through the pivot")]
    DeviceForbidden,
    #[error("the pivot has no shell; reach a device with: ssh -J <pivot> <device-id>")]
    NoShell,
    #[error("registry unavailable; try again")]
    Registry,
    #[error("device '{id}' did not answer within {secs}s")]
    NoAnswer { id: Id, secs: u64 },
    #[error("device '{id}' could not connect to the pivot: {reason}")]
    CouldNotConnect { id: Id, reason: String },
    #[error("device '{id}' refused the wake request: {reason}")]
    WakeRefused { id: Id, reason: String },
    #[error("signaling unavailable: {0}")]
    Signaling(String),
    #[error("too many channels open on this connection (limit {0}); close some or open another connection")]
    TooManyChannels(usize),
    #[error("device '{id}' is connected to pivot '{pivot}', which this pivot cannot reach: {reason}")]
    Peer { id: Id, pivot: String, reason: String },
    /// The refusal of the pivot holding the tunnel, passed on as it is.
    #[error("{0}")]
    Relayed(String),
}

fn last_seen_text(t: Option<i64>) -> String {
    match t {
        Some(t) => format!("last seen {}", format_unix(t)),
        None => "never connected".to_string(),
    }
}

impl Refusal {
    /// A short stable name for metrics labels.
    pub fn kind(&self) -> &'static str {
        match self {
            Refusal::Unknown(_) | Refusal::UnknownNear { .. } => "unknown",
            Refusal::Offline { .. } => "offline",
            Refusal::PortNotExposed { .. } => "port_not_exposed",
            Refusal::DeviceRefused { .. } => "device_refused",
            Refusal::TunnelFailed { .. } => "tunnel_failed",
            Refusal::NotAllowed(_) => "not_allowed",
            Refusal::Revoked(_) => "revoked",
            Refusal::NotEnrolled(_) => "not_enrolled",
            Refusal::DeviceForbidden => "device_forbidden",
            Refusal::NoShell => "no_shell",
            Refusal::Registry => "registry",
            Refusal::NoAnswer { .. } => "no_answer",
            Refusal::CouldNotConnect { .. } => "could_not_connect",
            Refusal::WakeRefused { .. } => "wake_refused",
            Refusal::Signaling(_) => "signaling",
            Refusal::TooManyChannels(_) => "too_many_channels",
            Refusal::Peer { .. } => "peer_unreachable",
            Refusal::Relayed(_) => "relayed",
        }
    }

    pub fn into_failure(self) -> ChannelOpenFailure {
        let code = match self {
            Refusal::DeviceForbidden | Refusal::NoShell | Refusal::NotAllowed(_) => {
                ChannelOpenFailure::AdministrativelyProhibited.code()
            }
            Refusal::Registry | Refusal::TooManyChannels(_) => ChannelOpenFailure::ResourceShortage.code(),
            _ => ChannelOpenFailure::ConnectFailed.code(),
        };
        ChannelOpenFailure::Other { code, reason: self.to_string() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_texts_are_exact() {
        let id = Id::parse("cam-42").unwrap();
        assert_eq!(Refusal::Unknown("cam-42".into()).to_string(), "unknown device 'cam-42'");
        assert_eq!(
            Refusal::UnknownNear { id: "cam-24".into(), near: "cam-42".into() }.to_string(),
            "unknown device 'cam-24'; did you mean 'cam-42'?"
        );
        assert_eq!(
            Refusal::Offline { id: id.clone(), last_seen: Some(1_795_428_251) }.to_string(),
            "device 'cam-42' is offline (last seen 2026-11-23T10:04:11Z)"
        );
        assert_eq!(
            Refusal::Offline { id: id.clone(), last_seen: None }.to_string(),
            "device 'cam-42' is offline (never connected)"
        );
        assert_eq!(Refusal::PortNotExposed { id, port: 8080 }.to_string(), "device 'cam-42' does not expose port 8080");
    }
}

/// Edits (insert, delete, substitute, swap two neighbours) from `a` to `b`.
fn edit_distance(a: &[u8], b: &[u8]) -> usize {
    let (n, m) = (a.len(), b.len());
    let mut d = vec![vec![0usize; m + 1]; n + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=n {
        for j in 1..=m {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            d[i][j] = (d[i - 1][j] + 1).min(d[i][j - 1] + 1).min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d[i][j] = d[i][j].min(d[i - 2][j - 2] + 1);
            }
        }
    }
    d[n][m]
}

/// The known id nearest to `id` if it is a likely typo of it: one edit for
/// short ids, two for longer ones (ties go to the first in order).
pub fn nearest<'a>(id: &str, known: impl IntoIterator<Item = &'a str>) -> Option<String> {
    let limit = if id.len() <= 4 { 1 } else { 2 };
    known
        .into_iter()
        .filter(|k| *k != id)
        .map(|k| (edit_distance(id.as_bytes(), k.as_bytes()), k))
        .filter(|(d, _)| *d <= limit)
        .min()
        .map(|(_, k)| k.to_string())
}

#[cfg(test)]
mod near_tests {
    use super::nearest;

    #[test]
    fn suggests_only_close_ids() {
        let known = ["cam-42", "cam-43", "gateway-1"];
        assert_eq!(nearest("cam-24", known).as_deref(), Some("cam-42"));
        assert_eq!(nearest("gatway-1", known).as_deref(), Some("gateway-1"));
        assert_eq!(nearest("printer-9", known), None);
        assert_eq!(nearest("cam-42", ["cam-42"]), None);
    }
}
