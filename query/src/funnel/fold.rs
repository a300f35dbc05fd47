//! The per-user fold of the funnel engine, run by [`super::plan::FunnelFoldExec`] on one
//! partition of users.
//!
//! Collect: the rows of the partition's users become compact [`Row`]s (user key, ts,
//! step mask, group id, where its event_id is in an arena of ids) filed into buckets by
//! the top bits of the user key; past the partition's share of the memory pool they are
//! spilled to disk in slices of buckets. Fold: a bucket's rows are grouped by user ([`UserIndex`]), each user's rows
//! are sorted by (ts, event_id), repeated event_ids are dropped, the user is evaluated
//! with [`Evaluator`] and the outcome is added to the counters of the user's group.
//! Nothing is allocated per user.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use arrow::array::builder::{BinaryBuilder, make_view};
use arrow::array::{
    Array, ArrayRef, AsArray, Int64Array, RecordBatch, StringViewArray, UInt32Array, UInt64Array,
};
use arrow::datatypes::{
    DataType, Field, Int64Type, Schema, SchemaRef, TimestampMicrosecondType, UInt32Type, UInt64Type,
};
use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::StreamWriter;
use datafusion::error::DataFusionError;
use datafusion::execution::disk_manager::DiskManager;
use datafusion::execution::memory_pool::MemoryReservation;
use datafusion::execution::{SpillFile, SpillWriter};
use datafusion::physical_plan::metrics::{Count, Time};
use serde_json::Value;
use xxhash_rust::xxh3::{Xxh3DefaultBuilder, xxh3_64, xxh3_128};

use super::chain::{ChainParams, Evaluator, FunnelEvent, UserOutcome};
use super::engine::StepStats;
use super::spec::{Breakdown, FunnelSpec, StepSpec};
use crate::error::{QueryError, Result};

const MICROS: i64 = 1_000_000;

/// Buckets per partition. A bucket of 10M-event data holds a few thousand rows, so its
/// sort runs in L2 cache.
const ROW_BUCKETS: usize = 1024;

/// One event row kept for the fold. A user is identified by a 128-bit hash of user_id
/// (the bet the ingest dedup index makes for event_ids: a collision among a billion
/// ids has odds below 10^-20), so rows need no per-user allocation.
#[derive(Clone, Copy)]
struct Row {
    /// Halves of the user key (u64s keep the row 8-byte aligned: 56 bytes).
    user: [u64; 2],
    ts: i64,
    steps: u64,
    /// Compared before the bytes, which are a cache miss away.
    eid_hash: u64,
    /// The event_id: `eid_len` bytes at `eid_at` in the collector's (or read-back
    /// slice's) id arena.
    eid_at: u32,
    eid_len: u32,
    /// The collector's group id.
    group: u32,
}

/// Counters of one group, before rates are derived.
#[derive(Debug, Clone, Default)]
pub(super) struct Tally {
    pub counts: Vec<u64>,
    pub pending: Vec<u64>,
    /// Per step, the µs from step 1 to it for each user who reached it (empty when
    /// medians are not wanted).
    pub durations: Vec<Vec<i64>>,
}

impl Tally {
    /// Counters for `k` steps; `durations` are kept only when medians are wanted.
    pub(super) fn new(k: usize, durations: bool) -> Self {
        Self {
            counts: vec![0; k],
            pending: vec![0; k],
            durations: if durations {
                vec![Vec::new(); k]
            } else {
                Vec::new()
            },
        }
    }

    fn add(&mut self, out: &UserOutcome, k: usize) {
        for i in 0..out.level {
            self.counts[i] += 1;
        }
        for (d, ts) in self.durations.iter_mut().zip(&out.step_ts) {
            d.push(ts - out.step_ts[0]);
        }
        if out.open && out.level < k {
            self.pending[out.level] += 1;
        }
    }

    pub(super) fn sort_durations(&mut self) {
        self.durations.iter_mut().for_each(|d| d.sort_unstable());
    }

    pub(super) fn stats(mut self) -> StepStats {
        let mut durations = std::mem::take(&mut self.durations);
        durations.resize_with(self.counts.len(), Vec::new);
        let median_seconds = durations
            .iter_mut()
            .map(|d| {
                if d.is_empty() {
                    return None;
                }
                let mid = (d.len() - 1) / 2;
                let (_, m, _) = d.select_nth_unstable(mid);
                Some(*m as f64 / MICROS as f64)
            })
            .collect();
        StepStats::new(self.counts, self.pending, median_seconds)
    }
}

