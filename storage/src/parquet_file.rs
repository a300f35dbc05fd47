//! Writing events as Parquet: zstd, page statistics, one file per time partition,
//! each file sorted by (campaign, user_id, ts) and declaring that order, so funnels
//! group cheaply and readers may trust the declared `sorting_columns`.

use std::collections::HashSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use arrow::array::{AsArray, RecordBatch, StringViewArray, TimestampMicrosecondArray};
use chrono::DateTime;
use funnelhouse_schemas::arrow::{col, is_inline};
use funnelhouse_schemas::event_schema;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, Encoding, ZstdLevel};
use parquet::file::metadata::SortingColumn;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;

use crate::config::Partitioning;
use crate::disk::{Disk, DiskFile};
use crate::error::{Result, StorageError};
use crate::fsutil::rename_durable;
use crate::gather::RowSources;
use crate::manifest::{EVENTS_DIR, FileMeta};

const DAY_US: i64 = 86_400_000_000;
const HOUR_US: i64 = 3_600_000_000;

/// The file sort order, as column indexes of the event schema.
pub const SORT_COLUMNS: [usize; 3] = [col::CAMPAIGN, col::USER_ID, col::TS];

pub fn writer_properties() -> WriterProperties {
    let sorting = SORT_COLUMNS
        .iter()
        .map(|&i| SortingColumn {
            column_idx: i as i32,
            descending: false,
            nulls_first: false,
        })
        .collect();
    // zstd level 1, not the usual 3: on the benchmark's events it is both smaller (31.4
    // against 32.4 bytes/event as flushed; properties 12.6 against 13.4, user ids 4.8
    // against 5.1) and faster, and the flusher's CPU is what limits sustained ingest.
    let mut b = WriterProperties::builder()
        .set_compression(Compression::ZSTD(
            ZstdLevel::try_new(1).expect("valid zstd level"),
        ))
        .set_statistics_enabled(EnabledStatistics::Page)
        .set_sorting_columns(Some(sorting));
    // Encodings per column, each the smallest measured on the benchmark's data as flushed
    // (benches/README.md, "Where the bytes go"), but for properties (below). Ids are
    // nearly unique within a file: a dictionary only costs the flusher hashing, and their
    // lengths delta-encode well (user ids 4.8 B/row against 6.8 with a dictionary). Event ids stay DELTA_BYTE_ARRAY (as
    // small within 2%): its reader copies the values out, where a plain or length-encoded
    // column is read as views into whole decompressed pages, and the funnel engine keeps
    // each batch's event ids: views would keep the pages of rows no step matched.
    // Properties keep parquet's dictionary: where whole objects repeat (a card and a
    // carrier, say) it stores each once (1.75 against 3.98 bytes/event on `gen --short`'s
    // events, 12% of whose objects are distinct), and where nearly every object is unique
    // it soon fills its 1 MiB and the rest of the column chunk is plain (12.64 against
    // 12.50 on the default lines). Timestamps delta-encode; `received_at` takes one value
    // per request, a dictionary.
    b = b
        .set_column_dictionary_enabled(ColumnPath::from("event_id"), false)
        .set_column_encoding(ColumnPath::from("event_id"), Encoding::DELTA_BYTE_ARRAY)
        .set_column_dictionary_enabled(ColumnPath::from("user_id"), false)
        .set_column_encoding(
            ColumnPath::from("user_id"),
            Encoding::DELTA_LENGTH_BYTE_ARRAY,
        )
        .set_column_dictionary_enabled(ColumnPath::from("ts"), false)
        .set_column_encoding(ColumnPath::from("ts"), Encoding::DELTA_BINARY_PACKED);
    b.build()
}

/// Keep the memory of zstd's contexts in the C heap between files. Rust's allocations go
/// to the global allocator, but zstd (under parquet) takes each column chunk's compressor
/// and decompressor from `malloc`, and glibc gives a freed heap top above 128 KiB back to
/// the kernel and maps large blocks fresh: every file faulted its contexts in again,
/// zeroed page by page (half the page faults of a flush loop and of the flusher;
/// benches/README.md). Only C code allocates there (zstd on the flusher and on query
/// threads reading Parquet): up to 64 MiB of freed C heap per malloc arena stays mapped.
/// Process-wide: the server calls it once at start.
pub fn keep_c_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu", target_pointer_width = "64"))]
    // SAFETY: mallopt only sets glibc malloc's thresholds and checks the values it is given.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
        // The most glibc takes on 64-bit (half its 64 MiB arena heaps).
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
    }
}

