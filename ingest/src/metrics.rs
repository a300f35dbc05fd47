//! Counters and gauges of the collector, rendered as Prometheus text.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Process-wide ingest metrics; cheap atomic updates on the hot path.
#[derive(Debug, Default)]
pub struct Metrics {
    pub accepted: AtomicU64,
    pub rejected: AtomicU64,
    pub duplicates: AtomicU64,
    pub segment_long_names: AtomicU64,
    pub requests_overloaded: AtomicU64,
    pub wal_fsyncs: AtomicU64,
    pub wal_fsync_micros: AtomicU64,
    pub wal_bytes: AtomicU64,
    pub flushes: AtomicU64,
    pub flush_micros: AtomicU64,
    pub flushed_rows: AtomicU64,
    pub compactions: AtomicU64,
    pub compaction_micros: AtomicU64,
    pub buffer_bytes: AtomicU64,
    /// 1 while flushes to Parquet are failing and being retried.
    pub flush_failing: AtomicU64,
    pub buffer_rows: AtomicU64,
    pub dedup_ids: AtomicU64,
    pub dedup_evicted: AtomicU64,
    pub query_count: AtomicU64,
    pub query_micros: AtomicU64,
}

impl Metrics {
    pub fn add_duration(count: &AtomicU64, micros: &AtomicU64, d: Duration) {
        count.fetch_add(1, Relaxed);
        micros.fetch_add(d.as_micros() as u64, Relaxed);
    }

    /// Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let counters = [
            (
                "funnelhouse_events_accepted_total",
                "Events accepted and made durable.",
                &self.accepted,
            ),
            (
                "funnelhouse_events_rejected_total",
                "Events rejected by validation.",
                &self.rejected,
            ),
            (
                "funnelhouse_events_duplicates_total",
                "Events dropped as duplicates.",
                &self.duplicates,
            ),
            (
                "funnelhouse_segment_long_names_dropped_total",
                "Segment track events dropped because their name is over 64 bytes.",
                &self.segment_long_names,
            ),
            (
                "funnelhouse_requests_overloaded_total",
                "Requests answered 503 for back-pressure.",
                &self.requests_overloaded,
            ),
            (
                "funnelhouse_wal_bytes_total",
                "Bytes appended to the WAL.",
                &self.wal_bytes,
            ),
            (
                "funnelhouse_flushed_rows_total",
                "Rows written to Parquet by flushes.",
                &self.flushed_rows,
            ),
            (
                "funnelhouse_dedup_evicted_total",
                "Dedup ids evicted early by dedup_max_ids.",
                &self.dedup_evicted,
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Relaxed)
            );
        }
        let gauges = [
            (
                "funnelhouse_buffer_bytes",
                "Bytes held by the live buffer.",
                &self.buffer_bytes,
            ),
            (
                "funnelhouse_buffer_rows",
                "Rows held by the live buffer.",
                &self.buffer_rows,
            ),
            (
                "funnelhouse_dedup_ids",
                "Ids in the dedup index.",
                &self.dedup_ids,
            ),
            (
                "funnelhouse_flush_failing",
                "1 while flushes to Parquet fail and are retried.",
                &self.flush_failing,
            ),
        ];
        for (name, help, v) in gauges {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {}",
                v.load(Relaxed)
            );
        }
        let summaries = [
            (
                "funnelhouse_wal_fsync_seconds",
                "WAL fsync latency.",
                &self.wal_fsyncs,
                &self.wal_fsync_micros,
            ),
            (
                "funnelhouse_flush_seconds",
                "Live buffer to Parquet flush duration.",
                &self.flushes,
                &self.flush_micros,
            ),
            (
                "funnelhouse_compaction_seconds",
                "Partition compaction duration.",
                &self.compactions,
                &self.compaction_micros,
            ),
            (
                "funnelhouse_query_seconds",
                "Query duration.",
                &self.query_count,
                &self.query_micros,
            ),
        ];
        for (name, help, count, micros) in summaries {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} summary\n{name}_sum {}\n{name}_count {}",
                micros.load(Relaxed) as f64 / 1e6,
                count.load(Relaxed)
            );
        }
        out
    }
}
