//! The event store: the write path from validated events to durable, queryable rows.
//!
//! - Each write request's task encodes its events for the WAL, builds their Arrow batch
//!   and hashes their ids; one writer thread takes the requests in groups (group commit):
//!   it drops duplicates against the dedup index, appends the group's events to the WAL
//!   as one record, fsyncs, packs the group's new rows into one live-buffer batch and
//!   only then answers the requests.
//! - When the live buffer is large or old enough, the writer rotates the WAL and hands the
//!   sealed batches to the flusher thread, which writes sorted Parquet files, the dedup ids
//!   file and a new manifest (the commit), swaps files and buffer for readers, and deletes
//!   the flushed WAL segments.
//! - The compactor thread merges the files of the partitions a flush touched, on its own
//!   thread so that a long compaction never holds up flushes (and through them, acks).
//! - With `[storage] url`, a publisher thread puts each committed manifest's files on the
//!   shared object store and a syncer thread reads the other nodes' (see [`crate::shared`]).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::TimestampMicrosecondType;
use funnelhouse_schemas::arrow::col;
use funnelhouse_schemas::time::now_micros;
use funnelhouse_schemas::{Event, events_to_batch, pack_events};
use tokio::sync::oneshot;

use crate::buffer::{LiveBuffer, Snapshot};
use crate::compact::{CompactOptions, compact};
use crate::config::{IngestConfig, StorageConfig};
use crate::dedup::{DedupIndex, IdsFile, id_hash};
use crate::disk::{Disk, OsDisk};
use crate::error::{Result, StorageError};
use crate::fsutil::DataDirLock;
use crate::manifest::{FileMeta, Manifest};
use crate::metrics::{StoreMetrics, add_duration};
use crate::parquet_file::{WriteThreads, write_partitioned};
use crate::shared::{Published, SeenLists, SharedReader, SharedStore};
use crate::wal::{EncodedEvents, RecordPayload, Wal};

/// How one write request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WriteOutcome {
    pub accepted: usize,
    pub duplicates: usize,
}

/// A request's events, made ready for the WAL writer by the request's own task (on one
/// of the runtime's threads, in parallel): one writer thread takes every commit in turn,
/// so what it does per event bounds ingest and adds to every ack's wait.
struct WriteRequest {
    /// The events' id hashes, for the dedup index.
    hashes: Vec<u128>,
    /// The events as they go into a WAL record.
    encoded: EncodedEvents,
    /// The events as the writer packs them into the live buffer.
    rows: Rows,
    received_at: i64,
    reply: oneshot::Sender<Result<WriteOutcome>>,
}

/// Requests of at least this many events build their batch on their own task (in
/// parallel, off the writer); the writer appends smaller ones' events (an SDK's handful,
/// a scan link's one) to the group's batch itself, a batch of its own not being worth it.
const OWN_BATCH_ROWS: usize = 256;

enum Rows {
    /// The request's batch, built by its task (on the heap until the writer packs it).
    Batch(RecordBatch),
    /// A small request's events (see [`OWN_BATCH_ROWS`]).
    Events(Vec<Event>),
}

enum Command {
    Write(WriteRequest),
    /// Flush everything acknowledged so far and answer once it is committed.
    Flush(oneshot::Sender<Result<()>>),
    /// Flush, then stop the threads.
    Shutdown(oneshot::Sender<Result<()>>),
}

struct FlushJob {
    /// The last WAL segment the batches came from; `None` when there was nothing to flush.
    seq: Option<u64>,
    batches: Vec<RecordBatch>,
    reply: Option<oneshot::Sender<Result<()>>>,
}

/// Memory taken by a request in flight; given back on drop.
pub struct Admission {
    inflight: Arc<AtomicUsize>,
    bytes: usize,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.inflight.fetch_sub(self.bytes, Relaxed);
    }
}

/// Start-up facts for the log.
#[derive(Debug, Clone, Default)]
pub struct OpenReport {
    pub files: usize,
    pub stored_rows: u64,
    pub replayed_events: usize,
    pub wal_dropped_bytes: u64,
    pub dedup_ids: usize,
    pub orphans_removed: usize,
}

pub struct EventStore {
    data_dir: PathBuf,
    tx: Mutex<Option<Sender<Command>>>,
    buffer: Arc<LiveBuffer>,
    metrics: Arc<StoreMetrics>,
    inflight: Arc<AtomicUsize>,
    max_buffer_bytes: usize,
    threads: Mutex<Vec<JoinHandle<()>>>,
    stopping: Arc<AtomicBool>,
    /// Released at shutdown (or by the kernel when the process dies).
    lock: Mutex<Option<DataDirLock>>,
    shared: Option<Arc<SharedStore>>,
}

impl EventStore {
    /// Open the data dir: load the manifest, remove uncommitted files, rebuild the dedup
    /// index, replay the WAL into the live buffer, and start the writer and flusher.
    /// Blocking: call it from a blocking context.
    pub fn open(
        data_dir: &Path,
        cfg: &IngestConfig,
        metrics: Arc<StoreMetrics>,
    ) -> Result<(EventStore, OpenReport)> {
        Self::open_on(Arc::new(OsDisk), data_dir, cfg, metrics)
    }