/// The partition folder of an event timestamp.
pub fn partition_of(ts: i64, partitioning: Partitioning) -> String {
    let start = ts - ts.rem_euclid(DAY_US);
    let day = DateTime::from_timestamp_micros(start)
        .map(|d| d.format("%Y-%m-%d").to_string())
        .unwrap_or_default();
    match partitioning {
        Partitioning::Day => format!("date={day}"),
        Partitioning::Hour => format!("date={day}/hour={:02}", ts.rem_euclid(DAY_US) / HOUR_US),
    }
}

fn ts_column(batch: &RecordBatch) -> &TimestampMicrosecondArray {
    batch.column(col::TS).as_primitive()
}

/// One row's sort key, 40 bytes: most comparisons are three integer compares, and rows
/// of one user (the usual tie) are ordered by their `ts` without looking anything up.
struct SortKey {
    /// The row's partition, counted from the first one in this sort, times the number
    /// of campaigns, plus its campaign's rank: one integer in (partition, campaign) order.
    lead: u64,
    /// The user id as 16 big-endian bytes in two halves: its first 15 bytes, zero-padded,
    /// then its length, or 0xFF when it is longer than 15 bytes. Ordering these orders the
    /// ids themselves (a shorter id that is a prefix of a longer one, zero bytes and all,
    /// has the smaller length byte), except that two long ids alike in their first 15
    /// bytes tie and are compared in full.
    user: [u64; 2],
    ts: i64,
    batch: u32,
    row: u32,
}

/// The length byte of [`SortKey::user`] for ids longer than the 15 bytes it holds.
const LONG_USER: u8 = 0xFF;
const _: () = assert!(std::mem::size_of::<SortKey>() == 40);

impl SortKey {
    /// (batch, row) of the row this key sorts.
    fn at(&self) -> (usize, usize) {
        (self.batch as usize, self.row as usize)
    }
}

fn user_key(id: &[u8]) -> [u64; 2] {
    let mut bytes = [0u8; 16];
    let len = id.len().min(15);
    bytes[..len].copy_from_slice(&id[..len]);
    bytes[15] = if id.len() > 15 {
        LONG_USER
    } else {
        id.len() as u8
    };
    let key = u128::from_be_bytes(bytes);
    [(key >> 64) as u64, key as u64]
}

thread_local! {
    /// The sorting thread's (the flusher's) sort keys, kept between flushes and sized by
    /// the largest with room to spare ([`clear_for`]; 40 bytes a row: 20-40 MiB at the
    /// default `flush_bytes`, touched as far as rows fill it; replay flushes are of the
    /// usual size too). Fresh vectors per flush came from fresh huge pages each time,
    /// and the kernel zeroing them was ~3% of the server's samples at peak ingest
    /// (benches/README.md). Each writing thread takes the (batch, row) pairs of a
    /// gathered batch from the keys as it goes: a copy of all of them (16 bytes a row)
    /// was more fresh memory on a server's first flushes.
    static SORT_KEYS: std::cell::RefCell<Vec<SortKey>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Empty `v` and make room for `n` items. When it must grow it is replaced, not grown,
/// with half as much again: a server's flushes come in about one size (`flush_bytes`),
/// and growing the kept keys by even one row (`reserve`) was a `realloc` to twice the
/// size that copied the whole old capacity into fresh memory, which the kernel then
/// zeroed (the second flush of a load spent ~40% of its time faulting in memory the first
/// one had already faulted in; benches/README.md, session 30). Room never touched costs
/// address space only.
fn clear_for<T>(v: &mut Vec<T>, n: usize) {
    v.clear();
    if v.capacity() < n {
        // Free the old allocation first, so the allocator may hand its memory back.
        drop(std::mem::take(v));
        *v = Vec::with_capacity(n.saturating_add(n / 2));
    }
}

/// How many campaigns a flush looks for linearly: among the values found so far, and
/// by their views when inline ([`is_inline`]), before it hashes them and ranks each row
/// by its string.
const FEW_CAMPAIGNS: usize = 32;

/// The distinct campaigns of a flush, sorted (a row's rank is its campaign's index), and
/// up to [`FEW_CAMPAIGNS`] inline views with their campaigns' ranks. Campaigns interleave
/// row by row; an inline view holds its whole string, so two equal inline views are equal
/// strings in any batch, and a scan of a few integers finds the rank where comparing
/// strings was a `memcmp` call per row.
struct Campaigns<'a> {
    sorted: Vec<&'a str>,
    inline: Vec<(u128, usize)>,
}

