//! The funnel as DataFusion physical plan nodes of our own over the events scan:
//!
//! ```text
//! FunnelMergeExec                    counters of every partition -> numbers per group
//!   CoalescePartitionsExec
//!     FunnelFoldExec                 per partition of users: rows (spilling), fold
//!       ... scan of the campaign's step events (pruned, projected)
//! ```
//!
//! Every user's rows must reach one fold partition. In one process the fold reads each
//! scan batch in every partition, which keeps the rows of its share of users (nothing
//! is copied); with input hash-partitioned by user_id (a `RepartitionExec`, the shape a
//! distributed engine cuts into stages) each partition keeps all it gets.
//!
//! Each node shows in `EXPLAIN`, reserves what it holds in the query memory pool (the
//! fold spills its rows past its share; see [`super::fold`]) and stops when its stream
//! is dropped. The fold's output is plain counters per (group, trend bucket, step) with
//! the durations a median needs, so the merge does not care where the folds ran.

use std::collections::HashMap;
use std::fmt;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, LazyLock, Mutex};

use arrow::array::builder::{Float64Builder, Int64Builder, StringBuilder};
use arrow::array::{
    Array, ArrayRef, AsArray, Int64Array, ListArray, RecordBatch, UInt32Array, UInt32Builder,
    UInt64Array, UInt64Builder,
};
use arrow::buffer::{NullBuffer, OffsetBuffer};
use arrow::datatypes::{
    DataType, Field, FieldRef, Float64Type, Int64Type, Schema, SchemaRef, UInt32Type, UInt64Type,
};
use datafusion::common::runtime::SpawnedTask;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::execution::memory_pool::MemoryConsumer;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::expressions::Column;
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::metrics::{ExecutionPlanMetricsSet, MetricBuilder, MetricsSet};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    ChildrenPropertiesMode, DisplayAs, DisplayFormatType, Distribution, ExecutionPlan,
    ExecutionPlanProperties, Partitioning, PlanProperties, ReplaceChildrenOptions,
};
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt, TryStreamExt};
use tokio::sync::mpsc;

use super::chain::ChainParams;
use super::engine::StepStats;
use super::fold::{
    CollectMetrics, Folded, Partial, RowCollector, Share, StepMatcher, Tally, user_keys,
};
use super::spec::FunnelSpec;

/// What both nodes compute: the funnel question, its time and, for a trend, the bucket
/// width in µs.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct FunnelQuery {
    pub spec: FunnelSpec,
    pub params: ChainParams,
    pub interval: Option<i64>,
}

impl FunnelQuery {
    /// `spec` as of `as_of` (UTC µs), a trend when `interval` (µs) is set.
    pub fn new(spec: &FunnelSpec, as_of: i64, interval: Option<i64>) -> Self {
        Self {
            spec: spec.clone(),
            params: ChainParams {
                steps: spec.steps.len(),
                window: spec.window_secs.saturating_mul(super::engine::MICROS),
                from: spec.from,
                to: spec.to,
                as_of: Some(as_of),
            },
            interval,
        }
    }
}

impl fmt::Display for FunnelQuery {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let steps: Vec<&str> = self.spec.steps.iter().map(|s| s.event.as_str()).collect();
        write!(
            f,
            "campaign={}, steps=[{}], window={}s",
            self.spec.campaign,
            steps.join(", "),
            self.spec.window_secs
        )?;
        if let Some(b) = &self.spec.breakdown {
            write!(f, ", breakdown={}", b.name())?;
        }
        if let Some(i) = self.interval {
            write!(f, ", interval={}s", i / 1_000_000)?;
        }
        Ok(())
    }
}

/// Fold output: users per (group, trend bucket, step), the open chains and the µs from
/// step 1 to that step of every user who reached it (null for a trend).
fn counters_schema() -> SchemaRef {
    static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
        Arc::new(Schema::new(vec![
            Field::new("group", DataType::Utf8, false),
            Field::new("bucket", DataType::Int64, true),
            Field::new("step", DataType::UInt32, false),
            Field::new("users", DataType::UInt64, false),
            Field::new("pending", DataType::UInt64, false),
            Field::new("durations", DataType::List(duration_field()), true),
        ]))
    });
    Arc::clone(&SCHEMA)
}

