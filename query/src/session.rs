//! The DataFusion session: the `events` table and `window_funnel` registered, a memory
//! pool that spills instead of failing, a timeout, and read-only SQL.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use bytes::Bytes;
use datafusion::datasource::TableProvider;
use datafusion::execution::memory_pool::{FairSpillPool, MemoryConsumer, MemoryReservation};
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::execution::{SendableRecordBatchStream, SessionState};
use datafusion::prelude::{DataFrame, SQLOptions, SessionConfig, SessionContext};
use funnelhouse_schemas::time::now_micros;
use funnelhouse_storage::metrics::add_duration;
use funnelhouse_storage::{FileMeta, SharedReader, Snapshot};
use futures::StreamExt;

use crate::error::{QueryError, Result};
use crate::funnel::live::LiveFunnels;
use crate::funnel::sql::FunnelFunction;
use crate::metrics::QueryMetrics;
use crate::output::OutputFormat;
use crate::table::{EventsTable, SnapshotSource, StaticSource};
use crate::udaf::WindowFunnel;

/// Settings of the `[query]` config section.
#[derive(Debug, Clone)]
pub struct QueryOptions {
    /// A query running longer is cancelled.
    pub timeout: Duration,
    /// Memory pool size; sorts, joins and aggregations spill to disk past it.
    pub memory_limit: usize,
    /// Parallelism of scans and operators; default the number of cores.
    pub target_partitions: usize,
    /// SQL results stop at this many rows (and say they were truncated).
    pub max_result_rows: usize,
    /// Where query work runs. `serve` gives queries their own runtime so that ingest
    /// acknowledgements never wait behind them; None: the caller's.
    pub runtime: Option<tokio::runtime::Handle>,
    /// The shared object store other nodes' files are read from (`[storage] url`).
    pub shared: Option<SharedReader>,
    /// Where SQL and funnels run when not in this process (`[query] ballista`).
    pub distribute: Option<Distribute>,
}

/// Turns the engine's DataFusion session into one whose queries are planned and run
/// elsewhere (the cluster crate's Ballista session); tables and functions are registered
/// on the session it returns.
#[derive(Clone)]
pub struct Distribute(
    pub Arc<dyn Fn(SessionState) -> datafusion::error::Result<SessionState> + Send + Sync>,
);

impl std::fmt::Debug for Distribute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Distribute")
    }
}

impl Default for QueryOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(60),
            memory_limit: 8 << 30,
            target_partitions: std::thread::available_parallelism().map_or(2, |n| n.get()),
            max_result_rows: 1_000_000,
            runtime: None,
            shared: None,
            distribute: None,
        }
    }
}

/// A query's answer: the schema (also when there are no rows) and the batches.
#[derive(Debug)]
pub struct QueryResult {
    pub schema: SchemaRef,
    pub batches: Vec<RecordBatch>,
    /// More rows than `max_result_rows` existed; `batches` stop there.
    pub truncated: bool,
}

/// A query's answer rendered in an output format.
pub struct RenderedResult {
    /// The response body; its share of the memory pool is returned when it is dropped.
    pub body: Bytes,
    /// More rows than `max_result_rows` existed; the body stops there.
    pub truncated: bool,
}

/// A rendered body that keeps its memory reservation until the body is dropped.
struct HeldBody {
    body: Vec<u8>,
    _held: MemoryReservation,
}

impl AsRef<[u8]> for HeldBody {
    fn as_ref(&self) -> &[u8] {
        &self.body
    }
}

/// A running query's batches, cut at `max_result_rows`.
struct CappedResult {
    schema: SchemaRef,
    stream: SendableRecordBatchStream,
    /// Rows still allowed.
    room: usize,
    truncated: bool,
}

impl CappedResult {
    async fn next(&mut self) -> Result<Option<RecordBatch>> {
        if self.truncated {
            return Ok(None);
        }
        let Some(batch) = self.stream.next().await.transpose()? else {
            return Ok(None);
        };
        if batch.num_rows() > self.room {
            self.truncated = true;
            return Ok(Some(batch.slice(0, std::mem::take(&mut self.room))));
        }
        self.room -= batch.num_rows();
        Ok(Some(batch))
    }
}