impl<'a> Campaigns<'a> {
    /// Collects them from `campaign` columns. Within a batch equal views are equal
    /// strings, so only a change of view is looked at, and an inline view already seen is
    /// skipped in any batch; a value is then looked for among the few found so far
    /// (hashing each change cost 2% of a flush), and hashed only once there are many.
    fn collect(campaign: &[&'a StringViewArray]) -> Self {
        let mut few: Vec<&str> = Vec::new();
        let mut many: HashSet<&str> = HashSet::new();
        let mut inline: Vec<(u128, &str)> = Vec::new();
        for c in campaign {
            let mut last_view = None;
            for (r, &view) in c.views().iter().enumerate() {
                if last_view == Some(view) {
                    continue;
                }
                last_view = Some(view);
                let inline_view = is_inline(view);
                if inline_view && inline.iter().any(|&(v, _)| v == view) {
                    continue;
                }
                let value = c.value(r);
                if inline_view && inline.len() < FEW_CAMPAIGNS {
                    inline.push((view, value));
                }
                if !many.is_empty() {
                    many.insert(value);
                } else if !few.contains(&value) {
                    few.push(value);
                    if few.len() == FEW_CAMPAIGNS {
                        many.extend(few.drain(..));
                    }
                }
            }
        }
        let mut sorted: Vec<&str> = if many.is_empty() {
            few
        } else {
            // Many campaigns: ranked by their strings alone.
            inline.clear();
            many.into_iter().collect()
        };
        sorted.sort_unstable();
        let inline = (inline.into_iter())
            .map(|(view, value)| (view, sorted.binary_search(&value).unwrap_or_default()))
            .collect();
        Campaigns { sorted, inline }
    }

    /// The rank of the campaign at row `r` of `c`, whose view is `view`.
    fn rank(&self, c: &StringViewArray, r: usize, view: u128) -> usize {
        match self.inline.iter().find(|&&(v, _)| v == view) {
            Some(&(_, rank)) => rank,
            None => self.sorted.binary_search(&c.value(r)).unwrap_or_default(),
        }
    }
}

/// `f` of the sort keys of the rows of `batches` (each with its (batch, row),
/// [`SortKey::at`]) sorted by (leading key, campaign, user_id, ts): the partition (`ts`
/// divided by `unit`, when given), then the file order. The caller gathers the rows
/// straight from the batches (string values stay in their buffers; only views, numbers
/// and keys are new memory), not concatenated first. Compared directly rather than with
/// arrow's `lexsort_to_indices`, whose per-comparison dispatch took 40% of the flusher's
/// CPU under load: campaigns are ranked once (there are few) and folded with the
/// partition into one integer, user ids compare as a 16-byte key (an 8-byte prefix left
/// counter ids like `u00000123` to `memcmp`, 4% of the flusher), and `ts` is in the key
/// (looking it up for each tie was a cache miss). `batches` must not be empty.
fn with_sorted_rows<T>(
    batches: &[&RecordBatch],
    unit: Option<i64>,
    f: impl FnOnce(&[SortKey]) -> T,
) -> T {
    debug_assert!(
        !batches.is_empty(),
        "with_sorted_rows needs at least one batch"
    );
    let campaign: Vec<_> = batches
        .iter()
        .map(|b| b.column(col::CAMPAIGN).as_string_view())
        .collect();
    let user: Vec<_> = batches
        .iter()
        .map(|b| b.column(col::USER_ID).as_string_view())
        .collect();
    let ts: Vec<&[i64]> = batches.iter().map(|b| &ts_column(b).values()[..]).collect();
    let campaigns = Campaigns::collect(&campaign);
    let partition = |t: i64| unit.map_or(0, |unit| t.div_euclid(unit));
    let first = (ts.iter().flat_map(|t| t.iter()))
        .map(|&t| partition(t))
        .min()
        .unwrap_or_default();
    // Partitions from the first fit in 33 bits (hours over the whole i64 range of µs) and
    // a flush holds far fewer than 2^31 campaigns: the product fits in a u64.
    debug_assert!(
        unit.is_none_or(|unit| unit >= HOUR_US),
        "partitions of an hour or more"
    );
    let n_campaigns = campaigns.sorted.len() as u64;
    let lead = |t: i64, rank: usize| (partition(t) - first) as u64 * n_campaigns + rank as u64;
    SORT_KEYS.with_borrow_mut(|keys| {
        clear_for(keys, batches.iter().map(|b| b.num_rows()).sum());
        for (b, batch) in batches.iter().enumerate() {
            // Look a campaign's rank up once per run of one view: by the view when it
            // is one of the few inline ones, else by its string.
            let views = campaign[b].views();
            let mut run: Option<(u128, usize)> = None;
            keys.extend((0..batch.num_rows()).map(|r| {
                let view = views[r];
                let rank = match run {
                    Some((last, rank)) if last == view => rank,
                    _ => {
                        let rank = campaigns.rank(campaign[b], r, view);
                        run = Some((view, rank));
                        rank
                    }
                };
                SortKey {
                    lead: lead(ts[b][r], rank),
                    user: user_key(user[b].value(r).as_bytes()),
                    ts: ts[b][r],
                    batch: b as u32,
                    row: r as u32,
                }
            }));
        }
        keys.sort_unstable_by(|a, b| {
            (a.lead, a.user).cmp(&(b.lead, b.user)).then_with(|| {
                // Equal keys: one user, unless both ids are longer than the key holds.
                let users = if a.user[1] as u8 == LONG_USER {
                    let (x, y) = (a.at(), b.at());
                    user[x.0].value(x.1).cmp(user[y.0].value(y.1))
                } else {
                    std::cmp::Ordering::Equal
                };
                users.then(a.ts.cmp(&b.ts))
            })
        });
        f(keys)
    })
}

/// The threads a flush writes its partitions' files on: `start` at once (the caller's
/// among them), and `standby` more that wait and take the partitions not yet started once
/// `join_when` says so (asked every [`STANDBY_POLL`]; they leave when the parts run
/// out). Why the flusher uses them: `Flusher::flush` in `store.rs`.
#[derive(Clone, Copy)]
pub struct WriteThreads<'a> {
    pub start: usize,
    pub standby: usize,
    pub join_when: &'a (dyn Fn() -> bool + Sync),
}

