//! The write-ahead log: numbered segment files of checksummed records.
//!
//! A record is `[len: u32 LE][crc32: u32 LE][payload]`; one record holds the accepted
//! events of one group commit. The checksum covers the segment's number, then the
//! payload, so a record is valid only in the segment it was written to: segments whose
//! events are flushed are kept as spares and rewritten from their first byte as later
//! segments (an fsync after rewriting allocated blocks commits no file-system journal,
//! one after appending to a new file does: about 40% of the fsync on the benchmark VM),
//! and what is left of a spare's earlier records after the new ones reads as a tail.
//! Segments of older versions, checksummed over the payload alone, are still read.
//! The steps are:
//! - [`Wal::open`] replays every segment after the last flushed one and starts a fresh
//!   segment. A torn or zero-filled tail (what a crash or power loss leaves) is cut at the
//!   last valid record; a bad record with valid ones after it is damage, not a tail: open
//!   refuses, naming the segment and offset, and [`check`] / [`salvage`] report it and
//!   keep every readable record;
//! - [`Wal::append`] writes a record and fsyncs it: only then may a request be acknowledged.
//!   A failed append is cut back, and the segment is abandoned: the next append opens a
//!   new segment whose first record is a cut mark, "segment N ends at byte L", so replay
//!   ignores whatever the failed write left in N even when the cut itself failed;
//! - [`Wal::rotate`] closes the current segment so its events can be flushed to Parquet;
//! - [`Wal::remove_through`] retires segments whose events are in committed Parquet
//!   files: a few become spares for the next segments, the others are deleted.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use funnelhouse_schemas::{Event, EventRef};

use crate::disk::{Disk, DiskFile};
use crate::error::{Result, StorageError};

const HEADER: usize = 8;
const SUFFIX: &str = ".wal";
/// A retired segment kept for reuse, named after the segment it was.
const SPARE_SUFFIX: &str = ".spare";
/// Spares kept: one flush's segment is retired while the next one is written, so two
/// cover a flush that starts before the last one's segment is retired.
const MAX_SPARES: usize = 2;
/// The smallest event a record holds: five string lengths, two times and the
/// properties' length (or the no-properties mark).
const MIN_EVENT_BYTES: usize = 5 * 4 + 2 * 8 + 4;
/// First bytes of a cut mark's payload; an events payload starts with its event count,
/// which never comes near this.
const CUT_MARK: u32 = u32::MAX;
const CUT_MARK_LEN: usize = 4 + 8 + 8;

/// The segment being appended to.
pub struct WalSegment {
    seq: u64,
    path: PathBuf,
    file: Box<dyn DiskFile>,
    len: u64,
    /// A reused spare: the file may hold bytes of its earlier life after `len`.
    reused: bool,
}

/// What replay found, for the start-up log line.
#[derive(Debug, Default, Clone, Copy)]
pub struct ReplayStats {
    pub segments: usize,
    pub records: usize,
    pub events: usize,
    pub dropped_bytes: u64,
}

pub struct Wal {
    dir: PathBuf,
    disk: Arc<dyn Disk>,
    current: WalSegment,
    next_seq: u64,
    /// The last append to `current` failed: the next one starts a new segment.
    failed: bool,
}

impl Wal {
    /// Replay segments numbered after `flushed_through` into `on_record`, delete older
    /// ones, and open a new segment after the last one found.
    pub fn open(
        dir: &Path,
        flushed_through: u64,
        disk: Arc<dyn Disk>,
        mut on_record: impl FnMut(u64, Vec<Event>),
    ) -> Result<(Wal, ReplayStats)> {
        crate::fsutil::create_dir_durable(&*disk, dir)?;
        let mut stats = ReplayStats::default();
        let mut last = flushed_through;
        let segments = list_segments(dir)?;
        let cuts = cut_marks(&segments)?;
        for (seq, path) in segments {
            last = last.max(seq);
            if seq <= flushed_through {
                fs::remove_file(&path).map_err(StorageError::io(&path))?;
                continue;
            }
            stats.segments += 1;
            let data = read_segment(seq, &path, &cuts)?;
            // Records go to `on_record` as they are decoded, so replay holds one record's
            // events at a time, not a segment's. Damage makes open fail, and the caller
            // drops what it was handed.
            let (valid_prefix, damage) = scan_records(seq, &data, true, |_, events| {
                // A cut mark is an empty record.
                if !events.is_empty() {
                    stats.records += 1;
                    stats.events += events.len();
                    on_record(seq, events);
                }
            });
            if let Some(damage) = damage.filter(|d| d.records_after > 0) {
                return Err(StorageError::Corrupt {
                    path: path.clone(),
                    reason: format!(
                        "{damage}; run `funnelhouse wal check` to see it and `funnelhouse wal salvage` to keep every readable record"
                    ),
                });
            }
            let dropped = data.len() as u64 - valid_prefix as u64;
            if dropped > 0 && !cuts.contains_key(&seq) {
                tracing::warn!(
                    segment = %path.display(),
                    dropped_bytes = dropped,
                    kept_bytes = valid_prefix,
                    "WAL segment has a torn, zero-filled or reused tail; cut at the last valid record"
                );
                let f = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(StorageError::io(&path))?;
                f.set_len(valid_prefix as u64)
                    .map_err(StorageError::io(&path))?;
                f.sync_all().map_err(StorageError::io(&path))?;
                stats.dropped_bytes += dropped;
            }
        }
        let current = WalSegment::create(&*disk, dir, last + 1)?;
        Ok((
            Wal {
                dir: dir.to_path_buf(),
                disk,
                current,
                next_seq: last + 2,
                failed: false,
            },
            stats,
        ))
    }