/// The folded numbers: the total, per group value and per (trend bucket, group value).
/// Without a breakdown `groups` is empty and bucket keys hold `""`. Trend requests
/// track no durations, so their medians are null.
pub(super) struct Partial {
    pub total: StepStats,
    pub groups: HashMap<String, StepStats>,
    pub buckets: HashMap<(i64, String), Vec<u64>>,
}

/// Which steps an event row matches and which group it belongs to.
pub(super) struct StepMatcher {
    /// Step masks by event name for steps without property filters (a handful: a
    /// linear scan beats hashing), with the inline view of names up to 12 bytes.
    plain: Vec<(String, Option<u128>, u64)>,
    /// Steps with property filters and their 0-based index.
    filtered: Vec<(usize, StepSpec)>,
    breakdown: Option<Breakdown>,
    needs_properties: bool,
}

impl StepMatcher {
    pub(super) fn new(spec: &FunnelSpec) -> Self {
        let mut plain: Vec<(String, Option<u128>, u64)> = Vec::new();
        for (i, s) in spec.steps.iter().enumerate() {
            if s.filter.is_empty() {
                match plain.iter_mut().find(|(e, _, _)| *e == s.event) {
                    Some((_, _, mask)) => *mask |= 1 << i,
                    None => plain.push((s.event.clone(), inline_key_of(&s.event), 1 << i)),
                }
            }
        }
        let filtered: Vec<_> = spec
            .steps
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.filter.is_empty())
            .map(|(i, s)| (i, s.clone()))
            .collect();
        let needs_properties =
            !filtered.is_empty() || matches!(spec.breakdown, Some(Breakdown::Property(_)));
        Self {
            plain,
            filtered,
            breakdown: spec.breakdown.clone(),
            needs_properties,
        }
    }

    /// Whether the scan must read `properties`.
    pub(super) fn needs_properties(&self) -> bool {
        self.needs_properties
    }

    /// The steps row `r` matches, and its properties when the matcher reads them.
    pub(super) fn row_steps(
        &self,
        events: &StringViewArray,
        props_col: Option<&StringViewArray>,
        r: usize,
    ) -> (u64, Option<serde_json::Map<String, Value>>) {
        let mut steps = self.plain_steps(events, r);
        // Parsed only when a filtered step or a property breakdown can use it: live-buffer
        // rows include every event of the campaign.
        let wanted = matches!(self.breakdown, Some(Breakdown::Property(_)))
            || self
                .filtered
                .iter()
                .any(|(_, s)| s.event == events.value(r));
        let props: Option<serde_json::Map<String, Value>> = props_col
            .filter(|p| wanted && p.is_valid(r))
            .and_then(|p| serde_json::from_str(p.value(r)).ok());
        for (i, s) in &self.filtered {
            if s.event == events.value(r)
                && s.filter
                    .iter()
                    .all(|(k, v)| v.matches(props.as_ref().and_then(|p| p.get(k))))
            {
                steps |= 1 << i;
            }
        }
        (steps, props)
    }

    /// Step mask of an event name without property filters.
    fn plain_steps(&self, events: &StringViewArray, r: usize) -> u64 {
        let found = match inline_key(events.views()[r]) {
            Some(key) => self.plain.iter().find(|(_, k, _)| *k == Some(key)),
            None => {
                let event = events.value(r);
                self.plain.iter().find(|(e, _, _)| e == event)
            }
        };
        found.map_or(0, |(_, _, mask)| *mask)
    }
}

/// The bits of a Utf8View view that hold a string of at most 12 bytes (length and
/// bytes, not the padding), or None for a longer string.
fn inline_key(view: u128) -> Option<u128> {
    let len = view as u32;
    (len <= 12).then(|| {
        if len == 12 {
            view
        } else {
            view & ((1u128 << (32 + 8 * len)) - 1)
        }
    })
}

fn inline_key_of(s: &str) -> Option<u128> {
    inline_key(make_view(s.as_bytes(), 0, 0))
}

/// Rows in the largest chunk of a [`Bucket`] (28 KiB); the first holds 4, each next one
/// twice as many up to this, so a tiny pool still holds a few rows of every bucket.
const CHUNK_ROWS: usize = 512;

