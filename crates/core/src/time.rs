//! Timestamps as users read them (RFC 3339, UTC, whole seconds) and the
//! durations they type (`30s`, `10m`, `24h`, `90days`).
//!
//! Timestamps are Unix seconds in an `i64`. Some arrive from devices and
//! requests, so every function here takes any `i64` or `Duration` without
//! panicking or overflowing: [`format_unix`] clamps into the years
//! 1970-9999, and [`expires_at`] refuses what it cannot represent.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::text::excerpt;

/// `9999-12-31T23:59:59Z`, the latest time burrow stores or prints.
pub const MAX_UNIX: i64 = 253_402_300_799;

/// The longest duration [`parse_duration`] accepts: 100 years of 365.25 days.
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 31_557_600);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TimeError {
    #[error("'{}' is not a duration ({reason}); write e.g. 30s, 10m, 24h or 90days", excerpt(input, 40))]
    Syntax { input: String, reason: String },
    #[error("duration '{}' is zero; give a positive duration such as 30s", excerpt(.0, 40))]
    Zero(String),
    #[error("duration '{}' is longer than the limit of 100 years", excerpt(.0, 40))]
    TooLong(String),
    #[error("{ttl_secs} s after {} is past {}, the latest time burrow handles; use a shorter duration", format_unix(*now), format_unix(MAX_UNIX))]
    PastMax { now: i64, ttl_secs: u64 },
}

/// Seconds since the Unix epoch, the form stored in the registry.
pub fn now_unix() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// `2026-11-23T10:04:11Z` for a Unix timestamp. Times before 1970 print as
/// 1970-01-01T00:00:00Z and times after 9999 as 9999-12-31T23:59:59Z.
pub fn format_unix(secs: i64) -> String {
    let secs = secs.clamp(0, MAX_UNIX) as u64;
    match UNIX_EPOCH.checked_add(Duration::from_secs(secs)) {
        Some(t) => humantime::format_rfc3339_seconds(t).to_string(),
        // Only where SystemTime ends in 2038 (32-bit Linux).
        None => "9999-12-31T23:59:59Z".to_string(),
    }
}

/// `now + ttl`, refused when it would pass [`MAX_UNIX`]. A fraction of a
/// second counts as a whole one, so a nonzero `ttl` never expires at `now`.
pub fn expires_at(now: i64, ttl: Duration) -> Result<i64, TimeError> {
    let secs = ttl.as_secs().saturating_add(u64::from(ttl.subsec_nanos() > 0));
    i64::try_from(secs)
        .ok()
        .and_then(|s| now.checked_add(s))
        .filter(|t| *t <= MAX_UNIX)
        .ok_or(TimeError::PastMax { now, ttl_secs: secs })
}

/// A positive duration of at most [`MAX_DURATION`], in humantime syntax
/// (`30s`, `10m`, `24h`, `90days`, `1h 30m`).
pub fn parse_duration(s: &str) -> Result<Duration, TimeError> {
    let d = humantime::parse_duration(s.trim()).map_err(|e| match e {
        humantime::DurationError::NumberOverflow => TimeError::TooLong(s.to_string()),
        e => TimeError::Syntax { input: s.to_string(), reason: e.to_string() },
    })?;
    if d.is_zero() {
        return Err(TimeError::Zero(s.to_string()));
    }
    if d > MAX_DURATION {
        return Err(TimeError::TooLong(s.to_string()));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_like_the_refusal_text() {
        assert_eq!(format_unix(1_795_428_251), "2026-11-23T10:04:11Z");
    }

    #[test]
    fn formats_any_timestamp() {
        assert_eq!(format_unix(MAX_UNIX), "9999-12-31T23:59:59Z");
        assert_eq!(format_unix(MAX_UNIX + 1), "9999-12-31T23:59:59Z");
        assert_eq!(format_unix(i64::MAX), "9999-12-31T23:59:59Z");
        assert_eq!(format_unix(-1), "1970-01-01T00:00:00Z");
        assert_eq!(format_unix(i64::MIN), "1970-01-01T00:00:00Z");
    }

    #[test]
    fn expiry_stays_representable() {
        assert_eq!(expires_at(1000, Duration::from_secs(30)), Ok(1030));
        assert_eq!(expires_at(1000, Duration::from_millis(1)), Ok(1001));
        assert_eq!(expires_at(MAX_UNIX - 1, Duration::from_secs(1)), Ok(MAX_UNIX));
        assert!(expires_at(MAX_UNIX, Duration::from_secs(1)).is_err());
        assert!(expires_at(i64::MAX, Duration::from_secs(1)).is_err());
        assert!(expires_at(0, Duration::MAX).is_err());
        assert!(expires_at(0, Duration::from_secs(u64::MAX)).is_err());
    }

    #[test]
    fn parses_durations_within_limits() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration(" 24h "), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("90days"), Ok(Duration::from_secs(90 * 86_400)));
        assert_eq!(parse_duration("100years"), Ok(MAX_DURATION));
        assert_eq!(parse_duration("0s"), Err(TimeError::Zero("0s".into())));
        assert_eq!(parse_duration("101years"), Err(TimeError::TooLong("101years".into())));
        assert_eq!(parse_duration("99999999999999999999h"), Err(TimeError::TooLong("99999999999999999999h".into())));
        assert!(matches!(parse_duration("soon"), Err(TimeError::Syntax { .. })));
        assert!(matches!(parse_duration(""), Err(TimeError::Syntax { .. })));
        let msg = parse_duration("101years").unwrap_err().to_string();
        assert!(msg.contains("101years") && msg.contains("100 years"), "{msg}");
    }
}