#[derive(Clone)]
pub struct QueryEngine {
    ctx: SessionContext,
    timeout: Duration,
    metrics: Arc<QueryMetrics>,
    source: Arc<dyn SnapshotSource>,
    data_dir: PathBuf,
    opts: QueryOptions,
    /// Funnels kept up to date as events arrive, answering polls without a scan.
    live: Arc<LiveFunnels>,
    /// "Now" for funnels.
    clock: FunnelClock,
}

impl QueryEngine {
    pub fn new(
        source: Arc<dyn SnapshotSource>,
        data_dir: &Path,
        opts: &QueryOptions,
        metrics: Arc<QueryMetrics>,
    ) -> Result<Self> {
        let runtime = RuntimeEnvBuilder::new()
            .with_memory_pool(Arc::new(FairSpillPool::new(opts.memory_limit)))
            .build_arc()?;
        let mut config = SessionConfig::new()
            .with_target_partitions(opts.target_partitions.max(1))
            .with_information_schema(true)
            .with_default_catalog_and_schema("funnelhouse", "public");
        // Late materialisation: decode the filter columns first, the rest only for matches.
        config.options_mut().execution.parquet.pushdown_filters = true;
        config.options_mut().execution.parquet.reorder_filters = true;
        // The reader also caches decoded filter columns, outside the memory pool (100 MB
        // per scan partition by default): keep that within an eighth of memory_limit.
        let cache = opts.memory_limit / 8 / opts.target_partitions.max(1);
        config
            .options_mut()
            .execution
            .parquet
            .max_predicate_cache_size = Some(cache.min(100 << 20));
        let shared_url = match &opts.shared {
            Some(shared) => {
                let url = ObjectStoreUrl::parse(&shared.url)?;
                runtime.register_object_store(url.as_ref(), Arc::clone(&shared.store));
                Some(url)
            }
            None => None,
        };
        let mut ctx = SessionContext::new_with_config_rt(config, runtime);
        if let Some(distribute) = &opts.distribute {
            ctx = SessionContext::new_with_state((distribute.0)(ctx.state())?);
        }
        let events = Arc::new(EventsTable::new(Arc::clone(&source), data_dir, shared_url));
        ctx.register_table("events", Arc::clone(&events) as Arc<dyn TableProvider>)?;
        ctx.register_udaf(WindowFunnel::udaf());
        let clock = FunnelClock {
            events,
            distributed: opts.distribute.is_some(),
        };
        ctx.register_udtf(
            "funnel",
            Arc::new(FunnelFunction {
                clock: clock.clone(),
            }),
        );
        Ok(Self {
            ctx,
            timeout: opts.timeout,
            metrics,
            source,
            data_dir: data_dir.to_path_buf(),
            opts: opts.clone(),
            live: Arc::default(),
            clock,
        })
    }

    /// What the `events` table reads now.
    pub fn snapshot(&self) -> Snapshot {
        self.source.snapshot()
    }

    /// An engine over exactly these committed files (no live buffer), for a scan that
    /// must match a snapshot taken earlier.
    pub fn over_files(&self, files: Arc<Vec<FileMeta>>) -> Result<QueryEngine> {
        let snapshot = Snapshot {
            files,
            ..Default::default()
        };
        QueryEngine::new(
            Arc::new(StaticSource(snapshot)),
            &self.data_dir,
            &self.opts,
            Arc::clone(&self.metrics),
        )
    }

    /// Whether queries run on a cluster (`[query] ballista`): they then read the
    /// committed files only, and live funnels are not used.
    pub fn is_distributed(&self) -> bool {
        self.opts.distribute.is_some()
    }

    /// "Now" for a funnel: the present, or on a cluster the newest committed file's time
    /// (what its answer is as of; the live buffer is not there).
    pub fn as_of_now(&self) -> i64 {
        self.clock.pin().0
    }

