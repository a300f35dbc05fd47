//! The collector's own counters (the store counts what it stores).

use std::sync::atomic::AtomicU64;

use funnelhouse_storage::{Exposition, MetricsSource};

#[derive(Debug, Default)]
pub struct CollectorMetrics {
    pub rejected: AtomicU64,
    pub segment_long_names: AtomicU64,
}

impl MetricsSource for CollectorMetrics {
    fn render(&self, out: &mut Exposition) {
        out.counter(
            "funnelhouse_events_rejected_total",
            "Events rejected by validation.",
            &self.rejected,
        );
        out.counter(
            "funnelhouse_segment_long_names_dropped_total",
            "Segment track events dropped because their name is over 64 bytes.",
            &self.segment_long_names,
        );
    }
}
