//! The store's counters and gauges, and the Prometheus text format every crate renders
//! its own metrics in (`/metrics` concatenates them).

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Metrics of one part of the server that `/metrics` shows.
pub trait MetricsSource: Send + Sync {
    fn render(&self, out: &mut Exposition);
}

/// Prometheus text exposition, written one metric at a time.
#[derive(Debug, Default)]
pub struct Exposition(String);

impl Exposition {
    pub fn counter(&mut self, name: &str, help: &str, value: &AtomicU64) {
        let _ = writeln!(
            self.0,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
            value.load(Relaxed)
        );
    }

    pub fn gauge(&mut self, name: &str, help: &str, value: &AtomicU64) {
        let _ = writeln!(
            self.0,
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {}",
            value.load(Relaxed)
        );
    }

    /// A duration summary from a count and a sum of microseconds.
    pub fn summary(&mut self, name: &str, help: &str, count: &AtomicU64, micros: &AtomicU64) {
        let _ = writeln!(
            self.0,
            "# HELP {name} {help}\n# TYPE {name} summary\n{name}_sum {}\n{name}_count {}",
            micros.load(Relaxed) as f64 / 1e6,
            count.load(Relaxed)
        );
    }

    pub fn into_text(self) -> String {
        self.0
    }
}

/// Adds one timed operation to a count and a sum of microseconds.
pub fn add_duration(count: &AtomicU64, micros: &AtomicU64, d: Duration) {
    count.fetch_add(1, Relaxed);
    micros.fetch_add(d.as_micros() as u64, Relaxed);
}

/// The store's metrics; cheap atomic updates on the hot path.
#[derive(Debug, Default)]
pub struct StoreMetrics {
    pub accepted: AtomicU64,
    pub duplicates: AtomicU64,
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
}

impl MetricsSource for StoreMetrics {
    fn render(&self, out: &mut Exposition) {
        out.counter(
            "funnelhouse_events_accepted_total",
            "Events accepted and made durable.",
            &self.accepted,
        );
        out.counter(
            "funnelhouse_events_duplicates_total",
            "Events dropped as duplicates.",
            &self.duplicates,
        );
        out.counter(
            "funnelhouse_requests_overloaded_total",
            "Requests answered 503 for back-pressure.",
            &self.requests_overloaded,
        );
        out.counter(
            "funnelhouse_wal_bytes_total",
            "Bytes appended to the WAL.",
            &self.wal_bytes,
        );
        out.counter(
            "funnelhouse_flushed_rows_total",
            "Rows written to Parquet by flushes.",
            &self.flushed_rows,
        );
        out.counter(
            "funnelhouse_dedup_evicted_total",
            "Dedup ids evicted early by dedup_max_ids.",
            &self.dedup_evicted,
        );
        out.gauge(
            "funnelhouse_buffer_bytes",
            "Bytes held by the live buffer.",
            &self.buffer_bytes,
        );
        out.gauge(
            "funnelhouse_buffer_rows",
            "Rows held by the live buffer.",
            &self.buffer_rows,
        );
        out.gauge(
            "funnelhouse_dedup_ids",
            "Ids in the dedup index.",
            &self.dedup_ids,
        );
        out.gauge(
            "funnelhouse_flush_failing",
            "1 while flushes to Parquet fail and are retried.",
            &self.flush_failing,
        );
        out.summary(
            "funnelhouse_wal_fsync_seconds",
            "WAL fsync latency.",
            &self.wal_fsyncs,
            &self.wal_fsync_micros,
        );
        out.summary(
            "funnelhouse_flush_seconds",
            "Live buffer to Parquet flush duration.",
            &self.flushes,
            &self.flush_micros,
        );
        out.summary(
            "funnelhouse_compaction_seconds",
            "Partition compaction duration.",
            &self.compactions,
            &self.compaction_micros,
        );
    }
}