/// The item of the durations list.
fn duration_field() -> FieldRef {
    Arc::new(Field::new("item", DataType::Int64, true))
}

/// Merge output: the numbers per breakdown value (null: the total) and trend bucket
/// and step; also the columns of SQL's `funnel(...)`.
pub fn funnel_schema() -> SchemaRef {
    static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
        Arc::new(Schema::new(vec![
            Field::new("value", DataType::Utf8, true),
            Field::new("bucket", DataType::Int64, true),
            Field::new("step", DataType::UInt32, false),
            Field::new("users", DataType::UInt64, false),
            Field::new("pending", DataType::UInt64, false),
            Field::new("median_seconds", DataType::Float64, true),
        ]))
    });
    Arc::clone(&SCHEMA)
}

fn bounded(schema: SchemaRef, partitioning: Partitioning) -> Arc<PlanProperties> {
    Arc::new(PlanProperties::new(
        EquivalenceProperties::new(schema),
        partitioning,
        EmissionType::Final,
        Boundedness::Bounded,
    ))
}

/// Per partition of users: collect the rows, fold them per user, emit the counters.
pub struct FunnelFoldExec {
    input: Arc<dyn ExecutionPlan>,
    query: Arc<FunnelQuery>,
    matcher: Arc<StepMatcher>,
    exchange: Exchange,
    properties: Arc<PlanProperties>,
    metrics: ExecutionPlanMetricsSet,
}

/// How the rows of a user reach one partition of the fold.
enum Exchange {
    /// The input is hash-partitioned by user_id.
    ByUser,
    /// In one process: every input batch goes to each of `partitions`, which keeps the
    /// rows of its share of users. (A `RepartitionExec` copies and buffers every row:
    /// at 10M events 0.3 GB more RSS and often twice the time.)
    Broadcast {
        partitions: usize,
        started: Mutex<Option<Broadcast>>,
    },
}

/// A scan batch and the key of each row's user (hashed once for all partitions).
type KeyedBatch = (RecordBatch, Option<Arc<[u128]>>);

/// The running broadcast: a channel per fold partition fed by a task per input
/// partition; the tasks stop when every fold partition's stream is dropped.
struct Broadcast {
    receivers: Vec<Option<mpsc::Receiver<DfResult<KeyedBatch>>>>,
    /// Given up once every partition has its stream, so only streams hold the tasks.
    senders: Option<Arc<Vec<SpawnedTask<()>>>>,
}

impl FunnelFoldExec {
    /// Over `input` hash-partitioned by user_id (or in one partition), with the
    /// columns of [`super::engine::scan_frame`]; other input would split users.
    pub fn by_user(input: Arc<dyn ExecutionPlan>, query: Arc<FunnelQuery>) -> DfResult<Self> {
        let by_user = match input.output_partitioning() {
            Partitioning::Hash(exprs, _) => {
                matches!(exprs.as_slice(), [e] if e.downcast_ref::<Column>().is_some_and(|c| c.name() == "user_id"))
            }
            p => p.partition_count() == 1,
        };
        if !by_user {
            return Err(DataFusionError::Plan(format!(
                "FunnelFoldExec needs its input partitioned by user_id, not {}",
                input.output_partitioning()
            )));
        }
        let partitions = input.output_partitioning().partition_count();
        Ok(Self::new(input, query, Exchange::ByUser, partitions))
    }

    /// What it folds, and whether it must run in one process (a broadcast exchange).
    pub fn query(&self) -> (&Arc<FunnelQuery>, bool) {
        let broadcast = matches!(self.exchange, Exchange::Broadcast { .. });
        (&self.query, broadcast)
    }

