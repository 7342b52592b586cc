//! Timestamps as users read them: RFC 3339, UTC, whole seconds.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch, the form stored in the registry.
pub fn now_unix() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// `2026-11-23T10:04:11Z` for a Unix timestamp.
pub fn format_unix(secs: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

#[cfg(test)]
mod tests {
    #[test]
    fn formats_like_the_refusal_text() {
        assert_eq!(super::format_unix(1_795_428_251), "2026-11-23T10:04:11Z");
    }
}