    /// Append one record and fsync it. On error the segment is cut back to its previous
    /// length, so a record that was not acknowledged is not replayed either, and it is
    /// never appended to again: after a failed write or fsync its state on disk is
    /// unknown, and later acknowledged records must not land after garbage. The next
    /// append starts a new segment with a cut mark for this one, which replay obeys even
    /// if the cut here failed or was lost.
    pub fn append(&mut self, payload: &[u8]) -> std::io::Result<std::time::Duration> {
        if self.failed {
            self.start_after_failure()?;
        }
        let seg = &mut self.current;
        match write_record(&mut *seg.file, seg.seq, payload) {
            Ok(d) => {
                seg.len += (HEADER + payload.len()) as u64;
                Ok(d)
            }
            Err(e) => {
                if let Err(cut) = seg.file.set_len(seg.len).and_then(|()| seg.file.sync()) {
                    tracing::error!(segment = %seg.path.display(), error = %cut, "cannot cut a failed WAL append; the next append starts a new segment");
                }
                self.failed = true;
                Err(e)
            }
        }
    }

    /// Open the next segment and make its first record the cut mark of the failed one.
    /// Until that mark is durable, nothing more is appended (and so nothing acknowledged).
    /// A segment whose mark could not be written is left behind (at most a torn tail,
    /// or the same mark) and the next attempt takes the number after it.
    fn start_after_failure(&mut self) -> std::io::Result<()> {
        let mut next = self
            .next_segment()
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let mut mark = Vec::with_capacity(CUT_MARK_LEN);
        mark.extend_from_slice(&CUT_MARK.to_le_bytes());
        mark.extend_from_slice(&self.current.seq.to_le_bytes());
        mark.extend_from_slice(&self.current.len.to_le_bytes());
        write_record(&mut *next.file, next.seq, &mark)?;
        next.len = (HEADER + mark.len()) as u64;
        let failed = std::mem::replace(&mut self.current, next);
        tracing::warn!(
            abandoned = %failed.path.display(),
            valid_bytes = failed.len,
            segment = %self.current.path.display(),
            "WAL continues in a new segment after a failed append"
        );
        self.failed = false;
        Ok(())
    }

    /// Close the current segment and start the next one; returns the closed segment's number.
    /// After a failed append the closed segment is cut by the next one's mark.
    pub fn rotate(&mut self) -> Result<u64> {
        if self.failed {
            self.start_after_failure()
                .map_err(StorageError::io(&self.dir))?;
        }
        let next = self.next_segment()?;
        let closed = std::mem::replace(&mut self.current, next);
        Ok(closed.seq)
    }

    /// Create the next segment. Every attempt takes a new number, so one whose file was
    /// created before a failure is never created again.
    fn next_segment(&mut self) -> Result<WalSegment> {
        let seq = self.next_seq;
        self.next_seq += 1;
        WalSegment::create(&*self.disk, &self.dir, seq)
    }

    /// Events of the segments after `flushed_through`, read without changing anything
    /// (a torn tail is skipped, not cut): for readers of a data dir a server may own.
    pub fn read_unflushed(dir: &Path, flushed_through: u64) -> Result<Vec<Vec<Event>>> {
        let mut out = Vec::new();
        if !dir.exists() {
            return Ok(out);
        }
        let segments = list_segments(dir)?;
        let cuts = cut_marks(&segments)?;
        for (seq, path) in segments {
            if seq <= flushed_through {
                continue;
            }
            let data = match read_segment(seq, &path, &cuts) {
                Ok(d) => d,
                Err(StorageError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    continue;
                }
                Err(e) => return Err(e),
            };
            // Up to the first unreadable record: a live segment's tail is the server's to
            // judge, and a reused one's runs to the end of the file.
            scan_records(seq, &data, false, |_, events| {
                if !events.is_empty() {
                    out.push(events);
                }
            });
        }
        Ok(out)
    }

    pub fn current_seq(&self) -> u64 {
        self.current.seq
    }

    pub fn current_len(&self) -> u64 {
        self.current.len
    }