/// `n` threads from the start, none waiting.
impl From<usize> for WriteThreads<'_> {
    fn from(n: usize) -> Self {
        WriteThreads {
            start: n,
            standby: 0,
            join_when: &|| false,
        }
    }
}

/// How often a standby writing thread asks whether to join.
pub const STANDBY_POLL: std::time::Duration = std::time::Duration::from_millis(10);

/// Write `batches` as one sorted file per partition under `<data_dir>/events/`, on the
/// `threads`, each gathering and writing one partition's file at a time (the rows are
/// sorted once, on this thread); the files come back in partition order, as from one
/// thread. Each file is fsynced and renamed into place; committing them is the
/// caller's step. On an error no further file is started and the error is returned;
/// files already renamed into place stay until the next start removes them (they are in
/// no manifest).
pub fn write_partitioned<'a>(
    disk: &dyn Disk,
    data_dir: &Path,
    batches: &[RecordBatch],
    partitioning: Partitioning,
    name_prefix: &str,
    threads: impl Into<WriteThreads<'a>>,
) -> Result<Vec<FileMeta>> {
    let threads = threads.into();
    let unit = match partitioning {
        Partitioning::Day => DAY_US,
        Partitioning::Hour => HOUR_US,
    };
    let batches: Vec<&RecordBatch> = batches.iter().filter(|b| b.num_rows() > 0).collect();
    if batches.is_empty() {
        return Ok(Vec::new());
    }
    with_sorted_rows(&batches, Some(unit), |keys| {
        // Each partition's rows, a run of the sorted ones.
        let parts: Vec<_> = (keys.chunk_by(|a, b| a.ts.div_euclid(unit) == b.ts.div_euclid(unit)))
            .map(|run| (run, partition_of(run[0].ts, partitioning)))
            .collect();
        write_parts(disk, data_dir, &batches, &parts, name_prefix, threads)
    })
}

