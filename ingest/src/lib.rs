//! Funnelhouse's collector: the HTTP way in. This crate owns the axum routes that take
//! events (`/v1/events`, the Segment-compatible routes, scan links), `/sdk.js`, health and
//! `/metrics`, and the HTTP server loop with the `[http]` limits. Handlers decode and
//! validate with the schemas crate, write through the storage crate's `EventStore`, and
//! map errors to HTTP in one place ([`IngestError`]).

pub mod collector;
pub mod config;
pub mod error;
pub mod metrics;
pub mod scan;
pub mod server;

pub use collector::{CollectorState, IngestResponse, SegmentResponse, router};
pub use config::HttpConfig;
pub use error::IngestError;
pub use metrics::CollectorMetrics;