    /// Over `input` partitioned any way, folding in `partitions` partitions of users;
    /// its partitions must all run at once in this process (as `CoalescePartitionsExec`
    /// runs them): the input moves at the pace of the slowest.
    pub fn broadcast(
        input: Arc<dyn ExecutionPlan>,
        query: Arc<FunnelQuery>,
        partitions: usize,
    ) -> Self {
        let exchange = Exchange::Broadcast {
            partitions,
            started: Mutex::new(None),
        };
        Self::new(input, query, exchange, partitions)
    }

    fn new(
        input: Arc<dyn ExecutionPlan>,
        query: Arc<FunnelQuery>,
        exchange: Exchange,
        partitions: usize,
    ) -> Self {
        Self {
            matcher: Arc::new(StepMatcher::new(&query.spec)),
            properties: bounded(
                counters_schema(),
                Partitioning::UnknownPartitioning(partitions),
            ),
            input,
            query,
            exchange,
            metrics: ExecutionPlanMetricsSet::new(),
        }
    }

    /// The batches partition `partition` folds, and the share of users it keeps.
    fn input_of(
        &self,
        partition: usize,
        context: &Arc<TaskContext>,
    ) -> DfResult<(BoxStream<'static, DfResult<KeyedBatch>>, Share)> {
        let (partitions, started) = match &self.exchange {
            Exchange::ByUser => {
                let input = self.input.execute(partition, Arc::clone(context))?;
                return Ok((input.map_ok(|b| (b, None)).boxed(), Share::ALL));
            }
            Exchange::Broadcast {
                partitions,
                started,
            } => (*partitions, started),
        };
        let mut started = started.lock().unwrap_or_else(|e| e.into_inner());
        if started.is_none() {
            *started = Some(self.start_broadcast(partitions, context)?);
        }
        let broadcast = started.as_mut().expect("started above");
        let receiver = broadcast
            .receivers
            .get_mut(partition)
            .and_then(Option::take)
            .ok_or_else(|| {
                DataFusionError::Internal(format!(
                    "FunnelFoldExec partition {partition} executed twice or out of range"
                ))
            })?;
        // Each stream holds the sending tasks: the last one dropped stops them.
        let senders = broadcast.senders.clone();
        if broadcast.receivers.iter().all(Option::is_none) {
            broadcast.senders = None;
        }
        let stream = futures::stream::unfold((receiver, senders), |(mut rx, senders)| async {
            rx.recv().await.map(|batch| (batch, (rx, senders)))
        });
        Ok((
            stream.boxed(),
            Share {
                part: partition,
                of: partitions,
            },
        ))
    }

    fn start_broadcast(
        &self,
        partitions: usize,
        context: &Arc<TaskContext>,
    ) -> DfResult<Broadcast> {
        let (senders, receivers): (Vec<_>, Vec<_>) =
            (0..partitions).map(|_| mpsc::channel(2)).unzip();
        let inputs = self.input.output_partitioning().partition_count();
        let mut tasks = Vec::with_capacity(inputs);
        for i in 0..inputs {
            let mut input = self.input.execute(i, Arc::clone(context))?;
            let senders = senders.clone();
            tasks.push(SpawnedTask::spawn(async move {
                let feed = async {
                    while let Some(batch) = input.next().await {
                        let batch = batch?;
                        let keys: Arc<[u128]> = user_keys(&batch)?.into();
                        for tx in &senders {
                            // A partition that stopped early (an error) is skipped.
                            let _ = tx.send(Ok((batch.clone(), Some(Arc::clone(&keys))))).await;
                        }
                    }
                    Ok::<_, DataFusionError>(())
                };
                // An error or a panic reaches every partition: a partition whose channel
                // just closed would take a lost scan for the end of the data.
                let failed = match AssertUnwindSafe(feed).catch_unwind().await {
                    Ok(Ok(())) => return,
                    Ok(Err(e)) => e,
                    Err(panic) => DataFusionError::Internal(format!(
                        "funnel scan task panicked: {}",
                        panic
                            .downcast_ref::<String>()
                            .map(String::as_str)
                            .or_else(|| panic.downcast_ref::<&str>().copied())
                            .unwrap_or("?")
                    )),
                };
                let failed = Arc::new(failed);
                for tx in &senders {
                    let _ = tx
                        .send(Err(DataFusionError::Shared(Arc::clone(&failed))))
                        .await;
                }
            }));
        }
        Ok(Broadcast {
            receivers: receivers.into_iter().map(Some).collect(),
            senders: Some(Arc::new(tasks)),
        })
    }
}