/// Gather each part's rows (in file order) and write them as one file into its
/// partition, on the `threads`. Each thread gathers the rows it writes, a batch of them
/// at a time ([`write_gathered`]): the gathers are spread over the threads, and the
/// sorted copy held is a batch per thread, not a partition or the whole flush.
fn write_parts(
    disk: &dyn Disk,
    data_dir: &Path,
    batches: &[&RecordBatch],
    parts: &[(&[SortKey], String)],
    name_prefix: &str,
    threads: WriteThreads,
) -> Result<Vec<FileMeta>> {
    let sources = RowSources::new(batches)?;
    // The largest partitions first, so the threads finish close together (with one
    // thread and none on standby, no helper starts and this thread writes them all).
    let mut order: Vec<usize> = (0..parts.len()).collect();
    order.sort_unstable_by_key(|&i| std::cmp::Reverse(parts[i].0.len()));
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let write_next_parts = || {
        let mut files = Vec::new();
        while !failed.load(Ordering::Relaxed) {
            let Some(&i) = order.get(next.fetch_add(1, Ordering::Relaxed)) else {
                break;
            };
            let (keys, partition) = &parts[i];
            let file = write_gathered(disk, data_dir, &sources, keys, partition, name_prefix);
            failed.fetch_or(file.is_err(), Ordering::Relaxed);
            files.push((i, file));
        }
        files
    };
    // A standby thread takes no part until it is told to join, and leaves once every
    // part is taken (or one failed): this thread wakes it then, so that a flush whose
    // standby never joined does not wait out a poll.
    let standby = || {
        while !failed.load(Ordering::Relaxed) && next.load(Ordering::Relaxed) < order.len() {
            if (threads.join_when)() {
                return write_next_parts();
            }
            std::thread::park_timeout(STANDBY_POLL);
        }
        Vec::new()
    };
    let mut files = std::thread::scope(|s| {
        // A helper the OS refuses leaves its share to the others.
        let start = threads.start.min(parts.len());
        let standby_helpers = threads.standby.min(parts.len() - start);
        type Work<'w> = &'w (dyn Fn() -> Vec<(usize, Result<FileMeta>)> + Sync);
        let helpers: Vec<_> = ((1..start).map(|_| &write_next_parts as Work))
            .chain((0..standby_helpers).map(|_| &standby as Work))
            .filter_map(|work| {
                let helper = std::thread::Builder::new().name("fh-flush-writer".into());
                helper.spawn_scoped(s, work).ok()
            })
            .collect();
        let mut files = write_next_parts();
        for helper in &helpers {
            helper.thread().unpark();
        }
        for helper in helpers {
            let theirs = helper.join();
            files.extend(theirs.unwrap_or_else(|panic| std::panic::resume_unwind(panic)));
        }
        files
    });
    // After a failure some partitions are missing, and the error is what comes back.
    files.sort_unstable_by_key(|(i, _)| *i);
    files.into_iter().map(|(_, file)| file).collect()
}

/// Rows gathered into one sorted batch at a time while a file is written. The Parquet
/// writer encodes each batch while its views are still in the cache, and the next batch
/// reuses its memory: a whole partition's copy (about 100 MB for a default flush of
/// short-line events of one day) was fresh memory every flush.
const GATHER_ROWS: usize = 16 * 1024;

/// Write the rows of `sources` that `keys` sort, in this order, as one file into
/// `partition`.
fn write_gathered(
    disk: &dyn Disk,
    data_dir: &Path,
    sources: &RowSources,
    keys: &[SortKey],
    partition: &str,
    name_prefix: &str,
) -> Result<FileMeta> {
    let mut file = SortedFileWriter::create(disk, data_dir, partition, name_prefix)?;
    let mut rows = Vec::with_capacity(GATHER_ROWS.min(keys.len()));
    for chunk in keys.chunks(GATHER_ROWS) {
        rows.clear();
        rows.extend(chunk.iter().map(SortKey::at));
        file.write(&sources.gather(&rows)?)?;
    }
    file.finish()
}

/// Sort and write one file into `partition`.
pub fn write_sorted_file(
    disk: &dyn Disk,
    data_dir: &Path,
    batch: &RecordBatch,
    partition: &str,
    name_prefix: &str,
) -> Result<FileMeta> {
    with_sorted_rows(&[batch], None, |keys| {
        let sources = RowSources::new(&[batch])?;
        write_gathered(disk, data_dir, &sources, keys, partition, name_prefix)
    })
}

/// A Parquet file of a partition being written from batches already in file order, a
/// batch at a time; [`SortedFileWriter::finish`] fsyncs it and renames it into place.
pub struct SortedFileWriter<'a> {
    disk: &'a dyn Disk,
    writer: ArrowWriter<Box<dyn DiskFile>>,
    tmp: PathBuf,
    final_path: PathBuf,
    meta: FileMeta,
}