    /// [`Self::open`], writing through `disk` (tests pass a [`crate::FaultDisk`]).
    pub fn open_on(
        disk: Arc<dyn Disk>,
        data_dir: &Path,
        cfg: &IngestConfig,
        metrics: Arc<StoreMetrics>,
    ) -> Result<(EventStore, OpenReport)> {
        Self::open_with(disk, data_dir, cfg, &StorageConfig::default(), metrics)
    }

    /// [`Self::open`], publishing to and reading from the shared object store when
    /// `storage.url` is set: before this returns, this node's committed files are
    /// published and the other nodes' are listed.
    pub fn open_with(
        disk: Arc<dyn Disk>,
        data_dir: &Path,
        cfg: &IngestConfig,
        storage: &StorageConfig,
        metrics: Arc<StoreMetrics>,
    ) -> Result<(EventStore, OpenReport)> {
        crate::fsutil::create_dir_durable(&*disk, data_dir)?;
        let lock = DataDirLock::acquire(data_dir)?;
        funnelhouse_schemas::region::keep_freed(cfg.flush_bytes.0);
        let manifest = Manifest::load(data_dir)?;
        let mut report = OpenReport {
            files: manifest.files.len(),
            stored_rows: manifest.total_rows(),
            orphans_removed: manifest.remove_orphans(data_dir)?,
            ..Default::default()
        };
        // Connecting makes no request: publication and the first listing run on their
        // threads, so a store that is down holds up /readyz, never acknowledgements.
        let shared = match &storage.url {
            Some(_) => {
                let node = crate::shared::node_id(data_dir)?;
                Some(Arc::new(SharedStore::connect(storage, &node)?))
            }
            None => None,
        };
        let dedup_dir = data_dir.join("dedup");
        let mut dedup = DedupIndex::new(cfg.dedup_window, cfg.dedup_max_ids);
        let ids_files = IdsFile::list(&dedup_dir)?;
        dedup.reserve(
            ids_files
                .iter()
                .map(|(_, path)| IdsFile::ids_in(path))
                .sum(),
        );
        for (seq, path) in ids_files {
            if seq > manifest.wal_flushed_through {
                std::fs::remove_file(&path).map_err(StorageError::io(&path))?;
                continue;
            }
            let pairs = IdsFile::read(&path)?;
            for chunk in pairs.chunk_by(|a, b| a.0 == b.0) {
                dedup.load(chunk[0].0, chunk.iter().map(|p| p.1));
            }
        }
        dedup.expire(now_micros());

        let buffer = Arc::new(LiveBuffer::new(
            manifest.files.clone(),
            Arc::clone(&metrics),
        ));

        // Replay flushes as it goes, at the end of each segment once a flush's worth is
        // held (segment N ends where every event of segments <= N is held), so that a
        // long replay becomes several flushes of the usual size: one flush of all of it
        // would hold sort keys for all of it at once, on top of the live buffer.
        let mut replay_flushes = Vec::new();
        let mut segment = None;
        let (wal, stats) = Wal::open(
            &data_dir.join("wal"),
            manifest.wal_flushed_through,
            Arc::clone(&disk),
            |seq, events| {
                if let Some(done) = segment.filter(|&s| s != seq)
                    && buffer.active().0 >= cfg.flush_bytes.0
                {
                    replay_flushes.push(FlushJob {
                        seq: Some(done),
                        batches: buffer.seal(done),
                        reply: None,
                    });
                }
                segment = Some(seq);
                let fresh: Vec<&Event> = events
                    .iter()
                    .filter(|e| dedup.insert(id_hash(e.event_id())))
                    .collect();
                let received_at = events.first().map_or(0, |e| e.received_at);
                dedup.record(received_at, fresh.len());
                buffer.push([pack_events(&[], &fresh)]);
            },
        )?;
        report.replayed_events = stats.events;
        report.wal_dropped_bytes = stats.dropped_bytes;
        report.dedup_ids = dedup.len();
        metrics.dedup_ids.store(dedup.len() as u64, Relaxed);

        let (tx, rx) = mpsc::channel();
        let (flush_tx, flush_rx) = mpsc::channel();
        for job in replay_flushes {
            let _ = flush_tx.send(job);
        }
        let writer = Writer {
            wal,
            dedup,
            buffer: Arc::clone(&buffer),
            metrics: Arc::clone(&metrics),
            flush_tx,
            flush_bytes: cfg.flush_bytes.0,
            flush_interval: cfg.flush_interval,
            payload: RecordPayload::default(),
        };
        let stopping = Arc::new(AtomicBool::new(false));
        let manifest = Arc::new(Mutex::new(manifest));
        let (compact_tx, compact_rx) = mpsc::channel();
        let (publish_tx, publish_rx) = mpsc::channel();
        let publish_tx = shared.as_ref().map(|_| publish_tx);
        let compactor = Compactor {
            disk: Arc::clone(&disk),
            data_dir: data_dir.to_path_buf(),
            manifest: Arc::clone(&manifest),
            buffer: Arc::clone(&buffer),
            metrics: Arc::clone(&metrics),
            opts: CompactOptions::from_config(cfg, cfg.compact_min_files),
            stopping: Arc::clone(&stopping),
            pending_deletes: Vec::new(),
            publish_tx: publish_tx.clone(),
        };
        let flusher = Flusher {
            disk,
            stopping: Arc::clone(&stopping),
            failures_while_stopping: 0,
            data_dir: data_dir.to_path_buf(),
            manifest: Arc::clone(&manifest),
            buffer: Arc::clone(&buffer),
            metrics: Arc::clone(&metrics),
            cfg: cfg.clone(),
            compact_tx,
            publish_tx,
        };
        let mut threads = vec![
            std::thread::Builder::new()
                .name("fh-wal-writer".into())
                .spawn(move || writer.run(rx)),
            std::thread::Builder::new()
                .name("fh-flusher".into())
                .spawn(move || {
                    background_priority();
                    flusher.run(flush_rx)
                }),
            std::thread::Builder::new()
                .name("fh-compactor".into())
                .spawn(move || {
                    background_priority();
                    compactor.run(compact_rx)
                }),
        ]
        .into_iter()
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(StorageError::io(data_dir))?;
        if let Some(shared) = &shared {
            let publisher = Publisher {
                shared: Arc::clone(shared),
                manifest,
                data_dir: data_dir.to_path_buf(),
                published: Published::default(),
                recovered: false,
            };
            let syncer = Syncer {
                shared: Arc::clone(shared),
                buffer: Arc::clone(&buffer),
                stopping: Arc::clone(&stopping),
                seen: SeenLists::default(),
            };
            let spawned = [
                std::thread::Builder::new()
                    .name("fh-publisher".into())
                    .spawn(move || publisher.run(publish_rx)),
                std::thread::Builder::new()
                    .name("fh-syncer".into())
                    .spawn(move || syncer.run()),
            ];
            for t in spawned {
                threads.push(t.map_err(StorageError::io(data_dir))?);
            }
        }
        let store = EventStore {
            data_dir: data_dir.to_path_buf(),
            tx: Mutex::new(Some(tx)),
            buffer,
            metrics,
            inflight: Arc::new(AtomicUsize::new(0)),
            max_buffer_bytes: cfg.max_buffer_bytes.0,
            threads: Mutex::new(threads),
            stopping,
            lock: Mutex::new(Some(lock)),
            shared,
        };
        Ok((store, report))
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn metrics(&self) -> &Arc<StoreMetrics> {
        &self.metrics
    }

    /// Where queries read the other nodes' files, with `[storage] url`.
    pub fn shared_reader(&self) -> Option<SharedReader> {
        self.shared.as_ref().map(|s| s.reader())
    }

    /// This node's id on the shared object store, with `[storage] url`.
    pub fn node(&self) -> Option<&str> {
        self.shared.as_ref().map(|s| s.node())
    }

    /// A snapshot's committed files as a machine without this data dir reads them (a
    /// Ballista executor): with `[storage] url`, this node's by their object keys, waiting
    /// up to `within` for the publisher to upload the newest; without it, as they are.
    pub fn files_elsewhere(&self, files: &[FileMeta], within: Duration) -> Result<Vec<FileMeta>> {
        let Some(shared) = &self.shared else {
            return Ok(files.to_vec());
        };
        let deadline = Instant::now() + within;
        let mut out = Vec::with_capacity(files.len());
        for file in files {
            if file.node.is_some() {
                out.push(file.clone());
                continue;
            }
            loop {
                if let Some(published) = shared.published(file) {
                    out.push(published);
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(StorageError::Remote(format!(
                        "{} is not uploaded to the shared object store after {} s, so executors cannot read it; see the log for failed publications",
                        file.path,
                        within.as_secs()
                    )));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        Ok(out)
    }

    /// Files and live batches, consistent with each other.
    pub fn snapshot(&self) -> Snapshot {
        self.buffer.snapshot()
    }

    /// Reserve memory for a request of `bytes` (decoded events take about three times the
    /// body), or refuse with 503 when the buffer and requests in flight are at the bound.
    /// Called with the declared size before the body is read, so an overloaded server
    /// refuses without reading or decompressing anything.
    pub fn admit(&self, bytes: usize) -> Result<Admission> {
        let mut admission = Admission {
            inflight: Arc::clone(&self.inflight),
            bytes: 0,
        };
        self.readmit(&mut admission, bytes)?;
        Ok(admission)
    }

    /// Change a request's reservation to `bytes` (its body once read and decompressed),
    /// refused like [`Self::admit`] when it grows past the bound.
    pub fn readmit(&self, admission: &mut Admission, bytes: usize) -> Result<()> {
        let cost = bytes.saturating_mul(3);
        if cost <= admission.bytes {
            self.inflight.fetch_sub(admission.bytes - cost, Relaxed);
            admission.bytes = cost;
            return Ok(());
        }
        let extra = cost - admission.bytes;
        let before = self.inflight.fetch_add(extra, Relaxed);
        admission.bytes = cost;
        if before + extra + self.buffer.bytes() > self.max_buffer_bytes {
            self.metrics.requests_overloaded.fetch_add(1, Relaxed);
            return Err(StorageError::Overloaded {
                retry_after_secs: 1,
            });
        }
        Ok(())
    }

    fn send(&self, cmd: Command) -> Result<()> {
        let tx = self.tx.lock().expect("store lock");
        tx.as_ref()
            .ok_or(StorageError::ShuttingDown)?
            .send(cmd)
            .map_err(|_| StorageError::ShuttingDown)
    }

    /// Store `events` durably; returns once they are fsynced in the WAL and visible.
    pub async fn write(&self, events: Vec<Event>, received_at: i64) -> Result<WriteOutcome> {
        if events.is_empty() {
            return Ok(WriteOutcome::default());
        }
        let (reply, rx) = oneshot::channel();
        let hashes = events.iter().map(|e| id_hash(e.event_id())).collect();
        let encoded = EncodedEvents::new(&events);
        let rows = if events.len() >= OWN_BATCH_ROWS {
            // The events are freed here, on the thread that made them.
            Rows::Batch(events_to_batch(&events))
        } else {
            Rows::Events(events)
        };
        self.send(Command::Write(WriteRequest {
            hashes,
            encoded,
            rows,
            received_at,
            reply,
        }))?;
        rx.await.map_err(|_| StorageError::ShuttingDown)?
    }

    /// Flush everything acknowledged so far to Parquet and wait for the commit.
    pub async fn flush(&self) -> Result<()> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Flush(reply))?;
        rx.await.map_err(|_| StorageError::ShuttingDown)?
    }

    /// Why the store cannot serve writes now, if it cannot: its WAL writer or flusher
    /// thread has stopped, or flushes to Parquet are failing.
    pub fn health(&self) -> std::result::Result<(), String> {
        let threads = self.threads.lock().expect("threads lock");
        if let Some(t) = threads.iter().find(|t| t.is_finished()) {
            return Err(format!(
                "the {} thread has stopped; restart the server (see its log)",
                t.thread().name().unwrap_or("store")
            ));
        }
        if self.metrics.flush_failing.load(Relaxed) != 0 {
            return Err(
                "flushes to Parquet are failing (see the log); events stay in the WAL".into(),
            );
        }
        self.shared.as_ref().map_or(Ok(()), |s| s.health())
    }

    /// Refuse new writes, flush the live buffer and stop the threads.
    pub async fn shutdown(&self) -> Result<()> {
        self.stopping.store(true, Relaxed);
        let (reply, rx) = oneshot::channel();
        let sent = self.send(Command::Shutdown(reply));
        self.tx.lock().expect("store lock").take();
        let result = match sent {
            Ok(()) => rx.await.unwrap_or(Err(StorageError::ShuttingDown)),
            Err(_) => Ok(()),
        };
        let threads = std::mem::take(&mut *self.threads.lock().expect("store lock"));
        tokio::task::spawn_blocking(move || threads.into_iter().for_each(|t| drop(t.join())))
            .await
            .ok();
        self.lock.lock().expect("store lock").take();
        result
    }
}

// ---- the writer thread: group commit ----

struct Writer {
    wal: Wal,
    dedup: DedupIndex,
    buffer: Arc<LiveBuffer>,
    metrics: Arc<StoreMetrics>,
    flush_tx: Sender<FlushJob>,
    flush_bytes: usize,
    flush_interval: Duration,
    /// The WAL record being built, kept between commits.
    payload: RecordPayload,
}

/// Flushes and compactions are background work that takes a core for seconds; on a
/// small machine they must not delay acks.
fn background_priority() {
    if !funnelhouse_schemas::region::background_priority() {
        tracing::debug!("could not lower the flusher's priority");
    }
}

/// Most requests in one group commit; larger groups add latency without saving fsyncs.
const MAX_GROUP: usize = 512;

impl Writer {
    fn run(mut self, rx: Receiver<Command>) {
        loop {
            let first = match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(cmd) => Some(cmd),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return self.start_flush(None),
            };
            let mut writes = Vec::new();
            let mut controls = Vec::new();
            for cmd in first
                .into_iter()
                .chain(std::iter::from_fn(|| rx.try_recv().ok()).take(MAX_GROUP))
            {
                match cmd {
                    Command::Write(w) => writes.push(w),
                    other => controls.push(other),
                }
            }
            if !writes.is_empty() {
                self.commit(writes);
            }
            self.dedup.expire(now_micros());
            self.metrics
                .dedup_ids
                .store(self.dedup.len() as u64, Relaxed);
            self.metrics
                .dedup_evicted
                .store(self.dedup.evicted, Relaxed);
            let (bytes, since) = self.buffer.active();
            if bytes >= self.flush_bytes
                || since.is_some_and(|s| s.elapsed() >= self.flush_interval)
            {
                self.start_flush(None);
            }
            for cmd in controls {
                match cmd {
                    Command::Flush(reply) => self.start_flush(Some(reply)),
                    Command::Shutdown(reply) => return self.start_flush(Some(reply)),
                    Command::Write(_) => unreachable!("writes were taken above"),
                }
            }
        }
    }

    /// Dedup, one WAL record + fsync for the whole group, its new rows into the buffer
    /// as one batch, reply.
    fn commit(&mut self, writes: Vec<WriteRequest>) {
        for w in &writes {
            self.dedup.warm(&w.hashes);
        }
        // Each request's events new to the dedup index (pending in it until durable).
        let fresh: Vec<NewIds> = writes.iter().map(|w| self.insert_ids(&w.hashes)).collect();
        if fresh.iter().all(|n| n.count == 0) {
            for (w, n) in writes.into_iter().zip(fresh) {
                self.answer(w, n.count);
            }
            return;
        }
        let parts = (writes.iter().zip(&fresh))
            .filter(|(_, n)| n.count > 0)
            .map(|(w, n)| (&w.encoded, n.mask.as_deref()));
        let payload = self.payload.build(parts);
        match self.wal.append(payload) {
            Ok(fsync) => {
                add_duration(
                    &self.metrics.wal_fsyncs,
                    &self.metrics.wal_fsync_micros,
                    fsync,
                );
                self.metrics
                    .wal_bytes
                    .fetch_add(payload.len() as u64, Relaxed);
                self.buffer.push(fresh_batch(&writes, &fresh));
                for (w, n) in writes.into_iter().zip(fresh) {
                    self.answer(w, n.count);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, segment = self.wal.current_seq(), "WAL append failed");
                self.dedup.remove_pending();
                for w in writes {
                    let _ = w.reply.send(Err(StorageError::Wal(std::io::Error::new(
                        e.kind(),
                        e.to_string(),
                    ))));
                }
            }
        }
    }

    /// Insert a request's ids into the dedup index.
    fn insert_ids(&mut self, hashes: &[u128]) -> NewIds {
        let mut mask: Option<Vec<bool>> = None;
        for (i, &h) in hashes.iter().enumerate() {
            let new = self.dedup.insert(h);
            match &mut mask {
                Some(mask) => mask.push(new),
                None if !new => {
                    let mut m = vec![true; i];
                    m.push(false);
                    mask = Some(m);
                }
                None => {}
            }
        }
        let count = (mask.as_ref()).map_or(hashes.len(), |m| m.iter().filter(|k| **k).count());
        NewIds { count, mask }
    }

    /// A request's `accepted` events are durable (its others were duplicates).
    fn answer(&mut self, w: WriteRequest, accepted: usize) {
        let result = WriteOutcome {
            accepted,
            duplicates: w.hashes.len() - accepted,
        };
        self.metrics
            .accepted
            .fetch_add(result.accepted as u64, Relaxed);
        self.metrics
            .duplicates
            .fetch_add(result.duplicates as u64, Relaxed);
        self.dedup.record(w.received_at, accepted);
        let _ = w.reply.send(Ok(result));
    }

    /// Seal the active batches under the current WAL segment and queue their flush.
    fn start_flush(&mut self, reply: Option<oneshot::Sender<Result<()>>>) {
        let (bytes, since) = self.buffer.active();
        let job = if since.is_none() && bytes == 0 {
            FlushJob {
                seq: None,
                batches: Vec::new(),
                reply,
            }
        } else {
            match self.wal.rotate() {
                Ok(seq) => FlushJob {
                    seq: Some(seq),
                    batches: self.buffer.seal(seq),
                    reply,
                },
                Err(e) => {
                    tracing::error!(error = %e, "cannot rotate the WAL; flush postponed");
                    if let Some(r) = reply {
                        let _ = r.send(Err(e));
                    }
                    return;
                }
            }
        };
        let _ = self.flush_tx.send(job);
    }
}

/// Which events of a request were new to the dedup index.
struct NewIds {
    count: usize,
    /// One flag per event; `None` when all were new (the common case: no mask is made).
    mask: Option<Vec<bool>>,
}

impl NewIds {
    fn is_new(&self, i: usize) -> bool {
        self.mask.as_ref().is_none_or(|m| m[i])
    }
}

/// The live-buffer batch of a committed group: its requests' new events, packed into
/// one batch ([`pack_events`]). A large request's batch comes from its handler (on the
/// heap until here), less its duplicates; the small requests' events are appended as
/// they are.
///
/// One batch per group, whatever it holds: every query (dashboards poll) pays for each
/// batch it reads, and at 1% resends nearly every 500-event request holds one, so
/// slices around them doubled ack -> visible (benches/README.md). Packed, the live
/// buffer holds each row's bytes once: a concatenation keeps the requests' string
/// buffers (and so their views, the rows cut, everything they were packed with) until
/// the flush, on top of its own views.
fn fresh_batch(writes: &[WriteRequest], fresh: &[NewIds]) -> Option<RecordBatch> {
    let mut pieces = Vec::new();
    let mut small: Vec<&Event> = Vec::new();
    for (w, new) in writes.iter().zip(fresh).filter(|(_, n)| n.count > 0) {
        match (&w.rows, &new.mask) {
            (Rows::Batch(batch), None) => pieces.push(batch.clone()),
            (Rows::Batch(batch), Some(mask)) => pieces.extend(without_duplicates(batch, mask)),
            (Rows::Events(events), _) => {
                small.extend(
                    (events.iter().enumerate())
                        .filter(|(i, _)| new.is_new(*i))
                        .map(|(_, e)| e),
                );
            }
        }
    }
    (!pieces.is_empty() || !small.is_empty()).then(|| pack_events(&pieces, &small))
}

/// `batch` less the rows `keep` marks false: the slices between them.
fn without_duplicates(batch: &RecordBatch, keep: &[bool]) -> Vec<RecordBatch> {
    let mut slices = Vec::new();
    let mut start = None;
    for (i, &k) in keep.iter().chain([&false]).enumerate() {
        match (k, start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                slices.push(batch.slice(s, i - s));
                start = None;
            }
            _ => {}
        }
    }
    slices
}

