//! The `events` table: the committed Parquet files unioned with the live buffer, both
//! from one [`Snapshot`], so a flush during a query neither hides nor doubles a row.
//!
//! Files are pruned by their manifest ts range against `ts` predicates (the partition
//! folders alone would not prune on `ts`); the remaining filters go to the Parquet
//! reader as a predicate for row-group and page pruning. Filters are `Inexact`:
//! DataFusion re-applies them, so pruning can only skip work, never change results.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, SchemaRef, TimeUnit};
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::{DFSchema, DataFusionError, Result, ScalarValue};
use datafusion::datasource::TableType;
use datafusion::datasource::file_format::FileFormat;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::datasource::physical_plan::{FileGroup, FileScanConfigBuilder, ParquetSource};
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::logical_expr::utils::conjunction;
use datafusion::logical_expr::{BinaryExpr, Expr, Operator, TableProviderFilterPushDown};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::empty::EmptyExec;
use datafusion::physical_plan::union::UnionExec;
use funnelhouse_schemas::event_schema;
use funnelhouse_storage::{EventStore, FileMeta, Snapshot, StorageError};

/// Where the table's rows come from: a running store, or a data dir read as it is.
pub trait SnapshotSource: Send + Sync {
    fn snapshot(&self) -> Snapshot;

    /// A snapshot's committed files as an executor on another machine reads them.
    fn files_elsewhere(&self, files: &[FileMeta]) -> Result<Vec<FileMeta>, StorageError> {
        Ok(files.to_vec())
    }
}

/// How long a distributed query waits for this node's newest files to be uploaded to
/// the shared object store (the publisher uploads each commit at once).
const UPLOAD_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

impl SnapshotSource for EventStore {
    fn snapshot(&self) -> Snapshot {
        EventStore::snapshot(self)
    }

    fn files_elsewhere(&self, files: &[FileMeta]) -> Result<Vec<FileMeta>, StorageError> {
        // Plans are encoded on a runtime worker, and this may wait for an upload: on a
        // multi-threaded runtime the worker's other tasks move to another thread meanwhile.
        let multi_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        let wait = || EventStore::files_elsewhere(self, files, UPLOAD_WAIT);
        if multi_thread {
            tokio::task::block_in_place(wait)
        } else {
            wait()
        }
    }
}

/// Another source as one snapshot of it: each part of a query planned in several steps
/// (a funnel's "now", then its scan) reads the same files.
struct PinnedSource {
    source: Arc<dyn SnapshotSource>,
    snapshot: Snapshot,
}

impl SnapshotSource for PinnedSource {
    fn snapshot(&self) -> Snapshot {
        self.snapshot.clone()
    }

    fn files_elsewhere(&self, files: &[FileMeta]) -> Result<Vec<FileMeta>, StorageError> {
        self.source.files_elsewhere(files)
    }
}

/// A fixed snapshot (offline queries, tests).
pub struct StaticSource(pub Snapshot);

impl SnapshotSource for StaticSource {
    fn snapshot(&self) -> Snapshot {
        self.0.clone()
    }
}

pub struct EventsTable {
    pub(crate) source: Arc<dyn SnapshotSource>,
    /// Absolute, so file paths resolve in the local object store.
    pub(crate) data_dir: PathBuf,
    /// Where the shared object store is registered (`s3://bucket`), with `[storage] url`.
    pub(crate) shared_url: Option<ObjectStoreUrl>,
}

impl fmt::Debug for EventsTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventsTable")
            .field("data_dir", &self.data_dir)
            .finish()
    }
}

