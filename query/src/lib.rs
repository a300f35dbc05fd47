//! Funnelhouse's query layer. This crate owns reading: the DataFusion session with the
//! `events` table (committed Parquet files unioned with the live buffer from one
//! snapshot), the `window_funnel` aggregate, the funnel engine (counts, conversion,
//! pending, medians, breakdowns, trends), named campaign funnels with targets and alerts,
//! SQL output formats, the query endpoints, the read-only Postgres wire protocol, and
//! the wire form of its tables and plan nodes for a distributed engine.

pub mod alerts;
pub mod campaign;
pub mod dashboard;
pub mod error;
pub mod funnel;
pub mod http;
pub mod limits;
pub mod metrics;
pub mod output;
pub mod pgwire;
pub mod session;
pub mod table;
pub mod udaf;
pub mod wire;

pub use alerts::Alerts;
pub use campaign::CampaignConfig;
pub use error::QueryError;
pub use funnel::{FunnelReport, FunnelRequest, FunnelSpec, LiveFunnels, TrendReport};
pub use http::{QueryState, router};
pub use metrics::QueryMetrics;
pub use output::OutputFormat;
pub use pgwire::serve_pg;
pub use session::{Distribute, QueryEngine, QueryOptions, QueryResult, RenderedResult};
pub use table::{EventsTable, SnapshotSource, StaticSource};
pub use udaf::WindowFunnel;