// ---- the flusher thread: Parquet, commit ----

/// How long no commit must have written the WAL before a running flush takes the other
/// cores. Shorter gaps come and go under load: with 10 ms a second thread joined while
/// 8 clients still posted, and cost acknowledged throughput (benches/README.md, session 31).
const QUIET: Duration = Duration::from_millis(50);

struct Flusher {
    disk: Arc<dyn Disk>,
    /// Set by [`EventStore::shutdown`].
    stopping: Arc<AtomicBool>,
    failures_while_stopping: u32,
    data_dir: PathBuf,
    /// Shared with the compactor; whoever commits holds it from commit to buffer swap.
    manifest: Arc<Mutex<Manifest>>,
    buffer: Arc<LiveBuffer>,
    metrics: Arc<StoreMetrics>,
    cfg: IngestConfig,
    /// Partitions a flush touched, for the compactor.
    compact_tx: Sender<HashSet<String>>,
    /// Tells the publisher a manifest committed (with `[storage] url`).
    publish_tx: Option<Sender<()>>,
}

impl Flusher {
    fn run(mut self, rx: Receiver<FlushJob>) {
        while let Ok(job) = rx.recv() {
            let result = match job.seq {
                Some(seq) => self.flush_until_done(seq, &job.batches),
                None => Ok(()),
            };
            if let Some(reply) = job.reply {
                let _ = reply.send(result);
            }
        }
    }

