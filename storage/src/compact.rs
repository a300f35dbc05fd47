//! Compaction: merge the small files of a partition into one, dropping late duplicates
//! (an event_id stored twice because its resend came after the dedup window). The new
//! file replaces the old ones in one manifest commit, so a crash leaves either set.
//!
//! Every file a flush wrote (named `f...`) goes through compaction once, however big, so
//! each stored row is checked against the partition's other files: a late duplicate
//! cannot hide in two big files. The merge reads and writes without holding the
//! manifest; only the commit takes it, so flushes commit while a compaction runs.
//!
//! Memory does not follow the files' size: the rows to drop are found from the ids
//! alone (about 32 bytes per merged row), then the files, each already sorted, are
//! merged a batch at a time into the new file. Nor their number: a step merges at most
//! `max_files` of them, and a backlog is worked off in several steps.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use arrow::array::{AsArray, RecordBatch};
use arrow::datatypes::TimestampMicrosecondType;
use funnelhouse_schemas::arrow::col;
use parquet::arrow::arrow_reader::ParquetRecordBatchReader;

use crate::dedup::id_hash;
use crate::disk::Disk;
use crate::error::Result;
use crate::gather::gather_rows;
use crate::manifest::{FileMeta, Manifest};
use crate::parquet_file::{SortedFileWriter, read_batches, read_batches_of};

#[derive(Debug, Clone, Copy)]
pub struct CompactOptions {
    /// A partition is compacted once it has this many small files.
    pub min_files: usize,
    /// Files below this size are small.
    pub small_bytes: u64,
    /// Most input bytes merged in one step, to bound the work of one step.
    pub max_input_bytes: u64,
    /// Most files merged in one step: each open input holds a batch of up to 8 K rows
    /// (1.5-2 MB), so merging the 1,227 small files of a lagging partition at once took
    /// about 2 GB (the crash loop's RSS peak).
    pub max_files: usize,
}

/// [`CompactOptions::max_files`] from the config: about 128 MB of open inputs.
const MAX_MERGE_FILES: usize = 64;

impl CompactOptions {
    /// The `[ingest]` settings; `min_files` differs between background and offline runs.
    pub fn from_config(cfg: &crate::config::IngestConfig, min_files: usize) -> Self {
        let small = cfg.compact_small_bytes.0 as u64;
        Self {
            min_files,
            small_bytes: small,
            max_input_bytes: 4 * small,
            max_files: MAX_MERGE_FILES,
        }
    }
}

#[derive(Debug, Default, Clone)]
pub struct CompactOutcome {
    pub partitions: usize,
    pub files_in: usize,
    pub rows_in: u64,
    pub rows_out: u64,
    /// Paths (relative to the data dir) no longer in the manifest, to delete once readers are done.
    pub replaced: Vec<String>,
    /// A partition has small files this step left out (input budget, file cap): run again.
    pub more: bool,
}

impl CompactOutcome {
    /// Add a later step's outcome to this one (its partitions are among this one's).
    pub fn absorb(&mut self, step: CompactOutcome) {
        self.files_in += step.files_in;
        self.rows_in += step.rows_in;
        self.rows_out += step.rows_out;
        self.replaced.extend(step.replaced);
        self.more = step.more;
    }
}

/// A file a flush wrote, not yet checked against the partition's other files.
fn from_flush(f: &FileMeta) -> bool {
    f.path
        .rsplit('/')
        .next()
        .is_some_and(|name| name.starts_with('f'))
}