/// The rows of one bucket, in chunks that are never reallocated. A bucket grows without
/// copying its rows or leaving a freed allocation behind: doubling vectors do both, and
/// until the allocator hands freed blocks back to the OS (a second later) the process
/// holds about twice what the pool counts (at 10M events under a 128 MiB pool, 400 MB
/// peak RSS against 260 MB when freed memory is returned at once).
#[derive(Default)]
struct Bucket {
    chunks: Vec<Vec<Row>>,
    len: usize,
    /// Rows the chunks have room for.
    capacity: usize,
}

/// What rows and their ids take, for the memory pool.
fn held_bytes(buckets: &[Bucket], ids: &IdArena) -> usize {
    buckets.iter().map(Bucket::bytes).sum::<usize>() + ids.bytes
}

impl Bucket {
    fn many(n: usize) -> Vec<Bucket> {
        (0..n).map(|_| Bucket::default()).collect()
    }

    fn push(&mut self, row: Row) {
        if self.len == self.capacity {
            let size = (4 << self.chunks.len().min(7)).min(CHUNK_ROWS);
            self.chunks.push(Vec::with_capacity(size));
            self.capacity += size;
        }
        self.chunks.last_mut().expect("a chunk with room").push(row);
        self.len += 1;
    }

    /// What it holds, for the memory pool.
    fn bytes(&self) -> usize {
        self.capacity * std::mem::size_of::<Row>()
            + self.chunks.capacity() * std::mem::size_of::<Vec<Row>>()
    }

    fn rows(&self) -> impl Iterator<Item = &Row> {
        self.chunks.iter().flatten()
    }

    /// The rows as one slice: the only chunk, or the chunks copied into `scratch`.
    fn as_slice<'a>(&'a self, scratch: &'a mut Vec<Row>) -> &'a [Row] {
        match self.chunks.as_slice() {
            [] => &[],
            [chunk] => chunk,
            _ => {
                scratch.clear();
                scratch.extend(self.rows().copied());
                scratch
            }
        }
    }
}

/// Bytes in the largest chunk of an [`IdArena`]; the first holds 64, each next one twice
/// as many up to this.
const ID_CHUNK: usize = 1 << 16;

/// Event ids, copied into chunks that are never reallocated, for the reason [`Bucket`]
/// gives. An id's place is its chunk (high 16 bits) and its offset in it (low 16 bits);
/// an id longer than [`ID_CHUNK`] gets a chunk of its own.
#[derive(Default)]
struct IdArena {
    chunks: Vec<Vec<u8>>,
    /// Bytes allocated, for the memory pool.
    bytes: usize,
}

impl IdArena {
    /// Copy `id` in; its place. The caller stops before the arena is [`Self::full`].
    fn push(&mut self, id: &[u8]) -> u32 {
        // Offsets have 16 bits: nothing goes past ID_CHUNK into a chunk, not even into an
        // oversized one.
        let fits = (self.chunks.last()).is_some_and(|c| {
            c.len() < ID_CHUNK && c.len() + id.len() <= c.capacity().min(ID_CHUNK)
        });
        if !fits {
            let size = (64 << self.chunks.len().min(10))
                .min(ID_CHUNK)
                .max(id.len());
            self.chunks.push(Vec::with_capacity(size));
            self.bytes += size;
        }
        let last = self.chunks.len() - 1;
        let chunk = &mut self.chunks[last];
        let at = (last << 16) | chunk.len();
        chunk.extend_from_slice(id);
        at as u32
    }

    fn get(&self, at: u32, len: u32) -> &[u8] {
        let (chunk, offset) = ((at >> 16) as usize, (at & 0xffff) as usize);
        &self.chunks[chunk][offset..][..len as usize]
    }

    /// Half of the 2^16 chunks a place can name are used: a batch more still fits.
    fn full(&self) -> bool {
        self.chunks.len() >= 1 << 15
    }
}

/// How many slices the buckets are spilled in: a spilled fold reads back one slice at a
/// time. Slice s holds buckets s, s + 128, ...: whatever range of buckets a partition
/// owns, each slice has 1/128 of its rows (16 MB of 50M events in two partitions).
const SPILL_SLICES: usize = 128;
const BUCKETS_PER_SLICE: usize = ROW_BUCKETS / SPILL_SLICES;

/// The buckets of a slice, in the order the slice's rows are read back.
fn slice_buckets(slice: usize) -> impl Iterator<Item = usize> + Clone {
    (0..BUCKETS_PER_SLICE).map(move |j| j * SPILL_SLICES + slice)
}