impl<'a> SortedFileWriter<'a> {
    pub fn create(
        disk: &'a dyn Disk,
        data_dir: &Path,
        partition: &str,
        name_prefix: &str,
    ) -> Result<Self> {
        let rel_dir = format!("{EVENTS_DIR}/{partition}");
        let dir = data_dir.join(&rel_dir);
        crate::fsutil::create_dir_durable(disk, &dir)?;
        let name = format!("{name_prefix}-{}.parquet", uuid::Uuid::now_v7().simple());
        let final_path = dir.join(&name);
        let tmp = final_path.with_extension("tmp");
        let file = disk.create(&tmp).map_err(StorageError::io(&tmp))?;
        let writer = ArrowWriter::try_new(file, event_schema(), Some(writer_properties()))?;
        Ok(Self {
            disk,
            writer,
            tmp,
            final_path,
            meta: FileMeta {
                path: format!("{rel_dir}/{name}"),
                partition: partition.to_string(),
                rows: 0,
                bytes: 0,
                min_ts: i64::MAX,
                max_ts: i64::MIN,
                node: None,
            },
        })
    }

    pub fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        let ts = ts_column(batch).values();
        self.meta.rows += batch.num_rows() as u64;
        self.meta.min_ts = ts.iter().copied().fold(self.meta.min_ts, i64::min);
        self.meta.max_ts = ts.iter().copied().fold(self.meta.max_ts, i64::max);
        self.writer.write(batch)?;
        Ok(())
    }

    pub fn finish(mut self) -> Result<FileMeta> {
        let mut file = self.writer.into_inner()?;
        file.sync().map_err(StorageError::io(&self.tmp))?;
        self.meta.bytes = std::fs::metadata(&self.tmp)
            .map_err(StorageError::io(&self.tmp))?
            .len();
        rename_durable(self.disk, &self.tmp, &self.final_path)?;
        if self.meta.rows == 0 {
            (self.meta.min_ts, self.meta.max_ts) = (0, 0);
        }
        Ok(self.meta)
    }
}

/// Read a whole Parquet file (optionally only some columns) as batches.
pub fn read_file(path: &Path, columns: Option<&[usize]>) -> Result<Vec<RecordBatch>> {
    Ok(read_batches(path, columns)?.collect::<Result<Vec<_>, _>>()?)
}

/// The file's batches one at a time (of 64 Ki rows), so a big file is never held whole.
pub fn read_batches(
    path: &Path,
    columns: Option<&[usize]>,
) -> Result<parquet::arrow::arrow_reader::ParquetRecordBatchReader> {
    read_batches_of(path, columns, 64 * 1024)
}