    /// "Now" for a funnel, and the `events` table its scan reads: on a cluster, the
    /// snapshot "now" was taken from (a flush in between would add events after it).
    pub(crate) fn pin_now(&self) -> (i64, Arc<EventsTable>) {
        self.clock.pin()
    }

    /// The live funnels this engine keeps.
    pub fn live(&self) -> &LiveFunnels {
        &self.live
    }

    pub fn context(&self) -> &SessionContext {
        &self.ctx
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub fn max_result_rows(&self) -> usize {
        self.opts.max_result_rows
    }

    /// What read-only SQL may plan: no DDL, no DML (COPY included), no statements.
    pub fn read_only_options() -> SQLOptions {
        SQLOptions::new()
            .with_allow_ddl(false)
            .with_allow_dml(false)
            .with_allow_statements(false)
    }

    /// Plan `sql` as a read-only query: DDL, DML (COPY included) and statements are refused.
    pub async fn plan(&self, sql: &str) -> Result<DataFrame> {
        self.ctx
            .sql_with_options(sql, Self::read_only_options())
            .await
            .map_err(QueryError::from_planning)
    }

    /// Run read-only SQL to completion within the timeout.
    pub async fn sql(&self, sql: &str) -> Result<QueryResult> {
        let sql = sql.to_string();
        self.timed(self.run(move |engine| async move {
            let mut result = engine.capped(&sql).await?;
            // The result is held in the query memory pool too, up to memory_limit.
            let held = engine.reservation("sql result");
            let mut batches = Vec::new();
            while let Some(batch) = result.next().await? {
                held.try_grow(funnelhouse_schemas::batch_memory_size(&batch))?;
                batches.push(batch);
            }
            Ok(QueryResult {
                schema: result.schema,
                batches,
                truncated: result.truncated,
            })
        }))
        .await
    }

    /// Run read-only SQL within the timeout and render it as `format`, batch by batch as
    /// rows arrive. The body is held in the query memory pool until it has been sent.
    pub async fn sql_rendered(&self, sql: &str, format: OutputFormat) -> Result<RenderedResult> {
        let sql = sql.to_string();
        self.timed(self.run(move |engine| async move {
            let mut result = engine.capped(&sql).await?;
            let held = engine.reservation("sql result");
            let mut writer = format.writer(&result.schema)?;
            while let Some(batch) = result.next().await? {
                writer.write(&batch)?;
                held.try_resize(writer.held_bytes())?;
            }
            let body = writer.finish(result.truncated)?;
            held.try_resize(body.capacity())?;
            Ok(RenderedResult {
                body: Bytes::from_owner(HeldBody { body, _held: held }),
                truncated: result.truncated,
            })
        }))
        .await
    }

    /// Plan and start `sql`, its rows to stop at `max_result_rows`.
    async fn capped(&self, sql: &str) -> Result<CappedResult> {
        let df = self.plan(sql).await?;
        Ok(CappedResult {
            schema: Arc::new(df.schema().as_arrow().clone()),
            // Streamed, so a huge result stops at the cap instead of being built whole;
            // dropping the stream stops the query's work.
            stream: df.execute_stream().await?,
            room: self.opts.max_result_rows,
            truncated: false,
        })
    }

    /// `work`, counted in the query metrics.
    async fn timed<T>(&self, work: impl Future<Output = Result<T>>) -> Result<T> {
        let started = Instant::now();
        let result = work.await;
        add_duration(
            &self.metrics.queries,
            &self.metrics.query_micros,
            started.elapsed(),
        );
        result
    }

    /// A share of the query memory pool for work DataFusion does not account itself
    /// (results being built); past `memory_limit` it fails with a 503 naming the limit.
    pub fn reservation(&self, name: &str) -> MemoryReservation {
        MemoryConsumer::new(name).register(&self.ctx.runtime_env().memory_pool)
    }

    /// Execute a DataFrame as one stream per output partition.
    pub async fn partitioned_streams(
        &self,
        df: DataFrame,
    ) -> Result<Vec<SendableRecordBatchStream>> {
        Ok(df.execute_stream_partitioned().await?)
    }

    /// Run query work within the timeout, on the query runtime when there is one.
    /// Dropping the returned future (the client went away) stops the work.
    pub async fn run<T, F>(&self, work: impl FnOnce(QueryEngine) -> F) -> Result<T>
    where
        T: Send + 'static,
        F: Future<Output = Result<T>> + Send + 'static,
    {
        let timeout = self.timeout;
        let timed = tokio::time::timeout(timeout, work(self.clone()));
        let fut = async move { timed.await.unwrap_or(Err(QueryError::Timeout(timeout))) };
        match &self.opts.runtime {
            Some(rt) => AbortOnDrop(rt.spawn(fut))
                .await
                .map_err(|e| QueryError::Internal(format!("query task failed: {e}")))?,
            None => fut.await,
        }
    }

    pub fn metrics(&self) -> &Arc<QueryMetrics> {
        &self.metrics
    }
}

/// "Now" for a funnel over `events`: the present, or on a cluster the newest committed
/// file's time (what its answer is as of; the live buffer is not there).
#[derive(Clone)]
pub struct FunnelClock {
    events: Arc<EventsTable>,
    distributed: bool,
}

impl FunnelClock {
    /// "Now", and the `events` table a funnel as of then reads: on a cluster, pinned to
    /// the snapshot whose newest file gave the time.
    pub fn pin(&self) -> (i64, Arc<EventsTable>) {
        if !self.distributed {
            return (now_micros(), Arc::clone(&self.events));
        }
        let snapshot = self.events.source.snapshot();
        let newest = (snapshot.files.iter())
            .filter_map(FileMeta::written_at)
            .max();
        let as_of = newest.unwrap_or_else(now_micros);
        (as_of, Arc::new(self.events.pinned(snapshot)))
    }
}

impl std::fmt::Debug for FunnelClock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FunnelClock(distributed: {})", self.distributed)
    }
}

