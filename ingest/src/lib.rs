//! Funnelhouse's collector and storage write path. This crate owns everything between
//! an HTTP request and a committed Parquet file: the axum collector (`/v1/events`, the
//! Segment-compatible routes, scan links, `/sdk.js`, health, metrics) and the HTTP
//! server loop with its limits, the WAL with group commit, the dedup index, the live
//! buffer that queries read together with the committed files, the Parquet writer,
//! compaction, and the `manifest.json` that commits flushes and compactions.

pub mod buffer;
pub mod collector;
pub mod compact;
pub mod config;
pub mod dedup;
pub mod disk;
pub mod error;
pub mod fsutil;
pub mod manifest;
pub mod metrics;
pub mod parquet_file;
pub mod scan;
pub mod server;
pub mod store;
pub mod wal;

pub use buffer::{LiveBuffer, Snapshot};
pub use collector::{CollectorState, IngestResponse, SegmentResponse, router};
pub use config::{AuthConfig, ByteSize, HttpConfig, IngestConfig, Partitioning};
pub use disk::{Disk, FaultDisk, OsDisk};
pub use error::IngestError;
pub use manifest::{FileMeta, Manifest};
pub use metrics::Metrics;
pub use store::{EventStore, OpenReport, WriteOutcome, compact_data_dir};
