//! The `[ingest]` section of `funnelhouse.toml`: dedup, flushing, back-pressure and
//! compaction of the store, and the collector's request limits. Every field documents its
//! default.

use std::time::Duration;

use funnelhouse_schemas::units::{ByteSize, de_duration, de_optional_duration};
use serde::{Deserialize, Serialize};

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

/// `[storage]`: Parquet on S3-compatible object storage shared by several collectors.
/// Credentials come from the environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`),
/// never from the file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// `"s3://bucket/prefix"`. Default: absent, files stay in `<data_dir>/events` only.
    pub url: Option<String>,
    /// The S3 endpoint, e.g. `"http://127.0.0.1:9000"`. Default: AWS.
    pub endpoint: Option<String>,
    /// Default `"us-east-1"`.
    pub region: Option<String>,
    /// Allow plain-HTTP endpoints (on-premises, tests). Default false.
    pub allow_http: bool,
}

impl StorageConfig {
    /// Start-up checks; the error names the key.
    pub fn validate(&self) -> Result<(), String> {
        if self.url.is_some() {
            self.bucket_and_prefix().map_err(|e| e.to_string())?;
        }
        if let Some(endpoint) = &self.endpoint {
            let plain = endpoint.starts_with("http://");
            if !plain && !endpoint.starts_with("https://") {
                return Err(format!(
                    "storage.endpoint: {endpoint:?} is not an http:// or https:// URL"
                ));
            }
            if plain && !self.allow_http {
                return Err(format!(
                    "storage.endpoint: {endpoint:?} is plain HTTP; set storage.allow_http = true to use it"
                ));
            }
        }
        Ok(())
    }

    /// The bucket and the key prefix (without slashes at its ends) of `url`.
    pub fn bucket_and_prefix(&self) -> crate::error::Result<(&str, &str)> {
        let url = self.url.as_deref().unwrap_or_default();
        let bad = |why: &str| {
            crate::error::StorageError::Config(format!(
                "storage.url: {url:?} {why} (write it as \"s3://bucket/prefix\")"
            ))
        };
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| bad("is not an s3:// URL"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(bad("names no bucket"));
        }
        let prefix = prefix.trim_matches('/');
        // Object keys are compared as written: a segment that object storage paths would
        // drop (empty) or escape would make a node miss its own objects.
        let plain = |c: char| c.is_ascii_alphanumeric() || "._=-".contains(c);
        if !prefix.is_empty()
            && prefix
                .split('/')
                .any(|s| s.is_empty() || !s.chars().all(plain))
        {
            return Err(bad(
                "has a prefix with an empty segment or characters other than letters, digits and ._=-",
            ));
        }
        Ok((bucket, prefix))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_storage_url_is_a_bucket_and_a_prefix() {
        let cfg = |url: &str| StorageConfig {
            url: Some(url.into()),
            ..Default::default()
        };
        assert_eq!(
            cfg("s3://events/funnelhouse/prod/")
                .bucket_and_prefix()
                .unwrap(),
            ("events", "funnelhouse/prod")
        );
        assert_eq!(
            cfg("s3://events").bucket_and_prefix().unwrap(),
            ("events", "")
        );
        for odd in ["s3://events/a//b", "s3://events/~t", "s3://events/a b"] {
            let err = cfg(odd).validate().unwrap_err();
            assert!(err.contains("has a prefix with an empty segment"), "{err}");
        }
        let err = cfg("gs://events").validate().unwrap_err();
        assert!(
            err.starts_with("storage.url: \"gs://events\" is not an s3:// URL"),
            "{err}"
        );
        let plain = StorageConfig {
            endpoint: Some("http://127.0.0.1:9000".into()),
            ..cfg("s3://b")
        };
        assert!(plain.validate().unwrap_err().contains("storage.allow_http"));
        assert_eq!(
            StorageConfig {
                allow_http: true,
                ..plain
            }
            .validate(),
            Ok(())
        );
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
