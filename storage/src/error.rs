//! The one error type of the storage crate. It knows the HTTP status each failure
//! means (so the collector and the query endpoints map it the same way), but not how a
//! response is written.

use std::path::PathBuf;

use http::StatusCode;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error(
        "the live buffer is at max_buffer_bytes while Parquet flushes catch up; retry after {retry_after_secs} s"
    )]
    Overloaded { retry_after_secs: u64 },
    #[error("shutting down: not accepting writes")]
    ShuttingDown,
    #[error("WAL write failed, nothing of this request was stored: {0}")]
    Wal(std::io::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parquet: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
    #[error("arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    #[error(
        "data dir in use (pid {pid}): {data_dir} is locked by another funnelhouse process; stop it, or use another --data-dir"
    )]
    Locked { data_dir: PathBuf, pid: String },
    #[error("{0}")]
    Config(String),
    #[error("object storage: {0}")]
    Remote(String),
    #[error("{path}: corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

pub type Result<T, E = StorageError> = std::result::Result<T, E>;

impl StorageError {
    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> StorageError {
        let path = path.into();
        move |source| StorageError::Io { path, source }
    }

    /// Refusals the client should retry (503) as against failures of ours (500).
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Overloaded { .. } | Self::ShuttingDown | Self::Wal(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::Io { .. }
            | Self::Remote(_)
            | Self::Config(_)
            | Self::Locked { .. }
            | Self::Parquet(_)
            | Self::Arrow(_)
            | Self::Corrupt { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Seconds to send as Retry-After, for the refusals that have one.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            Self::Overloaded { retry_after_secs } => Some(*retry_after_secs),
            Self::ShuttingDown | Self::Wal(_) => Some(1),
            _ => None,
        }
    }
}