/// Which users a collector keeps: those whose bucket falls in part `part` of `of`
/// equal ranges of buckets.
#[derive(Debug, Clone, Copy)]
pub(super) struct Share {
    pub part: usize,
    pub of: usize,
}

impl Share {
    pub const ALL: Share = Share { part: 0, of: 1 };

    fn keeps(self, bucket: usize) -> bool {
        bucket * self.of / ROW_BUCKETS == self.part
    }
}

/// What a collector reports to its plan node's metrics.
#[derive(Clone, Default)]
pub(super) struct CollectMetrics {
    /// Time collecting, spilling and folding (not waiting for input).
    pub elapsed_compute: Time,
    pub rows: Count,
    pub spills: Count,
    pub spilled_rows: Count,
    pub spilled_bytes: Count,
}

/// The rows of one partition of users, bucketed by user key. Past its share of the
/// memory pool it writes all rows it holds to spill files, one per slice of buckets,
/// and starts over; the fold then reads one slice back at a time.
pub(super) struct RowCollector {
    matcher: Arc<StepMatcher>,
    share: Share,
    buckets: Vec<Bucket>,
    /// The event_ids of the rows, read only to break ties and confirm repeats. Copied
    /// out of the scanned batches: their buffers also hold the ids of rows the fold
    /// does not keep, and in one process every fold partition sees every batch.
    ids: IdArena,
    groups: HashMap<String, u32, Xxh3DefaultBuilder>,
    /// Groups of short values by their inline view, found without hashing.
    short_groups: Vec<(u128, u32)>,
    group_names: Vec<String>,
    /// The rows and ids held, in the query memory pool (spillable).
    reservation: MemoryReservation,
    disk: Arc<DiskManager>,
    spill: Vec<Option<SpillRun>>,
    metrics: CollectMetrics,
}

/// The spill file of one slice, being written.
struct SpillRun {
    file: Arc<dyn SpillFile>,
    writer: StreamWriter<std::io::BufWriter<Box<dyn SpillWriter>>>,
}

impl RowCollector {
    pub(super) fn new(
        matcher: Arc<StepMatcher>,
        share: Share,
        reservation: MemoryReservation,
        disk: Arc<DiskManager>,
        metrics: CollectMetrics,
    ) -> Self {
        let no_breakdown = matcher.breakdown.is_none();
        let mut collector = Self {
            matcher,
            share,
            buckets: Bucket::many(ROW_BUCKETS),
            ids: IdArena::default(),
            groups: HashMap::default(),
            short_groups: Vec::new(),
            group_names: Vec::new(),
            reservation,
            disk,
            spill: (0..SPILL_SLICES).map(|_| None).collect(),
            metrics,
        };
        if no_breakdown {
            // Every row is in group 0.
            collector.group_id("");
        }
        collector
    }

    fn group_id(&mut self, value: &str) -> u32 {
        if let Some(&g) = self.groups.get(value) {
            return g;
        }
        let g = self.group_names.len() as u32;
        self.group_names.push(value.to_string());
        self.groups.insert(value.to_string(), g);
        g
    }

    fn group_of(&mut self, column: &StringViewArray, r: usize) -> u32 {
        const MAX_SHORT_GROUPS: usize = 64;
        let Some(key) = inline_key(column.views()[r]) else {
            return self.group_id(column.value(r));
        };
        if let Some(&(_, g)) = self.short_groups.iter().find(|(k, _)| *k == key) {
            return g;
        }
        let g = self.group_id(column.value(r));
        if self.short_groups.len() < MAX_SHORT_GROUPS {
            self.short_groups.push((key, g));
        }
        g
    }