    /// Retire segments numbered `<= seq`: their events are in committed Parquet files.
    /// The newest become spares (up to [`MAX_SPARES`] in all), the others are deleted.
    /// One that cannot go does not keep the others.
    pub fn remove_through(dir: &Path, seq: u64) -> Result<()> {
        let mut spares = list_spares(dir)?.len();
        let mut first_error = None;
        for (s, path) in list_segments(dir)?.into_iter().rev() {
            if s > seq {
                continue;
            }
            let retired = if spares < MAX_SPARES && reusable(s, &path) {
                spares += 1;
                fs::rename(&path, path.with_extension(&SPARE_SUFFIX[1..]))
            } else {
                fs::remove_file(&path)
            };
            if let Err(e) = retired {
                first_error.get_or_insert(StorageError::io(&path)(e));
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// Whether segment `seq` may become a spare: its first record checks with its number.
/// Rewritten, a spare's first bytes are its earlier life's until the first new record
/// lands; those of an older version's segment (payload-only checksums) would check and
/// replay as the new segment's. (Nor is a directory one: a test makes such a segment.)
fn reusable(seq: u64, path: &Path) -> bool {
    use std::io::Read;
    let Ok(mut file) = fs::File::open(path) else {
        return false;
    };
    let mut record = vec![0u8; HEADER];
    if file.read_exact(&mut record).is_err() {
        return false;
    }
    let len = u32::from_le_bytes(record[..4].try_into().unwrap()) as usize;
    if file
        .metadata()
        .map_or(true, |m| m.len() < (HEADER + len) as u64)
    {
        return false;
    }
    record.resize(HEADER + len, 0);
    file.read_exact(&mut record[HEADER..]).is_ok()
        && checked_payload(&record, 0, Checksum::Segment(seq)).is_ok()
}

impl Drop for Wal {
    /// Cut a reused segment after its records, so that the next start finds no tail to
    /// warn about. Nothing depends on it: after a crash, replay cuts the same bytes.
    fn drop(&mut self) {
        let seg = &mut self.current;
        if seg.reused && !self.failed {
            let cut = seg.file.set_len(seg.len).and_then(|()| seg.file.sync());
            if let Err(e) = cut {
                tracing::debug!(segment = %seg.path.display(), error = %e, "could not cut a reused WAL segment at close");
            }
        }
    }
}

/// Write one framed record of segment `seq` and fsync it; returns the time the fsync and
/// the page-cache release after it took (both delay the ack).
fn write_record(
    file: &mut dyn DiskFile,
    seq: u64,
    payload: &[u8],
) -> std::io::Result<std::time::Duration> {
    let mut header = [0u8; HEADER];
    header[..4].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    header[4..].copy_from_slice(&Checksum::Segment(seq).of(payload).to_le_bytes());
    // Two writes rather than a copy of the payload behind its header: a torn record is
    // a torn record however it was written, and the copy was a megabyte per commit.
    file.write_all(&header)?;
    file.write_all(payload)?;
    let start = Instant::now();
    file.sync()?;
    file.release_synced();
    Ok(start.elapsed())
}

/// What a segment's record checksums cover.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Checksum {
    /// The segment's number, then the payload.
    Segment(u64),
    /// The payload alone: segments written before spares were reused.
    PayloadOnly,
}

impl Checksum {
    fn of(self, payload: &[u8]) -> u32 {
        let mut h = crc32fast::Hasher::new();
        if let Checksum::Segment(seq) = self {
            h.update(&seq.to_le_bytes());
        }
        h.update(payload);
        h.finalize()
    }

    /// How segment `seq`'s records are checksummed: as its first record that checks
    /// either way, at its start or (with `search`, after damage there) further on. Only
    /// an older version's segments checksum over the payload alone, and they never
    /// become spares ([`Wal::remove_through`]): a reused file's earlier records cannot
    /// pass for them.
    fn of_segment(seq: u64, data: &[u8], search: bool) -> Self {
        let segment = Checksum::Segment(seq);
        let starts = if search { data.len() } else { 1 };
        for at in 0..starts {
            if checked_payload(data, at, segment).is_ok() {
                return segment;
            }
            if checked_payload(data, at, Checksum::PayloadOnly).is_ok() {
                return Checksum::PayloadOnly;
            }
        }
        segment
    }
}

impl WalSegment {
    /// Start segment `seq`, in a spare's file when there is one.
    fn create(disk: &dyn Disk, dir: &Path, seq: u64) -> Result<Self> {
        let path = dir.join(format!("{seq:020}{SUFFIX}"));
        // A spare is an option: a directory that cannot be listed just means a new file.
        let spare = list_spares(dir).ok().and_then(|mut spares| spares.pop());
        let reused = spare.and_then(|spare| match disk.reuse(&spare, &path) {
            Ok(file) => Some(file),
            Err(e) if e.kind() == std::io::ErrorKind::Unsupported => None,
            Err(e) => {
                tracing::warn!(spare = %spare.display(), error = %e, "cannot reuse a WAL spare; removing it and creating a new segment");
                let _ = fs::remove_file(&spare);
                None
            }
        });
        let (file, reused) = match reused {
            Some(file) => (file, true),
            None => (disk.create(&path).map_err(StorageError::io(&path))?, false),
        };
        crate::fsutil::sync_dir(disk, dir)?;
        Ok(WalSegment {
            seq,
            path,
            file,
            len: 0,
            reused,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The cut marks of `segments`: segment number -> bytes of it that count.
fn cut_marks(segments: &[(u64, PathBuf)]) -> Result<HashMap<u64, u64>> {
    use std::io::Read;
    let mut cuts = HashMap::new();
    for &(seq, ref path) in segments {
        let mut head = Vec::with_capacity(HEADER + CUT_MARK_LEN);
        match fs::File::open(path) {
            Ok(f) => f
                .take((HEADER + CUT_MARK_LEN) as u64)
                .read_to_end(&mut head)
                .map_err(StorageError::io(path))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(StorageError::io(path)(e)),
        };
        let checksum = Checksum::of_segment(seq, &head, false);
        if let Some((seq, len)) = read_record(&head, 0, checksum).ok().and_then(|r| r.cut) {
            let at = cuts.entry(seq).or_insert(len);
            *at = (*at).min(len);
        }
    }
    Ok(cuts)
}

/// A segment's bytes, up to its cut mark if a later segment has one.
fn read_segment(seq: u64, path: &Path, cuts: &HashMap<u64, u64>) -> Result<Vec<u8>> {
    let mut data = fs::read(path).map_err(StorageError::io(path))?;
    if let Some(&len) = cuts.get(&seq) {
        data.truncate(len as usize);
    }
    Ok(data)
}

fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    list_numbered(dir, SUFFIX)
}

/// Spare files, oldest first.
fn list_spares(dir: &Path) -> Result<Vec<PathBuf>> {
    Ok(list_numbered(dir, SPARE_SUFFIX)?
        .into_iter()
        .map(|(_, path)| path)
        .collect())
}

/// Files named `<number><suffix>` in `dir`, by number.
fn list_numbered(dir: &Path, suffix: &str) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(StorageError::io(dir))? {
        let path = entry.map_err(StorageError::io(dir))?.path();
        if let Some(seq) = numbered(&path, suffix) {
            out.push((seq, path));
        }
    }
    out.sort();
    Ok(out)
}

fn numbered(path: &Path, suffix: &str) -> Option<u64> {
    let name = path.file_name()?.to_str()?;
    name.strip_suffix(suffix)?.parse().ok()
}

/// The number of the segment file at `path` (what [`scan_segment`] takes).
pub fn segment_number(path: &Path) -> Option<u64> {
    numbered(path, SUFFIX)
}

/// What a segment holds: its readable records, and where it stops being readable.
#[derive(Debug, Default)]
pub struct SegmentScan {
    /// (offset, events) of every readable record, the ones after damage included.
    pub records: Vec<(usize, Vec<Event>)>,
    /// Length of the run of readable records from the start.
    pub valid_prefix: usize,
    /// The first unreadable record, if any.
    pub damage: Option<Damage>,
}

/// An unreadable record. With `records_after == 0` it is a tail (torn by a crash,
/// zero-filled by a power loss) and is cut; otherwise readable records follow it.
#[derive(Debug, Clone)]
pub struct Damage {
    pub offset: usize,
    pub reason: String,
    pub records_after: usize,
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "unreadable record at byte offset {} ({}) with {} readable records after it",
            self.offset, self.reason, self.records_after
        )
    }
}

/// A readable record: the events of a group commit, or a cut mark.
struct Record {
    events: Vec<Event>,
    /// (segment, valid bytes) of a cut mark.
    cut: Option<(u64, u64)>,
    len: usize,
}

/// The record at `pos`, or why it is unreadable.
fn read_record(
    data: &[u8],
    pos: usize,
    checksum: Checksum,
) -> std::result::Result<Record, Cow<'static, str>> {
    let (payload, is_cut) = checked_payload(data, pos, checksum)?;
    let len = HEADER + payload.len();
    if is_cut {
        let word = |i: usize| u64::from_le_bytes(payload[i..i + 8].try_into().unwrap());
        return Ok(Record {
            events: Vec::new(),
            cut: Some((word(4), word(12))),
            len,
        });
    }
    Ok(Record {
        events: decode_events(payload).map_err(Cow::Owned)?,
        cut: None,
        len,
    })
}

/// The payload of the record at `pos` if its checksum matches, and whether it is a cut
/// mark; or why not (a fixed reason: resynchronising over a damaged or reused segment's
/// bytes gets one per byte).
fn checked_payload(
    data: &[u8],
    pos: usize,
    checksum: Checksum,
) -> std::result::Result<(&[u8], bool), Cow<'static, str>> {
    let header = data
        .get(pos..pos + HEADER)
        .ok_or("header cut short (torn write)")?;
    let len = u32::from_le_bytes(header[..4].try_into().unwrap()) as usize;
    let crc = u32::from_le_bytes(header[4..].try_into().unwrap());
    if len == 0 {
        // Never written (a record holds at least its event count): zero fill.
        return Err("zero length (zero-filled)".into());
    }
    let payload = data
        .get(pos + HEADER..pos + HEADER + len)
        .ok_or("payload cut short (torn write)")?;
    let count = u32::from_le_bytes(
        payload
            .get(..4)
            .ok_or("no event count")?
            .try_into()
            .unwrap(),
    );
    let is_cut = len == CUT_MARK_LEN && count == CUT_MARK;
    let count = count as usize;
    if !is_cut
        && (len - 4 < count.saturating_mul(MIN_EVENT_BYTES)
            || !first_events_fit(&payload[4..], count))
    {
        return Err("events do not fit the record's length".into());
    }
    if checksum.of(payload) != crc {
        return Err("checksum mismatch".into());
    }
    Ok((payload, is_cut))
}

/// Whether the first events of a record's payload (after its count) read as
/// [`encode_events`] writes them, each within the payload. A cheap test, before
/// the checksum, of whether an offset can hold a record at all: resynchronising over a
/// damaged or reused segment tries every byte, and the length read at most of them
/// spans megabytes, each checksummed in full (7 s over one reused 100 MB segment).
fn first_events_fit(mut buf: &[u8], count: usize) -> bool {
    const CHECKED: usize = 4;
    (0..count.min(CHECKED)).all(|_| take_event(&mut buf).is_ok())
        && (count > CHECKED || buf.is_empty())
}

/// Read segment `seq`: records from the start until one is unreadable; then, to tell a
/// tail from damage, every later offset that holds a readable record.
pub fn scan_segment(seq: u64, data: &[u8]) -> SegmentScan {
    let mut records = Vec::new();
    let (valid_prefix, damage) = scan_records(seq, data, true, |bytes, events| {
        records.push((bytes.start, events))
    });
    SegmentScan {
        records,
        valid_prefix,
        damage,
    }
}

/// [`scan_segment`], handing each readable record (its bytes in `data`, its events) to
/// `on_record` as it is decoded instead of collecting them; returns the valid prefix and
/// the damage.
/// Without `resync`, it stops at the first unreadable record (`records_after` stays 0).
fn scan_records(
    seq: u64,
    data: &[u8],
    resync: bool,
    mut on_record: impl FnMut(Range<usize>, Vec<Event>),
) -> (usize, Option<Damage>) {
    let checksum = Checksum::of_segment(seq, data, resync);
    let mut pos = 0;
    let mut damage = None;
    while pos < data.len() {
        match read_record(data, pos, checksum) {
            Ok(r) => {
                on_record(pos..pos + r.len, r.events);
                pos += r.len;
            }
            Err(reason) => {
                damage = Some(Damage {
                    offset: pos,
                    reason: reason.into_owned(),
                    records_after: 0,
                });
                break;
            }
        }
    }
    let Some(found) = damage.as_mut().filter(|_| resync) else {
        return (pos, damage);
    };
    if data[pos..].iter().all(|&b| b == 0) {
        return (pos, damage);
    }
    // Resynchronise: a readable record can start at any later byte.
    let mut at = pos + 1;
    while at + HEADER <= data.len() {
        match read_record(data, at, checksum) {
            Ok(r) => {
                on_record(at..at + r.len, r.events);
                found.records_after += 1;
                at += r.len;
            }
            Err(_) => at += 1,
        }
    }
    (pos, damage)
}

/// One segment as `funnelhouse wal check` reports it.
#[derive(Debug)]
pub struct SegmentReport {
    pub seq: u64,
    pub path: PathBuf,
    pub bytes: usize,
    pub records: usize,
    pub events: usize,
    pub damage: Option<Damage>,
}

impl SegmentReport {
    fn of(seq: u64, path: PathBuf, data: &[u8], scan: &SegmentScan) -> Self {
        Self {
            seq,
            path,
            bytes: data.len(),
            records: scan.records.len(),
            events: scan.records.iter().map(|(_, e)| e.len()).sum(),
            damage: scan.damage.clone(),
        }
    }
}

/// Every segment of `data_dir/wal`: what is readable and where it is damaged. Changes
/// nothing.
pub fn check(wal_dir: &Path) -> Result<Vec<SegmentReport>> {
    let mut out = Vec::new();
    if !wal_dir.exists() {
        return Ok(out);
    }
    let segments = list_segments(wal_dir)?;
    let cuts = cut_marks(&segments)?;
    for (seq, path) in segments {
        let data = read_segment(seq, &path, &cuts)?;
        out.push(SegmentReport::of(
            seq,
            path,
            &data,
            &scan_segment(seq, &data),
        ));
    }
    Ok(out)
}

/// Rewrite every segment with damage before its tail so that it holds each readable
/// record, in order, and nothing else; the original is kept as `<segment>.damaged`.
/// Returns the segments rewritten. The data dir must not be in use (the caller locks it).
pub fn salvage(wal_dir: &Path) -> Result<Vec<SegmentReport>> {
    let mut out = Vec::new();
    for report in check(wal_dir)? {
        if report.damage.as_ref().is_none_or(|d| d.records_after == 0) {
            continue;
        }
        let path = &report.path;
        let data = fs::read(path).map_err(StorageError::io(path))?;
        let mut clean = Vec::with_capacity(data.len());
        scan_records(report.seq, &data, true, |bytes, _| {
            clean.extend_from_slice(&data[bytes]);
        });
        let mut keep = path.clone().into_os_string();
        keep.push(".damaged");
        fs::copy(path, &keep).map_err(StorageError::io(PathBuf::from(&keep)))?;
        crate::fsutil::write_atomic(&crate::disk::OsDisk, path, &clean)?;
        out.push(report);
    }
    Ok(out)
}

// ---- record payload: the events of one group commit ----

const NO_PROPERTIES: u32 = u32::MAX;

/// Append the binary encoding of `events` to `out`: their count, then each event.
pub fn encode_events<'a>(events: impl ExactSizeIterator<Item = &'a Event>, out: &mut Vec<u8>) {
    out.extend_from_slice(&(events.len() as u32).to_le_bytes());
    for e in events {
        encode_event(e, out);
    }
}