/// Compact the partitions that need it (only those in `only`, when given) and commit the
/// manifest; `on_commit` runs with the committed manifest while it is still locked.
/// Returns what changed; `replaced` files are still on disk. Only compaction removes
/// files from the manifest, so the files it merged are still there at its commit.
pub fn compact(
    disk: &dyn Disk,
    data_dir: &Path,
    manifest: &Mutex<Manifest>,
    only: Option<&HashSet<String>>,
    opts: CompactOptions,
    on_commit: impl FnOnce(&Manifest),
) -> Result<CompactOutcome> {
    let current = manifest.lock().expect("manifest lock").clone();
    let mut by_partition: BTreeMap<&str, Vec<&FileMeta>> = BTreeMap::new();
    for f in &current.files {
        if only.is_none_or(|o| o.contains(&f.partition)) {
            by_partition.entry(&f.partition).or_default().push(f);
        }
    }
    let mut out = CompactOutcome::default();
    let mut added = Vec::new();
    for (partition, files) in by_partition {
        let (mut small, big): (Vec<&FileMeta>, Vec<&FileMeta>) = files
            .into_iter()
            .partition(|f| f.bytes < opts.small_bytes || from_flush(f));
        let unchecked_big = small.iter().any(|f| f.bytes >= opts.small_bytes);
        if small.len() < opts.min_files && !unchecked_big {
            continue;
        }
        small.sort_by_key(|f| f.bytes);
        let candidates = small.len();
        let mut budget = 0;
        let mut taken = 0;
        // Within the input budget and the file cap, but always at least one file, so a
        // big flush file (at most one flush's worth) is checked too.
        small.retain(|f| {
            budget += f.bytes;
            taken += 1;
            taken == 1 || (budget <= opts.max_input_bytes && taken <= opts.max_files)
        });
        // One small file is still worth rewriting when big ones may hold its late duplicates.
        if small.len() == 1 && big.is_empty() && !from_flush(small[0]) {
            continue;
        }
        out.more |= small.len() < candidates;
        let paths: Vec<PathBuf> = small.iter().map(|f| data_dir.join(&f.path)).collect();
        let big_paths: Vec<PathBuf> = big.iter().map(|f| data_dir.join(&f.path)).collect();
        let rows: u64 = small.iter().map(|f| f.rows).sum();
        let passes = rows.div_ceil(IDS_PER_PASS).max(1);
        let drop = rows_to_drop(&paths, &big_paths, passes)?;
        let (meta, rows_in) = merge_sorted(disk, data_dir, partition, &paths, &drop)?;
        tracing::info!(
            partition,
            files = small.len(),
            rows_in,
            rows_out = meta.rows,
            "compacted"
        );
        out.partitions += 1;
        out.files_in += small.len();
        out.rows_in += rows_in;
        out.rows_out += meta.rows;
        out.replaced.extend(small.iter().map(|f| f.path.clone()));
        added.push(meta);
    }
    if out.partitions > 0 {
        let mut current = manifest.lock().expect("manifest lock");
        let mut next = current.clone();
        let replaced: HashSet<&String> = out.replaced.iter().collect();
        next.files.retain(|f| !replaced.contains(&f.path));
        next.files.extend(added);
        next.commit(disk, data_dir)?;
        *current = next;
        on_commit(&current);
    }
    Ok(out)
}

/// Most ids held at once by [`rows_to_drop`]: about 32 bytes each, so about 128 MiB.
const IDS_PER_PASS: u64 = 4 << 20;

/// Rows (file, row) of the merged `files` that go: every row whose event_id a file of
/// `others` already holds, and of an id stored twice among `files`, every row but the
/// first received. Reads ids only, a batch at a time, in `passes` passes over disjoint
/// ranges of id hashes (enough to keep each under [`IDS_PER_PASS`] ids): memory is
/// bounded whatever the merge's size (one merge of 17M rows held 540 MB of ids in one
/// pass, the burst benchmark's RSS peak).
fn rows_to_drop(
    files: &[PathBuf],
    others: &[PathBuf],
    passes: u64,
) -> Result<HashSet<(usize, usize)>> {
    let mut out = HashSet::new();
    for pass in 0..passes {
        let in_pass = |h: u128| (h >> 64) as u64 % passes == pass;
        rows_to_drop_among(files, others, in_pass, &mut out)?;
    }
    Ok(out)
}