/// [`read_batches`] with batches of `rows` rows.
pub fn read_batches_of(
    path: &Path,
    columns: Option<&[usize]>,
    rows: usize,
) -> Result<parquet::arrow::arrow_reader::ParquetRecordBatchReader> {
    use parquet::arrow::ProjectionMask;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let file = File::open(path).map_err(StorageError::io(path))?;
    let mut builder = ParquetRecordBatchReaderBuilder::try_new(file)?;
    if let Some(cols) = columns {
        let mask = ProjectionMask::roots(builder.parquet_schema(), cols.iter().copied());
        builder = builder.with_projection(mask);
    }
    Ok(builder.with_batch_size(rows).build()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::compute::concat_batches;
    use funnelhouse_schemas::{Event, EventRef, events_to_batch};

    use crate::disk::{DiskOp, Errno, Fault, FaultDisk, OsDisk};
    use crate::gather::gather_rows;

    /// The rows of `batches` as one batch in file order (see [`with_sorted_rows`]).
    fn sort_batches(batches: &[&RecordBatch], unit: Option<i64>) -> Result<RecordBatch> {
        with_sorted_rows(batches, unit, |keys| {
            let rows: Vec<_> = keys.iter().map(SortKey::at).collect();
            Ok(gather_rows(batches, &rows)?)
        })
    }

    /// A `scan` event with id `e<i>`, no channel and no properties.
    fn scan(i: i64, user: &str, campaign: &str, ts: i64) -> Event {
        Event::from(EventRef {
            event_id: &format!("e{i}"),
            event: "scan",
            user_id: user,
            campaign,
            channel: "",
            ts,
            received_at: 0,
            properties: None,
        })
    }

    #[test]
    fn kept_keys_keep_their_room_and_grow_with_headroom() {
        let mut v: Vec<u64> = Vec::new();
        clear_for(&mut v, 1000);
        assert!(v.is_empty());
        assert!(v.capacity() >= 1500);
        v.extend(0..1000);
        let (cap, ptr) = (v.capacity(), v.as_ptr());
        // A slightly larger flush fits in the room already there.
        clear_for(&mut v, 1001);
        assert!(v.is_empty());
        assert_eq!((v.capacity(), v.as_ptr()), (cap, ptr));
        clear_for(&mut v, 4000);
        assert!(v.capacity() >= 6000);
    }

    #[test]
    fn sorting_batches_orders_like_a_plain_tuple_sort() {
        let mut x: u64 = 7;
        let mut next = |n: u64| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 33) % n
        };
        // Shared 8+ and 15+ byte prefixes, a prefix of another id, ids of exactly 15 and
        // 16 bytes, short, empty and multi-byte ids.
        let users = [
            "",
            "é",
            "z",
            "user-0000001",
            "user-0000002",
            "user-000000",
            "u",
            "user-0000001x",
            "ab",
            "user-00000000001",
            "user-000000000010",
            "user-0000000000010",
            "user-00000000000101",
            "user-0000000000009",
            // 15 bytes, and ids that extend it by zero bytes, short or long.
            "user-0000000001",
            "user-0000000001\0",
            "user-0000000001\0\0",
            "ab\0",
            "ab\0\0",
        ];
        // Few campaigns (found by their views when inline, by their strings when longer
        // than a view holds), then with a tail of more than `FEW_CAMPAIGNS` (hashed, and
        // ranked by their strings).
        for tail in [false, true] {
            let events: Vec<Event> = (0..2000)
                .map(|i| {
                    scan(
                        i,
                        users[next(users.len() as u64) as usize],
                        &match next(8) {
                            0 if tail => format!("t{}", next(40)),
                            1 => format!("campaign-longer-{}", next(2)),
                            2 => ["", "é"][next(2) as usize].to_string(),
                            _ => format!("c{}", next(3)),
                        },
                        next(5) as i64 * DAY_US / 2 + next(3) as i64,
                    )
                })
                .collect();
            check_sorted(&events);
        }
    }

    /// Sorting `events` in three batches of uneven sizes gives the rows of a plain tuple
    /// sort, whole.
    fn check_sorted(events: &[Event]) {
        let batches: Vec<RecordBatch> = [&events[..700], &events[700..701], &events[701..]]
            .map(events_to_batch)
            .into();
        let batch = concat_batches(&event_schema(), &batches).unwrap();
        // By day and by hour as flushes do, and without a partition as compaction does.
        for unit in [Some(DAY_US), Some(HOUR_US), None] {
            let sorted = sort_batches(&batches.iter().collect::<Vec<_>>(), unit).unwrap();
            let key = |b: &RecordBatch, r: usize| {
                let s = |c| b.column(c).as_string_view().value(r).to_string();
                let ts = ts_column(b).value(r);
                let partition = unit.map_or(0, |unit| ts.div_euclid(unit));
                (partition, s(col::CAMPAIGN), s(col::USER_ID), ts)
            };
            let mut expected: Vec<_> = (0..batch.num_rows()).map(|r| key(&batch, r)).collect();
            expected.sort();
            let got: Vec<_> = (0..sorted.num_rows()).map(|r| key(&sorted, r)).collect();
            assert_eq!(got, expected, "{unit:?}");
            // Whole rows moved together: each event id still has its own key.
            let rows = |b: &RecordBatch| {
                let ids = b.column(col::EVENT_ID).as_string_view();
                let mut rows: Vec<_> = (0..b.num_rows())
                    .map(|r| (ids.value(r).to_string(), key(b, r)))
                    .collect();
                rows.sort();
                rows
            };
            assert_eq!(rows(&sorted), rows(&batch), "{unit:?}");
        }
    }

    /// A partition of more rows than one gathered batch is still one file, in file order,
    /// holding each row once, with long strings (in data buffers) intact.
    #[test]
    fn a_partition_larger_than_a_gathered_batch_is_one_sorted_file() {
        let dir = tempfile::tempdir().unwrap();
        let n = 2 * GATHER_ROWS + 123;
        let events: Vec<Event> = (0..n as i64)
            .map(|i| {
                scan(
                    i,
                    // 16 bytes: past a view's inline 12, and past the sort key's 15.
                    &format!("user-{:011}", i * 7919 % 5000),
                    ["campaign-long-name", "c"][i as usize % 2],
                    1_793_491_200_000_000 + (i * 104_729 % 86_000) * 1_000_000,
                )
            })
            .collect();
        let batches = [
            events_to_batch(&events[..GATHER_ROWS - 1]),
            events_to_batch(&events[GATHER_ROWS - 1..]),
        ];
        let files =
            write_partitioned(&OsDisk, dir.path(), &batches, Partitioning::Day, "f1", 1).unwrap();
        assert_eq!(files.len(), 1);
        assert_eq!(files[0].rows, n as u64);
        let ts = events.iter().map(|e| e.ts);
        assert_eq!(files[0].min_ts, ts.clone().min().unwrap());
        assert_eq!(files[0].max_ts, ts.max().unwrap());
        let read = read_file(&dir.path().join(&files[0].path), None).unwrap();
        let mut rows = Vec::new();
        for b in &read {
            let s = |c, r| b.column(c).as_string_view().value(r).to_string();
            for r in 0..b.num_rows() {
                let key = (
                    s(col::CAMPAIGN, r),
                    s(col::USER_ID, r),
                    ts_column(b).value(r),
                );
                rows.push((key, s(col::EVENT_ID, r)));
            }
        }
        assert!(rows.is_sorted_by(|a, b| a.0 <= b.0), "rows in file order");
        let mut got: Vec<_> = rows.into_iter().map(|(key, id)| (id, key)).collect();
        got.sort();
        let mut expected: Vec<_> = (events.iter())
            .map(|e| {
                let key = (e.campaign().to_string(), e.user_id().to_string(), e.ts);
                (e.event_id().to_string(), key)
            })
            .collect();
        expected.sort();
        assert_eq!(got, expected);
    }

    /// A flush over more partitions than threads (written side by side) fails as a whole
    /// when one file fails, and otherwise returns one file per partition in partition
    /// order, each holding exactly its partition's rows.
    #[test]
    fn a_flush_over_many_partitions_writes_each_once_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let days = 9;
        let events: Vec<Event> = (0..3000)
            .map(|i| {
                scan(
                    i,
                    &format!("u{}", i % 37),
                    "c",
                    // Day `days - 1 - i % days` after 2026-11-01: arrivals cycle through
                    // the days backwards.
                    1_793_491_200_000_000 + (days - 1 - i % days) * DAY_US + i,
                )
            })
            .collect();
        let batches = [
            events_to_batch(&events[..1234]),
            events_to_batch(&events[1234..]),
        ];
        let disk = FaultDisk::new();
        disk.inject(Fault::new(DiskOp::Write, "date=2026-11-05", Errno::NoSpace));
        let write = || write_partitioned(&disk, dir.path(), &batches, Partitioning::Day, "f1", 4);
        let failed = write().expect_err("a failed partition fails the flush");
        assert!(failed.to_string().contains("No space left"), "{failed}");
        assert_eq!(disk.injected(), 1);
        let expected: Vec<String> = (1..=days).map(|d| format!("date=2026-11-{d:02}")).collect();
        let mut all: Vec<String> = events.iter().map(|e| e.event_id().to_string()).collect();
        all.sort();
        // Every partition in order, each file holding exactly its partition's rows, every
        // event once.
        let check = |files: &[FileMeta]| {
            let partitions: Vec<&str> = files.iter().map(|f| f.partition.as_str()).collect();
            assert_eq!(partitions, expected);
            let mut ids = Vec::new();
            for file in files {
                let read = read_file(&dir.path().join(&file.path), None).unwrap();
                let rows: usize = read.iter().map(RecordBatch::num_rows).sum();
                assert_eq!(rows as u64, file.rows, "{}", file.path);
                for b in &read {
                    for r in 0..b.num_rows() {
                        let ts = ts_column(b).value(r);
                        assert_eq!(partition_of(ts, Partitioning::Day), file.partition);
                        let id = b.column(col::EVENT_ID).as_string_view().value(r);
                        ids.push(id.to_string());
                    }
                }
            }
            ids.sort();
            assert_eq!(ids, all);
        };
        // The retry (the fault is spent) writes every partition.
        check(&write().unwrap());

        // Standby threads that are told to join at once, or never are, change nothing
        // written; the write returns either way, and a failure with them joined fails it.
        for join in [false, true] {
            let join_when = || join;
            let threads = WriteThreads {
                start: 1,
                standby: 2,
                join_when: &join_when,
            };
            let write = || {
                write_partitioned(
                    &disk,
                    dir.path(),
                    &batches,
                    Partitioning::Day,
                    "f2",
                    threads,
                )
            };
            check(&write().unwrap());
            disk.inject(Fault::new(DiskOp::Write, "date=2026-11-02", Errno::Io));
            write().expect_err("a failed partition fails the flush");
        }
        assert_eq!(disk.injected(), 3);
    }
}
