//! The funnel engine behind `/v1/funnel` and `/v1/funnel/trend`.
//!
//! DataFusion scans only the campaign's step events (pruned by campaign, event and ts,
//! projected to the few columns needed); each scan partition collects compact rows,
//! and [`fold`] folds them per user into per-group counters, from which this module
//! derives the reports. A question a [`super::live`] funnel keeps up to date is
//! answered from it instead, without a scan.

use std::collections::BTreeMap;
use std::sync::Arc;

use datafusion::execution::SendableRecordBatchStream;
use datafusion::logical_expr::{col, lit};
use datafusion::scalar::ScalarValue;
use funnelhouse_schemas::time::{format_micros, now_micros};
use futures::StreamExt;
use serde::Serialize;

use super::chain::ChainParams;
use super::fold::{self, Partial, RowCollector, StepMatcher};
use super::spec::{Breakdown, FunnelSpec};
use crate::error::{QueryError, Result};
use crate::session::QueryEngine;

const MICROS: i64 = 1_000_000;
/// Most trend buckets one request may ask for.
const MAX_BUCKETS: i64 = 100_000;

/// Per-step numbers of the total or of one group.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepStats {
    pub counts: Vec<u64>,
    pub conversion: Vec<f64>,
    pub step_conversion: Vec<f64>,
    pub pending: Vec<u64>,
    pub median_seconds: Vec<Option<f64>>,
}