/// A task on another runtime that is aborted when its awaiting future is dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl<T> Future for AbortOnDrop<T> {
    type Output = std::result::Result<T, tokio::task::JoinError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0).poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// A source whose snapshot the test replaces, as flushes do.
    struct Flushing(Mutex<Snapshot>);

    impl SnapshotSource for Flushing {
        fn snapshot(&self) -> Snapshot {
            self.0.lock().unwrap().clone()
        }
    }

    /// A committed file written at `uuid`'s time (UUIDv7, ms since the epoch in front).
    fn file(uuid: &str) -> FileMeta {
        FileMeta {
            path: format!("events/date=2026-09-21/f00000000000000000001-{uuid}.parquet"),
            partition: "date=2026-09-21".into(),
            rows: 1,
            bytes: 1,
            min_ts: 0,
            max_ts: 0,
            node: None,
        }
    }

    fn with_files(files: Vec<FileMeta>) -> Snapshot {
        Snapshot {
            files: Arc::new(files),
            ..Default::default()
        }
    }

    #[test]
    fn on_a_cluster_a_funnel_reads_the_files_its_now_came_from() {
        let first = file("01a0c4506c0070008000000000000001"); // 1,790,000,000,000 ms
        let source = Arc::new(Flushing(Mutex::new(with_files(vec![first.clone()]))));
        let events = Arc::new(EventsTable::new(
            Arc::clone(&source) as Arc<dyn SnapshotSource>,
            Path::new("/data"),
            None,
        ));
        let clock = FunnelClock {
            events,
            distributed: true,
        };
        let (as_of, pinned) = clock.pin();
        assert_eq!(as_of, 1_790_000_000_000_000);
        // A flush commits a newer file before the funnel's scan is planned.
        let second = file("01a0c451566070008000000000000001"); // a minute later
        *source.0.lock().unwrap() = with_files(vec![first.clone(), second]);
        let read: Vec<String> = (pinned.source.snapshot().files.iter())
            .map(|f| f.path.clone())
            .collect();
        assert_eq!(read, [first.path]);
        assert_eq!(
            clock.pin().0,
            1_790_000_060_000_000,
            "the next funnel's now"
        );
    }
}