fn encode_event(e: &Event, out: &mut Vec<u8>) {
    for s in [
        e.event_id(),
        e.event(),
        e.user_id(),
        e.campaign(),
        e.channel(),
    ] {
        put_str(out, s);
    }
    out.extend_from_slice(&e.ts.to_le_bytes());
    out.extend_from_slice(&e.received_at.to_le_bytes());
    match e.properties() {
        Some(p) => put_str(out, p),
        None => out.extend_from_slice(&NO_PROPERTIES.to_le_bytes()),
    }
}

/// One request's events encoded as they go into a record, by the request's own task, so
/// that the WAL writer only copies bytes; where each event ends lets it leave duplicates
/// out without decoding anything.
#[derive(Debug)]
pub struct EncodedEvents {
    bytes: Vec<u8>,
    ends: Vec<usize>,
}

impl EncodedEvents {
    pub fn new(events: &[Event]) -> Self {
        let size = (events.iter())
            .map(|e| e.heap_bytes() + MIN_EVENT_BYTES)
            .sum();
        let mut out = EncodedEvents {
            bytes: Vec::with_capacity(size),
            ends: Vec::with_capacity(events.len()),
        };
        for e in events {
            encode_event(e, &mut out.bytes);
            out.ends.push(out.bytes.len());
        }
        out
    }