impl fmt::Debug for FunnelFoldExec {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "FunnelFoldExec({})", self.query)
    }
}

impl DisplayAs for FunnelFoldExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        let exchange = match self.exchange {
            Exchange::ByUser => "input partitioned by user_id",
            Exchange::Broadcast { .. } => "each partition keeps its share of users",
        };
        write!(f, "FunnelFoldExec: {}, {exchange}", self.query)
    }
}

impl ExecutionPlan for FunnelFoldExec {
    fn name(&self) -> &str {
        "FunnelFoldExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn benefits_from_input_partitioning(&self) -> Vec<bool> {
        // A broadcast spreads its input over its partitions itself.
        vec![matches!(self.exchange, Exchange::ByUser)]
    }

    fn required_input_distribution(&self) -> Vec<Distribution> {
        if let Exchange::Broadcast { .. } = self.exchange {
            return vec![Distribution::UnspecifiedDistribution];
        }
        let user = self
            .input
            .schema()
            .index_of("user_id")
            .map(|i| Arc::new(Column::new("user_id", i)) as Arc<dyn PhysicalExpr>);
        match user {
            Ok(user) => vec![Distribution::KeyPartitioned(vec![user])],
            Err(_) => vec![Distribution::UnspecifiedDistribution],
        }
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> DfResult<TreeNodeRecursion>,
    ) -> DfResult<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn replace_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
        _options: ReplaceChildrenOptions,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let input = children.swap_remove(0);
        let query = Arc::clone(&self.query);
        Ok(Arc::new(match self.exchange {
            // Not checked here: an optimizer (DataFusion's EnsureRequirements) may pass
            // through an input without the repartition before it puts one back where
            // `required_input_distribution` asks for it.
            Exchange::ByUser => {
                let partitions = input.output_partitioning().partition_count();
                Self::new(input, query, Exchange::ByUser, partitions)
            }
            Exchange::Broadcast { partitions, .. } => Self::broadcast(input, query, partitions),
        }))
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        self.replace_children(
            children,
            ReplaceChildrenOptions::new(ChildrenPropertiesMode::Recompute),
        )
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> DfResult<SendableRecordBatchStream> {
        let (mut input, share) = self.input_of(partition, &context)?;
        let reservation = MemoryConsumer::new(format!("FunnelFoldExec[{partition}]"))
            .with_can_spill(true)
            .register(context.memory_pool());
        let metric = || MetricBuilder::new(&self.metrics);
        let metrics = CollectMetrics {
            elapsed_compute: metric().elapsed_compute(partition),
            rows: metric().counter("rows", partition),
            spills: metric().spill_count(partition),
            spilled_rows: metric().spilled_rows(partition),
            spilled_bytes: metric().spilled_bytes(partition),
        };
        let mut collector = RowCollector::new(
            Arc::clone(&self.matcher),
            share,
            reservation,
            Arc::clone(&context.runtime_env().disk_manager),
            metrics,
        );
        let query = Arc::clone(&self.query);
        let fold = async move {
            while let Some(batch) = input.next().await {
                let (batch, keys) = batch?;
                collector.add_batch(&batch, keys.as_deref())?;
            }
            let folded = collector.fold(query.params, query.interval)?;
            let batches = counters_batches(folded, query.interval.is_some())?;
            Ok::<_, DataFusionError>(futures::stream::iter(batches.into_iter().map(Ok)))
        };
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            counters_schema(),
            futures::stream::once(fold).try_flatten(),
        )))
    }

    fn metrics(&self) -> Option<MetricsSet> {
        Some(self.metrics.clone_inner())
    }
}

