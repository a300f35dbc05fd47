//! The funnel engine behind `/v1/funnel` and `/v1/funnel/trend`.
//!
//! DataFusion scans only the campaign's step events (pruned by campaign, event and ts,
//! projected to the few columns needed); the plan nodes of [`super::plan`] fold them
//! per user into per-group counters, from which this module derives the reports. A
//! question a [`super::live`] funnel keeps up to date is answered from it instead,
//! without a scan.

use std::collections::BTreeMap;
use std::sync::Arc;

use datafusion::catalog::Session;
use datafusion::dataframe::DataFrame;
use datafusion::datasource::{TableProvider, provider_as_source};
use datafusion::error::Result as DfResult;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::logical_expr::{Expr, LogicalPlanBuilder, col, lit};
use datafusion::physical_expr::expressions::col as physical_col;
use datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec;
use datafusion::physical_plan::display::DisplayableExecutionPlan;
use datafusion::physical_plan::repartition::RepartitionExec;
use datafusion::physical_plan::{ExecutionPlan, Partitioning, collect};
use datafusion::scalar::ScalarValue;
use funnelhouse_schemas::time::{format_micros, now_micros};
use serde::Serialize;

use super::fold::{Partial, StepMatcher};
use super::plan::{FunnelFoldExec, FunnelMergeExec, FunnelQuery, partial_from_batches};
use super::spec::{Breakdown, FunnelSpec};
use super::sql::{FunnelColumns, FunnelTable};
use crate::error::{QueryError, Result};
use crate::session::QueryEngine;
use crate::table::EventsTable;

pub(super) const MICROS: i64 = 1_000_000;
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
/// columns user_id, event_id, ts, event, [breakdown as `breakdown`], [properties]: the
/// layout [`super::fold::RowCollector`] reads.
pub(super) async fn scan_frame(
    engine: &QueryEngine,
    spec: &FunnelSpec,
    matcher: &StepMatcher,
) -> Result<DataFrame> {
    let (filter, columns) = scan_filter_and_columns(spec, matcher);
    Ok(engine
        .context()
        .table("events")
        .await?
        .filter(filter)?
        .select(columns)?)
}

/// The predicate and the columns of [`scan_frame`].
fn scan_filter_and_columns(spec: &FunnelSpec, matcher: &StepMatcher) -> (Expr, Vec<Expr>) {
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
    (filter, columns)
}

/// [`scan_frame`] as one stream per scan partition.
pub(super) async fn scan(
    engine: &QueryEngine,
    spec: &FunnelSpec,
    matcher: &StepMatcher,
) -> Result<Vec<SendableRecordBatchStream>> {
    engine
        .partitioned_streams(scan_frame(engine, spec, matcher).await?)
        .await
}

/// The physical plan of a funnel (or trend, with `interval` in µs) as of `as_of`: the
/// scan, folded in `target_partitions` partitions of users, merged (see
/// [`super::plan`]).
pub async fn funnel_plan(
    engine: &QueryEngine,
    spec: &FunnelSpec,
    as_of: i64,
    interval: Option<i64>,
    exchange: FoldExchange,
) -> Result<Arc<dyn ExecutionPlan>> {
    let ctx = engine.context();
    let events = ctx.table_provider("events").await?;
    let query = Arc::new(FunnelQuery::new(spec, as_of, interval));
    Ok(plan_in(&ctx.state(), events, query, exchange).await?)
}

/// [`funnel_plan`] over `events` as `state` plans it (also for SQL's `funnel(...)`).
pub(super) async fn plan_in(
    state: &dyn Session,
    events: Arc<dyn TableProvider>,
    query: Arc<FunnelQuery>,
    exchange: FoldExchange,
) -> DfResult<Arc<dyn ExecutionPlan>> {
    let spec = &query.spec;
    let (filter, columns) = scan_filter_and_columns(spec, &StepMatcher::new(spec));
    let scan = LogicalPlanBuilder::scan("events", provider_as_source(events), None)?
        .filter(filter)?
        .project(columns)?
        .build()?;
    let scan = state.create_physical_plan(&scan).await?;
    let partitions = state.config().target_partitions().max(1);
    let fold = match exchange {
        FoldExchange::Broadcast => FunnelFoldExec::broadcast(scan, Arc::clone(&query), partitions),
        FoldExchange::Repartition => {
            let user = physical_col("user_id", &scan.schema())?;
            let by_user =
                RepartitionExec::try_new(scan, Partitioning::Hash(vec![user], partitions))?;
            FunnelFoldExec::by_user(Arc::new(by_user), Arc::clone(&query))?
        }
    };
    let coalesced = CoalescePartitionsExec::new(Arc::new(fold));
    Ok(Arc::new(FunnelMergeExec::new(Arc::new(coalesced), query)))
}

/// How a funnel plan brings each user's rows to one fold partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FoldExchange {
    /// In one process, without copying rows: what the engine runs.
    Broadcast,
    /// Through a `RepartitionExec` by user_id: the shape a distributed engine cuts into
    /// stages (it copies every row: slower in one process).
    Repartition,
}