impl StepStats {
    /// The numbers of the contract from users per level, pending and medians.
    pub(super) fn new(
        counts: Vec<u64>,
        pending: Vec<u64>,
        median_seconds: Vec<Option<f64>>,
    ) -> Self {
        let c = &counts;
        let rate = |n: u64, d: u64| if d == 0 { 0.0 } else { n as f64 / d as f64 };
        let conversion = c.iter().map(|&n| rate(n, c[0])).collect();
        let step_conversion = (0..c.len())
            .map(|i| if i == 0 { 1.0 } else { rate(c[i], c[i - 1]) })
            .collect();
        Self {
            counts,
            conversion,
            step_conversion,
            pending,
            median_seconds,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GroupStats {
    pub value: String,
    #[serde(flatten)]
    pub stats: StepStats,
}

/// What every funnel answer starts with: the question and the time it reflects.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReportHeader {
    pub campaign: String,
    pub steps: Vec<String>,
    pub window_seconds: i64,
    pub from: Option<String>,
    pub to: Option<String>,
    /// Every event acknowledged before this server time is included.
    pub as_of: String,
}

impl ReportHeader {
    fn new(spec: &FunnelSpec, as_of: i64) -> Self {
        Self {
            campaign: spec.campaign.clone(),
            steps: spec.steps.iter().map(|s| s.event.clone()).collect(),
            window_seconds: spec.window_secs,
            from: spec.from.map(format_micros),
            to: spec.to.map(format_micros),
            as_of: format_micros(as_of),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FunnelReport {
    #[serde(flatten)]
    pub header: ReportHeader,
    pub total: StepStats,
    pub breakdown: Option<String>,
    pub groups: Vec<GroupStats>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrendBucket {
    pub start: String,
    pub counts: Vec<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub groups: Option<Vec<TrendGroup>>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrendGroup {
    pub value: String,
    pub counts: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrendReport {
    #[serde(flatten)]
    pub header: ReportHeader,
    pub interval_seconds: i64,
    pub breakdown: Option<String>,
    pub buckets: Vec<TrendBucket>,
}

/// The scan of a funnel: the campaign's step events (pruned by campaign, event and ts),
/// one stream per partition of columns user_id, event_id, ts, event, [breakdown as
/// `breakdown`], [properties]: the layout [`RowCollector`] reads.
pub(super) async fn scan(
    engine: &QueryEngine,
    spec: &FunnelSpec,
    matcher: &StepMatcher,
) -> Result<Vec<SendableRecordBatchStream>> {
    let window = spec.window_secs.saturating_mul(MICROS);
    let names: Vec<_> = {
        let mut n: Vec<&str> = spec.steps.iter().map(|s| s.event.as_str()).collect();
        n.sort_unstable();
        n.dedup();
        n.into_iter().map(lit).collect()
    };
    let ts_lit = |us: i64| {
        lit(ScalarValue::TimestampMicrosecond(
            Some(us),
            Some("UTC".into()),
        ))
    };
    let mut filter = col("campaign")
        .eq(lit(spec.campaign.as_str()))
        .and(col("event").in_list(names, false));
    if let Some(from) = spec.from {
        filter = filter.and(col("ts").gt_eq(ts_lit(from)));
    }
    if let Some(to) = spec.to {
        filter = filter.and(col("ts").lt_eq(ts_lit(to.saturating_add(window))));
    }
    let mut columns = vec![col("user_id"), col("event_id"), col("ts"), col("event")];
    if let Some(Breakdown::Column(c)) = &spec.breakdown {
        // Aliased: `breakdown=event` would otherwise name `event` twice in the projection.
        columns.push(col(c.as_str()).alias("breakdown"));
    }
    if matcher.needs_properties() {
        columns.push(col("properties"));
    }
    let df = engine
        .context()
        .table("events")
        .await?
        .filter(filter)?
        .select(columns)?;
    engine.partitioned_streams(df).await
}

/// Scan, collect rows per scan partition, fold.
async fn compute(
    engine: &QueryEngine,
    spec: &FunnelSpec,
    as_of: i64,
    interval: Option<i64>,
) -> Result<Partial> {
    let matcher = Arc::new(StepMatcher::new(spec));
    let tasks = engine.context().state().config().target_partitions().max(1);
    let started = std::time::Instant::now();
    let streams = scan(engine, spec, &matcher).await?;
    let params = ChainParams {
        steps: spec.steps.len(),
        window: spec.window_secs.saturating_mul(MICROS),
        from: spec.from,
        to: spec.to,
        as_of: Some(as_of),
    };
    // A JoinSet aborts its tasks when dropped: a funnel past the timeout, or whose
    // client went away, stops scanning instead of running on detached.
    let mut collecting = tokio::task::JoinSet::new();
    for (part, mut stream) in streams.into_iter().enumerate() {
        let mut collector = RowCollector::new(
            Arc::clone(&matcher),
            part,
            engine.reservation("funnel rows"),
        );
        collecting.spawn(async move {
            while let Some(batch) = stream.next().await {
                collector.add_batch(&batch?)?;
            }
            Ok::<_, QueryError>((part, collector))
        });
    }
    let mut collectors = Vec::with_capacity(collecting.len());
    while let Some(done) = collecting.join_next().await {
        collectors.push(done.map_err(fold::task_failed)??);
    }
    // The fold addresses rows by partition number.
    collectors.sort_by_key(|(part, _)| *part);
    let collectors = collectors.into_iter().map(|(_, c)| c).collect();
    let scanned = started.elapsed();
    let partial = fold::fold_all(&matcher, collectors, params, interval, tasks).await?;
    tracing::debug!(
        campaign = %spec.campaign,
        scan_ms = scanned.as_millis() as u64,
        fold_ms = (started.elapsed() - scanned).as_millis() as u64,
        "funnel computed"
    );
    Ok(partial)
}

/// The numbers at `as_of`: from a live funnel of the same question when one is ready
/// and `live` allows it, else by a scan.
async fn partial(
    engine: &QueryEngine,
    spec: &FunnelSpec,
    as_of: i64,
    interval: Option<i64>,
    live: bool,
) -> Result<Partial> {
    let spec = spec.clone();
    // On the query runtime either way: taking in new events is query work too.
    engine
        .run(move |engine| async move {
            let kept = live.then(|| engine.live().find(&spec)).flatten();
            match kept.and_then(|f| f.partial(&engine, &spec, as_of, interval)) {
                Some(p) => Ok(p),
                None => compute(&engine, &spec, as_of, interval).await,
            }
        })
        .await
}

/// The funnel report of the contract, as of now.
pub async fn funnel(engine: &QueryEngine, spec: &FunnelSpec) -> Result<FunnelReport> {
    funnel_at(engine, spec, now_micros(), true).await
}

/// The funnel report as of `as_of` (which must not be before the last answer's), from a
/// live funnel when `live` allows, else recomputed from a scan.
pub async fn funnel_at(
    engine: &QueryEngine,
    spec: &FunnelSpec,
    as_of: i64,
    live: bool,
) -> Result<FunnelReport> {
    let partial = partial(engine, spec, as_of, None, live).await?;
    let mut groups: Vec<GroupStats> = partial
        .groups
        .into_iter()
        .map(|(value, t)| GroupStats { value, stats: t })
        .collect();
    groups.sort_by(|a, b| {
        b.stats.counts[0]
            .cmp(&a.stats.counts[0])
            .then_with(|| a.value.cmp(&b.value))
    });
    Ok(FunnelReport {
        header: ReportHeader::new(spec, as_of),
        total: partial.total,
        breakdown: spec.breakdown.as_ref().map(Breakdown::name),
        groups,
    })
}

/// Counts per time bucket of the attributing first step, as of now.
pub async fn trend(engine: &QueryEngine, spec: &FunnelSpec) -> Result<TrendReport> {
    trend_at(engine, spec, now_micros(), true).await
}

/// [`trend`] as of `as_of`; `live` as in [`funnel_at`].
pub async fn trend_at(
    engine: &QueryEngine,
    spec: &FunnelSpec,
    as_of: i64,
    live: bool,
) -> Result<TrendReport> {
    let interval_secs = spec.interval_secs.unwrap_or(3600);
    let interval = interval_secs.saturating_mul(MICROS);
    let partial = partial(engine, spec, as_of, Some(interval), live).await?;
    let k = spec.steps.len();
    let align = |t: i64| t - t.rem_euclid(interval);
    let starts: Vec<i64> = partial.buckets.keys().map(|(b, _)| *b).collect();
    let first = spec
        .from
        .map(align)
        .or_else(|| starts.iter().copied().min());
    let last = match spec.to {
        Some(to) => Some(align(to - 1)),
        None => starts.iter().copied().max(),
    };
    let mut by_bucket: BTreeMap<i64, Vec<(String, Vec<u64>)>> = BTreeMap::new();
    for ((b, value), counts) in partial.buckets {
        by_bucket.entry(b).or_default().push((value, counts));
    }
    let mut buckets = Vec::new();
    if let (Some(first), Some(last)) = (first, last) {
        if (last - first) / interval > MAX_BUCKETS {
            return Err(QueryError::BadRequest(format!(
                "interval: more than {MAX_BUCKETS} buckets; use a wider interval"
            )));
        }
        let mut b = first;
        while b <= last {
            let mut entries = by_bucket.remove(&b).unwrap_or_default();
            let mut counts = vec![0; k];
            for (_, c) in &entries {
                counts.iter_mut().zip(c).for_each(|(a, x)| *a += x);
            }
            let groups = spec.breakdown.as_ref().map(|_| {
                entries.sort_by(|a, b| b.1[0].cmp(&a.1[0]).then_with(|| a.0.cmp(&b.0)));
                entries
                    .drain(..)
                    .map(|(value, counts)| TrendGroup { value, counts })
                    .collect()
            });
            buckets.push(TrendBucket {
                start: format_micros(b),
                counts,
                groups,
            });
            b += interval;
        }
    }
    Ok(TrendReport {
        header: ReportHeader::new(spec, as_of),
        interval_seconds: interval_secs,
        breakdown: spec.breakdown.as_ref().map(Breakdown::name),
        buckets,
    })
}