/// The counters of one fold as one batch of [`counters_schema`]. Each tally's durations
/// are freed as soon as they are copied into the batch.
fn counters_batches(folded: Folded, trend: bool) -> DfResult<Vec<RecordBatch>> {
    let Folded {
        group_names,
        has_breakdown,
        tally,
    } = folded;
    let mut out = CounterRows::default();
    if trend {
        for ((bucket, g), counts) in &tally.buckets {
            for (step, &users) in counts.iter().enumerate() {
                out.push(
                    &group_names[*g as usize],
                    Some(*bucket),
                    step,
                    users,
                    0,
                    None,
                );
            }
        }
        return Ok(vec![out.finish()?]);
    }
    let tallies: Vec<(&str, Tally)> = if has_breakdown {
        (tally.groups.into_iter().enumerate())
            .filter_map(|(g, t)| Some((group_names[g].as_str(), t?)))
            .collect()
    } else if tally.total.counts.first().is_some_and(|&n| n > 0) {
        vec![("", tally.total)]
    } else {
        Vec::new()
    };
    let held = tallies.iter().flat_map(|(_, t)| &t.durations).map(Vec::len);
    out.durations.reserve_exact(held.sum());
    for (group, t) in tallies {
        let mut durations = t.durations.into_iter();
        for step in 0..t.counts.len() {
            let d = durations.next().unwrap_or_default();
            out.push(group, None, step, t.counts[step], t.pending[step], Some(d));
        }
    }
    Ok(vec![out.finish()?])
}

#[derive(Default)]
struct CounterRows {
    group: StringBuilder,
    bucket: Int64Builder,
    step: UInt32Builder,
    users: UInt64Builder,
    pending: UInt64Builder,
    /// Every row's durations back to back, and each row's count (None: not tracked).
    durations: Vec<i64>,
    lengths: Vec<Option<usize>>,
}

impl CounterRows {
    fn push(
        &mut self,
        group: &str,
        bucket: Option<i64>,
        step: usize,
        users: u64,
        pending: u64,
        durations: Option<Vec<i64>>,
    ) {
        self.group.append_value(group);
        self.bucket.append_option(bucket);
        self.step.append_value(step as u32);
        self.users.append_value(users);
        self.pending.append_value(pending);
        self.lengths.push(durations.as_ref().map(Vec::len));
        if let Some(d) = durations {
            self.durations.extend_from_slice(&d);
        }
    }

    fn finish(mut self) -> DfResult<RecordBatch> {
        let offsets = OffsetBuffer::from_lengths(self.lengths.iter().map(|l| l.unwrap_or(0)));
        let valid: NullBuffer = self.lengths.iter().map(Option::is_some).collect();
        let durations = ListArray::try_new(
            duration_field(),
            offsets,
            Arc::new(Int64Array::from(self.durations)),
            Some(valid),
        )?;
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.group.finish()),
            Arc::new(self.bucket.finish()),
            Arc::new(self.step.finish()),
            Arc::new(self.users.finish()),
            Arc::new(self.pending.finish()),
            Arc::new(durations),
        ];
        Ok(RecordBatch::try_new(counters_schema(), columns)?)
    }
}

/// Merge the counters of every fold into the numbers per group, the total and medians.
pub struct FunnelMergeExec {
    input: Arc<dyn ExecutionPlan>,
    query: Arc<FunnelQuery>,
    properties: Arc<PlanProperties>,
    metrics: ExecutionPlanMetricsSet,
}

impl FunnelMergeExec {
    /// `input` is the [`FunnelFoldExec`] (coalesced to one partition).
    pub fn new(input: Arc<dyn ExecutionPlan>, query: Arc<FunnelQuery>) -> Self {
        Self {
            input,
            query,
            properties: bounded(funnel_schema(), Partitioning::UnknownPartitioning(1)),
            metrics: ExecutionPlanMetricsSet::new(),
        }
    }

    pub fn query(&self) -> &Arc<FunnelQuery> {
        &self.query
    }
}

impl fmt::Debug for FunnelMergeExec {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "FunnelMergeExec({})", self.query)
    }
}