impl EventsTable {
    pub fn new(
        source: Arc<dyn SnapshotSource>,
        data_dir: &Path,
        shared_url: Option<ObjectStoreUrl>,
    ) -> Self {
        let data_dir = std::path::absolute(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
        Self {
            source,
            data_dir,
            shared_url,
        }
    }

    /// The same table over `snapshot` of its source.
    pub(crate) fn pinned(&self, snapshot: Snapshot) -> EventsTable {
        let source = PinnedSource {
            source: Arc::clone(&self.source),
            snapshot,
        };
        EventsTable {
            source: Arc::new(source),
            data_dir: self.data_dir.clone(),
            shared_url: self.shared_url.clone(),
        }
    }
}

#[async_trait]
impl TableProvider for EventsTable {
    fn schema(&self) -> SchemaRef {
        event_schema()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>> {
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let snapshot = self.source.snapshot();
        let schema = event_schema();
        let partitions = state.config().target_partitions().max(1);
        let range = TsRange::from_filters(filters);
        let mut inputs: Vec<Arc<dyn ExecutionPlan>> = Vec::new();

        // This data dir's files, and other nodes' on the shared object store.
        let (local, shared): (Vec<&FileMeta>, Vec<&FileMeta>) = snapshot
            .files
            .iter()
            .filter(|f| range.overlaps(f.min_ts, f.max_ts))
            .partition(|f| f.node.is_none());
        let predicate = match conjunction(filters.iter().cloned()) {
            Some(expr) => {
                let df_schema = DFSchema::try_from(Arc::clone(&schema))?;
                Some(state.create_physical_expr(expr, &df_schema)?)
            }
            None => None,
        };
        let scans = [
            (local, Some(ObjectStoreUrl::local_filesystem()), true),
            (shared, self.shared_url.clone(), false),
        ];
        for (files, url, in_data_dir) in scans {
            if files.is_empty() {
                continue;
            }
            let url = url.ok_or_else(|| {
                DataFusionError::Internal("other nodes' files without a shared object store".into())
            })?;
            let mut source = ParquetSource::new(Arc::clone(&schema))
                .with_table_parquet_options(state.table_options().parquet.clone());
            if let Some(predicate) = &predicate {
                source = source.with_predicate(Arc::clone(predicate));
            }
            let config = FileScanConfigBuilder::new(url, Arc::new(source))
                .with_file_groups(self.file_groups(&files, partitions, in_data_dir))
                .with_projection_indices(projection.cloned())?
                .with_limit(limit)
                .build();
            let format =
                ParquetFormat::default().with_options(state.table_options().parquet.clone());
            inputs.push(format.create_physical_plan(state, config).await?);
        }

        let batches: Vec<RecordBatch> = snapshot
            .batches
            .into_iter()
            .filter(|b| b.num_rows() > 0)
            .collect();
        if !batches.is_empty() {
            let per = batches.len().div_ceil(partitions);
            let chunks: Vec<Vec<RecordBatch>> =
                batches.chunks(per).map(<[RecordBatch]>::to_vec).collect();
            inputs.push(MemorySourceConfig::try_new_exec(
                &chunks,
                Arc::clone(&schema),
                projection.cloned(),
            )?);
        }

        if inputs.is_empty() {
            let projected = match projection {
                Some(p) => Arc::new(schema.project(p)?),
                None => schema,
            };
            return Ok(Arc::new(EmptyExec::new(projected)));
        }
        UnionExec::try_new(inputs)
    }
}

impl EventsTable {
    /// Spread files over `n` groups of about equal bytes (largest first). Paths of files
    /// `in_data_dir` are relative to it; shared ones are object keys already.
    fn file_groups(&self, files: &[&FileMeta], n: usize, in_data_dir: bool) -> Vec<FileGroup> {
        let mut sorted: Vec<&&FileMeta> = files.iter().collect();
        sorted.sort_by_key(|f| std::cmp::Reverse(f.bytes));
        let mut groups: Vec<(u64, Vec<PartitionedFile>)> =
            (0..n.min(files.len())).map(|_| (0, Vec::new())).collect();
        for f in sorted {
            let g = groups
                .iter_mut()
                .min_by_key(|g| g.0)
                .expect("at least one group");
            g.0 += f.bytes;
            let path = if in_data_dir {
                self.data_dir.join(&f.path).to_string_lossy().into_owned()
            } else {
                f.path.clone()
            };
            g.1.push(PartitionedFile::new(path, f.bytes));
        }
        groups
            .into_iter()
            .map(|(_, files)| FileGroup::new(files))
            .collect()
    }
}

/// Inclusive bounds on `ts` implied by a conjunction of filters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TsRange {
    pub lo: i64,
    pub hi: i64,
}

impl TsRange {
    pub fn from_filters(filters: &[Expr]) -> Self {
        let mut r = TsRange {
            lo: i64::MIN,
            hi: i64::MAX,
        };
        for f in filters {
            r.narrow(f);
        }
        r
    }

    fn overlaps(&self, min: i64, max: i64) -> bool {
        max >= self.lo && min <= self.hi
    }

    fn narrow(&mut self, e: &Expr) {
        match e {
            Expr::BinaryExpr(BinaryExpr {
                left,
                op: Operator::And,
                right,
            }) => {
                self.narrow(left);
                self.narrow(right);
            }
            Expr::BinaryExpr(BinaryExpr { left, op, right }) => {
                let (op, value) = match (is_ts(left), is_ts(right)) {
                    (true, false) => (*op, micros(right)),
                    (false, true) => (op.swap().unwrap_or(*op), micros(left)),
                    _ => return,
                };
                let Some(v) = value else { return };
                match op {
                    Operator::Gt | Operator::GtEq => self.lo = self.lo.max(v),
                    Operator::Lt | Operator::LtEq => self.hi = self.hi.min(v),
                    Operator::Eq => {
                        self.lo = self.lo.max(v);
                        self.hi = self.hi.min(v);
                    }
                    _ => {}
                }
            }
            Expr::Between(b) if !b.negated && is_ts(&b.expr) => {
                if let Some(v) = micros(&b.low) {
                    self.lo = self.lo.max(v);
                }
                if let Some(v) = micros(&b.high) {
                    self.hi = self.hi.min(v);
                }
            }
            _ => {}
        }
    }
}

fn is_ts(e: &Expr) -> bool {
    matches!(e, Expr::Column(c) if c.name == "ts")
}

/// A timestamp literal as UTC microseconds (rounded outwards is not needed: bounds are
/// only used to skip files whose whole range is outside).
fn micros(e: &Expr) -> Option<i64> {
    let Expr::Literal(v, _) = e else { return None };
    if !matches!(v.data_type(), DataType::Timestamp(..)) {
        return None;
    }
    match v
        .cast_to(&DataType::Timestamp(TimeUnit::Microsecond, None))
        .ok()?
    {
        ScalarValue::TimestampMicrosecond(Some(us), _) => Some(us),
        _ => None,
    }
}