    /// Batch columns: user_id, event_id, ts, event, [breakdown column], [properties];
    /// `user_keys`, when given, are [`user_keys`] of the batch.
    pub(super) fn add_batch(&mut self, b: &RecordBatch, user_keys: Option<&[u128]>) -> Result<()> {
        let elapsed = self.metrics.elapsed_compute.clone();
        let _timer = elapsed.timer();
        let matcher = Arc::clone(&self.matcher);
        let users = string_col(b, 0)?;
        let ids = string_col(b, 1)?;
        let ts = b.column(2).as_primitive::<TimestampMicrosecondType>();
        let events = string_col(b, 3)?;
        let mut next = 4;
        let breakdown_col = match &matcher.breakdown {
            Some(Breakdown::Column(_)) => {
                next += 1;
                Some(string_col(b, 4)?)
            }
            _ => None,
        };
        let props_col = if matcher.needs_properties {
            Some(string_col(b, next)?)
        } else {
            None
        };
        let held = self.bytes_held();
        let mut kept = 0;
        for r in 0..b.num_rows() {
            if ts.is_null(r) {
                continue;
            }
            let user = match user_keys {
                Some(keys) => keys[r],
                None => xxh3_128(users.value(r).as_bytes()),
            };
            let bucket = (user >> 118) as usize % ROW_BUCKETS;
            if !self.share.keeps(bucket) {
                continue;
            }
            let (steps, props) = matcher.row_steps(events, props_col, r);
            if steps == 0 {
                continue;
            }
            let group = match (&matcher.breakdown, breakdown_col) {
                (Some(Breakdown::Column(_)), Some(c)) => self.group_of(c, r),
                (Some(Breakdown::Property(key)), _) => {
                    let v = Breakdown::property_value(props.as_ref().and_then(|p| p.get(key)));
                    self.group_id(&v)
                }
                _ => 0,
            };
            let id = ids.value(r).as_bytes();
            self.buckets[bucket].push(Row {
                user: [(user >> 64) as u64, user as u64],
                ts: ts.value(r),
                steps,
                eid_hash: xxh3_64(id),
                eid_at: self.ids.push(id),
                eid_len: id.len() as u32,
                group,
            });
            kept += 1;
        }
        self.metrics.rows.add(kept);
        let grown = self.bytes_held() - held;
        // Spill past the pool share, and before ids outgrow their u32 offsets.
        if self.reservation.try_grow(grown).is_err() || self.ids.full() {
            self.spill()?;
        }
        Ok(())
    }

    fn rows_held(&self) -> usize {
        self.buckets.iter().map(|b| b.len).sum()
    }

    /// What the rows and ids take, for the memory pool.
    fn bytes_held(&self) -> usize {
        held_bytes(&self.buckets, &self.ids)
    }

    /// Append every row held to its slice's spill file and let go of them.
    fn spill(&mut self) -> Result<()> {
        let mut rows = 0;
        for slice in 0..SPILL_SLICES {
            let buckets: Vec<&Bucket> = slice_buckets(slice).map(|b| &self.buckets[b]).collect();
            let n: usize = buckets.iter().map(|b| b.len).sum();
            if n == 0 {
                continue;
            }
            let batch = spill_batch(&buckets, &self.ids, n)?;
            let run = match &mut self.spill[slice] {
                Some(run) => run,
                empty => {
                    let file = self.disk.create_tmp_file("funnel rows")?;
                    // The spill file's writer is unbuffered; IPC writes many small pieces.
                    let out = std::io::BufWriter::with_capacity(1 << 16, file.open_writer()?);
                    let writer = StreamWriter::try_new(out, &spill_schema())?;
                    empty.insert(SpillRun { file, writer })
                }
            };
            run.writer.write(&batch)?;
            rows += n;
        }
        self.buckets.iter_mut().for_each(|b| *b = Bucket::default());
        self.ids = IdArena::default();
        self.reservation.free();
        self.metrics.spills.add(1);
        self.metrics.spilled_rows.add(rows);
        Ok(())
    }

    /// Fold every user's rows into counters per group, reading spilled slices back one
    /// at a time.
    pub(super) fn fold(mut self, params: ChainParams, interval: Option<i64>) -> Result<Folded> {
        let elapsed = self.metrics.elapsed_compute.clone();
        let _timer = elapsed.timer();
        let has_breakdown = self.matcher.breakdown.is_some();
        // With a breakdown the total's medians come from the groups' durations (see
        // `FunnelMergeExec`): the total keeps none of its own.
        let mut out = TaskTally::new(params.steps, interval.is_none() && !has_breakdown);
        let context = |ids| FoldContext {
            params,
            interval,
            has_breakdown,
            ids,
        };
        if self.spill.iter().all(Option::is_none) {
            let ctx = context(std::mem::take(&mut self.ids));
            fold_buckets(&ctx, &self.buckets, &mut out);
        } else {
            if self.rows_held() > 0 {
                self.spill()?;
            }
            for run in std::mem::take(&mut self.spill).into_iter().flatten() {
                let mut file = run
                    .writer
                    .into_inner()?
                    .into_inner()
                    .map_err(|e| DataFusionError::IoError(e.into_error()))?;
                file.finish()?;
                let (buckets, ids) = self.read_slice(&*run.file)?;
                fold_buckets(&context(ids), &buckets, &mut out);
                self.reservation.free();
            }
        }
        Ok(Folded {
            group_names: self.group_names,
            has_breakdown,
            tally: out,
        })
    }