/// Run the funnel plan.
async fn compute(
    engine: &QueryEngine,
    spec: &FunnelSpec,
    at: &At,
    interval: Option<i64>,
) -> Result<Partial> {
    let started = std::time::Instant::now();
    let ctx = engine.context();
    let as_of = at.as_of;
    let batches = if engine.is_distributed() {
        // As a table the scheduler plans (see `crate::wire`).
        let events: Arc<dyn TableProvider> = match &at.events {
            Some(events) => Arc::clone(events) as _,
            None => ctx.table_provider("events").await?,
        };
        let table = FunnelTable {
            events,
            query: Arc::new(FunnelQuery::new(spec, as_of, interval)),
            columns: FunnelColumns::Report,
            // Not sent: the scheduler plans the table with a repartition by user.
            exchange: FoldExchange::Broadcast,
        };
        ctx.read_table(Arc::new(table))?.collect().await
    } else {
        let plan = funnel_plan(engine, spec, as_of, interval, FoldExchange::Broadcast).await?;
        collect(plan, ctx.task_ctx()).await
    }
    .map_err(QueryError::from_plan)?;
    tracing::debug!(
        campaign = %spec.campaign,
        ms = started.elapsed().as_millis() as u64,
        "funnel computed"
    );
    Ok(partial_from_batches(&batches, spec))
}

/// The funnel's plan (not the trend's) as `EXPLAIN ANALYZE` shows one: run, with each
/// node's metrics (rows, spills, time).
pub async fn explain_analyze(engine: &QueryEngine, spec: &FunnelSpec) -> Result<String> {
    if engine.is_distributed() {
        return Err(QueryError::BadRequest(
            "--explain shows the in-process plan; run it without [query] ballista".into(),
        ));
    }
    let plan = funnel_plan(engine, spec, now_micros(), None, FoldExchange::Broadcast).await?;
    collect(Arc::clone(&plan), engine.context().task_ctx())
        .await
        .map_err(QueryError::from_plan)?;
    Ok(DisplayableExecutionPlan::with_metrics(plan.as_ref())
        .indent(true)
        .to_string())
}

/// The moment a report is as of, and the `events` table pinned to it (see
/// [`QueryEngine::pin_now`]; None: the engine's).
struct At {
    as_of: i64,
    events: Option<Arc<EventsTable>>,
}

impl At {
    fn now(engine: &QueryEngine) -> At {
        let (as_of, events) = engine.pin_now();
        At {
            as_of,
            events: Some(events),
        }
    }

    fn of(as_of: i64) -> At {
        At {
            as_of,
            events: None,
        }
    }
}

/// The numbers at `at`: from a live funnel of the same question when one is ready
/// and `live` allows it, else by a scan.
async fn partial(
    engine: &QueryEngine,
    spec: &FunnelSpec,
    at: At,
    interval: Option<i64>,
    live: bool,
) -> Result<Partial> {
    let spec = spec.clone();
    // On the query runtime either way: taking in new events is query work too.
    engine
        .run(move |engine| async move {
            // A cluster reads committed files only; a live funnel also has the live buffer.
            let live = live && !engine.is_distributed();
            let kept = live.then(|| engine.live().find(&spec)).flatten();
            match kept.and_then(|f| f.partial(&engine, &spec, at.as_of, interval)) {
                Some(p) => Ok(p),
                None => compute(&engine, &spec, &at, interval).await,
            }
        })
        .await
}

/// The funnel report of the contract, as of now.
pub async fn funnel(engine: &QueryEngine, spec: &FunnelSpec) -> Result<FunnelReport> {
    funnel_report(engine, spec, At::now(engine), true).await
}

/// The funnel report as of `as_of` (which must not be before the last answer's), from a
/// live funnel when `live` allows, else recomputed from a scan.
pub async fn funnel_at(
    engine: &QueryEngine,
    spec: &FunnelSpec,
    as_of: i64,
    live: bool,
) -> Result<FunnelReport> {
    funnel_report(engine, spec, At::of(as_of), live).await
}

async fn funnel_report(
    engine: &QueryEngine,
    spec: &FunnelSpec,
    at: At,
    live: bool,
) -> Result<FunnelReport> {
    let as_of = at.as_of;
    let partial = partial(engine, spec, at, None, live).await?;
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
    trend_report(engine, spec, At::now(engine), true).await
}

/// [`trend`] as of `as_of`; `live` as in [`funnel_at`].
pub async fn trend_at(
    engine: &QueryEngine,
    spec: &FunnelSpec,
    as_of: i64,
    live: bool,
) -> Result<TrendReport> {
    trend_report(engine, spec, At::of(as_of), live).await
}

async fn trend_report(
    engine: &QueryEngine,
    spec: &FunnelSpec,
    at: At,
    live: bool,
) -> Result<TrendReport> {
    let as_of = at.as_of;
    let interval_secs = spec.interval_secs.unwrap_or(3600);
    let interval = interval_secs.saturating_mul(MICROS);
    let partial = partial(engine, spec, at, Some(interval), live).await?;
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
