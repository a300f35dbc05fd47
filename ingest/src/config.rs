//! The `[ingest]` and `[auth]` sections of `funnelhouse.toml`, and the units they use
//! (`"24h"`, `"8MiB"`). Every field documents its default.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

/// `[ingest]`: limits, dedup, flushing and back-pressure of the collector.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// Window on received_at in which a repeated event_id is a duplicate. Default `"24h"`.
    #[serde(deserialize_with = "de_duration")]
    pub dedup_window: Duration,
    /// Most event_id hashes kept in the dedup index (about 21 bytes each, ~2 GiB at the
    /// default); past it the oldest leave early. Default 100 000 000, at most 134 217 728.
    pub dedup_max_ids: usize,
    /// Largest request body after decompression; larger is a 413. Default `"8MiB"`.
    pub max_request_bytes: ByteSize,
    /// Largest single event (its JSON text); larger is a per-event rejection. Default `"32KiB"`.
    pub max_event_bytes: ByteSize,
    /// Reject `ts` later than received_at + this. Default `"off"`.
    #[serde(deserialize_with = "de_optional_duration")]
    pub max_future: Option<Duration>,
    /// Parquet partitioning by event ts: `"day"` (default) or `"hour"`.
    pub partition: Partitioning,
    /// Flush the live buffer to Parquet once it holds this much. Default `"128MiB"`.
    pub flush_bytes: ByteSize,
    /// ... or once its oldest event has waited this long. Default `"60s"`.
    #[serde(deserialize_with = "de_duration")]
    pub flush_interval: Duration,
    /// Memory for the live buffer plus requests in flight; past it the collector answers
    /// 503 with Retry-After instead of growing. Default `"1GiB"`.
    pub max_buffer_bytes: ByteSize,
    /// Compact a partition once it has this many small files. Default 8.
    pub compact_min_files: usize,
    /// Files smaller than this are "small" and get merged. Default `"128MiB"`.
    pub compact_small_bytes: ByteSize,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            dedup_window: Duration::from_secs(24 * 3600),
            dedup_max_ids: 100_000_000,
            max_request_bytes: ByteSize(8 << 20),
            max_event_bytes: ByteSize(32 << 10),
            max_future: None,
            partition: Partitioning::Day,
            flush_bytes: ByteSize(128 << 20),
            flush_interval: Duration::from_secs(60),
            max_buffer_bytes: ByteSize(1 << 30),
            compact_min_files: 8,
            compact_small_bytes: ByteSize(128 << 20),
        }
    }
}

impl IngestConfig {
    /// Start-up checks; the error names the key.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("ingest.max_request_bytes", self.max_request_bytes.0),
            ("ingest.max_event_bytes", self.max_event_bytes.0),
            ("ingest.flush_bytes", self.flush_bytes.0),
            ("ingest.max_buffer_bytes", self.max_buffer_bytes.0),
            ("ingest.dedup_max_ids", self.dedup_max_ids),
        ];
        if let Some((key, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{key}: must be greater than 0"));
        }
        if self.flush_interval.is_zero() {
            return Err("ingest.flush_interval: must be greater than 0".into());
        }
        if self.dedup_max_ids > crate::dedup::MAX_IDS {
            return Err(format!(
                "ingest.dedup_max_ids: at most {} (the index addresses that many ids)",
                crate::dedup::MAX_IDS
            ));
        }
        if self.compact_min_files < 2 {
            return Err("ingest.compact_min_files: must be at least 2".into());
        }
        if self.max_buffer_bytes.0 < self.max_request_bytes.0 * 2 {
            return Err(
                "ingest.max_buffer_bytes: must be at least twice ingest.max_request_bytes".into(),
            );
        }
        Ok(())
    }
}

/// `[auth]`: write keys for ingest and read tokens for queries. Empty lists: no auth.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Keys accepted on the ingest endpoints; required exactly when non-empty. Default none.
    pub write_keys: Vec<String>,
    /// Tokens accepted by the query endpoints and the Postgres wire. Default none.
    pub read_tokens: Vec<String>,
    /// Allow a non-loopback `http_addr` with neither keys nor tokens. Default false.
    pub open: bool,
}

impl AuthConfig {
    /// Whether an ingest request with this key (if any) may write.
    pub fn accepts_write_key(&self, key: Option<&str>) -> bool {
        self.write_keys.is_empty() || key.is_some_and(|k| contains_secret(&self.write_keys, k))
    }
}