    /// The rows of one spilled slice, bucketed again, with their id arena.
    fn read_slice(&mut self, file: &dyn SpillFile) -> Result<(Vec<Bucket>, IdArena)> {
        let path = file
            .path()
            .ok_or_else(|| QueryError::Internal("funnel spill files must be local files".into()))?;
        self.metrics
            .spilled_bytes
            .add(file.size().unwrap_or_default() as usize);
        let reader = StreamReader::try_new(
            std::io::BufReader::new(std::fs::File::open(path).map_err(DataFusionError::IoError)?),
            None,
        )?;
        let mut buckets = Bucket::many(BUCKETS_PER_SLICE);
        let mut arena = IdArena::default();
        for batch in reader {
            let b = batch?;
            let col = |i: usize| b.column(i).as_primitive::<UInt64Type>();
            let (hi, lo, steps, eid_hash) = (col(0), col(1), col(3), col(4));
            let ts = b.column(2).as_primitive::<Int64Type>();
            let group = b.column(5).as_primitive::<UInt32Type>();
            let ids = b.column(6).as_binary::<i32>();
            let held = held_bytes(&buckets, &arena);
            for r in 0..b.num_rows() {
                if arena.full() {
                    return Err(QueryError::Internal(
                        "a spilled slice holds over 2 GiB of event_ids".into(),
                    ));
                }
                // Bucket b of this slice is at b / SPILL_SLICES (see `slice_buckets`).
                let bucket = (hi.value(r) >> 54) as usize % ROW_BUCKETS / SPILL_SLICES;
                buckets[bucket].push(Row {
                    user: [hi.value(r), lo.value(r)],
                    ts: ts.value(r),
                    steps: steps.value(r),
                    eid_hash: eid_hash.value(r),
                    eid_at: arena.push(ids.value(r)),
                    eid_len: ids.value(r).len() as u32,
                    group: group.value(r),
                });
            }
            // A slice is 1/128 of the rows: if it does not fit, the query cannot run.
            let grown = held_bytes(&buckets, &arena) - held;
            self.reservation.try_grow(grown)?;
        }
        Ok((buckets, arena))
    }
}

/// Columns of a spill file: the row without its event_id location, and the event_id.
fn spill_schema() -> SchemaRef {
    static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
        let u64 = |name| Field::new(name, DataType::UInt64, false);
        Arc::new(Schema::new(vec![
            u64("user_hi"),
            u64("user_lo"),
            Field::new("ts", DataType::Int64, false),
            u64("steps"),
            u64("eid_hash"),
            Field::new("group", DataType::UInt32, false),
            Field::new("event_id", DataType::Binary, false),
        ]))
    });
    Arc::clone(&SCHEMA)
}

fn spill_batch(buckets: &[&Bucket], arena: &IdArena, n: usize) -> Result<RecordBatch> {
    let rows = || buckets.iter().flat_map(|b| b.rows());
    let u64s = |f: fn(&Row) -> u64| Arc::new(UInt64Array::from_iter_values(rows().map(f)));
    let mut ids = BinaryBuilder::with_capacity(n, n * 16);
    for r in rows() {
        ids.append_value(event_id(arena, r));
    }
    let columns: Vec<ArrayRef> = vec![
        u64s(|r| r.user[0]),
        u64s(|r| r.user[1]),
        Arc::new(Int64Array::from_iter_values(rows().map(|r| r.ts))),
        u64s(|r| r.steps),
        u64s(|r| r.eid_hash),
        Arc::new(UInt32Array::from_iter_values(rows().map(|r| r.group))),
        Arc::new(ids.finish()),
    ];
    Ok(RecordBatch::try_new(spill_schema(), columns)?)
}

/// The 128-bit key of each row's user_id (column 0), which picks its bucket: computed
/// once per batch when several fold partitions read it.
pub(super) fn user_keys(b: &RecordBatch) -> Result<Vec<u128>> {
    let users = string_col(b, 0)?;
    Ok((0..b.num_rows())
        .map(|r| xxh3_128(users.value(r).as_bytes()))
        .collect())
}

pub(super) fn string_col(b: &RecordBatch, i: usize) -> Result<&StringViewArray> {
    b.column(i).as_string_view_opt().ok_or_else(|| {
        QueryError::Internal(format!(
            "column {i} is {} not Utf8View",
            b.column(i).data_type()
        ))
    })
}