/// One pass of [`rows_to_drop`] over the ids whose hash is `in_pass`.
fn rows_to_drop_among(
    files: &[PathBuf],
    others: &[PathBuf],
    in_pass: impl Fn(u128) -> bool,
    out: &mut HashSet<(usize, usize)>,
) -> Result<()> {
    let ids_of = |path: &Path, columns: &[usize]| read_batches(path, Some(columns));
    let mut seen: HashSet<u128> = HashSet::new();
    let mut repeated: HashSet<u128> = HashSet::new();
    for path in files {
        for b in ids_of(path, &[col::EVENT_ID])? {
            let b = b?;
            let ids = b.column(0).as_string_view().iter().flatten().map(id_hash);
            for h in ids.filter(|&h| in_pass(h)) {
                if !seen.insert(h) {
                    repeated.insert(h);
                }
            }
        }
    }
    let mut elsewhere: HashSet<u128> = HashSet::new();
    for path in others {
        for b in ids_of(path, &[col::EVENT_ID])? {
            let b = b?;
            let ids = b.column(0).as_string_view().iter().flatten().map(id_hash);
            elsewhere.extend(ids.filter(|h| seen.contains(h)));
        }
    }
    drop(seen);
    if repeated.is_empty() && elsewhere.is_empty() {
        return Ok(());
    }
    // Every row of a repeated id (rare: late resends), to keep the first received.
    let mut copies: HashMap<u128, Vec<(i64, usize, usize)>> = HashMap::new();
    for (file, path) in files.iter().enumerate() {
        let mut row = 0;
        for b in ids_of(path, &[col::EVENT_ID, col::RECEIVED_AT])? {
            let b = b?;
            let ids = b.column(0).as_string_view();
            let at = b.column(1).as_primitive::<TimestampMicrosecondType>();
            for (id, at) in ids.iter().zip(at.values()) {
                let h = id_hash(id.unwrap_or(""));
                if elsewhere.contains(&h) {
                    out.insert((file, row));
                } else if repeated.contains(&h) {
                    copies.entry(h).or_default().push((*at, file, row));
                }
                row += 1;
            }
        }
    }
    for mut rows in copies.into_values() {
        rows.sort_unstable();
        out.extend(rows[1..].iter().map(|&(_, f, r)| (f, r)));
    }
    Ok(())
}

/// Rows per batch read from each merged file and per batch written.
const MERGE_BATCH_ROWS: usize = 8 * 1024;

/// One merged file's reader and its current row.
struct Cursor {
    reader: ParquetRecordBatchReader,
    /// Index of the current batch in the merge's batch pool; `None` once exhausted.
    batch: Option<usize>,
    row: usize,
    /// Row number in the file of the current batch's first row.
    base: usize,
}

/// Merge `files`, each sorted in file order (campaign, user_id, ts), into one sorted file
/// of `partition`, leaving out the rows in `drop`. Holds about one batch per file and one
/// batch of output, whatever the files' size. Returns the new file and the rows read.
fn merge_sorted(
    disk: &dyn Disk,
    data_dir: &Path,
    partition: &str,
    files: &[PathBuf],
    drop: &HashSet<(usize, usize)>,
) -> Result<(FileMeta, u64)> {
    let mut pool: Vec<RecordBatch> = Vec::new();
    let mut cursors = Vec::with_capacity(files.len());
    for path in files {
        let mut cursor = Cursor {
            reader: read_batches_of(path, None, MERGE_BATCH_ROWS)?,
            batch: None,
            row: 0,
            base: 0,
        };
        cursor.next_batch(&mut pool)?;
        cursors.push(cursor);
    }
    let mut out = SortedFileWriter::create(disk, data_dir, partition, "c")?;
    let mut picked: Vec<(usize, usize)> = Vec::with_capacity(MERGE_BATCH_ROWS);
    let mut rows_in = 0u64;
    loop {
        let mut min: Option<usize> = None;
        for (i, c) in cursors.iter().enumerate() {
            if c.batch.is_some()
                && min.is_none_or(|m| c.key(&pool).cmp(&cursors[m].key(&pool)).is_lt())
            {
                min = Some(i);
            }
        }
        let Some(i) = min else { break };
        let c = &mut cursors[i];
        let batch = c.batch.expect("a live cursor has a batch");
        rows_in += 1;
        if !drop.contains(&(i, c.base + c.row)) {
            picked.push((batch, c.row));
        }
        c.row += 1;
        if c.row == pool[batch].num_rows() {
            c.next_batch(&mut pool)?;
        }
        if picked.len() == MERGE_BATCH_ROWS {
            emit(&mut out, &mut pool, &mut cursors, &mut picked)?;
        }
    }
    emit(&mut out, &mut pool, &mut cursors, &mut picked)?;
    Ok((out.finish()?, rows_in))
}

