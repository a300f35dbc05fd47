//! Timestamps as the contract accepts them: RFC 3339 text (any offset) or integer epoch ms.

use chrono::DateTime;

/// Microseconds since the Unix epoch, UTC.
pub type Micros = i64;

/// Parse an RFC 3339 timestamp with any offset into UTC microseconds.
pub fn parse_rfc3339(text: &str) -> Option<Micros> {
    if let Some(us) = parse_common_rfc3339(text.as_bytes()) {
        return Some(us);
    }
    let dt = DateTime::parse_from_rfc3339(text).ok()?;
    Some(dt.timestamp_micros())
}

/// The layout SDKs send, `YYYY-MM-DDTHH:MM:SS[.f{1,9}](Z|+HH:MM|-HH:MM)`, parsed
/// without chrono (it is on the ingest hot path). Anything else (lowercase `t`, a
/// leap second, an odd digit count) returns None and goes to chrono, so the two
/// always agree.
fn parse_common_rfc3339(b: &[u8]) -> Option<Micros> {
    fn num(b: &[u8]) -> Option<i64> {
        b.iter().try_fold(0i64, |n, &d| {
            d.is_ascii_digit().then(|| n * 10 + i64::from(d - b'0'))
        })
    }
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let (year, month, day) = (num(&b[0..4])?, num(&b[5..7])?, num(&b[8..10])?);
    let (hour, minute, second) = (num(&b[11..13])?, num(&b[14..16])?, num(&b[17..19])?);
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let month_days = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if !(1..=12).contains(&month)
        || day < 1
        || day > month_days[month as usize - 1]
        || hour > 23
        || minute > 59
        || second > 59
    {
        return None;
    }
    let mut rest = &b[19..];
    let mut nanos = 0;
    if rest.first() == Some(&b'.') {
        let digits = rest[1..].iter().take_while(|d| d.is_ascii_digit()).count();
        if !(1..=9).contains(&digits) {
            return None;
        }
        nanos = num(&rest[1..1 + digits])? * 10i64.pow(9 - digits as u32);
        rest = &rest[1 + digits..];
    }
    let offset_secs = match rest {
        [b'Z'] => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let (h, m) = (num(&[*h1, *h2])?, num(&[*m1, *m2])?);
            if h > 23 || m > 59 {
                return None;
            }
            let secs = h * 3600 + m * 60;
            if *sign == b'-' { -secs } else { secs }
        }
        _ => return None,
    };
    // Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset_secs;
    Some(secs * 1_000_000 + nanos / 1000)
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

    #[test]
    fn the_fast_path_agrees_with_chrono() {
        let chrono = |t: &str| {
            DateTime::parse_from_rfc3339(t)
                .ok()
                .map(|d| d.timestamp_micros())
        };
        let mut cases = vec![
            "1970-01-01T00:00:00Z".to_string(),
            "1969-12-31T23:59:59.999999Z".to_string(),
            "2000-02-29T12:00:00+14:00".to_string(),
            "1900-02-29T00:00:00Z".to_string(),
            "2026-13-01T00:00:00Z".to_string(),
            "2026-04-31T00:00:00Z".to_string(),
            "2026-11-11T24:00:00Z".to_string(),
            "2026-11-11T10:00:00.1234567891Z".to_string(),
            "2026-11-11T10:00:00.Z".to_string(),
            "2026-11-11T10:00:00+08:60".to_string(),
            "2026-11-11T10:00:00+0800".to_string(),
            "0001-01-01T00:00:00Z".to_string(),
            "9999-12-31T23:59:59.999999999-23:59".to_string(),
        ];
        // A walk over years, months, days, times, fractions and offsets.
        let mut x: u64 = 1;
        for _ in 0..20_000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let r = |n: u64, shift: u32| (x >> shift) % n;
            let frac = match r(4, 60) {
                0 => String::new(),
                1 => format!(".{:03}", r(1000, 10)),
                2 => format!(".{:06}", r(1_000_000, 12)),
                _ => format!(".{:09}", r(1_000_000_000, 14)),
            };
            let offset = match r(3, 58) {
                0 => "Z".to_string(),
                1 => format!("+{:02}:{:02}", r(24, 20), r(60, 26)),
                _ => format!("-{:02}:{:02}", r(24, 32), r(60, 38)),
            };
            cases.push(format!(
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}{frac}{offset}",
                1900 + r(300, 0),
                1 + r(12, 8),
                1 + r(31, 16),
                r(24, 24),
                r(60, 30),
                r(60, 36),
            ));
        }
        for t in &cases {
            assert_eq!(parse_rfc3339(t), chrono(t), "{t}");
        }
    }
}
