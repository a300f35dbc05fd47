//! The live buffer: acknowledged events as Arrow batches, held until their flush to
//! Parquet commits, together with the committed file list, so that a reader takes both
//! from one consistent [`Snapshot`] (a flush never hides or doubles a row).

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use arrow::array::RecordBatch;

use crate::manifest::FileMeta;
use crate::metrics::StoreMetrics;

/// What a query reads: committed files plus the batches not yet in any of them.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// This node's committed files, then other nodes' on the shared object store.
    pub files: Arc<Vec<FileMeta>>,
    /// Changes whenever the other nodes' files change (a reader that follows new
    /// batches must then read the files again).
    pub shared_version: u64,
    pub batches: Vec<RecordBatch>,
    /// Batches the live buffer has taken since the store opened; `batches` are the last
    /// `batches.len()` of them, in push order (one flusher commits flushes in seal
    /// order), so a reader that remembers this number can tell which batches are new.
    pub batches_pushed: u64,
    /// The batches of the last committed flush, which came just before `batches`: not
    /// part of what queries read (they are in `files`), but kept one flush longer so a
    /// reader following new batches does not miss those flushed before it looked.
    pub retired: Arc<Vec<RecordBatch>>,
}

impl Snapshot {
    /// What is on disk now, for a reader without a running server: the committed files
    /// plus the events of WAL segments not yet flushed.
    pub fn read(data_dir: &std::path::Path) -> crate::error::Result<Snapshot> {
        let manifest = crate::manifest::Manifest::load(data_dir)?;
        let records =
            crate::wal::Wal::read_unflushed(&data_dir.join("wal"), manifest.wal_flushed_through)?;
        let batches = records
            .iter()
            .map(funnelhouse_schemas::events_to_batch)
            .collect::<Vec<_>>();
        Ok(Snapshot {
            files: Arc::new(manifest.files),
            batches_pushed: batches.len() as u64,
            batches,
            ..Default::default()
        })
    }

    pub fn rows(&self) -> u64 {
        self.files.iter().map(|f| f.rows).sum::<u64>()
            + self
                .batches
                .iter()
                .map(|b| b.num_rows() as u64)
                .sum::<u64>()
    }
}

#[derive(Default)]
struct BufferState {
    active: Vec<RecordBatch>,
    active_bytes: usize,
    active_rows: usize,
    active_since: Option<Instant>,
    /// Sealed batches being written out, by the WAL segment their flush covers.
    flushing: Vec<(u64, Vec<RecordBatch>, usize)>,
    /// This node's committed files.
    own: Arc<Vec<FileMeta>>,
    /// Other nodes' committed files on the shared object store.
    shared: Arc<Vec<FileMeta>>,
    shared_version: u64,
    /// `own` then `shared`, what snapshots hand out.
    files: Arc<Vec<FileMeta>>,
    pushed: u64,
    /// The batches of the last committed flush (see `Snapshot::retired`).
    retired: Arc<Vec<RecordBatch>>,
}

impl BufferState {
    fn bytes(&self) -> usize {
        self.active_bytes + self.flushing.iter().map(|(_, _, b)| b).sum::<usize>()
    }
    fn set_files(&mut self, own: Vec<FileMeta>) {
        self.own = Arc::new(own);
        self.combine();
    }

    fn combine(&mut self) {
        self.files = if self.shared.is_empty() {
            Arc::clone(&self.own)
        } else {
            Arc::new(self.own.iter().chain(self.shared.iter()).cloned().collect())
        };
    }

    fn rows(&self) -> usize {
        self.active_rows
            + self
                .flushing
                .iter()
                .flat_map(|(_, bs, _)| bs)
                .map(|b| b.num_rows())
                .sum::<usize>()
    }
}

pub struct LiveBuffer {
    state: RwLock<BufferState>,
    metrics: Arc<StoreMetrics>,
}

impl LiveBuffer {
    pub fn new(files: Vec<FileMeta>, metrics: Arc<StoreMetrics>) -> Self {
        let mut state = BufferState::default();
        state.set_files(files);
        Self {
            state: RwLock::new(state),
            metrics,
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        let s = self.state.read().expect("buffer lock");
        let batches = s
            .flushing
            .iter()
            .flat_map(|(_, bs, _)| bs.iter())
            .chain(&s.active)
            .cloned()
            .collect();
        Snapshot {
            files: Arc::clone(&s.files),
            shared_version: s.shared_version,
            batches,
            batches_pushed: s.pushed,
            retired: Arc::clone(&s.retired),
        }
    }

    pub fn push(&self, batches: impl IntoIterator<Item = RecordBatch>) {
        // Sized before the lock: snapshots wait on it.
        let batches: Vec<(RecordBatch, usize)> = (batches.into_iter())
            .filter(|b| b.num_rows() > 0)
            .map(|b| {
                let bytes = funnelhouse_schemas::batch_memory_size(&b);
                (b, bytes)
            })
            .collect();
        if batches.is_empty() {
            return;
        }
        let mut s = self.state.write().expect("buffer lock");
        s.active_since.get_or_insert_with(Instant::now);
        for (batch, bytes) in batches {
            s.active_bytes += bytes;
            s.active_rows += batch.num_rows();
            s.active.push(batch);
            s.pushed += 1;
        }
        self.publish(&s);
    }

    /// Bytes of all batches held (active and flushing).
    pub fn bytes(&self) -> usize {
        self.state.read().expect("buffer lock").bytes()
    }

    /// Bytes and age of the batches not yet sealed for a flush.
    pub fn active(&self) -> (usize, Option<Instant>) {
        let s = self.state.read().expect("buffer lock");
        (s.active_bytes, s.active_since)
    }

    /// Move the active batches to "flushing" under WAL segment `seq`; they stay visible.
    pub fn seal(&self, seq: u64) -> Vec<RecordBatch> {
        let mut s = self.state.write().expect("buffer lock");
        let batches = std::mem::take(&mut s.active);
        let bytes = std::mem::take(&mut s.active_bytes);
        s.active_rows = 0;
        s.active_since = None;
        s.flushing.push((seq, batches.clone(), bytes));
        batches
    }

    /// The flush of `seq` committed as `files`: swap both in one step.
    pub fn finish_flush(&self, seq: u64, files: Vec<FileMeta>) {
        let mut s = self.state.write().expect("buffer lock");
        if let Some(at) = s.flushing.iter().position(|(q, _, _)| *q == seq) {
            s.retired = Arc::new(s.flushing.remove(at).1);
        }
        s.set_files(files);
        self.publish(&s);
    }

    /// A compaction committed: the same rows, in other files.
    pub fn set_files(&self, files: Vec<FileMeta>) {
        self.state.write().expect("buffer lock").set_files(files);
    }

    /// The other nodes' committed files as last read from the shared store.
    pub fn set_shared(&self, shared: Vec<FileMeta>) {
        // Mostly unchanged: compare under the read lock, which snapshots share.
        if *self.state.read().expect("buffer lock").shared == shared {
            return;
        }
        let mut s = self.state.write().expect("buffer lock");
        s.shared = Arc::new(shared);
        s.shared_version += 1;
        s.combine();
    }

    fn publish(&self, s: &BufferState) {
        self.metrics.buffer_bytes.store(s.bytes() as u64, Relaxed);
        self.metrics.buffer_rows.store(s.rows() as u64, Relaxed);
    }
}