    /// A failed flush loses nothing (the WAL still has the events) but must not be skipped:
    /// retry until it commits, while back-pressure keeps memory bounded. Once the store
    /// is stopping, a few failures in all end the retries of this and every queued flush,
    /// so a server whose disk fails can still stop: the events stay in the WAL and are
    /// replayed at the next start.
    fn flush_until_done(&mut self, seq: u64, batches: &[RecordBatch]) -> Result<()> {
        const FAILURES_WHEN_STOPPING: u32 = 3;
        let mut delay = Duration::from_millis(200);
        loop {
            match self.flush(seq, batches) {
                Ok(()) => {
                    self.metrics.flush_failing.store(0, Relaxed);
                    return Ok(());
                }
                Err(e)
                    if self.stopping.load(Relaxed) && {
                        self.failures_while_stopping += 1;
                        self.failures_while_stopping >= FAILURES_WHEN_STOPPING
                    } =>
                {
                    tracing::error!(error = %e, "flush failed while stopping; its events stay in the WAL and are replayed at the next start");
                    return Err(e);
                }
                Err(e) => {
                    // /readyz answers 503 until a flush commits again.
                    self.metrics.flush_failing.store(1, Relaxed);
                    tracing::error!(error = %e, retry_in = ?delay, "flush to Parquet failed; events stay in the WAL");
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    fn flush(&mut self, seq: u64, batches: &[RecordBatch]) -> Result<()> {
        let start = Instant::now();
        let prefix = format!("f{seq:020}");
        let disk = &*self.disk;
        // A flush writes a file per partition (day) its events fall in: on the benchmark's
        // data seven large ones and a few dozen small ones of late events (41 for 400 K
        // rows), mostly one for traffic stamped near now. Encoding and compressing them
        // is most of its work. While the collector takes events one thread does it, at
        // low priority: a second one took 6% of the acknowledged rate at 8 clients on 2
        // cores (benches/README.md). The other cores stand by and join once no commit
        // has written the WAL for [`QUIET`], or at once when the store is stopping (a
        // shutdown waits for the flush): the flush still running when a load ended went
        // on alone for up to a quarter of a second while the other core idled
        // (benches/README.md, session 31).
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let wal_bytes = || self.metrics.wal_bytes.load(Relaxed);
        let wal_growth_seen = Mutex::new((wal_bytes(), Instant::now()));
        let quiet = || {
            self.stopping.load(Relaxed) || {
                let mut last = wal_growth_seen.lock().expect("wal growth lock");
                let now = wal_bytes();
                if now != last.0 {
                    *last = (now, Instant::now());
                }
                last.1.elapsed() >= QUIET
            }
        };
        let threads = WriteThreads {
            start: 1,
            standby: cores - 1,
            join_when: &quiet,
        };
        // The ids file goes beside the Parquet files, on a thread of its own: hashing the
        // ids is little work, and its writes and fsync wait on the disk while the
        // Parquet files are encoded (the rate until all is in Parquet +9%, benches/README.md,
        // session 31). Neither counts until the manifest commits.
        let write_ids =
            || IdsFile::write(disk, &self.data_dir.join("dedup"), seq, id_runs(batches));
        let (files, ids) = std::thread::scope(|s| {
            let ids = std::thread::Builder::new()
                .name("fh-ids-writer".into())
                .spawn_scoped(s, write_ids);
            let files = write_partitioned(
                disk,
                &self.data_dir,
                batches,
                self.cfg.partition,
                &prefix,
                threads,
            );
            // A thread the OS refuses leaves the ids file to this one.
            let ids = match ids {
                Ok(thread) => thread
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
                Err(_) => write_ids(),
            };
            (files, ids)
        });
        if let (Err(_), Err(e)) = (&files, &ids) {
            tracing::warn!(seq, error = %e, "writing the flush's ids file failed too");
        }
        let files = files?;
        ids?;
        let touched: HashSet<String> = files.iter().map(|f| f.partition.clone()).collect();
        let rows: u64 = files.iter().map(|f| f.rows).sum();
        {
            let mut manifest = self.manifest.lock().expect("manifest lock");
            let mut next = manifest.clone();
            next.wal_flushed_through = seq;
            next.files.extend(files);
            next.commit(disk, &self.data_dir)?;
            *manifest = next;
            self.buffer.finish_flush(seq, manifest.files.clone());
        }
        add_duration(
            &self.metrics.flushes,
            &self.metrics.flush_micros,
            start.elapsed(),
        );
        self.metrics.flushed_rows.fetch_add(rows, Relaxed);
        tracing::debug!(seq, rows, took = ?start.elapsed(), "flushed live buffer to Parquet");
        // The rows are committed: a failure from here on must not fail the flush, whose
        // retry would write every row a second time. What is left behind is harmless
        // (replay skips WAL segments the manifest covers) and goes at the next flush.
        let cleanup = Wal::remove_through(&self.data_dir.join("wal"), seq)
            .and_then(|()| self.expire_ids_files());
        if let Err(e) = cleanup {
            tracing::warn!(seq, error = %e, "cleanup after a committed flush failed; retried after the next flush");
        }
        let _ = self.compact_tx.send(touched);
        if let Some(tx) = &self.publish_tx {
            let _ = tx.send(());
        }
        Ok(())
    }

    /// An ids file written longer than the dedup window ago holds only expired ids.
    fn expire_ids_files(&self) -> Result<()> {
        let dir = self.data_dir.join("dedup");
        for (_, path) in IdsFile::list(&dir)? {
            let age = std::fs::metadata(&path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| SystemTime::now().duration_since(t).ok());
            if age.is_some_and(|a| a > self.cfg.dedup_window) {
                std::fs::remove_file(&path).map_err(StorageError::io(&path))?;
            }
        }
        Ok(())
    }
}

// ---- the compactor thread ----

struct Compactor {
    disk: Arc<dyn Disk>,
    data_dir: PathBuf,
    manifest: Arc<Mutex<Manifest>>,
    buffer: Arc<LiveBuffer>,
    metrics: Arc<StoreMetrics>,
    opts: CompactOptions,
    stopping: Arc<AtomicBool>,
    /// Files replaced by compaction, deleted after a grace period for running queries.
    pending_deletes: Vec<(Instant, PathBuf)>,
    /// Tells the publisher a manifest committed (with `[storage] url`).
    publish_tx: Option<Sender<()>>,
}

/// How long replaced files stay on disk for queries that planned over them.
const DELETE_GRACE: Duration = Duration::from_secs(120);

impl Compactor {
    /// Compact the partitions flushes touched, several flushes' worth at a time, until the
    /// flusher is gone.
    fn run(mut self, rx: Receiver<HashSet<String>>) {
        loop {
            match rx.recv_timeout(Duration::from_secs(10)) {
                Ok(mut partitions) => {
                    partitions.extend(rx.try_iter().flatten());
                    // A step merges a bounded number of files; a backlog takes several.
                    while !self.stopping.load(Relaxed) && self.compact(&partitions) {}
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            self.delete_replaced(false);
        }
        self.delete_replaced(true);
    }

    /// One compaction step over `partitions`; true when it left work for another.
    fn compact(&mut self, partitions: &HashSet<String>) -> bool {
        let start = Instant::now();
        let buffer = &self.buffer;
        let result = compact(
            &*self.disk,
            &self.data_dir,
            &self.manifest,
            Some(partitions),
            self.opts,
            |m| buffer.set_files(m.files.clone()),
        );
        match result {
            Ok(outcome) if outcome.partitions > 0 => {
                let now = Instant::now();
                self.pending_deletes.extend(
                    outcome
                        .replaced
                        .iter()
                        .map(|p| (now, self.data_dir.join(p))),
                );
                add_duration(
                    &self.metrics.compactions,
                    &self.metrics.compaction_micros,
                    start.elapsed(),
                );
                if let Some(tx) = &self.publish_tx {
                    let _ = tx.send(());
                }
                outcome.more
            }
            Ok(_) => false,
            Err(e) => {
                tracing::warn!(error = %e, "compaction failed; the small files stay and are retried later");
                false
            }
        }
    }

    fn delete_replaced(&mut self, all: bool) {
        self.pending_deletes.retain(|(at, path)| {
            if all || at.elapsed() >= DELETE_GRACE {
                let _ = std::fs::remove_file(path);
                false
            } else {
                true
            }
        });
    }
}

// ---- with `[storage] url`: the publisher and the syncer threads ----

/// Publishes the committed manifest after each commit, retrying until it succeeds.
struct Publisher {
    shared: Arc<SharedStore>,
    manifest: Arc<Mutex<Manifest>>,
    data_dir: PathBuf,
    published: Published,
    /// The start-up clean-up of this node's objects is done.
    recovered: bool,
}

impl Publisher {
    /// At once (the start-up recovery), after each commit, until the flusher and the
    /// compactor are gone; then once more, so the last flush of a shutdown is published
    /// before the store stops (for at most a minute when the object store is down).
    fn run(mut self, rx: Receiver<()>) {
        let mut due = true;
        let mut retry = Duration::from_secs(1);
        loop {
            if due {
                match self.publish() {
                    Ok(()) => (due, retry) = (false, Duration::from_secs(1)),
                    Err(_) => retry = (retry * 2).min(Duration::from_secs(30)),
                }
            }
            let wait = if due {
                retry
            } else if self.published.deletes_pending() {
                Duration::from_secs(30)
            } else {
                Duration::from_secs(3600)
            };
            match rx.recv_timeout(wait) {
                Ok(()) => due = true,
                Err(RecvTimeoutError::Timeout) => due = due || self.published.deletes_pending(),
                Err(RecvTimeoutError::Disconnected) => {
                    let deadline = Instant::now() + Duration::from_secs(60);
                    while self.publish().is_err() && Instant::now() < deadline {
                        std::thread::sleep(Duration::from_secs(1));
                    }
                    return;
                }
            }
        }
    }

    fn publish(&mut self) -> Result<()> {
        let manifest = self.manifest.lock().expect("manifest lock").clone();
        let started = Instant::now();
        let result = if self.recovered {
            (self.shared).publish(&mut self.published, &manifest, &self.data_dir)
        } else {
            (self.shared).recover(&mut self.published, &manifest, &self.data_dir)
        };
        match &result {
            Ok(()) => {
                self.recovered = true;
                tracing::debug!(files = manifest.files.len(), took = ?started.elapsed(), "published committed files to the shared object store");
            }
            Err(e) => {
                tracing::warn!(error = %e, "publishing committed files to the shared object store failed; retrying (the files are safe on local disk)")
            }
        }
        result
    }
}

/// How often the other nodes' file lists are read.
const SYNC_INTERVAL: Duration = Duration::from_secs(5);

/// Reads the other nodes' committed files every [`SYNC_INTERVAL`].
struct Syncer {
    shared: Arc<SharedStore>,
    buffer: Arc<LiveBuffer>,
    stopping: Arc<AtomicBool>,
    seen: SeenLists,
}

impl Syncer {
    /// At once (`/readyz` waits for it), then every [`SYNC_INTERVAL`].
    fn run(mut self) {
        let mut failing = false;
        let mut first = true;
        loop {
            match self.shared.other_nodes_files(&mut self.seen) {
                Ok(files) => {
                    if first {
                        tracing::info!(
                            files = files.len(),
                            "listed the other nodes' files on the shared object store"
                        );
                        first = false;
                    }
                    failing = false;
                    self.buffer.set_shared(files);
                    self.shared.mark_synced();
                }
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(error = %e, "reading the other nodes' file lists failed; retrying (queries see their files as last read)");
                }
                Err(_) => {}
            }
            let next = Instant::now() + SYNC_INTERVAL;
            while Instant::now() < next {
                if self.stopping.load(Relaxed) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// The rows of `batches` in runs of one received_at, in commit order, each with its
/// received_at and its ids' hashes (taken as the ids file is written).
fn id_runs(batches: &[RecordBatch]) -> Vec<(i64, impl ExactSizeIterator<Item = u128>)> {
    let mut runs = Vec::new();
    for b in batches {
        let ids = b.column(col::EVENT_ID).as_string_view();
        let at = b
            .column(col::RECEIVED_AT)
            .as_primitive::<TimestampMicrosecondType>();
        let mut start = 0;
        for run in at.values().chunk_by(|x, y| x == y) {
            let rows = start..start + run.len();
            let hash = move |r| id_hash(if ids.is_null(r) { "" } else { ids.value(r) });
            runs.push((run[0], rows.map(hash)));
            start += run.len();
        }
    }
    runs
}

/// Offline compaction of a data dir (refused while a server holds it).
pub fn compact_data_dir(
    data_dir: &Path,
    cfg: &IngestConfig,
) -> Result<crate::compact::CompactOutcome> {
    let _lock = DataDirLock::acquire(data_dir)?;
    let manifest = Manifest::load(data_dir)?;
    manifest.remove_orphans(data_dir)?;
    let manifest = Mutex::new(manifest);
    let opts = CompactOptions::from_config(cfg, 1);
    let mut outcome = compact(&OsDisk, data_dir, &manifest, None, opts, |_| {})?;
    while outcome.more {
        outcome.absorb(compact(&OsDisk, data_dir, &manifest, None, opts, |_| {})?);
    }
    for p in &outcome.replaced {
        let path = data_dir.join(p);
        std::fs::remove_file(&path).map_err(StorageError::io(&path))?;
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use arrow::array::TimestampMicrosecondArray;
    use funnelhouse_schemas::{Event, events_to_batch};

    use super::*;
    use crate::wal::tests::event;

    /// Every row of every batch, sliced ones too, is in one run, with its received_at
    /// and its id's hash, in commit order.
    #[test]
    fn id_runs_cover_every_row_once_with_its_received_at() {
        let batch = |rows: &[(i64, &str)]| {
            let events: Vec<Event> = rows.iter().map(|&(_, id)| event(id, None)).collect();
            let batch = events_to_batch(&events);
            let mut columns = batch.columns().to_vec();
            let at = TimestampMicrosecondArray::from_iter_values(rows.iter().map(|r| r.0))
                .with_data_type(columns[col::RECEIVED_AT].data_type().clone());
            columns[col::RECEIVED_AT] = Arc::new(at);
            RecordBatch::try_new(batch.schema(), columns).unwrap()
        };
        let first = batch(&[(1, "a"), (1, "b"), (2, "c"), (2, "d"), (2, "e")]);
        let second = batch(&[(9, "x"), (2, "f"), (3, "g"), (3, "h")]).slice(1, 3);
        let pairs: Vec<(i64, u128)> = (id_runs(&[first, second]).into_iter())
            .flat_map(|(at, run)| run.map(move |h| (at, h)))
            .collect();
        let want: Vec<(i64, u128)> = [(1, "a"), (1, "b"), (2, "c"), (2, "d"), (2, "e")]
            .into_iter()
            .chain([(2, "f"), (3, "g"), (3, "h")])
            .map(|(at, id)| (at, id_hash(id)))
            .collect();
        assert_eq!(pairs, want);
    }
}