    /// The bytes of event `i`.
    fn event(&self, i: usize) -> &[u8] {
        let start = i.checked_sub(1).map_or(0, |p| self.ends[p]);
        &self.bytes[start..self.ends[i]]
    }
}

/// The payload of one record, built from requests' encoded events. The writer keeps one
/// between commits: a fresh megabyte per commit is fresh memory for the OS to fault in.
#[derive(Debug, Default)]
pub struct RecordPayload {
    bytes: Vec<u8>,
}

impl RecordPayload {
    /// The payload of a record of `parts`: each request's events, or those of them its
    /// mask keeps (as `encode_events` would write them).
    pub fn build<'a>(
        &mut self,
        parts: impl IntoIterator<Item = (&'a EncodedEvents, Option<&'a [bool]>)>,
    ) -> &[u8] {
        /// Past this a payload's buffer is not kept for the next record.
        const KEEP: usize = 16 << 20;
        if self.bytes.capacity() > KEEP {
            self.bytes = Vec::new();
        }
        self.bytes.clear();
        self.bytes.extend_from_slice(&[0; 4]);
        let mut count = 0u32;
        for (events, keep) in parts {
            match keep {
                None => {
                    self.bytes.extend_from_slice(&events.bytes);
                    count += events.ends.len() as u32;
                }
                Some(keep) => {
                    debug_assert_eq!(keep.len(), events.ends.len());
                    for (i, _) in keep.iter().enumerate().filter(|(_, k)| **k) {
                        self.bytes.extend_from_slice(events.event(i));
                        count += 1;
                    }
                }
            }
        }
        self.bytes[..4].copy_from_slice(&count.to_le_bytes());
        &self.bytes
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

pub fn decode_events(mut buf: &[u8]) -> std::result::Result<Vec<Event>, String> {
    let n = take_u32(&mut buf)? as usize;
    let mut events = Vec::with_capacity(n.min(1 << 20));
    for _ in 0..n {
        events.push(Event::from(take_event(&mut buf)?));
    }
    if !buf.is_empty() {
        return Err(format!("{} trailing bytes in a WAL record", buf.len()));
    }
    Ok(events)
}

/// The next event of a record's payload, as [`encode_event`] wrote it, borrowed from it.
fn take_event<'a>(buf: &mut &'a [u8]) -> std::result::Result<EventRef<'a>, &'static str> {
    let event_id = take_str(buf)?;
    let event = take_str(buf)?;
    let user_id = take_str(buf)?;
    let campaign = take_str(buf)?;
    let channel = take_str(buf)?;
    let ts = take_i64(buf)?;
    let received_at = take_i64(buf)?;
    let properties = if buf.get(..4) == Some(&NO_PROPERTIES.to_le_bytes()[..]) {
        *buf = &buf[4..];
        None
    } else {
        Some(take_str(buf)?)
    };
    Ok(EventRef {
        event_id,
        event,
        user_id,
        campaign,
        channel,
        ts,
        received_at,
        properties,
    })
}