impl Cursor {
    fn key<'p>(&self, pool: &'p [RecordBatch]) -> (&'p str, &'p str, i64) {
        let b = &pool[self.batch.expect("a live cursor has a batch")];
        let ts = b.column(col::TS).as_primitive::<TimestampMicrosecondType>();
        (
            b.column(col::CAMPAIGN).as_string_view().value(self.row),
            b.column(col::USER_ID).as_string_view().value(self.row),
            ts.value(self.row),
        )
    }

    fn next_batch(&mut self, pool: &mut Vec<RecordBatch>) -> Result<()> {
        if let Some(b) = self.batch {
            self.base += pool[b].num_rows();
        }
        self.row = 0;
        self.batch = None;
        for b in self.reader.by_ref() {
            let b = b?;
            if b.num_rows() > 0 {
                pool.push(b);
                self.batch = Some(pool.len() - 1);
                break;
            }
        }
        Ok(())
    }
}

/// Write the picked rows as one batch, then keep only the cursors' current batches.
fn emit(
    out: &mut SortedFileWriter,
    pool: &mut Vec<RecordBatch>,
    cursors: &mut [Cursor],
    picked: &mut Vec<(usize, usize)>,
) -> Result<()> {
    if !picked.is_empty() {
        let refs: Vec<&RecordBatch> = pool.iter().collect();
        out.write(&gather_rows(&refs, picked)?)?;
        picked.clear();
    }
    let mut kept = Vec::with_capacity(cursors.len());
    for c in cursors.iter_mut() {
        if let Some(b) = c.batch {
            kept.push(pool[b].clone());
            c.batch = Some(kept.len() - 1);
        }
    }
    *pool = kept;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::OsDisk;
    use crate::parquet_file::{read_file, write_sorted_file};
    use funnelhouse_schemas::{Event, EventRef, events_to_batch};

    /// A partition with more small files than one step may merge is compacted in steps
    /// of at most `max_files` inputs, each saying whether more is left, until one file
    /// holds every row.
    #[test]
    fn a_step_merges_at_most_max_files_and_says_more_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let files: Vec<FileMeta> = (0..10)
            .map(|f| {
                let events: Vec<Event> = (0..5)
                    .map(|i| {
                        Event::from(EventRef {
                            event_id: &format!("f{f}-{i}"),
                            event: "scan",
                            user_id: &format!("u{i}"),
                            campaign: "c",
                            channel: "",
                            ts: i,
                            received_at: f,
                            properties: None,
                        })
                    })
                    .collect();
                write_sorted_file(&OsDisk, dir.path(), &events_to_batch(&events), "p", "f").unwrap()
            })
            .collect();
        let manifest = Mutex::new(Manifest {
            wal_flushed_through: 0,
            files,
        });
        let opts = CompactOptions {
            min_files: 2,
            small_bytes: u64::MAX,
            max_input_bytes: u64::MAX,
            max_files: 4,
        };
        let mut steps = Vec::new();
        loop {
            let o = compact(&OsDisk, dir.path(), &manifest, None, opts, |_| {}).unwrap();
            steps.push((o.files_in, o.more));
            if !o.more {
                break;
            }
        }
        // 10 flush files -> 7 -> 4 (3 flush files and the first merge) -> 1.
        assert_eq!(steps, vec![(4, true), (4, true), (4, false)]);
        let m = manifest.lock().unwrap();
        assert_eq!(m.files.len(), 1);
        assert_eq!(m.files[0].rows, 50);
    }

    /// Several sorted files with repeated ids (received at different times) and ids a
    /// big file holds, merged with tiny batches (ids checked in one pass or several):
    /// the output is in file order and holds exactly the first received row of each id
    /// not in the big file.
    #[test]
    fn the_streaming_merge_equals_a_sort_of_the_kept_rows() {
        let dir = tempfile::tempdir().unwrap();
        let mut x: u64 = 3;
        let mut rand = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let mut all = Vec::new();
        let mut files = Vec::new();
        for f in 0..5 {
            let events: Vec<Event> = (0..20_000)
                .map(|_| {
                    Event::from(EventRef {
                        event_id: &format!("e{}", rand(60_000)),
                        event: "scan",
                        user_id: &format!("u{}", rand(50)),
                        campaign: &format!("c{}", rand(3)),
                        channel: "",
                        ts: rand(100_000) as i64,
                        received_at: rand(1_000_000) as i64,
                        properties: None,
                    })
                })
                .collect();
            // Within one file an id appears once, as a flush stores it.
            let mut ids = HashSet::new();
            let events: Vec<Event> = events
                .into_iter()
                .filter(|e| ids.insert(e.event_id().to_string()))
                .collect();
            let batch = events_to_batch(&events);
            let prefix = if f == 4 { "c" } else { "f" };
            files.push(write_sorted_file(&OsDisk, dir.path(), &batch, "p", prefix).unwrap());
            if f < 4 {
                all.extend(events);
            }
        }
        // The big file is the last one: every id it holds leaves the others.
        let big_ids: HashSet<String> = read_file(&dir.path().join(&files[4].path), None)
            .unwrap()
            .iter()
            .flat_map(|b| {
                let ids = b.column(col::EVENT_ID).as_string_view();
                (0..b.num_rows())
                    .map(|r| ids.value(r).to_string())
                    .collect::<Vec<_>>()
            })
            .collect();
        all.retain(|e| !big_ids.contains(e.event_id()));
        let mut expected: Vec<&Event> = Vec::new();
        all.sort_by_key(|e| e.received_at);
        let mut kept_ids = HashSet::new();
        for e in &all {
            if kept_ids.insert(e.event_id().to_string()) {
                expected.push(e);
            }
        }
        expected.sort_by(|a, b| {
            (a.campaign(), a.user_id(), a.ts).cmp(&(b.campaign(), b.user_id(), b.ts))
        });
        // Ids are looked at in disjoint hash ranges when there are many: any number of
        // passes drops the same rows.
        let paths: Vec<PathBuf> = files.iter().map(|f| dir.path().join(&f.path)).collect();
        let in_one_pass = rows_to_drop(&paths[..4], &paths[4..], 1).unwrap();
        assert!(!in_one_pass.is_empty());
        assert_eq!(
            rows_to_drop(&paths[..4], &paths[4..], 7).unwrap(),
            in_one_pass
        );
        let (big_bytes, big_path) = (files[4].bytes, files[4].path.clone());
        let manifest = Mutex::new(Manifest {
            wal_flushed_through: 0,
            files,
        });
        let opts = CompactOptions {
            min_files: 2,
            small_bytes: big_bytes,
            max_input_bytes: u64::MAX,
            max_files: 64,
        };
        let outcome = compact(&OsDisk, dir.path(), &manifest, None, opts, |_| {}).unwrap();
        assert_eq!(outcome.files_in, 4);
        let m = manifest.lock().unwrap();
        assert_eq!(m.files.len(), 2);
        let merged = m.files.iter().find(|f| f.path != big_path).unwrap();
        let got: Vec<(String, String, i64, String)> =
            read_file(&dir.path().join(&merged.path), None)
                .unwrap()
                .iter()
                .flat_map(|b| {
                    let s = |c| b.column(c).as_string_view();
                    let ts = b.column(col::TS).as_primitive::<TimestampMicrosecondType>();
                    (0..b.num_rows())
                        .map(|r| {
                            (
                                s(col::CAMPAIGN).value(r).to_string(),
                                s(col::USER_ID).value(r).to_string(),
                                ts.value(r),
                                s(col::EVENT_ID).value(r).to_string(),
                            )
                        })
                        .collect::<Vec<_>>()
                })
                .collect();
        let mut sorted = got.clone();
        sorted.sort_by(|a, b| (&a.0, &a.1, a.2).cmp(&(&b.0, &b.1, b.2)));
        assert_eq!(got, sorted, "the merged file is in file order");
        let got_ids: BTreeMap<String, i64> = got.iter().map(|r| (r.3.clone(), r.2)).collect();
        let want_ids: BTreeMap<String, i64> = expected
            .iter()
            .map(|e| (e.event_id().to_string(), e.ts))
            .collect();
        assert_eq!(got.len(), expected.len());
        assert_eq!(
            got_ids, want_ids,
            "the first received row of each id, none in the big file"
        );
        assert_eq!(outcome.rows_out as usize, expected.len());
    }
}