impl DisplayAs for FunnelMergeExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "FunnelMergeExec: steps={}", self.query.params.steps)
    }
}

impl ExecutionPlan for FunnelMergeExec {
    fn name(&self) -> &str {
        "FunnelMergeExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn required_input_distribution(&self) -> Vec<Distribution> {
        vec![Distribution::SinglePartition]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> DfResult<TreeNodeRecursion>,
    ) -> DfResult<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn replace_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
        _options: ReplaceChildrenOptions,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        Ok(Arc::new(Self::new(
            children.swap_remove(0),
            Arc::clone(&self.query),
        )))
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        self.replace_children(
            children,
            ReplaceChildrenOptions::new(ChildrenPropertiesMode::Recompute),
        )
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> DfResult<SendableRecordBatchStream> {
        if partition != 0 {
            return Err(DataFusionError::Internal(format!(
                "FunnelMergeExec has one partition, not {partition}"
            )));
        }
        let input = self.input.execute(0, Arc::clone(&context))?;
        // Durations are held once, per group, until the medians are taken; they cannot
        // spill.
        let reservation = MemoryConsumer::new("FunnelMergeExec").register(context.memory_pool());
        let query = Arc::clone(&self.query);
        let elapsed = MetricBuilder::new(&self.metrics).elapsed_compute(0);
        let output_rows = MetricBuilder::new(&self.metrics).output_rows(0);
        let merge = async move {
            let k = query.params.steps;
            let medians = query.interval.is_none();
            let mut total = Tally::new(k, false);
            let mut groups: HashMap<(String, Option<i64>), Tally> = HashMap::new();
            // Reserved once every fold is done and has let go of its rows; each batch's
            // durations are copied into the tallies and the batch is dropped.
            let batches: Vec<RecordBatch> = input.try_collect().await?;
            let durations_of = |b: &RecordBatch| {
                let list = b.column(5).as_list::<i32>();
                list.values().as_primitive::<Int64Type>().values().clone()
            };
            let held = batches.iter().map(|b| durations_of(b).inner().len()).sum();
            reservation.try_grow(held)?;
            let _timer = elapsed.timer();
            for b in batches {
                let durations = b.column(5).as_list::<i32>();
                let all_durations = durations_of(&b);
                let offsets = durations.value_offsets();
                let group = b.column(0).as_string::<i32>();
                let bucket = b.column(1).as_primitive::<Int64Type>();
                let step = b.column(2).as_primitive::<UInt32Type>();
                let users = b.column(3).as_primitive::<UInt64Type>();
                let pending = b.column(4).as_primitive::<UInt64Type>();
                for r in 0..b.num_rows() {
                    let key = (
                        group.value(r).to_string(),
                        bucket.is_valid(r).then(|| bucket.value(r)),
                    );
                    let t = groups.entry(key).or_insert_with(|| Tally::new(k, medians));
                    let s = step.value(r) as usize;
                    let d = durations
                        .is_valid(r)
                        .then(|| &all_durations[offsets[r] as usize..offsets[r + 1] as usize]);
                    for t in [&mut *t, &mut total] {
                        t.counts[s] += users.value(r);
                        t.pending[s] += pending.value(r);
                    }
                    if let (Some(d), Some(mine)) = (d, t.durations.get_mut(s)) {
                        mine.extend_from_slice(d);
                    }
                }
            }
            let mut out = FunnelRows::default();
            if medians {
                groups.values_mut().for_each(Tally::sort_durations);
                let sorted: Vec<&Tally> = groups.values().collect();
                let total_medians = (0..k)
                    .map(|s| {
                        let steps: Vec<&[i64]> =
                            sorted.iter().map(|t| t.durations[s].as_slice()).collect();
                        median_of_sorted(&steps)
                    })
                    .collect();
                out.push(
                    None,
                    None,
                    StepStats::new(total.counts, total.pending, total_medians),
                );
            }
            for ((group, bucket), t) in groups {
                out.push(Some(&group), bucket, t.stats());
            }
            drop(reservation);
            let batch = out.finish()?;
            output_rows.add(batch.num_rows());
            Ok(batch)
        };
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            funnel_schema(),
            futures::stream::once(merge),
        )))
    }

    fn metrics(&self) -> Option<MetricsSet> {
        Some(self.metrics.clone_inner())
    }
}

