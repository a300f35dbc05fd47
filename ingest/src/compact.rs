//! Compaction: merge the small files of a partition into one, dropping late duplicates
//! (an event_id stored twice because its resend came after the dedup window). The new
//! file replaces the old ones in one manifest commit, so a crash leaves either set.
//!
//! Every file a flush wrote (named `f...`) goes through compaction once, however big, so
//! each stored row is checked against the partition's other files: a late duplicate
//! cannot hide in two big files. The merge reads and writes without holding the
//! manifest; only the commit takes it, so flushes commit while a compaction runs.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::Mutex;

use arrow::array::{AsArray, RecordBatch, UInt32Array};
use arrow::compute::{concat_batches, sort_to_indices, take_record_batch};
use funnelhouse_schemas::arrow::col;
use funnelhouse_schemas::event_schema;

use crate::dedup::id_hash;
use crate::disk::Disk;
use crate::error::Result;
use crate::manifest::{FileMeta, Manifest};
use crate::parquet_file::{read_batches, read_file, write_sorted_file};

#[derive(Debug, Clone, Copy)]
pub struct CompactOptions {
    /// A partition is compacted once it has this many small files.
    pub min_files: usize,
    /// Files below this size are small.
    pub small_bytes: u64,
    /// Most input bytes merged in one step, to bound memory.
    pub max_input_bytes: u64,
}

impl CompactOptions {
    /// The `[ingest]` settings; `min_files` differs between background and offline runs.
    pub fn from_config(cfg: &crate::config::IngestConfig, min_files: usize) -> Self {
        let small = cfg.compact_small_bytes.0 as u64;
        Self {
            min_files,
            small_bytes: small,
            max_input_bytes: 4 * small,
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
        let mut budget = 0;
        let mut taken = 0;
        // Within the input budget, but always at least one file, so a big flush file
        // (at most one flush's worth) is checked too.
        small.retain(|f| {
            budget += f.bytes;
            taken += 1;
            taken == 1 || budget <= opts.max_input_bytes
        });
        // One small file is still worth rewriting when big ones may hold its late duplicates.
        if small.len() == 1 && big.is_empty() && !from_flush(small[0]) {
            continue;
        }
        let mut batches = Vec::new();
        for f in &small {
            batches.extend(read_file(&data_dir.join(&f.path), None)?);
        }
        let merged = concat_batches(&event_schema(), &batches)?;
        // Which of the merged ids a big file already holds: the big files' ids are
        // streamed past the merged ones, so memory follows the small files' size, not
        // the partition's.
        let merged_ids: HashSet<u128> = merged
            .column(col::EVENT_ID)
            .as_string_view()
            .iter()
            .flatten()
            .map(id_hash)
            .collect();
        let mut seen = HashSet::new();
        for f in &big {
            for b in read_batches(&data_dir.join(&f.path), Some(&[col::EVENT_ID]))? {
                let b = b?;
                let ids = b.column(0).as_string_view().iter().flatten().map(id_hash);
                seen.extend(ids.filter(|h| merged_ids.contains(h)));
            }
        }
        let kept = first_received_per_id(&merged, seen)?;
        let meta = write_sorted_file(disk, data_dir, &kept, partition, "c")?;
        tracing::info!(
            partition,
            files = small.len(),
            rows_in = merged.num_rows(),
            rows_out = kept.num_rows(),
            "compacted"
        );
        out.partitions += 1;
        out.files_in += small.len();
        out.rows_in += merged.num_rows() as u64;
        out.rows_out += kept.num_rows() as u64;
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

/// Keep, per event_id, the first received row, and none whose id is in `seen`.
fn first_received_per_id(batch: &RecordBatch, mut seen: HashSet<u128>) -> Result<RecordBatch> {
    let order = sort_to_indices(batch.column(col::RECEIVED_AT), None, None)?;
    let ids = batch.column(col::EVENT_ID).as_string_view();
    let keep: UInt32Array = order
        .values()
        .iter()
        .copied()
        .filter(|&i| seen.insert(id_hash(ids.value(i as usize))))
        .collect();
    Ok(take_record_batch(batch, &keep)?)
}