/// What one fold reads besides the rows.
struct FoldContext {
    params: ChainParams,
    /// Trend bucket width (µs) for trend requests.
    interval: Option<i64>,
    has_breakdown: bool,
    /// The rows' event_ids.
    ids: IdArena,
}

impl FoldContext {
    fn event_id(&self, r: &Row) -> &[u8] {
        event_id(&self.ids, r)
    }
}

fn event_id<'a>(arena: &'a IdArena, r: &Row) -> &'a [u8] {
    arena.get(r.eid_at, r.eid_len)
}

/// The counters one partition of users folded into.
pub(super) struct Folded {
    /// Group id -> value.
    pub group_names: Vec<String>,
    pub has_breakdown: bool,
    pub tally: TaskTally,
}

/// The counters of one fold, by group id.
pub(super) struct TaskTally {
    pub total: Tally,
    /// Per group id (with a breakdown).
    pub groups: Vec<Option<Tally>>,
    /// Per (trend bucket start, group id): users per level.
    pub buckets: HashMap<(i64, u32), Vec<u64>>,
}

impl TaskTally {
    fn new(k: usize, durations: bool) -> Self {
        Self {
            total: Tally::new(k, durations),
            groups: Vec::new(),
            buckets: HashMap::new(),
        }
    }
}

fn fold_buckets(ctx: &FoldContext, buckets: &[Bucket], out: &mut TaskTally) {
    let p = &ctx.params;
    let k = p.steps;
    let durations = ctx.interval.is_none();
    let mut evaluator = Evaluator::default();
    let mut index = UserIndex::default();
    let mut user_rows: Vec<Row> = Vec::new();
    let mut events: Vec<FunnelEvent> = Vec::new();
    let mut scratch: Vec<Row> = Vec::new();
    for bucket in buckets {
        let rows = bucket.as_slice(&mut scratch);
        index.build(rows);
        for first in index.users() {
            user_rows.clear();
            user_rows.extend(index.rows_of(first).map(|i| rows[i]));
            user_rows.sort_unstable_by(|a, b| {
                a.ts.cmp(&b.ts)
                    .then_with(|| ctx.event_id(a).cmp(ctx.event_id(b)))
            });
            dedup_event_ids(&mut user_rows, |r| ctx.event_id(r));
            events.clear();
            events.extend(user_rows.iter().map(|r| FunnelEvent {
                ts: r.ts,
                steps: r.steps,
            }));
            let outcome = evaluator.evaluate(&events, p);
            let Some(start) = outcome.start else { continue };
            let start = user_rows[start];
            out.total.add(outcome, k);
            if let Some(interval) = ctx.interval {
                let bucket = start.ts - start.ts.rem_euclid(interval);
                let counts = out
                    .buckets
                    .entry((bucket, start.group))
                    .or_insert_with(|| vec![0; k]);
                counts.iter_mut().take(outcome.level).for_each(|c| *c += 1);
            }
            if ctx.has_breakdown {
                let g = start.group as usize;
                if out.groups.len() <= g {
                    out.groups.resize(g + 1, None);
                }
                out.groups[g]
                    .get_or_insert_with(|| Tally::new(k, durations))
                    .add(outcome, k);
            }
        }
    }
}

/// The rows of each user of one bucket, found through an open-addressing table of
/// per-user chains. This is linear in the rows where sorting the bucket was not, and
/// only a user's few rows get sorted.
#[derive(Default)]
struct UserIndex {
    /// Slot -> the user's last row, or NONE.
    slots: Vec<u32>,
    /// Row -> the same user's previous row, or NONE.
    next: Vec<u32>,
    /// The slots in use.
    used: Vec<u32>,
}

impl UserIndex {
    const NONE: u32 = u32::MAX;

    fn build(&mut self, rows: &[Row]) {
        let capacity = (rows.len() * 2).next_power_of_two().max(16);
        let mask = capacity - 1;
        self.slots.clear();
        self.slots.resize(capacity, Self::NONE);
        self.next.clear();
        self.next.resize(rows.len(), Self::NONE);
        self.used.clear();
        for (i, row) in rows.iter().enumerate() {
            // The bucket was picked by the key's top bits; its low bits pick the slot.
            let mut slot = row.user[1] as usize & mask;
            loop {
                let last = self.slots[slot];
                if last == Self::NONE {
                    self.used.push(slot as u32);
                    self.slots[slot] = i as u32;
                    break;
                }
                if rows[last as usize].user == row.user {
                    self.next[i] = last;
                    self.slots[slot] = i as u32;
                    break;
                }
                slot = (slot + 1) & mask;
            }
        }
    }

