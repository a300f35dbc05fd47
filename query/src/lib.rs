//! Funnelhouse's query layer. This crate owns reading: the DataFusion session with the
//! `events` table (committed Parquet files unioned with the live buffer from one
//! snapshot), the `window_funnel` aggregate, the funnel engine (counts, conversion,
//! pending, medians, breakdowns, trends), SQL output formats, and the query endpoints.

pub mod error;
pub mod funnel;
pub mod http;
pub mod output;
pub mod session;
pub mod table;
pub mod udaf;

pub use error::QueryError;
pub use funnel::{FunnelReport, FunnelRequest, FunnelSpec, TrendReport};
pub use http::{QueryState, router};
pub use output::OutputFormat;
pub use session::{QueryEngine, QueryOptions, QueryResult};
pub use table::{EventsTable, SnapshotSource, StaticSource};
pub use udaf::WindowFunnel;