/// The median (the lower middle value, in seconds) of the values of several sorted
/// runs together, found by bisecting on the value instead of merging them.
fn median_of_sorted(runs: &[&[i64]]) -> Option<f64> {
    let n: usize = runs.iter().map(|r| r.len()).sum();
    if n == 0 {
        return None;
    }
    let k = (n - 1) / 2;
    let mut lo = runs.iter().filter_map(|r| r.first()).copied().min()?;
    let mut hi = runs.iter().filter_map(|r| r.last()).copied().max()?;
    // The smallest value with more than k values at or below it.
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let at_or_below: usize = runs.iter().map(|r| r.partition_point(|&x| x <= mid)).sum();
        if at_or_below > k {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    Some(lo as f64 / 1e6)
}

#[derive(Default)]
struct FunnelRows {
    group: StringBuilder,
    bucket: Int64Builder,
    step: UInt32Builder,
    users: UInt64Builder,
    pending: UInt64Builder,
    median: Float64Builder,
}

impl FunnelRows {
    fn push(&mut self, group: Option<&str>, bucket: Option<i64>, stats: StepStats) {
        for step in 0..stats.counts.len() {
            self.group.append_option(group);
            self.bucket.append_option(bucket);
            self.step.append_value(step as u32);
            self.users.append_value(stats.counts[step]);
            self.pending.append_value(stats.pending[step]);
            self.median.append_option(stats.median_seconds[step]);
        }
    }

    fn finish(mut self) -> DfResult<RecordBatch> {
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.group.finish()),
            Arc::new(self.bucket.finish()),
            Arc::new(self.step.finish()),
            Arc::new(self.users.finish()),
            Arc::new(self.pending.finish()),
            Arc::new(self.median.finish()),
        ];
        Ok(RecordBatch::try_new(funnel_schema(), columns)?)
    }
}

/// The report numbers from the merge's rows: the total, per group and per trend bucket.
pub(super) fn partial_from_batches(batches: &[RecordBatch], spec: &FunnelSpec) -> Partial {
    let k = spec.steps.len();
    // Users, pending and median per step, made into `StepStats` once all are read.
    type PerStep = (Vec<u64>, Vec<u64>, Vec<Option<f64>>);
    let empty = || -> PerStep { (vec![0; k], vec![0; k], vec![None; k]) };
    let mut total = empty();
    let mut groups: HashMap<String, PerStep> = HashMap::new();
    let mut buckets: HashMap<(i64, String), Vec<u64>> = HashMap::new();
    for b in batches {
        let group = b.column(0).as_string::<i32>();
        let bucket = b.column(1).as_primitive::<Int64Type>();
        let step: &UInt32Array = b.column(2).as_primitive();
        let users: &UInt64Array = b.column(3).as_primitive();
        let pending: &UInt64Array = b.column(4).as_primitive();
        let median = b.column(5).as_primitive::<Float64Type>();
        for r in 0..b.num_rows() {
            let s = step.value(r) as usize;
            if bucket.is_valid(r) {
                buckets
                    .entry((bucket.value(r), group.value(r).to_string()))
                    .or_insert_with(|| vec![0; k])[s] = users.value(r);
                continue;
            }
            let stats = if group.is_null(r) {
                &mut total
            } else if spec.breakdown.is_some() {
                groups
                    .entry(group.value(r).to_string())
                    .or_insert_with(empty)
            } else {
                continue;
            };
            stats.0[s] = users.value(r);
            stats.1[s] = pending.value(r);
            stats.2[s] = median.is_valid(r).then(|| median.value(r));
        }
    }
    let finish = |(counts, pending, medians): PerStep| StepStats::new(counts, pending, medians);
    Partial {
        total: finish(total),
        groups: groups.into_iter().map(|(g, s)| (g, finish(s))).collect(),
        buckets,
    }
}