    /// One row per user: the start of its chain.
    fn users(&self) -> impl Iterator<Item = u32> + '_ {
        self.used.iter().map(|&slot| self.slots[slot as usize])
    }

    fn rows_of(&self, first: u32) -> impl Iterator<Item = usize> + '_ {
        std::iter::successors(Some(first), |&i| {
            Some(self.next[i as usize]).filter(|&n| n != Self::NONE)
        })
        .map(|i| i as usize)
    }
}

/// Keep the first row of each event_id (rows are sorted by ts, event_id). Users have
/// few rows, so all pairs of hashes are compared; long histories sort the hashes.
fn dedup_event_ids<'e>(rows: &mut Vec<Row>, eid: impl Fn(&Row) -> &'e [u8]) {
    const PAIRWISE: usize = 32;
    let same = |a: &Row, b: &Row| a.eid_hash == b.eid_hash && eid(a) == eid(b);
    if rows.len() < 2 {
        return;
    }
    let mut drop = Vec::new();
    if rows.len() <= PAIRWISE {
        for j in 1..rows.len() {
            if (0..j).any(|i| same(&rows[i], &rows[j])) {
                drop.push(j);
            }
        }
    } else {
        let mut hashes: Vec<(u64, usize)> = rows
            .iter()
            .enumerate()
            .map(|(i, r)| (r.eid_hash, i))
            .collect();
        hashes.sort_unstable();
        for w in hashes.windows(2) {
            if same(&rows[w[0].1], &rows[w[1].1]) {
                drop.push(w[1].1.max(w[0].1));
            }
        }
        drop.sort_unstable();
        drop.dedup();
    }
    if drop.is_empty() {
        return;
    }
    let mut i = 0;
    rows.retain(|_| {
        let keep = drop.binary_search(&i).is_err();
        i += 1;
        keep
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_keep_their_bytes_across_growing_and_oversized_chunks() {
        let mut arena = IdArena::default();
        let ids: Vec<Vec<u8>> = (0..20_000)
            .map(|i: usize| {
                // Mostly short ids, now and then one longer than a chunk.
                let len = if i % 5_000 == 4_999 {
                    ID_CHUNK + 10
                } else {
                    1 + i % 130
                };
                (0..len).map(|j| (i * 7 + j) as u8).collect()
            })
            .collect();
        let places: Vec<u32> = ids.iter().map(|id| arena.push(id)).collect();
        for (id, &at) in ids.iter().zip(&places) {
            assert_eq!(arena.get(at, id.len() as u32), id.as_slice());
        }
        assert!(arena.bytes >= ids.iter().map(Vec::len).sum::<usize>());
        assert!(!arena.full());

        // Chunks of 64 B doubling to 64 KiB, filled exactly by 2,047 ids of 64 bytes: an
        // empty id after them must not get offset 65,536 (the next chunk's place).
        let mut exact = IdArena::default();
        for i in 0..2_047u32 {
            exact.push(&[i as u8; 64]);
        }
        let at = exact.push(b"");
        assert_eq!(exact.get(at, 0), b"");
        let at = exact.push(b"after");
        assert_eq!(exact.get(at, 5), b"after");
    }

    #[test]
    fn a_bucket_hands_out_its_rows_in_order_from_every_chunk() {
        let row = |ts: i64| Row {
            user: [1, 2],
            ts,
            steps: 1,
            eid_hash: 0,
            eid_at: 0,
            eid_len: 0,
            group: 0,
        };
        let mut bucket = Bucket::default();
        // Past 62 chunks too (a shift past a usize's bits once made new chunks empty).
        for ts in 0..40_000 {
            bucket.push(row(ts));
        }
        let mut scratch = Vec::new();
        let rows = bucket.as_slice(&mut scratch);
        assert!(rows.iter().map(|r| r.ts).eq(0..40_000));
        assert_eq!(bucket.len, 40_000);
        assert!(bucket.capacity >= 40_000 && bucket.capacity < 40_000 + CHUNK_ROWS);
        assert!(bucket.chunks.iter().all(|c| c.capacity() <= CHUNK_ROWS));
    }
}