/// Whether `candidate` is one of `secrets`, in time that does not depend on where the
/// bytes differ (so response timing does not reveal a key byte by byte).
pub fn contains_secret(secrets: &[String], candidate: &str) -> bool {
    secrets.iter().fold(false, |found, secret| {
        found | constant_time_eq(secret.as_bytes(), candidate.as_bytes())
    })
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// `[http]`: connection limits, and what browsers on other origins may do.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// A request's headers must arrive within this, else the connection is closed.
    /// Default `"10s"`.
    #[serde(deserialize_with = "de_duration")]
    pub header_timeout: Duration,
    /// A request's body must arrive within this, else 408 and the connection closes.
    /// Default `"60s"`.
    #[serde(deserialize_with = "de_duration")]
    pub request_timeout: Duration,
    /// Connections served at once; more wait in the listen backlog. Default 10 000.
    pub max_connections: usize,
    /// Origins whose pages may post to the ingest routes (CORS); `"*"` is any. Default `["*"]`.
    pub cors_origins: Vec<String>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(60),
            max_connections: 10_000,
            cors_origins: vec!["*".into()],
        }
    }
}

impl HttpConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.header_timeout.is_zero() || self.request_timeout.is_zero() {
            return Err("http.header_timeout and http.request_timeout must be above 0".into());
        }
        if self.max_connections == 0 {
            return Err("http.max_connections must be at least 1".into());
        }
        for origin in &self.cors_origins {
            if origin != "*" && axum::http::HeaderValue::from_str(origin).is_err() {
                return Err(format!(
                    "http.cors_origins: {origin:?} is not a valid origin"
                ));
            }
        }
        Ok(())
    }
}

/// How Parquet files are partitioned by event ts (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Partitioning {
    /// `events/date=YYYY-MM-DD/`
    #[default]
    Day,
    /// `events/date=YYYY-MM-DD/hour=HH/`
    Hour,
}

/// A byte count written as `"8MiB"`, `"32KiB"`, `"1GiB"`, `"512"` or an integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub usize);

impl ByteSize {
    pub fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: usize = num
            .parse()
            .map_err(|_| format!("{text:?} is not a size like \"8MiB\""))?;
        let mult = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" | "kib" => 1 << 10,
            "m" | "mb" | "mib" => 1 << 20,
            "g" | "gb" | "gib" => 1 << 30,
            _ => return Err(format!("{text:?}: unknown unit (use B, KiB, MiB or GiB)")),
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("{text:?} is too large"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} bytes", self.0)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(usize),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(ByteSize(n)),
            Raw::Text(t) => ByteSize::parse(&t).map_err(serde::de::Error::custom),
        }
    }
}

/// Parse `"500ms"`, `"30s"`, `"30m"`, `"24h"`, `"7d"` or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like \"24h\""))?;
    let secs = match unit.trim() {
        "ms" => return Ok(Duration::from_millis(n)),
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("{text:?}: unknown unit (use ms, s, m, h or d)")),
    };
    n.checked_mul(secs)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{text:?} is too long"))
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawDuration {
    Secs(u64),
    Text(String),
}

pub fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    match RawDuration::deserialize(d)? {
        RawDuration::Secs(s) => Ok(Duration::from_secs(s)),
        RawDuration::Text(t) => parse_duration(&t).map_err(serde::de::Error::custom),
    }
}

/// Like [`de_duration`], with `"off"` meaning `None`.
pub fn de_optional_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    match RawDuration::deserialize(d)? {
        RawDuration::Text(t) if t.trim() == "off" => Ok(None),
        RawDuration::Secs(s) => Ok(Some(Duration::from_secs(s))),
        RawDuration::Text(t) => parse_duration(&t)
            .map(Some)
            .map_err(serde::de::Error::custom),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_parse() {
        assert_eq!(ByteSize::parse("8MiB").unwrap().0, 8 << 20);
        assert_eq!(ByteSize::parse("32KiB").unwrap().0, 32 << 10);
        assert_eq!(ByteSize::parse("100").unwrap().0, 100);
        assert!(ByteSize::parse("8 parsecs").is_err());
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86400));
        assert_eq!(
            parse_duration("7d").unwrap(),
            Duration::from_secs(7 * 86400)
        );
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn more_ids_than_the_index_addresses_are_refused_by_name() {
        let mut cfg = IngestConfig::default();
        assert_eq!(cfg.validate(), Ok(()));
        cfg.dedup_max_ids = crate::dedup::MAX_IDS + 1;
        let err = cfg.validate().unwrap_err();
        assert!(
            err.starts_with("ingest.dedup_max_ids: at most 134217728"),
            "{err}"
        );
    }
}