fn take<'a>(buf: &mut &'a [u8], n: usize) -> std::result::Result<&'a [u8], &'static str> {
    if buf.len() < n {
        return Err("truncated WAL record");
    }
    let (head, tail) = buf.split_at(n);
    *buf = tail;
    Ok(head)
}

fn take_u32(buf: &mut &[u8]) -> std::result::Result<u32, &'static str> {
    Ok(u32::from_le_bytes(take(buf, 4)?.try_into().unwrap()))
}

fn take_i64(buf: &mut &[u8]) -> std::result::Result<i64, &'static str> {
    Ok(i64::from_le_bytes(take(buf, 8)?.try_into().unwrap()))
}

fn take_str<'a>(buf: &mut &'a [u8]) -> std::result::Result<&'a str, &'static str> {
    let n = take_u32(buf)? as usize;
    std::str::from_utf8(take(buf, n)?).map_err(|_| "non-UTF-8 string in a WAL record")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A `scan` event with id `id` (also the storage crate's other tests' event).
    pub(crate) fn event(id: &str, props: Option<&str>) -> Event {
        Event::from(EventRef {
            event_id: id,
            event: "scan",
            user_id: "u",
            campaign: "c",
            channel: "",
            ts: 1,
            received_at: 2,
            properties: props,
        })
    }

    /// A record built from requests' encoded events, some left out by a mask, is the
    /// record `encode_events` writes of the kept events, and decodes back to them.
    #[test]
    fn a_record_of_encoded_requests_is_the_record_of_their_kept_events() {
        let first = [event("a", None), event("b", Some("{\"x\":1}"))];
        let second = [
            event("c", Some("")),
            event("d", None),
            event("e", Some("{}")),
        ];
        let (enc1, enc2) = (EncodedEvents::new(&first), EncodedEvents::new(&second));
        let mut payload = RecordPayload::default();
        let keep = [true, false, true];
        let built = payload
            .build([(&enc1, None), (&enc2, Some(&keep[..]))])
            .to_vec();
        let kept = [&first[0], &first[1], &second[0], &second[2]];
        let mut expected = Vec::new();
        encode_events(kept.into_iter(), &mut expected);
        assert_eq!(built, expected);
        assert_eq!(decode_events(&built).unwrap(), kept.map(Clone::clone));
        // The buffer is reused: a second record holds only its own events.
        let again = payload.build([(&enc2, None)]).to_vec();
        assert_eq!(decode_events(&again).unwrap(), second);
    }

    #[test]
    fn torn_tail_is_cut_and_earlier_records_survive() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path(), 0, Arc::new(crate::disk::OsDisk), |_, _| {
            panic!("empty")
        })
        .unwrap();
        for i in 0..3 {
            let mut buf = Vec::new();
            let e = event(&format!("e{i}"), (i == 1).then_some("{\"a\":1}"));
            encode_events([&e].into_iter(), &mut buf);
            wal.append(&buf).unwrap();
        }
        let path = wal.current.path().to_path_buf();
        drop(wal);
        let full = fs::metadata(&path).unwrap().len();
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(full - 3).unwrap();
        let mut seen = Vec::new();
        let (wal, stats) = Wal::open(dir.path(), 0, Arc::new(crate::disk::OsDisk), |_, evs| {
            seen.extend(evs)
        })
        .unwrap();
        assert_eq!(
            seen,
            vec![event("e0", None), event("e1", Some("{\"a\":1}"))]
        );
        assert!(stats.dropped_bytes > 0);
        assert_eq!(wal.current_seq(), 2);
    }

    fn record_of(events: &[Event]) -> Vec<u8> {
        let mut buf = Vec::new();
        encode_events(events.iter(), &mut buf);
        buf
    }

    /// A framed record as older versions wrote it: the checksum over the payload alone.
    fn older_record(events: &[Event]) -> Vec<u8> {
        let payload = record_of(events);
        let mut record = (payload.len() as u32).to_le_bytes().to_vec();
        record.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        record.extend_from_slice(&payload);
        record
    }

    /// A retired segment is rewritten as a later one. After a crash (no close to cut it),
    /// replay reads the new records and cuts the old ones as a tail: they were
    /// checksummed with another segment's number.
    #[test]
    fn a_reused_spare_replays_only_its_own_records() {
        let dir = tempfile::tempdir().unwrap();
        let disk = || Arc::new(crate::disk::OsDisk);
        let (mut wal, _) = Wal::open(dir.path(), 0, disk(), |_, _| panic!("empty")).unwrap();
        for i in 0..50 {
            let e = event(&format!("old{i}"), Some("{\"pad\":\"xxxxxxxxxxxxxxxx\"}"));
            wal.append(&record_of(&[e])).unwrap();
        }
        let flushed = wal.rotate().unwrap();
        Wal::remove_through(dir.path(), flushed).unwrap();
        let spare = dir.path().join(format!("{flushed:020}{SPARE_SUFFIX}"));
        let old_len = fs::metadata(&spare).unwrap().len();
        assert!(old_len > 0, "the flushed segment is kept as a spare");
        let sealed = wal.rotate().unwrap();
        assert!(!spare.exists(), "the next segment took the spare");
        assert!(wal.current.reused);
        wal.append(&record_of(&[event("new", None)])).unwrap();
        let path = wal.current.path().to_path_buf();
        assert_eq!(
            fs::metadata(&path).unwrap().len(),
            old_len,
            "rewritten in place"
        );
        std::mem::forget(wal); // a crash: no close

        let mut seen = Vec::new();
        let (wal, stats) =
            Wal::open(dir.path(), sealed - 1, disk(), |_, evs| seen.extend(evs)).unwrap();
        assert_eq!(seen, vec![event("new", None)]);
        assert!(stats.dropped_bytes > 0, "the old records are cut as a tail");
        assert!(fs::metadata(&path).unwrap().len() < old_len);

        // A clean close cuts a reused segment after its records.
        let mut wal = wal;
        let flushed = wal.rotate().unwrap();
        Wal::remove_through(dir.path(), flushed).unwrap();
        wal.rotate().unwrap();
        assert!(wal.current.reused);
        let record = record_of(&[event("z", None)]);
        wal.append(&record).unwrap();
        let path = wal.current.path().to_path_buf();
        assert!(fs::metadata(&path).unwrap().len() > (HEADER + record.len()) as u64);
        drop(wal);
        assert_eq!(
            fs::metadata(&path).unwrap().len(),
            (HEADER + record.len()) as u64
        );
        for report in check(dir.path()).unwrap() {
            assert!(report.damage.is_none(), "{report:?}");
        }
    }

    /// An older version's segment never becomes a spare: rewritten, its first record
    /// would check as the new segment's until the first new one lands.
    #[test]
    fn only_segments_of_this_version_become_spares() {
        let dir = tempfile::tempdir().unwrap();
        let older = older_record(&[event("a", None)]);
        fs::write(dir.path().join(format!("{:020}{SUFFIX}", 1)), older).unwrap();
        let (mut wal, _) =
            Wal::open(dir.path(), 0, Arc::new(crate::disk::OsDisk), |_, _| {}).unwrap();
        wal.append(&record_of(&[event("b", None)])).unwrap();
        let sealed = wal.rotate().unwrap();
        Wal::remove_through(dir.path(), sealed).unwrap();
        let spares = list_spares(dir.path()).unwrap();
        assert_eq!(
            spares,
            [dir.path().join(format!("{sealed:020}{SPARE_SUFFIX}"))],
            "segment 1 (older) deleted, segment {sealed} kept"
        );
    }

    /// Segments written before records were checksummed with their segment's number
    /// are still replayed, and damage to their first record is still damage.
    #[test]
    fn segments_checksummed_over_the_payload_alone_are_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = [
            older_record(&[event("a", None)]),
            older_record(&[event("b", None)]),
        ];
        let segment = dir.path().join(format!("{:020}{SUFFIX}", 1));
        let mut damaged = bytes.concat();
        damaged[HEADER + 6] ^= 0xff;
        fs::write(&segment, &damaged).unwrap();
        let refused = Wal::open(dir.path(), 0, Arc::new(crate::disk::OsDisk), |_, _| {});
        let message = refused.err().expect("damage refuses the open").to_string();
        assert!(message.contains("byte offset 0"), "{message}");

        fs::write(&segment, bytes.concat()).unwrap();
        let mut seen = Vec::new();
        let (wal, stats) = Wal::open(dir.path(), 0, Arc::new(crate::disk::OsDisk), |_, evs| {
            seen.extend(evs)
        })
        .unwrap();
        assert_eq!(seen, vec![event("a", None), event("b", None)]);
        assert_eq!(stats.dropped_bytes, 0);
        assert_eq!(wal.current_seq(), 2);
    }

    /// Synced WAL bytes leave the page cache at once (all but the last partial page), and
    /// replay still reads every record back from the disk.
    #[cfg(target_os = "linux")]
    #[test]
    fn synced_records_leave_the_page_cache() {
        use std::os::fd::AsRawFd;
        let dir = tempfile::tempdir().unwrap();
        // tmpfs pages are the file itself: nothing to release there.
        // SAFETY: statfs fills the struct it is given.
        let mut fs_info: libc::statfs = unsafe { std::mem::zeroed() };
        let c_dir = std::ffi::CString::new(dir.path().as_os_str().as_encoded_bytes()).unwrap();
        assert_eq!(unsafe { libc::statfs(c_dir.as_ptr(), &mut fs_info) }, 0);
        if fs_info.f_type == libc::TMPFS_MAGIC {
            eprintln!("skipped: {} is on tmpfs", dir.path().display());
            return;
        }
        let (mut wal, _) = Wal::open(dir.path(), 0, Arc::new(crate::disk::OsDisk), |_, _| {
            panic!("empty")
        })
        .unwrap();
        let props = format!("{{\"pad\":\"{}\"}}", "x".repeat(3000));
        for i in 0..100 {
            let mut buf = Vec::new();
            encode_events(
                [&event(&format!("e{i}"), Some(&props))].into_iter(),
                &mut buf,
            );
            wal.append(&buf).unwrap();
        }
        let path = wal.current.path().to_path_buf();
        let file = fs::File::open(&path).unwrap();
        let len = file.metadata().unwrap().len() as usize;
        // SAFETY: sysconf reads a constant of the system.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let pages = len.div_ceil(page);
        let mut resident = vec![0u8; pages];
        // Safety: a read-only shared mapping of a file this test owns, unmapped below.
        unsafe {
            let map = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            );
            assert_ne!(map, libc::MAP_FAILED);
            assert_eq!(libc::mincore(map, len, resident.as_mut_ptr()), 0);
            libc::munmap(map, len);
        }
        let cached = resident.iter().filter(|r| **r & 1 == 1).count();
        assert!(
            cached <= 1,
            "{cached} of {pages} WAL pages still in the page cache after sync"
        );
        drop(wal);
        let mut seen = 0;
        Wal::open(dir.path(), 0, Arc::new(crate::disk::OsDisk), |_, evs| {
            assert_eq!(evs[0].properties(), Some(props.as_str()));
            seen += evs.len();
        })
        .unwrap();
        assert_eq!(seen, 100);
    }
}
