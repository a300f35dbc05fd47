//! Funnelhouse's storage engine: everything between a batch of validated events and a
//! committed Parquet file, behind a small API. Writers call [`EventStore::write`] (WAL
//! group commit with fsync, dedup, then the live buffer) and get an acknowledgement only
//! once the events are durable; readers take a [`Snapshot`] (the committed files of the
//! manifest plus the live buffer's batches, consistent with each other) from a running
//! store or, without one, from a data dir as it is on disk. Flushes to zstd Parquet,
//! compaction, the `manifest.json` that commits both, replay after a crash and the data
//! dir lock happen inside. With `[storage] url` the committed files are also published
//! to S3-compatible object storage shared with other collectors, whose files every
//! snapshot then includes.

pub mod buffer;
pub mod compact;
pub mod config;
pub mod dedup;
pub mod disk;
pub mod error;
pub mod fsutil;
mod gather;
pub mod manifest;
pub mod metrics;
pub mod parquet_file;
pub mod shared;
pub mod store;
pub mod wal;

pub use buffer::{LiveBuffer, Snapshot};
pub use config::{IngestConfig, Partitioning, StorageConfig};
pub use disk::{Disk, FaultDisk, OsDisk};
pub use error::StorageError;
pub use manifest::{FileMeta, Manifest};
pub use metrics::{Exposition, MetricsSource, StoreMetrics};
pub use shared::{SharedReader, SharedStore};
pub use store::{EventStore, OpenReport, WriteOutcome, compact_data_dir};
