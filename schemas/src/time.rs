//! Timestamps as the contract accepts them: RFC 3339 text (any offset) or integer epoch ms.

use chrono::DateTime;

/// Microseconds since the Unix epoch, UTC.
pub type Micros = i64;

/// Parse an RFC 3339 timestamp with any offset into UTC microseconds.
pub fn parse_rfc3339(text: &str) -> Option<Micros> {
    let dt = DateTime::parse_from_rfc3339(text).ok()?;
    Some(dt.timestamp_micros())
}

/// Epoch milliseconds to microseconds, refusing values that would overflow.
pub fn epoch_ms_to_micros(ms: i64) -> Option<Micros> {
    ms.checked_mul(1000)
}

/// Format UTC microseconds as RFC 3339 with microseconds and `Z`.
pub fn format_micros(us: Micros) -> String {
    match DateTime::from_timestamp_micros(us) {
        Some(dt) => dt.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string(),
        None => us.to_string(),
    }
}

/// The current time in UTC microseconds.
pub fn now_micros() -> Micros {
    chrono::Utc::now().timestamp_micros()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_are_normalised_to_utc() {
        let a = parse_rfc3339("2026-11-11T10:00:00.123Z").unwrap();
        let b = parse_rfc3339("2026-11-11T18:00:00.123+08:00").unwrap();
        assert_eq!(a, b);
        assert_eq!(format_micros(a), "2026-11-11T10:00:00.123000Z");
        assert_eq!(parse_rfc3339("2026-11-11 10:00"), None);
    }
}
