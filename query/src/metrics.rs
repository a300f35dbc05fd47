//! The query engine's counters, shown by `/metrics` after the collector's and the store's.

use std::sync::atomic::AtomicU64;

use funnelhouse_storage::{Exposition, MetricsSource};

#[derive(Debug, Default)]
pub struct QueryMetrics {
    pub queries: AtomicU64,
    pub query_micros: AtomicU64,
}

impl MetricsSource for QueryMetrics {
    fn render(&self, out: &mut Exposition) {
        out.summary(
            "funnelhouse_query_seconds",
            "Query duration.",
            &self.queries,
            &self.query_micros,
        );
    }
}
